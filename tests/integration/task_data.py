"""Small learnable datasets for every fine-tuning task, written as raw files and prepared as train/dev/test shards.

Signals are keywords from the test tokenizer's whole-word vocabulary (market, team, music, film), so a tiny BERT
learns them in a few dozen steps."""

import json
import random
from pathlib import Path

from dtrain.tasks import prepare_finetune
from tests.conftest import WORDS

FILLER = [w for w in WORDS[:40]]
SIZES = (("train", 320), ("dev", 48), ("test", 48))


def _words(rng: random.Random, lo: int = 3, hi: int = 10) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(lo, hi))]


def _insert(rng: random.Random, words: list[str], *new: str) -> list[str]:
    at = rng.randint(0, len(words))
    return words[:at] + list(new) + words[at:]


def multilabel_row(rng: random.Random) -> dict:
    words, labels = _words(rng), []
    for keyword, label in (("market", "econ"), ("team", "sport"), ("music", "arts")):
        if rng.random() < 0.4:
            words = _insert(rng, words, keyword)
            labels.append(label)
    return {"text": " ".join(words), "label": labels}


def regression_row(rng: random.Random) -> dict:
    k = rng.randint(0, 3)
    words = _words(rng)
    for _ in range(k):
        words = _insert(rng, words, "market")
    return {"text": " ".join(words), "label": float(k)}


def ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """`team <word>` is an ORG (two words), `music` alone a WORK."""
    out = [(w, "O") for w in _words(rng, 2, 6)]
    if rng.random() < 0.8:
        out += [("team", "B-ORG"), (rng.choice(FILLER[:10]), "I-ORG")]
    out += [(w, "O") for w in _words(rng, 1, 4)]
    if rng.random() < 0.6:
        out += [("music", "B-WORK")]
    return out + [(w, "O") for w in _words(rng, 0, 3)]


def qa_example(rng: random.Random, i: int) -> dict:
    """The answer is the word after `film` in the context."""
    answer = rng.choice(FILLER[10:30])
    before, after = " ".join(_words(rng, 2, 8)), " ".join(_words(rng, 2, 8))
    context = f"{before} film {answer} {after}"
    return {"id": f"q{i}", "question": "which film ?", "context": context,
            "answers": [{"text": answer, "answer_start": len(before) + len(" film ")}]}


def write_task(task: str, root: Path, tokenizer_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Raw files + prepared train/dev/test dirs for `task` (multilabel, regression, ner, qa) under root."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    counter = 0
    for split, n in SIZES:
        if task == "ner":
            raw = root / f"{split}.conll"
            raw.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in ner_sentence(rng)) for _ in range(n)) + "\n")
        elif task == "qa":
            raw = root / f"{split}.json"
            examples = []
            for _ in range(n):
                examples.append(qa_example(rng, counter))
                counter += 1
            paragraphs = [{"context": e["context"], "qas": [{"id": e["id"], "question": e["question"],
                                                             "answers": e["answers"]}]} for e in examples]
            raw.write_text(json.dumps({"data": [{"title": "toy", "paragraphs": paragraphs}]}))
        else:
            make = multilabel_row if task == "multilabel" else regression_row
            raw = root / f"{split}.jsonl"
            raw.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(n)))
        prepare_finetune([str(raw)], root / split, str(tokenizer_dir), task=task, max_seq_len=32, workers=1,
                         labels=None if split == "train" else str(root / "train"),
                         doc_stride=8 if task == "qa" else None)
    return {split: root / split for split, _ in SIZES}
