"""Training engines behind one interface (base.Engine): torch DDP + autocast, DeepSpeed ZeRO."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dtrain.config import Config
from dtrain.distributed import DistEnv
from dtrain.engine.base import Engine, EngineSections
from dtrain.errors import DtrainError
from dtrain.optim import build_optimizer, build_scheduler


def build_engine(cfg: Config, model: torch.nn.Module, env: DistEnv, total_steps: int) -> Engine:
    """The optimizer and LR schedule from the config, driven by the configured engine."""
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    sections = EngineSections.of(cfg)
    if cfg.parallel.engine == "ddp":
        from dtrain.engine.ddp import DDPEngine

        return DDPEngine(model, optimizer, scheduler, env, sections)
    if cfg.precision.dtype == "fp16" and env.device.type == "cpu":
        raise DtrainError("DeepSpeed refuses fp16 on a CPU (it needs AVX512-FP16/AMX); use precision.dtype=bf16, or "
                          "parallel.engine=ddp, whose GradScaler does fp16 on CPU")
    try:
        from dtrain.engine.deepspeed import DeepSpeedEngine
    except ImportError as e:  # deepspeed not installed (or built against another torch)
        raise DtrainError(f"parallel.engine=deepspeed needs the deepspeed package, which does not import here ({e}); "
                          f"install it (`make install`) or use parallel.engine=ddp") from None
    return DeepSpeedEngine(model, optimizer, scheduler, env, sections)


@contextlib.contextmanager
def model_building(cfg: Config, env: DistEnv) -> Iterator[None]:
    """Where an entry point builds the model it trains: under DeepSpeed ZeRO-3 the model is built partitioned
    (engine/deepspeed.py partitioned_build), for every other engine and stage as it is."""
    if cfg.parallel.engine != "deepspeed":
        yield
        return
    from dtrain.engine.deepspeed import partitioned_build

    with partitioned_build(EngineSections.of(cfg), env.world_size):
        yield
