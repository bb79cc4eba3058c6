"""What a run builds from its task: the head (the trainer's Objective: loss terms and target counts), the collator
(padding a batch only as far as its longest sequence), the HF task model and its PEFT wrapping."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dtrain.data.shards import ShardError
from dtrain.data.windows import CONFIG_KEY as TEXT_KEY
from dtrain.data.windows import Cut
from dtrain.errors import DtrainError
from dtrain.model import adapters, peft
from dtrain.model.bert import load_model
from dtrain.model.heads import export_dir_of, grow_head
from dtrain.model.source import preset_of
from dtrain.tasks.base import Task, check_class_weights, pad_2d
from dtrain.tasks.labels import LabelMap
from dtrain.tasks.registry import SEQUENCE_TASKS, TASKS, get_task


class Head:
    """Loss and outputs of one task with this run's options. `losses`/`counts` form the trainer's Objective;
    `forward` feeds evaluation and prediction. With a `teacher` (dtrain.methods.distill.Teacher: model, hard, soft,
    temperature) the training loss is hard·(the task's terms) + a `distill` term: soft·T²·KL(teacher ‖ model)."""

    def __init__(self, task: str | Task, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 num_labels: int = 0, teacher: Any = None):
        self.task = get_task(task)
        check_class_weights(self.task, class_weights, num_labels)
        self.label_smoothing = label_smoothing
        self.weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.teacher = teacher

    def soft_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's term for the model's `logits` of `batch` (the teacher's forward: no gradients); {}."""
        if self.teacher is None:
            return {}
        if self.teacher.soft == 0:  # (distill.alpha=1: labels only; the teacher need not run)
            return {"distill": torch.zeros((), device=logits.device)}
        with torch.no_grad():
            target = self.task.forward(self.teacher.model, batch)
        return {"distill": self.teacher.soft * self.task.distill_loss(logits, target, batch, self.teacher.temperature)}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.forward(model, batch)

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.task.loss_terms(logits, batch, self)

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = self.task.losses(model, batch, self)
        if self.teacher is None or self.teacher.hard == 1:
            return terms
        return {k: v if k == "distill" else self.teacher.hard * v for k, v in terms.items()}

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets per loss term (class-weighted for weighted classification, so the loss is a weighted mean)."""
        counts = self.task.counts(batch, self)
        return {**counts, "distill": self.task.distill_count(batch)} if self.teacher is not None else counts


class FinetuneCollator:
    """Pads a batch to its longest sequence (rounded up to a multiple of 8), not to max_seq_len.

    Output (numpy; StreamLoader hands tensors to the loop): input_ids, attention_mask, token_type_ids, index, pad and
    the task's targets (Task.targets: labels, or for qa start_position, end_position and example). Padding repeats
    (pad=True) get ignored targets (-100; NaN for regression) so they add nothing to the loss. Windows of long
    documents (prepare --windows) also carry `weight` = 1/windows of their document (0 for padding), which the loss
    terms and counts weigh each sample by: a document counts once, however long.
    """

    def __init__(self, task: str | Task, pad_id: int, num_labels: int = 0, pad_to_multiple_of: int = 8):
        if not isinstance(task, Task) and task not in TASKS:
            raise ShardError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        self.task, self.pad_id, self.num_labels, self.multiple = get_task(task), pad_id, num_labels, pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        samples = self.task.inputs(samples)
        lengths = np.array([len(s["input_ids"]) for s in samples])
        width = -(-int(lengths.max()) // self.multiple) * self.multiple
        pad = np.array([bool(s["pad"]) for s in samples])
        batch = {"input_ids": pad_2d([s["input_ids"] for s in samples], width, self.pad_id),
                 "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
                 "token_type_ids": pad_2d([s["token_type_ids"] for s in samples], width, 0),
                 "index": np.array([int(s["index"]) for s in samples]), "pad": pad}
        if any("windows" in s for s in samples):  # (replayed rows of unwindowed data: 1)
            batch["weight"] = np.where(pad, 0.0, 1.0 / np.array([int(s.get("windows", 1)) for s in samples]))
            batch["weight"] = batch["weight"].astype(np.float32)
        return {**batch, **self.task.targets(samples, pad, width, self.num_labels)}


def task_model(task: str | Task, name_or_path: str, labels: Sequence[str], dropout: float | None = None,
               attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, list[str]]:
    """The HF model of the task with label names in its config (so pipeline() prints them)."""
    import transformers

    task = get_task(task)
    task.check_model_labels(labels)
    model, fresh = load_model(getattr(transformers, task.hf_class), name_or_path, dropout, attn_implementation,
                              **task.model_config(labels))
    task.check_loaded(name_or_path, fresh, preset_of(name_or_path) is not None)
    keep_settings(model.config, task)
    return model, fresh


def run_task(options: Any, tokenizer: Any, labels: LabelMap, manifest: dict[str, Any], max_seq_len: int) -> Task:
    """A run's task: task.type (`options`: the task config section) bound to the run's settings (a prompt's template
    and verbalizer) and reading long texts as the training set (its `manifest`) was cut, its windows pooled by
    task.window_pooling."""
    task = get_task(options.type).bind(options, tokenizer, labels.labels, get_task(labels.task).has_pairs, max_seq_len)
    return task.reading(Cut.of(manifest), options.window_pooling)


def keep_settings(config: Any, task: Task) -> None:
    """The run's task settings into the model's HF config (what its export's config.json keeps: Task.saved_config);
    how a loaded model (init_from, a teacher) read long texts is dropped when this run's task reads them plainly."""
    saved = task.saved_config()
    if TEXT_KEY not in saved and hasattr(config, TEXT_KEY):
        delattr(config, TEXT_KEY)
    for key, value in saved.items():  # (not from_pretrained keywords: those it gives the model class)
        setattr(config, key, value)


def init_from_run(task: str | Task, path: str, labels: Sequence[str], extend: bool, dropout: float | None = None,
                  attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, list[str]]:
    """Continue fine-tuning an earlier fine-tuned model (model.init_from) on new data: the same label map, or with
    task.extend_labels a superset of it (old labels keep their head rows, new ones start fresh). An export with
    bottleneck adapters brings them (trained again with peft.method=adapter, or with everything else)."""
    model, fresh = _init_from_run(get_task(task), path, labels, extend, dropout, attn_implementation)
    return adapters.load(model, export_dir_of(path)), fresh


def _init_from_run(task: Task, path: str, labels: Sequence[str], extend: bool, dropout: float | None,
                   attn_implementation: str) -> tuple[torch.nn.Module, list[str]]:
    source = export_dir_of(path)
    config = json.loads((source / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch != task.hf_class:
        raise DtrainError(f"model.init_from={path}: it is a {arch}, but task {task.name} needs {task.hf_class}; "
                          f"init from a run of the same task")
    if not task.named_labels or not task.label_rows:
        return task_model(task, str(source), labels, dropout, attn_implementation)
    old = [config["id2label"][str(i)] for i in range(len(config.get("id2label", {})))]
    if old == list(labels):
        return task_model(task, str(source), labels, dropout, attn_implementation)
    missing = [x for x in old if x not in labels]
    if not extend or missing:
        why = f"labels {missing} of the old model are not in data.train" if missing else "the label maps differ"
        raise DtrainError(f"model.init_from={path}: {why} (old: {old[:10]}, new: {list(labels)[:10]}); prepare the "
                          f"new data with --labels <old train dir>, or set task.extend_labels=true to add labels")
    model, _ = task_model(task, str(source), old, dropout, attn_implementation)
    return grow_head(model, old, list(labels))


def apply_peft(model: torch.nn.Module, cfg: Any, task: str | Task) -> torch.nn.Module:
    """dtrain.model.peft.apply_peft for the task (its head module, its peft task type, whether it is sequence-level)."""
    if not isinstance(task, Task) and task not in TASKS:
        raise DtrainError(f"task.type {task!r} has no PEFT support; choose one of {', '.join(TASKS)}")
    return peft.apply_peft(model, cfg, get_task(task), SEQUENCE_TASKS)
