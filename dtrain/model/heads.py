"""Task heads for fine-tuning: which transformers class each task uses, its loss (summed; the trainer normalises
by the target count over the whole step), and the raw outputs evaluation and prediction turn into answers.

Tasks are named as the prepared data names them (labels.json): classification, pair, multilabel, regression, ner,
qa. The config's task.type accepts the long names too (`resolve_task`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dtrain.data import IGNORE
from dtrain.errors import DtrainError
from dtrain.model.bert import load_model

ALIASES = {"token_classification": "ner", "question_answering": "qa"}
HF_CLASS = {"classification": "BertForSequenceClassification", "pair": "BertForSequenceClassification",
            "multilabel": "BertForSequenceClassification", "regression": "BertForSequenceClassification",
            "ner": "BertForTokenClassification", "qa": "BertForQuestionAnswering"}
PROBLEM_TYPE = {"classification": "single_label_classification", "pair": "single_label_classification",
                "multilabel": "multi_label_classification", "regression": "regression"}
DEFAULT_METRIC = {"classification": "accuracy", "pair": "accuracy", "multilabel": "micro_f1",
                  "regression": "pearson", "ner": "f1", "qa": "f1"}


def resolve_task(configured: str | None, prepared: str, source: str) -> str:
    """The data task of a run: the training set's labels.json task, checked against task.type when that is set."""
    if configured is None:
        return prepared
    want = ALIASES.get(configured, configured)
    fits = want == prepared or (want == "classification" and prepared == "pair") or (want == "pair" == prepared)
    if not fits:
        raise DtrainError(f"task.type={configured}, but {source} was prepared for task {prepared!r}; set task.type to "
                          f"{prepared} (or null), or prepare the data with --task")
    return prepared


def num_outputs(task: str, labels: Sequence[str]) -> int:
    return {"regression": 1, "qa": 2}.get(task, len(labels))


def task_model(task: str, name_or_path: str, labels: Sequence[str], dropout: float | None = None,
               attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, list[str]]:
    """The HF model of the task with label names in its config (so pipeline() prints them)."""
    import transformers

    if task in ("classification", "pair") and len(labels) < 2:
        raise DtrainError(f"the training set's labels.json has {len(labels)} label(s) {list(labels)}, but a "
                          f"classifier needs two classes at least; prepare a training set with examples of each class")
    extra: dict[str, Any] = {}
    if task in PROBLEM_TYPE:
        extra["problem_type"] = PROBLEM_TYPE[task]
    if task != "qa":
        extra["num_labels"] = num_outputs(task, labels)
    if labels and task not in ("regression", "qa"):
        extra["id2label"] = dict(enumerate(labels))
        extra["label2id"] = {name: i for i, name in enumerate(labels)}
    return load_model(getattr(transformers, HF_CLASS[task]), name_or_path, dropout, attn_implementation, **extra)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"]}


class Head:
    """Loss and outputs of one task. `losses`/`counts` form the trainer's Objective; `outputs` feeds evaluation."""

    def __init__(self, task: str, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 num_labels: int = 0):
        if class_weights is not None and task not in ("classification", "pair"):
            raise DtrainError(f"task.class_weights applies to classification, not {task}; remove it")
        if class_weights is not None and len(class_weights) != num_labels:
            raise DtrainError(f"task.class_weights has {len(class_weights)} values but the task has {num_labels} "
                              f"labels; give one weight per label in labels.json order")
        self.task, self.label_smoothing = task, label_smoothing
        self.weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits as float32: [B, C] (sequence tasks), [B, T, C] (ner), [B, T, 2] start/end (qa)."""
        out = model(**_inputs(batch))
        if self.task == "qa":
            return torch.stack([out.start_logits, out.end_logits], dim=-1).float()
        return out.logits.float()

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.task in ("classification", "pair"):
            weight = self.weights.to(logits.device) if self.weights is not None else None
            return {"cls": F.cross_entropy(logits, batch["labels"], weight=weight, ignore_index=IGNORE,
                                           reduction="sum", label_smoothing=self.label_smoothing)}
        if self.task == "multilabel":
            labels = batch["labels"]
            keep = labels != IGNORE
            return {"bce": F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float(), reduction="sum")}
        if self.task == "regression":
            labels = batch["labels"]
            keep = ~torch.isnan(labels)
            return {"mse": F.mse_loss(logits.squeeze(-1)[keep], labels[keep].float(), reduction="sum")}
        if self.task == "ner":
            return {"tag": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")}
        width = logits.shape[1]  # qa: the mean of the start and end cross-entropies; answers past the end ignored
        start = batch["start_position"].clamp(max=width - 1)
        end = batch["end_position"].clamp(max=width - 1)
        ce = sum(F.cross_entropy(logits[..., i], pos, ignore_index=IGNORE, reduction="sum")
                 for i, pos in enumerate((start, end)))
        return {"span": ce / 2}

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss_terms(self.forward(model, batch), batch)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets per loss term (class-weighted for weighted classification, so the loss is a weighted mean)."""
        if self.task in ("classification", "pair"):
            labels = batch["labels"]
            if self.weights is None:
                return {"cls": (labels != IGNORE).sum()}
            return {"cls": self.weights[labels[labels != IGNORE].cpu()].sum()}
        if self.task == "multilabel":
            return {"bce": (batch["labels"] != IGNORE).sum()}
        if self.task == "regression":
            return {"mse": (~torch.isnan(batch["labels"])).sum()}
        if self.task == "ner":
            return {"tag": (batch["labels"] != IGNORE).sum()}
        return {"span": (batch["start_position"] != IGNORE).sum()}


def export_dir_of(path: str | Path) -> Path:
    """A fine-tuned model dir: the path itself (an HF export) or <run_dir>/export."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    raise DtrainError(f"{path}: neither an exported model (config.json) nor a run dir with export/; point it at a "
                      f"finished dtrain run or its export")


def init_from_run(task: str, path: str, labels: Sequence[str], extend: bool, dropout: float | None = None,
                  attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, list[str]]:
    """Continue fine-tuning an earlier fine-tuned model (model.init_from) on new data: the same label map, or with
    task.extend_labels a superset of it (old labels keep their head rows, new ones start fresh)."""
    source = export_dir_of(path)
    config = json.loads((source / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch != HF_CLASS[task]:
        raise DtrainError(f"model.init_from={path}: it is a {arch}, but task {task} needs {HF_CLASS[task]}; "
                          f"init from a run of the same task")
    if task in ("regression", "qa"):
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
    return _grow_head(model, old, list(labels))


def _grow_head(model: torch.nn.Module, old: list[str], new: list[str]) -> tuple[torch.nn.Module, list[str]]:
    """Replace the classifier by one over `new` labels; rows of labels in `old` are copied, the others start fresh."""
    head = model.classifier
    grown = torch.nn.Linear(head.in_features, len(new))
    torch.nn.init.normal_(grown.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(grown.bias)
    with torch.no_grad():
        for i, name in enumerate(new):
            if name in old:
                grown.weight[i] = head.weight[old.index(name)]
                grown.bias[i] = head.bias[old.index(name)]
    model.classifier = grown
    model.num_labels = model.config.num_labels = len(new)
    model.config.id2label = dict(enumerate(new))
    model.config.label2id = {name: i for i, name in enumerate(new)}
    return model, [f"classifier rows of the new labels {[n for n in new if n not in old]}"]
