"""`dtrain <command>`: thin dispatch to the parts that do the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dtrain.errors import DtrainError


def _config_show(args: argparse.Namespace) -> int:
    from dtrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.get is None:
        print(cfg.to_yaml(), end="")
        return 0
    value = cfg
    for part in args.get.split("."):
        if not hasattr(value, "__dataclass_fields__") or part not in value.__dataclass_fields__:
            raise DtrainError(f"--get {args.get}: no such config key; `dtrain config keys` lists them")
        value = getattr(value, part)
    print("" if value is None else value)
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


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1 << 10, "K": 1 << 10, "MB": 1 << 20, "M": 1 << 20, "GB": 1 << 30, "G": 1 << 30}
    number = text.rstrip("KMGBkmgb")
    unit = text[len(number):].upper()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64MB or 1GB") from None


def _prepare(args: argparse.Namespace) -> int:
    from dtrain.data import prepare
    from dtrain.data.examples import example_or_path

    common = {"out": args.out, "tokenizer": example_or_path(args.tokenizer), "max_seq_len": args.max_seq_len,
              "workers": args.workers, "shard_bytes": args.shard_size, "overwrite": args.overwrite,
              "command": "dtrain " + " ".join(sys.argv[1:])}
    if args.prepare_command == "pretrain":
        manifest = prepare.prepare_pretrain(args.inputs, text_field=args.text_field, doc_split=args.doc_split,
                                            short_seq_prob=args.short_seq_prob, **common)
        print(f"{args.out}: {manifest['rows']} samples from {manifest['documents']} documents, "
              f"{manifest['sentences']} sentences, {manifest['total_tokens']} tokens in {len(manifest['shards'])} "
              f"shard(s)")
    else:
        from dtrain.tasks import prepare_finetune

        manifest = prepare_finetune(args.inputs, task=args.task, text_field=args.text_field,
                                    text_pair_field=args.text_pair_field, label_field=args.label_field,
                                    labels=args.labels, doc_stride=args.doc_stride, truncation=args.truncation,
                                    head_share=args.head_share, windows=args.windows, max_windows=args.max_windows,
                                    **common)
        cap = f", {manifest['truncated_documents']} cut at --max-windows {args.max_windows}" if args.max_windows \
            else ""
        cut = (f"{manifest['documents']} documents in windows of {args.max_seq_len}{cap}" if args.windows else
               f"{manifest['truncated']} cut to {args.max_seq_len}" + (f" at the {args.truncation.replace('_', '+')}"
                                                                      if args.truncation != "head" else ""))
        print(f"{args.out}: {manifest['rows']} {manifest['task']} rows, {manifest['num_labels']} labels, "
              f"{manifest['total_tokens']} tokens ({cut}) in {len(manifest['shards'])} shard(s)")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.command == "pretrain":
        from dtrain.pretrain import main
    else:
        from dtrain.finetune import main
    return main(args.args)


def _export(args: argparse.Namespace) -> int:
    from dtrain.export import export

    ckpt = export(args.source, args.out, overwrite=args.overwrite)
    print(f"{args.out}: Hugging Face model from {ckpt}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dtrain.predict import predict

    n = predict(args.model, args.input, args.output, args.text_field, args.text_pair_field, args.question_field,
                args.context_field, args.batch_size, args.max_seq_len, args.threshold, args.overwrite, args.prompt,
                args.window_pooling)
    print(f"{args.output}: {n} predictions")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dtrain.predict import evaluate

    evaluate(args.model, args.data, args.batch_size, args.threshold, args.output, args.overwrite, args.prompt,
             args.window_pooling)
    return 0


class _TaskNames:
    """argparse choices: the registry's task names, imported (with torch) only when --task is given or help shown."""

    def _names(self) -> list[str]:
        from dtrain.tasks import TASKS

        return list(TASKS)

    def __iter__(self):  # noqa: ANN204
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


