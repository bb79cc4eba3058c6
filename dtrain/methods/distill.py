"""A frozen teacher whose temperature-softened predictions the model learns from: the model.init_from model when
re-fine-tuning (learning without forgetting: `continual.distill_weight`), a larger fine-tuned model when distilling
(`distill.teacher`, optionally with a student built from the teacher's own layers: `distill.student_layers`).

The loss: hard·(the task's terms) + soft·T²·KL(teacher ‖ student) over the targets of the batch, each term a mean
over its own targets (the trainer's global counts); distill: hard = alpha, soft = 1 − alpha (Hinton et al.);
continual: hard = 1, soft = continual.distill_weight (Li & Hoiem, LwF). The Head adds the term (Head.soft_terms,
with Task.distill_loss), so every task whose outputs are a distribution over labels at each target distils
(Task.distills).

How the teacher meets the engines: a plain module on every rank, outside the engine (not wrapped by DDP, not
partitioned by ZeRO, no optimizer state), frozen, in eval mode (no dropout), on the run's device; it runs once per
micro-batch inside the engine's forward (under its autocast) without gradients. Under ZeRO-3 every rank holds the
whole teacher, so a teacher that does not fit one device is not supported. Frozen and deterministic, it is not in a
checkpoint: a resumed run loads it again from the same path, and resume stays exact.

Written here: transformers keeps distillation in research examples, and no peer trainer (HF Trainer, DLE, Mosaic)
has a teacher; the loss is a few lines, the checks (labels, tokenizer, task) are dtrain's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dtrain.data.shards import tokenizer_fingerprint
from dtrain.errors import DtrainError
from dtrain.model.bert import set_encoder
from dtrain.model.heads import export_dir_of
from dtrain.model.tokenizer import TokenizerError, load_tokenizer
from dtrain.tasks import Task, init_from_run, keep_settings, task_model


@dataclass
class Teacher:
    """The frozen model and how its soft targets weigh against the labels."""

    model: torch.nn.Module
    hard: float  # weight of the task's own loss terms
    soft: float  # weight of the T²·KL term
    temperature: float
    source: str = ""

    def describe(self) -> str:
        return (f"teacher {self.source} (frozen, eval mode): loss = {self.hard:g}·(task loss) + "
                f"{self.soft:g}·T²·KL(teacher ‖ model), T={self.temperature:g}")


def weights_source(cfg: Any) -> str:
    """Where the model's weights start: distill.teacher (a student of its layers), model.init_from, or
    model.name_or_path."""
    if cfg.distill.student_layers is not None:
        return cfg.distill.teacher
    return cfg.model.init_from or cfg.model.name_or_path


def teacher_for(cfg: Any, task: Task, labels: Sequence[str], tokenizer: Any, device: torch.device) -> Teacher | None:
    """The run's teacher: distill.teacher, or with continual.distill_weight the model.init_from model; None."""
    if cfg.distill.teacher:
        model = load_teacher(task, cfg.distill.teacher, "distill.teacher", labels, tokenizer, cfg)
        return Teacher(_placed(model, cfg, device), cfg.distill.alpha, 1.0 - cfg.distill.alpha, cfg.distill.temperature,
                       cfg.distill.teacher)
    if cfg.continual.distill_weight:
        model = load_teacher(task, cfg.model.init_from, "model.init_from", labels, tokenizer, cfg)
        return Teacher(_placed(model, cfg, device), 1.0, cfg.continual.distill_weight, cfg.continual.temperature,
                       cfg.model.init_from)
    return None


