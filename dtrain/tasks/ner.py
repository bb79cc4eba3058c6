"""Named-entity recognition: CoNLL sentences with BIO tags, a tag per word (on its first word piece), entity F1."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dtrain import metrics as M
from dtrain.data import IGNORE
from dtrain.data.rows import CONLL_SUFFIXES, iter_conll
from dtrain.data.shards import ShardError
from dtrain.tasks.base import Task, pad_2d, softmax


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


class Ner(Task):
    name = "ner"
    hf_class = "BertForTokenClassification"
    default_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    reads_windows = False
    sequence_level = False
    label_column = "labels"
    label_type = pa.list_(pa.int32())
    list_labels = True
    counts_per_label = False
    predict_offsets = True  # entities are decoded as character spans

    def read_rows(self, files: list[Path], text_field: str, text_pair_field: str | None,
                  label_field: str) -> tuple[list[tuple], list[str]]:
        rows, where = [], []
        for f in files:
            if f.suffix.lower() not in CONLL_SUFFIXES:
                raise ShardError(f"{f}: NER input must be CoNLL (token<TAB>tag lines, .conll/.bio); got {f.suffix}")
            for lineno, tokens, tags in iter_conll(f):
                rows.append((tokens, None, tags))
                where.append(f"{f} line {lineno}")
        return rows, where

    def label_names(self, values: Sequence[Any]) -> list[str]:
        names = super().label_names(values)
        if "O" in names:  # O first, then B-/I- grouped by entity type
            names = ["O"] + sorted((n for n in names if n != "O"), key=lambda n: (n[2:], n[:1]))
        return names

    def check_one_kind(self, label_map: Any, flat: list[tuple[Any, str]]) -> None:
        pass  # BIO tags are names by construction (the CoNLL reader checks them)

    def check_classes(self, label_map: Any, values: Sequence[Any], source: str) -> None:
        if not any(x != "O" for x in label_map.labels):
            raise ShardError(f"{source}: every tag is O, so there is no entity to learn; add sentences with B-/I- "
                             f"tags (a dev/test set: prepare it with --labels <train dir>)")

    def label_ids(self, value: Any, label_map: Any, where: str, counts: Counter) -> Any:
        ids = [label_map.id(v, where) for v in value]
        counts.update([v[2:] for v in value if v[:2] == "B-"])  # entities per type
        return ids

    def encode(self, tok: Any, rows: list[tuple], first: int, max_seq_len: int, cut: Any) -> dict[str, list]:
        return encode_ner(tok, [r[0] for r in rows], [r[2] for r in rows], max_seq_len)

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        labels = pad_2d([s["labels"] for s in samples], width, IGNORE)
        labels[pad] = IGNORE
        return {"labels": labels}

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        return {"tag": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                       ignore_index=IGNORE, reduction="sum")}

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        return {"tag": (batch["labels"] != IGNORE).sum()}

    def records(self, x: np.ndarray, batch: dict[str, torch.Tensor], keep: list[int]) -> list[tuple]:
        labels = batch["labels"].cpu().numpy()
        out = []
        for i in keep:
            where = labels[i] != IGNORE
            out.append((int(batch["index"][i]), x[i][where].argmax(-1), labels[i][where]))
        return out

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        names = evaluator.labels
        out = M.entity_metrics([[names[t] for t in r[2]] for r in records],
                               [[names[t] for t in r[1]] for r in records])
        hits = sum(int((r[1] == r[2]).sum()) for r in records)
        out["token_accuracy"] = hits / max(sum(len(r[2]) for r in records), 1)
        return out

    def output_of(self, logits: np.ndarray, length: int) -> np.ndarray:
        return logits[:length]

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
        text = fields["text"]
        return [{"entities": _entities(outputs[i], enc, i, rows[i][text], labels)} for i in range(len(rows))]


def _entities(logits: np.ndarray, enc: Any, row: int, text: str, labels: list[str]) -> list[dict[str, Any]]:
    """Word-level entities: each word takes the tag of its first piece (as training labelled it)."""
    words, first = enc.word_ids(row), {}
    for t, w in enumerate(words):
        if w is not None and w not in first:
            first[w] = t
    pieces = [first[w] for w in sorted(first)]
    probs = softmax(logits)
    tags = [labels[int(probs[t].argmax())] for t in pieces]
    offsets = enc["offset_mapping"][row]
    last = {w: t for t, w in enumerate(words) if w is not None}
    out = []
    for kind, s, e in M.entity_spans(tags):
        lo, hi = offsets[pieces[s]][0], offsets[last[sorted(first)[e - 1]]][1]
        score = float(np.mean([probs[pieces[k]].max() for k in range(s, e)]))
        out.append({"type": kind, "text": text[lo:hi], "start": lo, "end": hi, "score": round(score, 4)})
    return out
