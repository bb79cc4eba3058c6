"""Multi-label classification: any number of labels per text (a JSON list or 'a;b'), one sigmoid per label."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dtrain import metrics as M
from dtrain.data import IGNORE
from dtrain.data.shards import ShardError
from dtrain.tasks.base import Task


class MultiLabel(Task):
    name = "multilabel"
    distills = False  # (no soft-target loss written yet)
    problem_type = "multi_label_classification"
    default_metric = "micro_f1"
    label_column = "labels"
    label_type = pa.list_(pa.int32())
    list_labels = True

    def parse_label(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(";") if v.strip()]
        return super().parse_label(value, where)

    def check_classes(self, label_map: Any, values: Sequence[Any], source: str) -> None:
        if not label_map.labels:
            raise ShardError(f"{source}: no row has a label, so there is nothing to learn; give the rows their "
                             f"labels (a JSON list or 'a;b')")

    def label_ids(self, value: Any, label_map: Any, where: str, counts: Counter) -> Any:
        counts.update(value)
        return [label_map.id(v, where) for v in value]

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        labels = np.zeros((len(samples), num_labels), dtype=np.float32)
        for i, s in enumerate(samples):
            labels[i, np.asarray(s["labels"], dtype=np.int64)] = 1.0
        labels[pad] = IGNORE
        return {"labels": labels}

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        keep = labels != IGNORE
        if "weight" not in batch:
            return {"bce": F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float(), reduction="sum")}
        each = F.binary_cross_entropy_with_logits(logits, labels.float().clamp(min=0), reduction="none")
        return {"bce": (each * batch["weight"][:, None] * keep).sum()}  # windows: 1/windows of their document

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        keep = batch["labels"] != IGNORE
        return {"bce": (keep * batch["weight"][:, None]).sum() if "weight" in batch else keep.sum()}

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        probs = M.sigmoid(np.stack([r[1] for r in records]))
        return M.multilabel_metrics(probs, np.stack([r[2] for r in records]), evaluator.labels, evaluator.threshold)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return M.sigmoid(logits)

    def as_logits(self, probabilities: np.ndarray) -> np.ndarray:
        p = np.clip(probabilities, 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
        probs = [M.sigmoid(x) for x in outputs]
        return [{"labels": [labels[k] for k in np.flatnonzero(p >= threshold)],
                 "probabilities": {labels[k]: round(float(v), 4) for k, v in enumerate(p)}} for p in probs]
