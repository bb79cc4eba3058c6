"""Loading the tokenizer of a checkpoint or a run: a fast HF tokenizer, checked to be a BERT one.

Next to the model code (where checkpoints and their files are found: source.py); torch-free, so `dtrain prepare`
(data/) uses it without importing a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.errors import DtrainError
from dtrain.model.source import TOKENIZER_FILES, local_dir, preset_of, tokenizer_files_missing

if TYPE_CHECKING:
    from dtrain.config import Config


class TokenizerError(DtrainError):
    """A tokenizer that cannot be used (missing files, not fast, not BERT's special tokens)."""


def load_tokenizer(name_or_path: str | os.PathLike, key: str = "tokenizer") -> Any:
    """A fast HF tokenizer from a local dir, or of a Hugging Face Hub id (from the HF cache, or the Hub when
    reachable). Refused: a dir without tokenizer files, and a tokenizer without BERT's special tokens. `key`: what
    the user set (a run's model.tokenizer, or model.name_or_path when the checkpoint brings its tokenizer)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if not path.is_dir():
        if path.exists() or not str(name_or_path).strip():
            raise TokenizerError(f"tokenizer {name_or_path}: not a local directory with tokenizer files; pass "
                                 f"the model checkpoint dir (e.g. the minilm example from `dtrain fetch-examples`)")
        path = local_dir(str(name_or_path), key)
    if tokenizer_files_missing(path):
        raise TokenizerError(f"tokenizer {path}: no tokenizer files in the dir (none of "
                             f"{', '.join(TOKENIZER_FILES[:3])} ...), so every word would be [UNK]; pass the dir "
                             f"of a checkpoint that includes its tokenizer (e.g. the minilm example from "
                             f"`dtrain fetch-examples`)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"tokenizer {path}: cannot be loaded ({str(e).splitlines()[0]})") from None
    if not tok.is_fast:
        raise TokenizerError(f"tokenizer {path}: dtrain needs a fast (Rust) tokenizer; add tokenizer.json to the dir")
    lacking = [t for t in ("cls", "sep", "mask", "pad") if getattr(tok, f"{t}_token_id", None) is None]
    if lacking:
        named = ", ".join(f"[{t.upper()}]" for t in lacking)
        raise TokenizerError(f"tokenizer {path}: no {named} token, so not a BERT "
                             f"tokenizer (dtrain trains BERT models); pass the tokenizer of a BERT checkpoint")
    return tok


def tokenizer_for(cfg: Config) -> Any:
    """The tokenizer of a run: model.tokenizer, else the checkpoint's own; a random-init preset uses the uncased
    BERT vocabulary of the minilm example."""
    from dtrain.data.examples import example_or_path  # a leaf module: fetches an example name on first use

    name = cfg.model.tokenizer
    if name is None:
        preset = preset_of(cfg.model.name_or_path)
        if preset:
            if "uncased" not in preset and preset != "tiny":
                raise DtrainError(f"model.tokenizer: the preset {preset} has a cased vocabulary and no tokenizer "
                                  f"ships for it; set model.tokenizer to a cased tokenizer dir")
            name = "minilm"  # the uncased BERT WordPiece vocabulary (30,522), as the presets
        else:
            name = cfg.model.name_or_path  # a checkpoint dir or Hub id brings its own tokenizer
    return load_tokenizer(example_or_path(name), "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
