"""The engine of one process without an optimizer: `dtrain evaluate` and `dtrain predict` run the evaluation loop
(evaluation.forward_pass) through it as a run does through its DDP or DeepSpeed engine: the batch to the device,
fn(model, batch) under inference_mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dtrain.engine.base import to_device


class LocalEngine:
    """`forward` and `device` of the Engine interface, for a model in eval mode on one device (CUDA if present)."""

    distributed = False  # one process: its evaluation loop combines nothing with other ranks (even inside a job)

    def __init__(self, model: torch.nn.Module, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()

    def forward(self, fn: Callable[[torch.nn.Module, dict], Any], batch: dict) -> Any:
        batch = to_device(batch, self.device, non_blocking=False)
        with torch.inference_mode():
            return fn(self.model, batch)
