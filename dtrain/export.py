"""`dtrain export RUN_DIR[/checkpoints/step-N] OUT_DIR`: a checkpoint (DDP or DeepSpeed ZeRO 0–3) → a Hugging Face
model dir with its tokenizer, loadable by AutoModelFor*.from_pretrained and pipeline()."""

from __future__ import annotations

from pathlib import Path

import torch

from dtrain.checkpoint import TRAINER_FILE, latest_checkpoint
from dtrain.config import load_config
from dtrain.data.shards import atomic_output_dir
from dtrain.engine.ddp import STATE_FILE
from dtrain.engine.deepspeed import TAG, written_world_size
from dtrain.errors import DtrainError
from dtrain.files import EXPORT, check_output
from dtrain.model.bert import pretraining_model, quiet_transformers
from dtrain.model.peft import base_hf_model, is_peft
from dtrain.runner import tokenizer_for
from dtrain.tasks import LabelMap, apply_peft, task_model


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from either engine's checkpoint format."""
    if (ckpt / STATE_FILE).is_file():
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    if (ckpt / TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO stage 0 has no per-rank optimizer partitions and keeps plain module states (DeepSpeed 0.19's
        # zero_to_fp32 fails on it with a TypeError)
        if written_world_size(ckpt / TAG) is None:
            files = sorted((ckpt / TAG).glob("mp_rank_*_model_states.pt"))
            state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
        return {k.removeprefix("model."): v.float() for k, v in state.items()}
    raise DtrainError(f"{ckpt}: neither {STATE_FILE} (DDP) nor {TAG}/ (DeepSpeed) in it; pass a dtrain checkpoint")


def export(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    source = Path(source)
    ckpt = source if (source / TRAINER_FILE).is_file() else latest_checkpoint(source / "checkpoints")
    if ckpt is None:
        raise DtrainError(f"{source}: no complete checkpoint (neither a step-N dir nor a run dir with checkpoints/)")
    cfg = load_config(ckpt / "config.yaml")
    read = [("the checkpoint", ckpt), ("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer",
            cfg.model.tokenizer), ("data.train", cfg.data.train if cfg.task.type else None)]
    check_output(out, EXPORT, [(k, v) for k, v in read if v and Path(v).exists()], overwrite, "OUT")
    if cfg.task.type is None:
        model, _ = pretraining_model(cfg.model.name_or_path)
    else:
        labels = LabelMap.load(Path(cfg.data.train))
        model = apply_peft(task_model(cfg.task.type, cfg.model.name_or_path, labels.labels)[0], cfg.peft,
                           cfg.task.type)
    state = checkpoint_weights(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DtrainError(f"{ckpt}: the weights do not fit {cfg.model.name_or_path} "
                          f"({str(e).splitlines()[0][:200]})") from None
    if is_peft(model):
        model = base_hf_model(model)
    with atomic_output_dir(out, overwrite, kind=EXPORT, flag="OUT") as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer_for(cfg).save_pretrained(tmp)
    return ckpt
