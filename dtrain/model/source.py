"""Where a model comes from: `model.name_or_path` (and a `--tokenizer`) → a random-init preset or a local dir.

- `preset:NAME` (and the bare `tiny`): an architecture from presets.py with random weights, only ever on request;
- an existing directory: a local Hugging Face checkpoint (or tokenizer) dir;
- anything else is a Hugging Face Hub id (`bert-base-uncased`, `org/name`): its pretrained weights, from the local
  HF cache, else downloaded when the Hub is reachable; with neither, one line that says so and how to fix it.

Checkpoints must be BERT (config.json model_type `bert`: BERT itself, MiniLM and other checkpoints of the BERT
architecture), the only architecture dtrain's models and heads are built on. No torch import here: `dtrain prepare`
resolves its tokenizer with it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dtrain.errors import DtrainError
from dtrain.model.presets import PRESETS

PRESET_PREFIX = "preset:"
BARE_PRESETS = ("tiny",)  # the one preset that may be named without the prefix (never a Hub id of a real model)
SUPPORTED_MODEL_TYPES = ("bert",)
# what a checkpoint or tokenizer needs from a Hub repo (no TF/Flax/ONNX weights); pytorch_model.bin only without
# safetensors
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def preset_of(name_or_path: str) -> str | None:
    """The preset a name asks for (random init): `preset:NAME` or a bare `tiny`; None for a dir or Hub id."""
    name = str(name_or_path)
    if name.startswith(PRESET_PREFIX):
        preset = name[len(PRESET_PREFIX):]
        if preset not in PRESETS:
            raise DtrainError(f"model.name_or_path={name}: no preset {preset!r}; the random-init presets are "
                              f"{', '.join(PRESET_PREFIX + p for p in PRESETS)}")
        return preset
    return name if name in BARE_PRESETS else None


def origin(name_or_path: str) -> dict[str, Any]:
    """What a run's model starts from, for the log, status.json and report.json: {"name_or_path", "init":
    "random" (a preset: no pretrained weights) or "pretrained" (a checkpoint dir or Hub id), "preset"}."""
    preset = preset_of(name_or_path)
    return {"name_or_path": str(name_or_path), "init": "random" if preset else "pretrained", "preset": preset}


def origin_line(name_or_path: str) -> str:
    """One log line: `model: random init of preset X (no pretrained weights)` or `model: pretrained weights of X`."""
    preset = preset_of(name_or_path)
    if preset:
        return f"model: random init of preset {preset} (no pretrained weights)"
    return f"model: pretrained weights from {name_or_path}"


def _looks_like_path(name: str) -> bool:
    """A name no Hub id can be: absolute, ./ ../ ~, or more than one `/` (Hub ids are `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def hub_dir(name: str, key: str) -> Path:
    """The local snapshot dir of the Hub repo `name`: from the HF cache, else downloaded (config, tokenizer files and
    safetensors weights) when the Hub is reachable; otherwise one DtrainError naming both and the fixes."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = _hub_cache()
    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache))
    except HFValidationError:
        raise DtrainError(f"{key}={name}: no such local dir, and not a valid Hugging Face Hub id; point it at a local "
                          f"checkpoint dir") from None
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError is an OSError)
        pass
    random_hint = (f", or write {PRESET_PREFIX}{name} for a randomly initialised model of that shape"
                   if name in PRESETS else "")
    if _hub_offline():
        why = "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") else "offline mode is set"
    else:
        try:
            path = Path(snapshot_download(name, cache_dir=cache, allow_patterns=HUB_FILES))
            if not any(path.glob("*.safetensors")) and key != "tokenizer":
                from huggingface_hub import hf_hub_download

                hf_hub_download(name, "pytorch_model.bin", cache_dir=cache)
            return path
        except Exception as e:  # noqa: BLE001 - any failure to reach or read the Hub: one line, the first of its text
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
                raise DtrainError(f"{key}={name}: no such local dir, and the Hugging Face Hub has no (public) model "
                                  f"{name} ({first}); check the name, or point it at a local checkpoint dir"
                                  f"{random_hint}") from None
            why = f"{type(e).__name__}: {first}"
    raise DtrainError(f"{key}={name}: no such local dir, not in the Hugging Face cache ({cache}), and the Hub is not "
                      f"reachable ({why}); download it where there is network (`hf download {name}`, then copy the "
                      f"cache or set HF_HUB_CACHE), point {key} at a local checkpoint dir{random_hint}")


def local_dir(name_or_path: str, key: str = "model.name_or_path") -> Path:
    """A checkpoint or tokenizer as a local dir: the dir itself, or the Hub id's snapshot (cache, then Hub)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DtrainError(f"{key}={name_or_path} is a file, not a checkpoint dir; point it at the dir that holds "
                          f"config.json (and the weights / tokenizer files)")
    if _looks_like_path(str(name_or_path)):
        raise DtrainError(f"{key}={name_or_path}: no such dir; point it at a local checkpoint dir (or a Hugging Face "
                          f"Hub id, or {PRESET_PREFIX}NAME for a random-init preset)")
    return hub_dir(str(name_or_path), key)


def check_bert(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint dir, refused unless it is a BERT model (dtrain's models and heads are BERT)."""
    f = path / "config.json"
    if not f.is_file():
        raise DtrainError(f"model.name_or_path={path}: no config.json in the dir, so not a Hugging Face checkpoint; "
                          f"point it at a checkpoint dir (config.json + model.safetensors), or write "
                          f"{PRESET_PREFIX}NAME for a random-init preset ({', '.join(PRESETS)})")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DtrainError(f"{f}: not readable JSON ({e}); restore the checkpoint's config.json") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    archs = (config.get("architectures") or []) if isinstance(config, dict) else []
    if model_type in SUPPORTED_MODEL_TYPES or (model_type is None and archs and
                                               all(str(a).startswith("Bert") for a in archs)):
        return config
    found = f"model_type {model_type!r}" if model_type else "no model_type"
    if archs:
        found += f" ({', '.join(map(str, archs))})"
    raise DtrainError(f"{f}: {found} is not BERT; dtrain trains BERT models (model_type bert: BERT, MiniLM and "
                      f"other BERT-architecture checkpoints); point model.name_or_path at a BERT checkpoint")


def tokenizer_files_missing(path: Path) -> bool:
    """True when a dir has none of the files a tokenizer is built from (a config.json alone makes a tokenizer of
    only the special tokens, which turns every word into [UNK])."""
    return not any((path / name).is_file() for name in TOKENIZER_FILES)
