"""Regression: one number per text (or text pair), mean squared error; labels.json keeps the mean and std."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dtrain import metrics as M
from dtrain.data.shards import ShardError
from dtrain.errors import DtrainError
from dtrain.tasks.base import Task, counted, summed


class Regression(Task):
    name = "regression"
    distills = False  # (no soft-target loss written yet)
    problem_type = "regression"
    default_metric = "pearson"
    named_labels = False
    label_type = pa.float32()

    def parse_label(self, value: Any, where: str) -> Any:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ShardError(f"{where}: regression label {value!r} is not a number; fix the row") from None

    def label_ids(self, value: Any, label_map: Any, where: str, counts: Counter) -> Any:
        return value

    def write_extra(self, out: Path, encoded: list[tuple], cut: Any) -> dict[str, Any]:
        values = np.array([r[2] for r in encoded], dtype=np.float64)
        return {"mean": float(values.mean()), "std": float(values.std())}

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        labels = np.array([float(s["label"]) for s in samples], dtype=np.float32)
        labels[pad] = np.nan
        return {"labels": labels}

    def num_outputs(self, labels: Any) -> int:
        return 1

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        keep = ~torch.isnan(labels)
        if "weight" not in batch:
            return {"mse": F.mse_loss(logits.squeeze(-1)[keep], labels[keep].float(), reduction="sum")}
        return {"mse": summed(lambda reduction: F.mse_loss(logits.squeeze(-1)[keep], labels[keep].float(),
                                                           reduction=reduction), {"weight": batch["weight"][keep]})}

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        return {"mse": counted(~torch.isnan(batch["labels"]), batch)}

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        return M.regression_metrics(np.array([float(r[1][0]) for r in records]),
                                    np.array([float(r[2]) for r in records]))

    def check_pooling(self, pooling: str, where: str) -> None:
        if pooling.endswith("_logits"):
            raise DtrainError(f"{where}={pooling}: a regression model outputs values, not logits of probabilities; "
                              f"use mean or max (of the windows' values)")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:  # (values: pooled as they are)
        return logits

    def as_logits(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
        return [{"score": float(x[0])} for x in outputs]
