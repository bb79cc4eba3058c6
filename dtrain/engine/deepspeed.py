"""DeepSpeed ZeRO 0–3 behind the Engine interface. Its JSON is generated from the dtrain config; a user JSON
(`parallel.deepspeed_config`) is merged on top and every key it changes is reported."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtrain.config import Config
from dtrain.distributed import DistEnv
from dtrain.engine.base import Engine, Forward, NonFiniteError, StepInfo
from dtrain.errors import DtrainError

TAG = "deepspeed"


def deepspeed_config(cfg: Config, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    p = cfg.precision
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if hidden_size and cfg.parallel.zero_stage > 0:
        # Buffers sized to the model, as HF Trainer's "auto" values do. DeepSpeed's defaults (5e8-element reduce
        # and all-gather buckets) are sized for billion-parameter models: for BERT they cost more memory per rank
        # than ZeRO-3 saves (bench/memory.py measured ZeRO-3 at 1.3x DDP with them, below 1x without).
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["allgather_bucket_size"] = max(hidden_size * hidden_size, 50_000_000)
        if cfg.parallel.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.schedule.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.schedule.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload works with dtrain's torch optimizer too
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {"enabled": p.dtype == "fp16", "loss_scale": 0, "initial_scale_power": p.initial_loss_scale_power,
                 "loss_scale_window": p.loss_scale_window, "min_loss_scale": p.min_loss_scale},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict[str, Any], path: str | None) -> tuple[dict[str, Any], list[str]]:
    """The generated config with the user's JSON on top; returns (merged, one line per key the user changed)."""
    if not path:
        return generated, []
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DtrainError(f"parallel.deepspeed_config={path}: cannot read it as JSON ({e}); fix the file") from None
    changes: list[str] = []

    def merge(base: dict, top: dict, prefix: str) -> dict:
        out = dict(base)
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, f"{prefix}{key}.")
            else:
                if key in out and out[key] != value:
                    changes.append(f"{prefix}{key}: dtrain {out[key]!r} → {Path(path).name} {value!r}")
                out[key] = value
        return out

    return merge(generated, user, ""), changes


class DeepSpeedEngine(Engine):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv,
                 cfg: Config):
        import deepspeed

        self.env, self.device, self.model = env, env.device, model
        self.stage = cfg.parallel.zero_stage
        config, self.changes = merge_user_config(
            deepspeed_config(cfg, env.world_size, getattr(getattr(model, "config", None), "hidden_size", None)),
            cfg.parallel.deepspeed_config)
        if env.is_main:
            for change in self.changes:
                print(f"dtrain: parallel.deepspeed_config overrides {change}", file=sys.stderr)
        self.gas = int(config["gradient_accumulation_steps"])
        if self.gas != cfg.schedule.grad_accum_steps:
            raise DtrainError("parallel.deepspeed_config sets gradient_accumulation_steps; set "
                              "schedule.grad_accum_steps instead (the loop must agree with DeepSpeed)")
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Forward(model), optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False)
        self.fp16 = bool(config["fp16"]["enabled"])
        self.half = self.fp16 or bool(config["bf16"]["enabled"])

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed counts micro-steps itself

    def forward(self, fn: Callable[[torch.nn.Module, dict], dict], batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return self.ds(batch, fn)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps: undo both
        self.ds.backward(loss * self.env.world_size * self.gas)
        self.ds.step()  # a micro-step; the optimizer runs at the accumulation boundary

    def step(self) -> StepInfo:
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.ds.optimizer, "overflow", False)) if self.fp16 else False
        if not self.fp16 and not math.isfinite(norm) and norm == norm:  # inf (nan means "not reported")
            raise NonFiniteError(f"the gradient norm is {norm}: training diverged; lower optim.lr or resume from an "
                                 f"earlier checkpoint")
        scale = float(getattr(self.ds.optimizer, "cur_scale", 0.0)) if self.fp16 else None
        return StepInfo(skipped, norm, scale)

    @property
    def lr(self) -> float:
        return float(max(self.ds.get_lr()))

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=TAG)

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
        if loaded is None:
            raise DtrainError(f"{path}: no DeepSpeed checkpoint (tag {TAG}) in it; it was written by another engine")

    def full_state_dict(self, checkpoint: Path | None = None) -> dict[str, torch.Tensor] | None:
        """All ranks take part (ZeRO-3 gathers the partitions); rank 0 gets the weights. In bf16/fp16 with ZeRO
        1–3 and a checkpoint of the current state given, these are its fp32 master weights (the module itself
        holds 16-bit copies)."""
        import deepspeed

        if self.half and self.stage > 0 and checkpoint is not None:
            if self.env.is_main:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
                return {k.removeprefix("model."): v.float() for k, v in state.items()}
            return None

        params = list(self.model.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.stage == 3 \
            else contextlib.nullcontext()
        with gather:
            if self.env.is_main:
                return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
        return None