def _placed(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.nn.Module:
    """On the run's device; under DeepSpeed in its half precision (DeepSpeed runs the model itself in bf16/fp16,
    without autocast; DDP's autocast covers an fp32 teacher as it covers the model)."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype)
    if half is not None and cfg.parallel.engine == "deepspeed":
        model = model.to(half)
    return model.to(device)


def load_teacher(task: Task, path: str, key: str, labels: Sequence[str], tokenizer: Any, cfg: Any) -> torch.nn.Module:
    """A fine-tuned model of `task` predicting `labels` in their order with the run's tokenizer, frozen, eval mode."""
    if not task.distills:
        raise DtrainError(f"{key}: task {task.name} has no distillation loss (classification, pair, prompt and ner "
                          f"have); remove distill.* and continual.distill_weight")
    try:
        source = export_dir_of(path)
    except DtrainError as e:
        raise DtrainError(f"{key}={e}") from None
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch != task.hf_class:
        raise DtrainError(f"{key}={path}: it is a {arch}, but task {task.name} needs {task.hf_class}; a teacher is a "
                          f"fine-tuned model of the run's task")
    if task.named_labels:
        theirs = [config.get("id2label", {}).get(str(i)) for i in range(len(config.get("id2label", {})))]
        if theirs != list(labels):
            raise DtrainError(f"{key}={path}: its labels {theirs[:10]} are not data.train's {list(labels)[:10]}; a "
                              f"teacher predicts the same labels in the same order (prepare data.train with "
                              f"--labels and the teacher's training set)")
    try:
        own = tokenizer_fingerprint(load_tokenizer(source, key))
    except TokenizerError as e:
        raise DtrainError(f"{key}={path}: {e}") from None
    if own != tokenizer_fingerprint(tokenizer):
        raise DtrainError(f"{key}={path}: its tokenizer (fingerprint {own}) is not the run's "
                          f"({tokenizer_fingerprint(tokenizer)}): the same ids would mean other words; use a teacher "
                          f"trained with the run's tokenizer (model.tokenizer)")
    model, _ = init_from_run(task, str(source), labels, False, None, cfg.model.attn_implementation)
    set_encoder(model.eval(), cfg.model.unpad)
    return model.requires_grad_(False)


def student(cfg: Any, task: Task, labels: Sequence[str], teacher: Teacher | None) -> tuple[torch.nn.Module, list[str]]:
    """The model the run trains and its fresh weights: built from the teacher's layers (distill.student_layers),
    else the model.init_from run's, else model.name_or_path."""
    if cfg.distill.student_layers is not None:
        return student_from_layers(teacher.model, cfg.distill.student_layers, cfg.distill.teacher,
                                   cfg.model.dropout), []
    if cfg.model.init_from:
        return init_from_run(task, cfg.model.init_from, labels, cfg.task.extend_labels, cfg.model.dropout,
                             cfg.model.attn_implementation)
    return task_model(task, cfg.model.name_or_path, labels, cfg.model.dropout, cfg.model.attn_implementation)


def student_skeleton(cfg: Any, task: Task) -> torch.nn.Module:
    """The architecture of a layer student (distill.student_layers): the teacher's config with the student's layer
    count, random weights — what `dtrain export` loads a checkpoint's weights into (the teacher's config.json is
    read, not its weights)."""
    import transformers

    try:
        source = export_dir_of(cfg.distill.teacher)
    except DtrainError as e:
        raise DtrainError(f"distill.teacher={e} (the student's architecture is the teacher's)") from None
    config = transformers.AutoConfig.from_pretrained(str(source), local_files_only=True)
    config.num_hidden_layers = len(cfg.distill.student_layers)
    if cfg.model.dropout is not None:  # as the run's own export has it
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.model.dropout
    keep_settings(config, task)  # (the run's, not the teacher's: how the student reads long texts)
    return getattr(transformers, task.hf_class)(config)


def student_from_layers(teacher: torch.nn.Module, layers: Sequence[int], source: str,
                        dropout: float | None = None) -> torch.nn.Module:
    """A trainable copy of the teacher keeping only its encoder `layers` (in that order), with its embeddings and
    head: the DistilBERT-style start of a smaller student."""
    encoder = teacher.base_model.encoder
    n = len(encoder.layer)
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n for i in layers):
        raise DtrainError(f"distill.student_layers={list(layers)}: the teacher {source} has {n} encoder layers, "
                          f"numbered 0..{n - 1}; give distinct layers in that range, e.g. {list(range(0, n, 2))}")
    student = copy.deepcopy(teacher)
    kept = torch.nn.ModuleList([student.base_model.encoder.layer[i] for i in layers])
    for i, layer in enumerate(kept):  # the attention's own index (transformers uses it for caches)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    student.base_model.encoder.layer = kept
    student.config.num_hidden_layers = len(layers)
    if dropout is not None:  # the encoder's dropouts (as model.dropout sets them); the head's stays
        for module in student.base_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        student.config.hidden_dropout_prob = student.config.attention_probs_dropout_prob = dropout
    student.requires_grad_(True)
    return student.train()

