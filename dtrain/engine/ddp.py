"""torch DDP with autocast (bf16/fp16) and, for fp16, a dynamic loss scale (GradScaler)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from dtrain.distributed import DistEnv
from dtrain.engine.base import AUTOCAST, Engine, EngineSections, Forward, NonFiniteError, StepInfo, to_device

STATE_FILE = "engine.pt"


class DDPEngine(Engine):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
                 env: DistEnv, sections: EngineSections):
        precision = sections.precision
        self.env, self.device = env, env.device
        self.model = model.to(env.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype = AUTOCAST[precision.dtype]
        self.max_grad_norm = sections.optim.max_grad_norm
        self.wrapped: torch.nn.Module = Forward(self.model)
        if env.world_size > 1:
            ids = [env.local_rank] if env.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.wrapped, device_ids=ids)
        self.scaler = None
        self.min_scale = precision.min_loss_scale
        if precision.dtype == "fp16":
            self.scaler = torch.amp.GradScaler(env.device.type, init_scale=2.0 ** precision.initial_loss_scale_power,
                                               growth_interval=precision.loss_scale_window)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def forward(self, fn: Callable[[torch.nn.Module, dict], dict], batch: dict) -> dict:
        batch = to_device(batch, self.device)
        if self.dtype is None:
            return self.wrapped(batch, fn)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.wrapped(batch, fn)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss * self.env.world_size  # DDP averages gradients over ranks; the loop's shares already add up
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepInfo:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf))
        skipped = False
        if self.scaler:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update when unscale_ found inf/nan
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
            if self.scaler.get_scale() < self.min_scale:
                self.scaler.update(new_scale=self.min_scale)
        elif not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"the gradient norm is {norm}: training diverged (no fp16 loss scale to skip the "
                                 f"step); lower optim.lr, set optim.max_grad_norm, or resume from an earlier "
                                 f"checkpoint")
        else:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(skipped, norm, self.scaler.get_scale() if self.scaler else None)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, path: Path) -> None:
        if self.env.is_main:  # every rank holds the same replica
            torch.save(self.state_dict(), path / STATE_FILE)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path / STATE_FILE, map_location=self.device, weights_only=False))

    def full_state_dict(self, checkpoint: Path | None = None) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()} if self.env.is_main else None
