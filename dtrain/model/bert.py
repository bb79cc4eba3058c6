"""BERT models in the standard Hugging Face layout, built from a preset or a local checkpoint.

Pretraining uses transformers' BertForPreTraining module (so weights stay tied and save/load as any HF checkpoint)
but runs its vocabulary head only on the masked positions the collator lists: for 15% masking that is about 1/7 of
the head's FLOPs and memory, and the head is the single largest matmul of a BERT-base step at sequence 128.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from dtrain.data import IGNORE
from dtrain.errors import DtrainError
from dtrain.model.presets import preset_config
from dtrain.model.source import check_bert, local_dir, preset_of

ENCODER_KEY = "embeddings.word_embeddings.weight"  # no encoder weights in a checkpoint: refused


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers warns loudly about heads a checkpoint lacks; dtrain reports them itself in one line."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _overrides(dropout: float | None, attn_implementation: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dropout is not None:
        extra.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return extra


def load_model(cls: Any, name_or_path: str, dropout: float | None = None, attn_implementation: str = "sdpa",
               **config: Any) -> tuple[torch.nn.Module, list[str]]:
    """(model, names of the weights that start fresh) for a transformers model class.

    `name_or_path` (dtrain/model/source.py): `preset:NAME` or `tiny` (random init, only on request), a local
    checkpoint dir, or a Hugging Face Hub id (pretrained weights from the HF cache, or the Hub when reachable). A
    checkpoint must be BERT, and must hold BERT encoder weights: nothing starts from random weights unasked."""
    extra = _overrides(dropout, attn_implementation)
    preset = preset_of(name_or_path)
    if preset:
        model = cls._from_config(preset_config(preset, **config, **extra))  # (under ZeRO-3: built partitioned)
        return model, [name for name, _ in model.named_parameters()]
    path = local_dir(name_or_path)
    check_bert(path)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), output_loading_info=True, local_files_only=True,
                                              **config, **extra)
    except OSError as e:
        raise DtrainError(f"{path}: cannot load weights ({str(e).splitlines()[0][:200]}); the dir needs "
                          f"model.safetensors (or pytorch_model.bin) beside config.json") from None
    if info.get("mismatched_keys"):
        raise DtrainError(f"{path}: weights do not fit the model ({info['mismatched_keys'][0]} ...); check "
                          f"model.name_or_path and the task's label count")
    missing = sorted(info.get("missing_keys", []))
    if any(k.split(".", 1)[-1] == ENCODER_KEY or k == ENCODER_KEY for k in missing):
        unexpected = sorted(info.get("unexpected_keys", []))
        found = f"it holds {unexpected[0]} ..." if unexpected else "it holds none of them"
        raise DtrainError(f"{path}: config.json says BERT, but the weights have no BERT encoder ({ENCODER_KEY} "
                          f"missing; {found}); point model.name_or_path at a BERT checkpoint, or write "
                          f"preset:NAME for a random-init model")
    return model, missing


def fresh_summary(missing: list[str]) -> str:
    """One line for the log: which parts start from random weights."""
    if not missing:
        return "all weights loaded from the checkpoint"
    if any(k.startswith(("bert.embeddings", "embeddings")) for k in missing):
        return "random init (a preset: no pretrained weights)"
    heads = sorted({".".join(k.split(".")[:2] if k.count(".") > 1 else k.split(".")[:1]) for k in missing})
    return "fresh (not in the checkpoint): " + ", ".join(heads)


def pretraining_model(name_or_path: str, dropout: float | None = None,
                      attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, list[str]]:
    from transformers import BertForPreTraining

    return load_model(BertForPreTraining, name_or_path, dropout, attn_implementation)


def pretraining_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How many targets each loss term of a pretraining batch has (known before the forward pass)."""
    return {"mlm": (batch["mlm_labels"] != IGNORE).sum(), "nsp": (batch["next_sentence_label"] != IGNORE).sum()}


def pretraining_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Summed MLM and NSP cross-entropies of a PretrainingCollator batch.

    Sums, not means: the trainer divides by the number of targets over all micro-batches and ranks of a step, so
    that micro 4 × accumulation 2 gives the same gradient as micro 8 × 1. The vocabulary head runs on the masked
    positions only (gathered before the transform and the tied decoder)."""
    out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
    sequence, pooled = out[0], out[1]
    positions = batch["mlm_positions"]
    gathered = sequence.gather(1, positions.unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))
    logits = model.cls.predictions(gathered).float()
    labels = batch["mlm_labels"]
    mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    nsp = F.cross_entropy(model.cls.seq_relationship(pooled).float(), batch["next_sentence_label"],
                          ignore_index=IGNORE, reduction="sum")
    return {"mlm": mlm, "nsp": nsp}


def set_encoder(model: torch.nn.Module, unpad: bool = True, gradient_checkpointing: bool = False,
                compile: bool = False) -> torch.nn.Module:
    """`model.unpad`, `model.gradient_checkpointing` and `model.compile` applied to a model (in place) before an
    engine wraps it. Checkpointed layers run HF's padded path (dtrain/model/unpad.py says when unpadding steps aside).

    compile: torch.compile of the BERT encoder module (nn.Module.compile: parameter names and state dicts unchanged)
    with dynamic shapes, so batches of any length and token count reuse one graph per region (the unpadded path
    breaks the graph where the batch's token count is read) instead of one compile per shape; the heads stay eager.
    Not under DeepSpeed ZeRO-3 (config.py refuses it), whose parameter-gathering hooks dynamo cannot follow."""
    from dtrain.model import unpad as unpadding

    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DtrainError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; set it "
                              f"to false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = unpadding.unpad(model) if unpad else unpadding.padded(model)
    if compile:
        encoders = [m for m in model.modules() if isinstance(m, unpadding.BertModel)]
        if not encoders:
            raise DtrainError(f"model.compile: {type(model).__name__} has no BERT encoder to compile; set it to false")
        encoders[0].compile(dynamic=True)
    return model


def numel(p: torch.Tensor) -> int:
    """A parameter's size, also when ZeRO-3 built it partitioned (its own tensor is then empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(numel(p) for p in {id(p): p for p in model.parameters()}.values())
