"""dtrain: a distributed trainer for BERT models."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | os.PathLike) -> Any:
    """The fine-tuned model of a dtrain run dir or export dir, in eval mode, as its AutoModelFor* class, with what
    the HF dir alone does not hold put back (bottleneck adapters): it works in `transformers.pipeline(task,
    model=dtrain.load_model(d), tokenizer=d)` and predicts what `dtrain predict` predicts."""
    from dtrain.predict import load_finetuned

    return load_finetuned(path)[0].eval()
