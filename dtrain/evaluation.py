"""Fine-tuning evaluation: run the model over a whole dataset (every rank its share), gather the per-sample outputs
on every rank in dataset order, and turn them into the task's metrics (`scalars` drive early stopping, the full
report adds per-class tables and the confusion matrix). The task (head.task) makes the records and the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dtrain.data.shards import ShardedDataset
from dtrain.distributed import all_reduce_sum
from dtrain.tasks import Head

Record = tuple  # (dataset index, task-specific arrays ...)


class Evaluator:
    """Evaluates a fine-tuning head on a prepared dataset; `scalars` for the loop, `report` for the end of a run."""

    def __init__(self, head: Head, labels: Sequence[str], data: ShardedDataset, threshold: float = 0.5,
                 n_best: int = 20, max_answer_length: int = 30):
        self.head, self.task, self.labels, self.data = head, head.task, list(labels), data  # task: a Task
        self.threshold, self.n_best, self.max_answer_length = threshold, n_best, max_answer_length

    # -- running the model ---------------------------------------------------------------------------------------

    def _records(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[Record]:
        keep = (~batch["pad"]).nonzero().flatten().tolist()
        return self.task.records(logits.detach().cpu().numpy(), batch, keep)

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

    def report(self, loss: float, records: list[Record]) -> dict[str, Any]:
        """Every metric of the task, JSON-serialisable: scalars plus per-class/per-type tables where they apply."""
        if not records:
            return {"loss": loss}
        return {"loss": loss, **self.task.report(records, self)}

    def scalars(self, engine: Any, loader: Any) -> dict[str, float]:
        """The report's scalar metrics (what the loop logs and early stopping reads)."""
        return scalar_metrics(self.report(*self.collect(engine, loader)))


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
