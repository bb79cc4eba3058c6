"""The training loop. `train_step` reads top to bottom; every decision that must agree across ranks (loss, stop,
early stopping) comes from a collective, so ranks never diverge."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import RNG, Checkpointer
from dtrain.config import (
    CheckpointConfig,
    Config,
    EarlyStoppingConfig,
    EvalConfig,
    LoggingConfig,
    PrecisionConfig,
    ScheduleConfig,
)
from dtrain.distributed import DistEnv, all_reduce_sum, any_rank, stop_requested
from dtrain.engine.base import Engine, NonFiniteError
from dtrain.errors import DtrainError
from dtrain.export import export_live
from dtrain.logging import RunLogger

Batch = dict[str, torch.Tensor]


@dataclass
class Objective:
    """What is learned: summed loss terms of a batch, and how many targets each term has (from the labels)."""

    losses: Callable[[torch.nn.Module, Batch], dict[str, torch.Tensor]]
    counts: Callable[[Batch], dict[str, torch.Tensor]]


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (skipped fp16 steps included)
    skipped: int = 0
    skipped_in_a_row: int = 0  # fp16 overflow skips since the last applied step
    samples: int = 0
    tokens: int = 0
    best: float | None = None  # the best evaluation of a trained model (step > 0): the model kept, tested, exported
    best_step: int | None = None
    baseline: float | None = None  # the step-0 evaluation (an untrained head): a bar for early stopping, never kept
    bad_evals: int = 0
    train_seconds: float = 0.0  # time in train_step (evaluations and checkpoints excluded), over all attempts
    history: list[dict[str, float]] = field(default_factory=list)  # eval results, for the run report

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = TrainerState()  # a key an earlier version did not write keeps its default
        for name in TrainerState.__dataclass_fields__:
            setattr(self, name, state.get(name, getattr(fresh, name)))


@dataclass(frozen=True)
class TrainerSections:
    """The config sections the loop reads."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # grad_accum_steps, stop_at_step
    eval: EvalConfig = field(default_factory=EvalConfig)  # metric, mode
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)  # patience, min_delta
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # every_steps, export
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # min_loss_scale, max_consecutive_skips
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # ledger

    @classmethod
    def of(cls, cfg: Config) -> TrainerSections:
        return cls(cfg.schedule, cfg.eval, cfg.early_stopping, cfg.checkpoint, cfg.precision, cfg.logging)


@dataclass(frozen=True)
class Plan:
    """What the run works out beyond its config: its length, how it is judged, what it keeps."""

    total_steps: int
    evaluate: Callable[[Engine], dict[str, float]] | None = None
    eval_every: int | None = None
    metric: str | None = None  # the run's default; eval.metric, when set, wins
    keep_best: bool = False  # test and export the best evaluation's model, not the last one
    tokenizer: Any = None  # saved with the export


