"""Sequence-length bounds, checked in one place at `dtrain prepare` and at the start of a run.

- at least MIN_SEQ_LEN tokens: [CLS], [SEP] (a pair: two) and room for text;
- at prepare: at most what the tokenizer's model takes — its `model_max_length`, and `max_position_embeddings` of
  the config.json beside it (a checkpoint dir) — when either is known;
- at run start: the longest sequence that enters the model at most the model's `max_position_embeddings`
  (fine-tuning: the longest row the data holds; pretraining: data.max_seq_len, or the data's length if shorter);
- pretraining data prepared longer than data.max_seq_len: a warning with the share of its tokens that are cut.
No torch import (prepare uses it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.errors import DtrainError

MIN_SEQ_LEN = 8
_UNBOUNDED = 1_000_000  # transformers' "no limit" model_max_length is ~1e30


def tokenizer_limit(tok: Any, tokenizer_dir: str | Path | None) -> tuple[int | None, str]:
    """(the longest sequence the tokenizer's model takes, where that limit comes from), or (None, "")."""
    limits = []
    length = getattr(tok, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNBOUNDED:
        limits.append((length, "its model_max_length"))
    if tokenizer_dir is not None:
        try:
            config = json.loads((Path(tokenizer_dir) / "config.json").read_text(encoding="utf-8"))
            positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
        except (OSError, ValueError):
            positions = None
        if isinstance(positions, int) and positions > 0:
            limits.append((positions, "max_position_embeddings in its config.json"))
    return min(limits) if limits else (None, "")


def check_prepare_len(max_seq_len: int, tok: Any, tokenizer: str | Path, tokenizer_dir: str | Path | None) -> None:
    """`dtrain prepare --max-seq-len`: within [MIN_SEQ_LEN, the limit of the tokenizer's model]."""
    if max_seq_len < MIN_SEQ_LEN:
        raise DtrainError(f"--max-seq-len {max_seq_len}: must be at least {MIN_SEQ_LEN} (room for [CLS], [SEP] and "
                          f"some text); BERT data is usually prepared at 128 or 512")
    limit, source = tokenizer_limit(tok, tokenizer_dir)
    if limit is not None and max_seq_len > limit:
        raise DtrainError(f"--max-seq-len {max_seq_len}: longer than the model of tokenizer {tokenizer} takes "
                          f"({limit} tokens, {source}); use --max-seq-len {limit} or less")


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise DtrainError(f"--workers {workers}: must be at least 1 (1 tokenizes in this process; leave it out for "
                          f"one process per core, at most 8)")


def longest_row(data: Any) -> int:
    """The longest sequence (special tokens included) a prepared dataset feeds the model."""
    lengths = data.column("length")
    longest = int(lengths.max()) if len(lengths) else 0
    return longest + 3 if data.manifest.get("kind") == "pretrain" else longest  # chunks: + [CLS] A [SEP] B [SEP]


def check_finetune_lengths(model_config: Any, datasets: dict[str, Any]) -> None:
    """Fine-tuning feeds rows as prepared: the longest of each dataset must fit the model's positions."""
    limit = int(model_config.max_position_embeddings)
    for key, data in datasets.items():
        longest = longest_row(data)
        if longest > limit:
            raise DtrainError(f"{key}={data.path} holds sequences of up to {longest} tokens (prepared with "
                              f"--max-seq-len {data.manifest.get('max_seq_len')}), but the model takes at most "
                              f"{limit} (max_position_embeddings); prepare it again with --max-seq-len {limit} or "
                              f"less")


def check_pretrain_lengths(model_config: Any, max_seq_len: int, datasets: dict[str, Any]) -> list[str]:
    """Pretraining cuts every pair to data.max_seq_len: that (or the data's own length, if shorter) must fit the
    model's positions. Returns a warning per dataset prepared longer than data.max_seq_len, with the share of its
    tokens that the cut drops."""
    limit = int(model_config.max_position_embeddings)
    warnings = []
    for key, data in datasets.items():
        prepared = int(data.manifest.get("max_seq_len") or 0)
        if min(max_seq_len, longest_row(data)) > limit:
            raise DtrainError(f"data.max_seq_len={max_seq_len}: longer than the model takes ({limit} positions, "
                              f"max_position_embeddings) and {key} holds sequences that long; set "
                              f"data.max_seq_len={limit} or less")
        if prepared > max_seq_len:
            lengths = data.column("length").astype(np.int64)
            total = int(lengths.sum())
            cut = int(np.maximum(lengths - (max_seq_len - 3), 0).sum())
            if cut:
                warnings.append(f"dtrain: warning: {key}={data.path} was prepared with --max-seq-len {prepared}, "
                                f"data.max_seq_len={max_seq_len} cuts every sequence to {max_seq_len} tokens: "
                                f"{cut / total:.1%} of its tokens are never trained on; prepare it with --max-seq-len "
                                f"{max_seq_len} (or raise data.max_seq_len)")
    return warnings
