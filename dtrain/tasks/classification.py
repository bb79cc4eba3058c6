"""Single-label classification of a text, and of a text pair (`pair`: the same task on [CLS] A [SEP] B [SEP])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dtrain import metrics as M
from dtrain.data import IGNORE
from dtrain.data.shards import ShardError
from dtrain.errors import DtrainError
from dtrain.tasks.base import Task, counted, softmax, summed


class Classification(Task):
    name = "classification"
    also_fits = ("pair",)
    problem_type = "single_label_classification"
    class_weights_ok = True

    def check_classes(self, label_map: Any, values: Sequence[Any], source: str) -> None:
        if len(label_map.labels) < 2:
            raise ShardError(f"{source}: all {len(values)} examples have the label "
                             f"{label_map.labels[0] if label_map.labels else None!r}, but a classifier needs two "
                             f"classes at least; add examples of the other class(es) (a dev/test set: prepare it "
                             f"with --labels <train dir>)")

    def check_model_labels(self, labels: Sequence[str]) -> None:
        if len(labels) < 2:
            raise DtrainError(f"the training set's labels.json has {len(labels)} label(s) {list(labels)}, but a "
                              f"classifier needs two classes at least; prepare a training set with examples of each "
                              f"class")

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        weight = head.weights.to(logits.device) if head.weights is not None else None
        return {"cls": summed(lambda reduction: F.cross_entropy(logits, batch["labels"], weight=weight,
                                                                ignore_index=IGNORE, reduction=reduction,
                                                                label_smoothing=head.label_smoothing), batch)}

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        """Targets (class-weighted when weighted, so the loss is a weighted mean)."""
        labels = batch["labels"]
        keep = labels != IGNORE
        if head.weights is None:
            return {"cls": counted(keep, batch)}
        weights = head.weights[labels[keep].cpu()]
        return {"cls": (weights * batch["weight"][keep].cpu()).sum() if "weight" in batch else weights.sum()}

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        logits = np.stack([r[1] for r in records])
        return M.classification_report(logits.argmax(-1), np.array([int(r[2]) for r in records]), evaluator.labels)

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
        probs = [softmax(x) for x in outputs]
        return [{"label": labels[int(p.argmax())], "score": round(float(p.max()), 4),
                 "probabilities": {labels[k]: round(float(v), 4) for k, v in enumerate(p)}} for p in probs]


class Pair(Classification):
    """Prepared from rows with a text pair; trained, evaluated and exported as classification."""

    name = "pair"
    also_fits = ()
    has_pairs = True
