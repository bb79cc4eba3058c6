"""`dtrain <command>`: thin dispatch to the parts that do the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dtrain.errors import DtrainError


def _config_show(args: argparse.Namespace) -> int:
    from dtrain.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    from dtrain.config import describe_keys

    print(describe_keys(markdown=args.markdown))
    return 0


def _fetch_examples(args: argparse.Namespace) -> int:
    from dtrain.data.examples import cache_dir, fetch_examples, format_summary

    manifests = fetch_examples(args.only or None, args.cache, force=args.force)
    print(format_summary(manifests, cache_dir(args.cache)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="A distributed trainer for BERT models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    config = sub.add_parser("config", help="show the resolved configuration or list every key")
    config_sub = config.add_subparsers(dest="config_command", metavar="<show|keys>", required=True)
    show = config_sub.add_parser("show", help="print the config resolved from --config and key=value overrides")
    show.add_argument("--config", help="YAML config file (may name a base: file it extends)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-5")
    show.set_defaults(func=_config_show)
    keys = config_sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.add_argument("--markdown", action="store_true", help="print a Markdown table (as in README.md)")
    keys.set_defaults(func=_config_keys)

    fetch = sub.add_parser("fetch-examples", help="fetch the example BERT weights and datasets into the cache")
    fetch.add_argument("--cache", help="cache root (default: $DTRAIN_CACHE or ~/.cache/dtrain)")
    fetch.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these examples")
    fetch.add_argument("--force", action="store_true", help="rebuild even when the cached copy verifies")
    fetch.set_defaults(func=_fetch_examples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DtrainError as e:
        print(f"dtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
