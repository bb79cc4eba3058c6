"""The one writer of Hugging Face model dirs (config, safetensors, tokenizer; loadable by AutoModelFor*.from_pretrained
and pipeline()), from either source:

- `export_live`: the live engine at the end of a run (`<run_dir>/export`; every rank takes part, ZeRO-3 gathers);
- `export`: a checkpoint on disk (`dtrain export RUN_DIR[/checkpoints/step-N] OUT_DIR`, DDP or DeepSpeed ZeRO 0–3).

Both read fp32 weights (`checkpoint_weights` / `Engine.full_state_dict`: one ZeRO path, engine.deepspeed.fp32_weights)
and write them through `_write` (a PEFT model merged into a plain HF model, the dtype recorded as float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import TRAINER_FILE, latest_checkpoint
from dtrain.config import load_config
from dtrain.data.shards import MANIFEST, ShardedDataset, read_manifest
from dtrain.distributed import DistEnv, barrier
from dtrain.engine.base import Engine
from dtrain.engine.ddp import STATE_FILE
from dtrain.engine.deepspeed import TAG, fp32_weights
from dtrain.errors import DtrainError
from dtrain.files import EXPORT, atomic_output_dir, check_output
from dtrain.methods.distill import student_skeleton, weights_source
from dtrain.model import adapters
from dtrain.model.bert import pretraining_model, quiet_transformers
from dtrain.model.peft import base_hf_model, is_peft
from dtrain.model.tokenizer import tokenizer_for
from dtrain.tasks import LabelMap, apply_peft, init_from_run, run_task, task_model


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from either engine's checkpoint format."""
    if (ckpt / STATE_FILE).is_file():
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    if (ckpt / TAG).is_dir():
        return fp32_weights(ckpt)
    raise DtrainError(f"{ckpt}: neither {STATE_FILE} (DDP) nor {TAG}/ (DeepSpeed) in it; pass a dtrain checkpoint")


def _write(model: torch.nn.Module, state: dict[str, torch.Tensor] | None, tokenizer: Any, tmp: Path) -> None:
    """`model` with `state` (None: its own weights) as an HF dir in `tmp`."""
    with quiet_transformers():
        if is_peft(model):  # LoRA merged into a plain HF model (prompt tuning: a peft adapter dir, see peft.py)
            model, state = base_hf_model(model, state), None
        if adapters.has_adapters(model):  # the HF model without them, the adapters beside it (adapters.py)
            full = state if state is not None else model.state_dict()
            model.save_pretrained(tmp, state_dict=adapters.split_state(full)[0])
            adapters.save(model, full, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    # save_pretrained records the module's dtype (16-bit under DeepSpeed bf16/fp16); the weights are fp32
    if (tmp / "config.json").is_file():  # (a prompt-tuning export is a peft adapter dir without one)
        config = json.loads((tmp / "config.json").read_text())
        config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_live(engine: Engine, model: torch.nn.Module, tokenizer: Any, out: Path, env: DistEnv,
                checkpoint: Path | None = None) -> None:
    """The run's own export from the engine's consolidated weights (all ranks call it; rank 0 writes). `checkpoint`:
    the checkpoint just saved of this state (the fp32 master weights under DeepSpeed bf16/fp16)."""
    state = engine.full_state_dict(checkpoint)
    if env.is_main:
        with atomic_output_dir(out, overwrite=True) as tmp:  # the run's own export: replaced whole when complete
            _write(model, state, tokenizer, tmp)
    barrier()


def trained_on(ckpt: Path, data_train: str) -> str:
    """The training set of a checkpoint's run, which gives the export its labels and how it cuts long texts: the set
    its run dir's data.json recorded (an absolute path), refused when re-prepared since; data.train without one."""
    record = ckpt.parent.parent / "data.json"
    if ckpt.parent.name != "checkpoints" or not record.is_file():
        return data_train
    source = json.loads(record.read_text(encoding="utf-8"))["train"]
    path = Path(source["path"])
    if not (path / MANIFEST).is_file():
        return data_train  # (moved: data.train, as the config names it)
    if ShardedDataset(path).record()["manifest_sha256"] != source.get("manifest_sha256"):
        raise DtrainError(f"{ckpt}: its training set {path} no longer matches the manifest the run trained on "
                          f"(re-prepared since: its manifest.json changed), and the export takes its labels and its "
                          f"cut of long texts from there; restore that data (the run's own export/ has both)")
    return str(path)


def export(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A checkpoint (or a run dir's latest one) → an HF dir at `out`; returns the checkpoint exported."""
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
        train = trained_on(ckpt, cfg.data.train)
        labels = LabelMap.load(Path(train))
        task = run_task(cfg.task, tokenizer_for(cfg), labels, read_manifest(train), cfg.data.max_seq_len)
        if cfg.distill.student_layers is not None:  # a student of a teacher's layers: the teacher's config, fewer
            model = student_skeleton(cfg, task)     # layers
        elif cfg.model.init_from and Path(cfg.model.init_from).exists():  # as the run built it (it may bring adapters)
            model = init_from_run(task, cfg.model.init_from, labels.labels, cfg.task.extend_labels)[0]
        else:
            model = task_model(task, cfg.model.name_or_path, labels.labels)[0]
        model = apply_peft(model, cfg.peft, task)
    state = checkpoint_weights(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DtrainError(f"{ckpt}: the weights do not fit {weights_source(cfg)} "
                          f"({str(e).splitlines()[0][:200]})") from None
    with atomic_output_dir(out, overwrite, kind=EXPORT, flag="OUT") as tmp:
        _write(model, None, tokenizer_for(cfg), tmp)
    return ckpt
