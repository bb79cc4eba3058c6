"""Fine-tuning evaluation: run the model over a whole dataset (every rank its share), gather the per-sample outputs
on every rank in dataset order, and turn them into the task's metrics (`scalars` drive early stopping, the full
report adds per-class tables and the confusion matrix). Also decodes QA spans, shared with `dtrain predict`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain import metrics as M
from dtrain.data import IGNORE
from dtrain.data.shards import ShardedDataset
from dtrain.distributed import all_reduce_sum
from dtrain.model.heads import Head

Record = tuple  # (dataset index, task-specific arrays ...)


def best_spans(start: np.ndarray, end: np.ndarray, context: np.ndarray, n_best: int,
               max_answer_length: int) -> list[tuple[float, int, int]]:
    """(score, start, end) of the valid answer spans of one window, best first: both ends inside the context
    (`context`: bool per token), end ≥ start, at most max_answer_length tokens, among the n_best starts and ends."""
    if not context.any():
        return []
    masked_s = np.where(context, start, -np.inf)
    masked_e = np.where(context, end, -np.inf)
    starts = np.argsort(-masked_s)[:n_best]
    ends = np.argsort(-masked_e)[:n_best]
    spans = [(float(start[s] + end[e]), int(s), int(e)) for s in starts for e in ends
             if context[s] and context[e] and s <= e < s + max_answer_length]
    return sorted(spans, reverse=True)


def decode_answer(windows: Sequence[dict[str, Any]], context: str, n_best: int, max_answer_length: int,
                  allow_null: bool) -> tuple[str, float, int, int]:
    """The best answer over all windows of one example: (text, score, char start, char end). With allow_null
    (SQuAD v2 data), "" when the [CLS] score (start+end at 0) beats every span."""
    best: tuple[float, str, int, int] = (-np.inf, "", -1, -1)
    null = np.inf
    for w in windows:
        offsets_s, offsets_e = np.asarray(w["offset_start"]), np.asarray(w["offset_end"])
        null = min(null, float(w["start"][0] + w["end"][0]))
        spans = best_spans(w["start"], w["end"], offsets_s >= 0, n_best, max_answer_length)
        if spans and spans[0][0] > best[0]:
            _, s, e = spans[0]
            lo, hi = int(offsets_s[s]), int(offsets_e[e])
            best = (spans[0][0], context[lo:hi], lo, hi)
    if allow_null and null > best[0]:
        return "", null, -1, -1
    return best[1], best[0], best[2], best[3]


class Evaluator:
    """Evaluates a fine-tuning head on a prepared dataset; `scalars` for the loop, `report` for the end of a run."""

    def __init__(self, head: Head, labels: Sequence[str], data: ShardedDataset, threshold: float = 0.5,
                 n_best: int = 20, max_answer_length: int = 30):
        self.head, self.task, self.labels, self.data = head, head.task, list(labels), data
        self.threshold, self.n_best, self.max_answer_length = threshold, n_best, max_answer_length

    # -- running the model ---------------------------------------------------------------------------------------

    def _records(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[Record]:
        keep = (~batch["pad"]).nonzero().flatten().tolist()
        index = batch["index"]
        x = logits.detach().cpu().numpy()
        if self.task in ("classification", "pair", "multilabel", "regression"):
            return [(int(index[i]), x[i], batch["labels"][i].cpu().numpy()) for i in keep]
        if self.task == "ner":
            labels = batch["labels"].cpu().numpy()
            out = []
            for i in keep:
                where = labels[i] != IGNORE
                out.append((int(index[i]), x[i][where].argmax(-1), labels[i][where]))
            return out
        lengths = batch["attention_mask"].sum(1).tolist()
        return [(int(index[i]), int(batch["example"][i]), x[i, :lengths[i], 0], x[i, :lengths[i], 1]) for i in keep]

    def collect(self, engine: Any, loader: Any) -> tuple[float, list[Record]]:
        """(mean loss over all ranks, every rank's records in dataset order)."""
        head = self.head

        def fn(model: torch.nn.Module, batch: dict) -> dict:
            logits = head.forward(model, batch)
            return {"logits": logits, **head.loss_terms(logits, batch)}

        total, count, records = 0.0, 0.0, []
        for batch in loader:
            out = engine.forward(fn, batch)
            total += float(sum(v for k, v in out.items() if k != "logits"))
            count += float(sum(head.counts(batch).values()))
            records.extend(self._records(out["logits"], batch))
        sums = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=engine.device)).cpu()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        records.sort(key=lambda r: r[0])
        return float(sums[0] / max(float(sums[1]), 1.0)), records

    # -- metrics ------------------------------------------------------------------------------------------------

    def qa_predictions(self, records: list[Record]) -> dict[str, str]:
        """Question id → predicted answer text, from the windows' start/end logits."""
        examples = read_examples(self.data.path)
        allow_null = any(not e["answers"] for e in examples)
        windows: dict[int, list[dict[str, Any]]] = {}
        for index, example, start, end in records:
            windows.setdefault(example, []).append(
                {"start": start, "end": end, "offset_start": self.data.get(index, "offset_start")[:len(start)],
                 "offset_end": self.data.get(index, "offset_end")[:len(start)]})
        return {examples[i]["id"]: decode_answer(w, examples[i]["context"], self.n_best, self.max_answer_length,
                                                 allow_null)[0] for i, w in windows.items()}

    def report(self, loss: float, records: list[Record]) -> dict[str, Any]:
        """Every metric of the task, JSON-serialisable: scalars plus per-class/per-type tables where they apply."""
        if not records:
            return {"loss": loss}
        if self.task in ("classification", "pair"):
            logits = np.stack([r[1] for r in records])
            out = M.classification_report(logits.argmax(-1), np.array([int(r[2]) for r in records]), self.labels)
        elif self.task == "multilabel":
            probs = M.sigmoid(np.stack([r[1] for r in records]))
            out = M.multilabel_metrics(probs, np.stack([r[2] for r in records]), self.labels, self.threshold)
        elif self.task == "regression":
            out = M.regression_metrics(np.array([float(r[1][0]) for r in records]),
                                       np.array([float(r[2]) for r in records]))
        elif self.task == "ner":
            names = self.labels
            out = M.entity_metrics([[names[t] for t in r[2]] for r in records],
                                   [[names[t] for t in r[1]] for r in records])
            hits = sum(int((r[1] == r[2]).sum()) for r in records)
            out["token_accuracy"] = hits / max(sum(len(r[2]) for r in records), 1)
        else:
            examples = read_examples(self.data.path)
            out = M.squad_metrics(self.qa_predictions(records),
                                  {e["id"]: [a["text"] for a in e["answers"]] for e in examples})
        return {"loss": loss, **out}

    def scalars(self, engine: Any, loader: Any) -> dict[str, float]:
        """The report's scalar metrics (what the loop logs and early stopping reads)."""
        return scalar_metrics(self.report(*self.collect(engine, loader)))


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """examples.jsonl of a prepared QA set (id, question, context, answers), by example number."""
    with open(Path(path) / "examples.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
