"""Task-model helpers that know HF models, not tasks: where a fine-tuned model's HF directory is, and growing a
classifier over a larger label set. The tasks themselves (which HF class, loss, outputs) are dtrain/tasks/."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dtrain.errors import DtrainError


def export_dir_of(path: str | Path) -> Path:
    """A fine-tuned model dir: the path itself (an HF export) or <run_dir>/export."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    raise DtrainError(f"{path}: neither an exported model (config.json) nor a run dir with export/; point it at a "
                      f"finished dtrain run or its export")


def _whole(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A module's parameters whole to read: gathered when ZeRO-3 built them partitioned."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def grow_head(model: torch.nn.Module, old: list[str], new: list[str]) -> tuple[torch.nn.Module, list[str]]:
    """Replace the classifier by one over `new` labels; rows of labels in `old` are copied, the others start fresh."""
    head = model.classifier
    grown = torch.nn.Linear(head.in_features, len(new))
    torch.nn.init.normal_(grown.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(grown.bias)
    with torch.no_grad(), _whole(head):
        for i, name in enumerate(new):
            if name in old:
                grown.weight[i] = head.weight[old.index(name)]
                grown.bias[i] = head.bias[old.index(name)]
    model.classifier = grown
    model.num_labels = model.config.num_labels = len(new)
    model.config.id2label = dict(enumerate(new))
    model.config.label2id = {name: i for i, name in enumerate(new)}
    return model, [f"classifier rows of the new labels {[n for n in new if n not in old]}"]
