"""Fine-tuning features: label maps, (pair) classification / multi-label / regression rows and NER sentences
→ token ids, and the collator that pads each batch only as far as its longest sequence."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dtrain.data.shards import ShardError

TASKS = ("classification", "pair", "multilabel", "regression", "ner")
IGNORE = -100
LABELS_FILE = "labels.json"


def schema_for(task: str) -> pa.Schema:
    fields = [("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())), ("length", pa.int32())]
    label = {"classification": ("label", pa.int32()), "pair": ("label", pa.int32()),
             "regression": ("label", pa.float32()), "multilabel": ("labels", pa.list_(pa.int32())),
             "ner": ("labels", pa.list_(pa.int32()))}[task]
    return pa.schema([*fields, label])


def infer_task(first_label: Any, has_pair: bool) -> str:
    if isinstance(first_label, list):
        return "multilabel"
    if isinstance(first_label, float):
        return "regression"
    return "pair" if has_pair else "classification"


class LabelMap:
    """label ↔ id, saved as labels.json beside the shards (and reused to prepare dev/test sets)."""

    def __init__(self, task: str, labels: Sequence[str], source: str = ""):
        self.task, self.labels, self.source = task, list(labels), source
        self.ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def build(cls, task: str, values: Sequence[Any]) -> LabelMap:
        if task == "regression":
            return cls(task, [])
        flat = [v for vs in values for v in vs] if task in ("multilabel", "ner") else list(values)
        names = sorted({str(v) for v in flat})
        if task == "ner" and "O" in names:  # O first, then B-/I- grouped by entity type
            names = ["O"] + sorted((n for n in names if n != "O"), key=lambda n: (n[2:], n[:1]))
        return cls(task, names)

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        path = Path(path)
        path = path / LABELS_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["task"], data["labels"], str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{path}: not a readable {LABELS_FILE} ({e}); pass the labels.json written by "
                             f"`dtrain prepare finetune` for the training set") from None

    def id(self, label: Any, where: str) -> int:
        try:
            return self.ids[str(label)]
        except KeyError:
            known = ", ".join(self.labels[:20]) + (" ..." if len(self.labels) > 20 else "")
            src = self.source or LABELS_FILE
            raise ShardError(f"{where}: label {str(label)!r} is not in {src} (known: {known}); fix the label or "
                             f"prepare the training set so that it includes it") from None

    def save(self, out: Path, counts: Counter | None = None, extra: dict | None = None) -> None:
        data = {"task": self.task, "labels": self.labels,
                "counts": {str(k): v for k, v in sorted((counts or {}).items())}, **(extra or {})}
        (out / LABELS_FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def encode_rows(tok: Any, texts: list[str], pairs: list[str] | None, max_seq_len: int) -> dict[str, list]:
    """Tokenize (text[, text_pair]) rows with [CLS] A [SEP] (B [SEP]), longest-first truncation."""
    enc = tok(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_seq_len,
              return_token_type_ids=True)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]]}


def encode_ner(tok: Any, sentences: list[list[str]], tag_ids: list[list[int]], max_seq_len: int,
               label_all_pieces: bool = False) -> dict[str, list]:
    """Word-level tags → word-piece labels: a word's first piece carries its tag, the other pieces IGNORE (or the
    I- form of the tag with label_all_pieces); [CLS]/[SEP] IGNORE. Sentences longer than max_seq_len are truncated."""
    enc = tok(sentences, is_split_into_words=True, truncation=True, max_length=max_seq_len,
              return_token_type_ids=True)
    labels = []
    for i, tags in enumerate(tag_ids):
        row, prev = [], None
        for word in enc.word_ids(i):
            if word is None:
                row.append(IGNORE)
            elif word != prev:
                row.append(tags[word])
            else:
                row.append(tags[word] if label_all_pieces else IGNORE)
            prev = word
        labels.append(row)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]], "labels": labels}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_2d(rows: Sequence[np.ndarray], width: int, value: int) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class FinetuneCollator:
    """Pads a batch to its longest sequence (rounded up to a multiple of 8), not to max_seq_len.

    Output (numpy; StreamLoader hands tensors to the loop): input_ids, attention_mask, token_type_ids, labels (int;
    float for regression; multi-hot float for multilabel; per token for ner), index, pad. Padding repeats (pad=True)
    get ignored labels (-100; NaN for regression) so they add nothing to the loss.
    """

    def __init__(self, task: str, pad_id: int, num_labels: int = 0, pad_to_multiple_of: int = 8):
        if task not in TASKS:
            raise ShardError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        self.task, self.pad_id, self.num_labels, self.multiple = task, pad_id, num_labels, pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        lengths = np.array([len(s["input_ids"]) for s in samples])
        width = _round_up(int(lengths.max()), self.multiple)
        pad = np.array([bool(s["pad"]) for s in samples])
        batch = {"input_ids": pad_2d([s["input_ids"] for s in samples], width, self.pad_id),
                 "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
                 "token_type_ids": pad_2d([s["token_type_ids"] for s in samples], width, 0),
                 "index": np.array([int(s["index"]) for s in samples]), "pad": pad}
        if self.task == "ner":
            labels = pad_2d([s["labels"] for s in samples], width, IGNORE)
        elif self.task == "multilabel":
            labels = np.zeros((len(samples), self.num_labels), dtype=np.float32)
            for i, s in enumerate(samples):
                labels[i, np.asarray(s["labels"], dtype=np.int64)] = 1.0
        elif self.task == "regression":
            labels = np.array([float(s["label"]) for s in samples], dtype=np.float32)
        else:
            labels = np.array([int(s["label"]) for s in samples], dtype=np.int64)
        labels[pad] = np.nan if self.task == "regression" else IGNORE
        batch["labels"] = labels
        return batch