def build_parser() -> argparse.ArgumentParser:
    from dtrain.data.windows import POOLINGS, TRUNCATIONS

    parser = argparse.ArgumentParser(prog="dtrain", description="A distributed trainer for BERT models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    config = sub.add_parser("config", help="show the resolved configuration or list every key")
    config_sub = config.add_subparsers(dest="config_command", metavar="<show|keys>", required=True)
    show = config_sub.add_parser("show", help="print the config resolved from --config and key=value overrides")
    show.add_argument("--config", help="YAML config file (may name a base: file it extends)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-5")
    show.add_argument("--get", metavar="KEY", help="print only this key's value (e.g. run_dir)")
    show.set_defaults(func=_config_show)
    keys = config_sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.add_argument("--markdown", action="store_true", help="print a Markdown table (as in README.md)")
    keys.set_defaults(func=_config_keys)

    fetch = sub.add_parser("fetch-examples", help="fetch the example BERT weights and datasets into the cache")
    fetch.add_argument("--cache", help="cache root (default: $DTRAIN_CACHE or ~/.cache/dtrain)")
    fetch.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these examples")
    fetch.add_argument("--force", action="store_true", help="rebuild even when the cached copy verifies")
    fetch.set_defaults(func=_fetch_examples)
    for name in ("pretrain", "finetune"):
        train = sub.add_parser(name, help=f"same as python -m dtrain.{name} (--config, --debug, key=value ...)",
                               add_help=False)
        train.add_argument("args", nargs=argparse.REMAINDER)
        train.set_defaults(func=_train)

    exp = sub.add_parser("export", help="a checkpoint (DDP or DeepSpeed ZeRO 0-3) → a Hugging Face model dir")
    exp.add_argument("source", help="run dir (its latest checkpoint) or a checkpoints/step-N dir")
    exp.add_argument("out", help="output dir (refused if it exists and is not empty)")
    exp.add_argument("--overwrite", action="store_true", help="replace an earlier export (only that) when done")
    exp.set_defaults(func=_export)

    pred = sub.add_parser("predict", help="a fine-tuned model on new text → one JSON line of predictions per row")
    pred.add_argument("--input", required=True, help=".jsonl/.csv/.tsv rows, or .txt with one text per line")
    pred.add_argument("--output", required=True, help="predictions .jsonl (the input row plus its prediction)")
    pred.add_argument("--text-field", default="text", help="field/column with the text (text)")
    pred.add_argument("--text-pair-field", default=None, help="field with the second text of a pair task")
    pred.add_argument("--question-field", default="question", help="qa: field with the question (question)")
    pred.add_argument("--context-field", default="context", help="qa: field with the context (context)")
    pred.add_argument("--max-seq-len", type=int, default=None, help="truncate inputs to this many tokens (default: "
                      "the model's positions; a model trained on cut or windowed texts: its training length)")
    pred.set_defaults(func=_predict)
    ev = sub.add_parser("evaluate", help="a fine-tuned model on a prepared labelled dataset → metrics report")
    ev.add_argument("--data", required=True, help="dataset dir made by `dtrain prepare finetune` (with labels)")
    ev.add_argument("--output", default=None, help="also write the report as JSON here")
    ev.set_defaults(func=_evaluate)
    for p in (pred, ev):
        p.add_argument("--model", required=True, help="run dir of `dtrain finetune` or its export dir")
        p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (32)")
        p.add_argument("--threshold", type=float, default=0.5, help="multilabel: probability to predict a label")
        p.add_argument("--overwrite", action="store_true", help="replace an earlier --output of dtrain (only that)")
        p.add_argument("--prompt", default=None, help="cloze prompt YAML (template, verbalizer): zero-shot with a "
                       "model that has an MLM head (a pretraining run)")
        p.add_argument("--window-pooling", choices=POOLINGS, default=None, help="windowed documents: pool the "
                       "windows' probabilities (mean, max) or logits (mean_logits, max_logits); default: as trained")

    prep = sub.add_parser("prepare", help="tokenize raw text or labelled files into a sharded dataset")
    prep_sub = prep.add_subparsers(dest="prepare_command", metavar="<pretrain|finetune>", required=True)
    for name, help_text in [("pretrain", "raw text (.txt, .jsonl, a saved datasets dir) → MLM/NSP shards"),
                            ("finetune", "CSV/TSV/JSONL rows or CoNLL sentences → task shards + labels.json")]:
        p = prep_sub.add_parser(name, help=help_text)
        p.add_argument("inputs", nargs="+", help="input files or folders")
        p.add_argument("--out", required=True, help="dataset dir to create (refused if it exists and is not empty)")
        p.add_argument("--tokenizer", required=True, help="model/tokenizer dir, or an example name (minilm)")
        p.add_argument("--max-seq-len", type=int, default=128, help="tokens per sequence incl. specials (128)")
        p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: cores, at most 8)")
        p.add_argument("--shard-size", type=_size, default=64 << 20, help="target shard size, e.g. 64MB (default)")
        p.add_argument("--overwrite", action="store_true", help="replace an earlier dataset (only that) when done")
        p.add_argument("--text-field", default="text", help="field/column with the text (text)")
        p.set_defaults(func=_prepare)
        if name == "pretrain":
            p.add_argument("--doc-split", choices=["file", "blank-line"], default="file",
                           help="a .txt file is one document (file), or blank lines separate documents")
            p.add_argument("--short-seq-prob", type=float, default=0.1,
                           help="share of NSP pairs cut to a random shorter length, drawn at read time (0.1)")
        else:
            p.add_argument("--task", choices=_TaskNames(),
                           help="default: inferred (list labels: multilabel; numbers: regression; CoNLL: ner); "
                                "qa reads SQuAD-style .json")
            p.add_argument("--doc-stride", type=int, default=None, help="qa and --windows: tokens shared by "
                           "consecutive windows (qa: 128; --windows: a quarter of --max-seq-len)")
            p.add_argument("--truncation", choices=TRUNCATIONS, default="head", help="a text longer than "
                           "--max-seq-len keeps its first tokens (head), its last (tail) or both (head_tail)")
            p.add_argument("--head-share", type=float, default=None, help="head_tail: share of the kept tokens taken "
                           "from the start (0.25, as Sun et al. 2019)")
            p.add_argument("--windows", action="store_true", help="cut each long text into overlapping windows "
                           "(a sample each; evaluation and predict pool them per text: task.window_pooling)")
            p.add_argument("--max-windows", type=int, default=None, help="--windows: keep at most this many "
                           "windows of a text (the first ones; default: all)")
            p.add_argument("--text-pair-field", default=None, help="field with the second text of a pair")
            p.add_argument("--label-field", default="label", help="field/column with the label(s) (label)")
            p.add_argument("--labels", default=None, help="labels.json (or dataset dir) of the training set: "
                                                          "prepare dev/test with the same label ids")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("pretrain", "finetune"):  # the entry point parses the rest (--help included)
        return _train(argparse.Namespace(command=argv[0], args=argv[1:]))
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