class Trainer:
    def __init__(self, env: DistEnv, engine: Engine, loader: Any, objective: Objective, checkpointer: Checkpointer,
                 logger: RunLogger, sections: TrainerSections, plan: Plan):
        self.env, self.engine, self.loader, self.objective = env, engine, loader, objective
        self.checkpointer, self.logger, self.sections, self.plan = checkpointer, logger, sections, plan
        self.total_steps, self.grad_accum = plan.total_steps, sections.schedule.grad_accum_steps
        self.evaluate, self.eval_every, self.keep_best = plan.evaluate, plan.eval_every, plan.keep_best
        self.checkpoint_every, self.stop_at_step = sections.checkpoint.every_steps, sections.schedule.stop_at_step
        self.metric = metric = sections.eval.metric or plan.metric
        mode = sections.eval.mode
        self.maximize = mode == "max" or (mode == "auto" and not (metric or "loss").endswith(("loss", "mse", "mae")))
        self.patience, self.min_delta = sections.early_stopping.patience, sections.early_stopping.min_delta
        self.min_loss_scale = sections.precision.min_loss_scale
        self.max_consecutive_skips = sections.precision.max_consecutive_skips
        self.state = TrainerState()
        self.model_step = 0  # after fit: the step whose weights the engine holds (the best one with keep_best)
        self.interrupted: str | None = None  # why fit saved and stopped before the end (resume later): a stop
        # signal ("preempted") or schedule.stop_at_step ("stopped")
        self.ledger = None  # debug: one JSON line per step with the sample ids this rank trained on
        if sections.logging.ledger:
            self.ledger = Path(checkpointer.run_dir) / "ledger" / f"rank-{env.rank}.jsonl"
            self.ledger.parent.mkdir(parents=True, exist_ok=True)

    # -- state ------------------------------------------------------------------------------------------------------

    @property
    def parts(self) -> dict[str, Any]:
        """Every stateful part of the run: what a checkpoint saves and a resume restores."""
        return {"trainer": self.state, "stream": self.loader, "rng": RNG(), "engine": self.engine}

    def resume(self, resume: str) -> Path | None:
        path = self.checkpointer.resolve(resume)
        if path is not None:
            self.checkpointer.load(path, self.parts)
            self.logger.info(f"resumed from {path} at step {self.state.step}")
        return path

    # -- the loop ---------------------------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[Batch]:
        while True:
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            if not produced:
                raise DtrainError("the training data yields no batch: the dataset is smaller than one global batch "
                                  "(lower data.micro_batch_size or set data.drop_last=false)")

    def train_step(self, micro: list[Batch]) -> dict[str, float]:
        """One optimizer step over `micro` (grad_accum micro-batches): each term's summed loss is divided by its
        target count over all micro-batches and ranks, so the step's gradient does not depend on how the global
        batch is split."""
        counts = [self.objective.counts(b) for b in micro]
        names = list(counts[0])
        local = torch.tensor([float(sum(c[k] for c in counts)) for k in names]
                             + [float(sum(int((~b["pad"]).sum()) for b in micro)),
                                float(sum(int(b["attention_mask"].sum()) for b in micro))])
        totals = all_reduce_sum(local.to(self.engine.device)).cpu()
        # (weighted targets — windows of long documents, 1/windows each — may sum to less than 1: only 0 is replaced)
        denominators = {k: float(totals[i]) if float(totals[i]) > 0 else 1.0 for i, k in enumerate(names)}
        sums = torch.zeros(len(names), device=self.engine.device)
        self.engine.train()
        for i, batch in enumerate(micro):
            with self.engine.micro_batch(last=i == len(micro) - 1):
                terms = self.engine.forward(self.objective.losses, batch)
                loss = sum(terms[k] / denominators[k] for k in names)
                self.engine.backward(loss)
            sums += torch.stack([terms[k].detach().float() for k in names])
        try:
            info = self.engine.step()
        except NonFiniteError as e:
            raise NonFiniteError(f"step {self.state.step + 1}: {e}; {self._last_good()}") from None
        step_terms = all_reduce_sum(sums).cpu()
        scalars = {f"{k}_loss": float(step_terms[i]) / denominators[k] for i, k in enumerate(names)}
        scalars["loss"] = sum(scalars.values())
        if not math.isfinite(scalars["loss"]) and not info.skipped:
            raise NonFiniteError(f"step {self.state.step + 1}: the loss is {scalars['loss']} (seen by all ranks), "
                                 f"nothing was saved from this step on; lower optim.lr and resume from the last "
                                 f"good checkpoint; {self._last_good()}")
        self._check_loss_scale(info)
        self.state.step += 1
        self.state.skipped += int(info.skipped)
        samples, tokens = int(totals[len(names)]), int(totals[len(names) + 1])
        self.state.samples += samples
        self.state.tokens += tokens
        scalars.update(lr=self.engine.lr, grad_norm=info.grad_norm, skipped_steps=float(self.state.skipped))
        if info.loss_scale is not None:
            scalars["loss_scale"] = info.loss_scale
        self.logger.step(self.state.step, scalars, samples, tokens)
        if self.ledger is not None:
            ids = [int(i) for b in micro for i in b["index"][~b["pad"]]]
            with open(self.ledger, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.step, "ids": ids}) + "\n")
        return scalars

    def fit(self) -> TrainerState:
        if self.evaluate and self.state.step == 0:
            self._eval_and_maybe_stop()  # the baseline the run is measured against
        batches = self._micro_batches()
        while self.state.step < self.total_steps:
            started = time.perf_counter()
            self.train_step([next(batches) for _ in range(self.grad_accum)])
            self.state.train_seconds += time.perf_counter() - started
            step = self.state.step
            stop = False
            if self.evaluate and self.eval_every and step % self.eval_every == 0 and step < self.total_steps:
                stop = self._eval_and_maybe_stop()
            signalled = any_rank(stop_requested() is not None, self.engine.device)
            if signalled or step == self.stop_at_step:
                self.interrupted = "preempted" if signalled else "stopped"
                self.logger.info(f"{'a stop signal' if signalled else 'schedule.stop_at_step'}: saving at step "
                                 f"{step} and stopping (the next run with checkpoint.resume=auto continues)")
                self.save()
                return self.state
            if stop:
                break
            if self.checkpoint_every and step % self.checkpoint_every == 0 and step < self.total_steps:
                self.save()
        if self.evaluate and (not self.state.history or self.state.history[-1]["step"] != self.state.step):
            self._eval_and_maybe_stop()
        final = self.checkpointer.latest() if self._saved_at(self.state.step) else self.save()
        self.logger.info(f"trained {self.state.samples} samples in {self.state.train_seconds:.2f} s "
                         f"({self.state.samples / max(self.state.train_seconds, 1e-9):.2f} samples/s)")
        best = self.checkpointer.best() if self.keep_best and self.state.best_step else None
        self.model_step = self.state.step
        if best is not None and best.name == self.checkpointer.name(self.state.best_step) and best != final:
            # the model to test and deploy is the best one (a `best` left by an earlier run does not count)
            self.engine.load(best)
            self.model_step = self.state.best_step
            self.logger.info(f"loaded the best checkpoint {best.name} ({self.metric}={self.state.best:.6g})")
            final = best
        if self.keep_best and self.state.baseline is not None and self.state.best is not None \
                and self._gain(self.state.baseline, self.state.best) > 0:
            self.logger.info(f"the step-0 baseline ({self.metric}={self.state.baseline:.6g}) beat every evaluation "
                             f"after training; it is not a candidate (its head is untrained), so the model kept is "
                             f"the best trained one, step {self.model_step} ({self.metric}={self.state.best:.6g})")
        if self.sections.checkpoint.export:
            export_dir = self.checkpointer.run_dir / "export"
            export_live(self.engine, self.engine.model, self.plan.tokenizer, export_dir, self.env, final)
            self.logger.info(f"exported the model to {export_dir}")
        return self.state

    # -- pieces -----------------------------------------------------------------------------------------------------

    def _last_good(self) -> str:
        latest = self.checkpointer.latest()
        return f"last good checkpoint: {latest}" if latest else "no checkpoint was saved yet"

    def _check_loss_scale(self, info: Any) -> None:
        """fp16: a skipped step is normal while the loss scale finds its level; a step that overflows at the
        floor, or many skips in a row, mean the model itself produces inf/nan (the scale has collapsed)."""
        self.state.skipped_in_a_row = self.state.skipped_in_a_row + 1 if info.skipped else 0
        at_floor = info.skipped and info.loss_scale is not None and info.loss_scale <= self.min_loss_scale
        if at_floor or self.state.skipped_in_a_row >= self.max_consecutive_skips:
            why = (f"it overflowed at the floor precision.min_loss_scale={self.min_loss_scale:g}" if at_floor else
                   f"{self.state.skipped_in_a_row} steps in a row were skipped for overflow "
                   f"(precision.max_consecutive_skips)")
            raise NonFiniteError(f"step {self.state.step + 1}: the fp16 loss scale collapsed ({why}): the model "
                                 f"produces inf/nan, so training stops instead of going on with garbage; resume "
                                 f"from the last good checkpoint with a lower optim.lr or precision.dtype=bf16; "
                                 f"{self._last_good()}")

    def save(self, best: bool = False) -> Path:
        return self.checkpointer.save(self.state.step, self.parts, best=best)

    def _saved_at(self, step: int) -> bool:
        latest = self.checkpointer.latest()
        return latest is not None and latest.name == self.checkpointer.name(step)

    def _gain(self, value: float, reference: float | None) -> float:
        if reference is None:
            return math.inf
        return value - reference if self.maximize else reference - value

    def _eval_and_maybe_stop(self) -> bool:
        """Evaluate (metrics are reduced over ranks by `evaluate`, so every rank decides the same)."""
        with self.engine.evaluating():
            metrics = self.evaluate(self.engine)
        self.logger.eval(self.state.step, metrics)
        self.state.history.append({"step": self.state.step, **metrics})
        if not self.metric:
            return False
        if self.metric not in metrics:
            raise DtrainError(f"eval.metric={self.metric}: the evaluation reports {', '.join(sorted(metrics))}; set "
                              f"eval.metric to one of them")
        value = metrics[self.metric]
        if self.state.step == 0:  # the baseline: its head is untrained, so it is a bar to beat, never the model kept
            self.state.baseline = value
            return False
        # early stopping counts evaluations that beat neither the best trained one nor the baseline
        bar = min((v for v in (self.state.best, self.state.baseline) if v is not None),
                  key=lambda v: -v if self.maximize else v, default=None)
        improved = self._gain(value, bar) > self.min_delta
        if self._gain(value, self.state.best) > self.min_delta:
            self.state.best, self.state.best_step = value, self.state.step
            if self.keep_best:
                self.save(best=True)  # kept apart from the rolling checkpoints
        if improved:
            self.state.bad_evals = 0
            return False
        self.state.bad_evals += 1
        if self.patience and self.state.bad_evals >= self.patience:
            self.logger.info(f"early stopping: {self.metric} has not improved for {self.patience} evaluations")
            return True
        return False
