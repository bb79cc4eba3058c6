"""The Engine interface: the loop calls forward / backward per micro-batch and step per optimizer step, and never
asks which engine it drives."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtrain.config import Config, DataConfig, OptimConfig, ParallelConfig, PrecisionConfig, ScheduleConfig
from dtrain.errors import DtrainError


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict:
    """A batch's tensors on `device` (other values as they are): what every engine does before a forward."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


class NonFiniteError(DtrainError):
    """The gradient (or loss) is NaN/inf and there is no loss scale to absorb it."""


class CheckpointError(DtrainError):
    """An engine could not load a checkpoint and its message already names the checkpoint and the fix:
    Checkpointer.load passes it on as it is (other load errors it words as "does not fit this model")."""


@dataclass(frozen=True)
class StepInfo:
    skipped: bool  # the optimizer step was skipped (fp16 overflow): weights and schedule unchanged
    grad_norm: float  # global gradient norm before clipping (inf/nan on overflow)
    loss_scale: float | None  # fp16 dynamic loss scale after the step; None without fp16


@dataclass(frozen=True)
class EngineSections:
    """The config sections an engine reads; both engines are built from the same ones (one signature):
    Engine(model, optimizer, scheduler, env, sections). DeepSpeed's JSON also states the batch shape
    (data.micro_batch_size, schedule.grad_accum_steps) and the clipping (optim.max_grad_norm)."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def of(cls, cfg: Config) -> EngineSections:
        return cls(cfg.precision, cfg.optim, cfg.parallel, cfg.schedule, cfg.data)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Forward(torch.nn.Module):
    """Runs fn(model, batch) as this module's forward, so a wrapper around it (DDP, DeepSpeed) sees the call: DDP
    only synchronises gradients of work done inside its own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, fn: Callable[[torch.nn.Module, dict], Any]) -> Any:
        return fn(self.model, batch)


class Engine(ABC):
    """model: the plain HF module (never the wrapper); optimizer/scheduler: what the engine steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device

    @abstractmethod
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; `last` is the one that synchronises gradients."""

    @abstractmethod
    def forward(self, fn: Callable[[torch.nn.Module, dict], dict], batch: dict) -> dict:
        """fn(module, batch) under the engine's precision (the module may be a wrapper around self.model)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """loss: this micro-batch's share of the step's loss (the shares of all micro-batches on all ranks add up
        to the step loss); the engine undoes its own gradient averaging."""

    @abstractmethod
    def step(self) -> StepInfo:
        """Clip, (unscale / skip on overflow), optimizer step, scheduler step, zero the gradients."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the engine's state (model, optimizer, scheduler, loss scaler) into the checkpoint dir `path`."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what save() wrote."""

    @abstractmethod
    def full_state_dict(self, checkpoint: Path | None = None) -> dict[str, torch.Tensor] | None:
        """The whole model's weights in fp32 on rank 0 (None on other ranks), for export; `checkpoint`: a checkpoint
        of the current state, which an engine may read its fp32 master weights from."""

    @property
    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was)
