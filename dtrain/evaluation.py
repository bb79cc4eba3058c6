"""The one evaluation loop (`forward_pass`) and fine-tuning evaluation (`Evaluator`).

`forward_pass` runs a forward function over every batch of a stream (every rank its share), sums each loss term and
its target count, keeps the per-sample records the caller makes of the outputs, and combines every rank's sums and
records (in dataset order). Its users: pretraining's held-out losses (`evaluate_terms`), fine-tuning evaluation
during a run and in `dtrain evaluate` (`Evaluator.collect`), and `dtrain predict` (predict.py, over its
length-sorted batches of new text). The caller puts the engine in evaluation mode (`Engine.evaluating`, or the
one-process `LocalEngine`, which runs under inference_mode).

The Evaluator turns the records into the task's metrics (`scalars` drive early stopping; the full report adds
per-class tables and the confusion matrix); the task (head.task) makes the records and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dtrain.data.shards import ShardedDataset
from dtrain.data.windows import Cut
from dtrain.errors import DtrainError
from dtrain.tasks import Head, LabelMap

Record = tuple  # (dataset index, task-specific arrays ...)
Batch = dict[str, Any]


@dataclass
class Totals:
    """What one pass over a stream adds up to, over all ranks: each loss term's sum and target count, the records."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        """Each term's mean over its targets (`<term>_loss`), and their sum as `loss`."""
        out = {f"{k}_loss": v / _nonzero(self.counts.get(k, 0.0)) for k, v in self.sums.items()}
        return {**out, "loss": sum(out.values())} if out else {}

    def mean(self) -> float:
        """All terms together over all targets (fine-tuning's single loss)."""
        return sum(self.sums.values()) / _nonzero(sum(self.counts.values()))


def _nonzero(count: float) -> float:
    """A count to divide by: itself, or 1 for none (weighted counts may be fractions below 1)."""
    return count if count > 0 else 1.0


def forward_pass(engine: Any, batches: Iterable[Batch], fn: Callable[[torch.nn.Module, Batch], dict],
                 counts: Callable[[Batch], dict] | None = None,
                 records: Callable[[torch.Tensor, Batch], list[Record]] | None = None) -> Totals:
    """fn(model, batch) → {"logits": ... (optional), <term>: loss sum, ...} on every batch, through `engine` (an
    Engine or LocalEngine: device placement, precision); `counts(batch)` → {<term>: targets}; `records(logits,
    batch)` → this batch's per-sample records. Every rank calls it; every rank gets the totals of all."""
    totals = Totals()
    for batch in batches:
        out = engine.forward(fn, batch)
        for k, v in out.items():
            if k != "logits":
                totals.sums[k] = totals.sums.get(k, 0.0) + float(v)
        for k, v in (counts(batch) if counts else {}).items():
            totals.counts[k] = totals.counts.get(k, 0.0) + float(v)
        if records is not None:
            totals.records.extend(records(out["logits"], batch))
    if getattr(engine, "distributed", True) and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        # one object gather: also right when a rank's share was empty (it knows no term names)
        torch.distributed.all_gather_object(parts, (totals.sums, totals.counts, totals.records))
        totals = Totals()
        for sums, n, recs in parts:
            for k, v in sums.items():
                totals.sums[k] = totals.sums.get(k, 0.0) + v
            for k, v in n.items():
                totals.counts[k] = totals.counts.get(k, 0.0) + v
            totals.records.extend(recs)
    totals.records.sort(key=lambda r: r[0])
    return totals


def evaluate_terms(engine: Any, loader: Iterable[Batch], objective: Any) -> dict[str, float]:
    """Mean of every loss term of `objective` (losses, counts) over a whole evaluation stream, and their sum."""
    return forward_pass(engine, loader, objective.losses, objective.counts).means()


class Evaluator:
    """Evaluates a fine-tuning head on a prepared dataset; `scalars` for the loop, `report` for the end of a run."""

    def __init__(self, head: Head, labels: Sequence[str], data: ShardedDataset, threshold: float = 0.5,
                 n_best: int = 20, max_answer_length: int = 30):
        self.head, self.task, self.labels, self.data = head, head.task, list(labels), data  # task: a Task
        self.threshold, self.n_best, self.max_answer_length = threshold, n_best, max_answer_length
        self.windowed = Cut.of(data.manifest).windows  # windows of long documents: pooled per document

    @classmethod
    def of(cls, head: Head, labels: LabelMap, data: ShardedDataset, key: str, options: Any) -> Evaluator:
        """An evaluator of `data` (the config key that names it: `key`), checked to use the training set's label
        map; `options`: the task config section (threshold, n_best, max_answer_length)."""
        LabelMap.load(data.path).check_same(labels, key)
        have, want = Cut.of(data.manifest), head.task.cut
        if (have.truncation, have.windows) != (want.truncation, want.windows):
            def made(cut: Cut) -> str:
                return "prepare's default (head truncation)" if cut.plain else cut.describe()

            raise DtrainError(f"{key}={data.path} was prepared with {made(have)}, data.train with {made(want)}; "
                              f"prepare it as data.train was, so that the model is evaluated on texts cut as it "
                              f"was trained (`dtrain evaluate` takes any set)")
        return cls(head, labels.labels, data, options.threshold, options.n_best, options.max_answer_length)

    def _records(self, logits: torch.Tensor, batch: Batch) -> list[Record]:
        keep = (~batch["pad"]).nonzero().flatten().tolist()
        return self.task.records(logits.detach().cpu().numpy(), batch, keep)

    def _forward(self, model: torch.nn.Module, batch: Batch) -> dict:
        logits = self.head.forward(model, batch)
        return {"logits": logits, **self.head.loss_terms(logits, batch)}

    def collect(self, engine: Any, loader: Iterable[Batch]) -> tuple[float, list[Record]]:
        """(mean loss over all ranks, every rank's records in dataset order)."""
        totals = forward_pass(engine, loader, self._forward, self.head.counts, self._records)
        return totals.mean(), totals.records

    def report(self, loss: float, records: list[Record]) -> dict[str, Any]:
        """Every metric of the task, JSON-serialisable: scalars plus per-class/per-type tables where they apply."""
        if not records:
            return {"loss": loss}
        if not self.windowed:
            return {"loss": loss, **self.task.report(records, self)}
        pooled = self.task.pool_windows(records, [int(self.data.get(r[0], "doc")) for r in records])
        return {"loss": loss, **self.task.report(pooled, self), "documents": len(pooled), "windows": len(records)}

    def scalars(self, engine: Any, loader: Iterable[Batch]) -> dict[str, float]:
        """The report's scalar metrics (what the loop logs and early stopping reads)."""
        return scalar_metrics(self.report(*self.collect(engine, loader)))


def final_reports(trainer: Any, evaluators: dict[str, Evaluator], streams: dict[str, Any], titles: dict[str, str],
                  is_main: bool) -> dict[str, dict[str, Any]]:
    """The full report of the model the trainer ended with on each set named in `titles` that has an evaluator and a
    stream: logged (TensorBoard under its name) and printed on rank 0 (titled `titles[name]`)."""
    from dtrain.metrics import format_report

    reports = {}
    for name in [n for n in titles if n in evaluators and n in streams]:
        evaluator = evaluators[name]
        with trainer.engine.evaluating():
            reports[name] = evaluator.report(*evaluator.collect(trainer.engine, streams[name]))
        trainer.logger.eval(trainer.model_step, scalar_metrics(reports[name]), prefix=name)
        if is_main:
            print(format_report(reports[name], f"{titles[name]} {evaluator.data.path}, model of step "
                                               f"{trainer.model_step}"))
    return reports


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
