"""The label map of a fine-tuning dataset: label ↔ id, saved as labels.json beside the shards, checked against the
shards it was written with when it is loaded."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dtrain.data import IGNORE
from dtrain.data.shards import MANIFEST, ShardError, read_manifest
from dtrain.tasks.base import Task
from dtrain.tasks.registry import TASKS, get_task

LABELS_FILE = "labels.json"


class LabelMap:
    """label ↔ id, saved as labels.json beside the shards (and reused to prepare dev/test sets)."""

    def __init__(self, task: str, labels: Sequence[str], source: str = ""):
        self.task, self.labels, self.source = task, list(labels), source
        self.ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def build(cls, task: str | Task, values: Sequence[Any]) -> LabelMap:
        task = get_task(task)
        return cls(task.name, task.label_names(values))

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """labels.json (or the dataset dir that holds it), checked against the dataset's manifest.json beside it:
        the task, the number of labels and the label ids its shards hold (and their counts) must agree, so an
        edited file cannot silently renumber the labels. `labels` is a list (id = position) or a mapping
        {"name": id, ...} (read by id, which must run 0..n-1)."""
        path = Path(path)
        path = path / LABELS_FILE if path.is_dir() else path
        if not path.exists() and (path.parent / "manifest.json").is_file():
            kind = read_manifest(path.parent).get("kind")
            if kind != "finetune":
                raise ShardError(f"{path.parent} was prepared for {kind!r} (`dtrain prepare {kind}`), not for "
                                 f"fine-tuning: it has no labels; prepare labelled data with `dtrain prepare "
                                 f"finetune`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            task, raw = data["task"], data["labels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{path}: not a readable {LABELS_FILE} ({e}); pass the labels.json written by "
                             f"`dtrain prepare finetune` for the training set") from None
        label_map = cls(task, _label_list(raw, path), str(path))
        label_map._check_dataset(path.parent, data.get("counts"))
        return label_map

    def _check_dataset(self, folder: Path, counts: Any) -> None:
        """The label map against the dataset it was written with (when labels.json sits in a dataset dir)."""
        if not (folder / MANIFEST).is_file():
            return  # a labels.json on its own (prepare --labels FILE): nothing to check it against
        manifest = read_manifest(folder)
        src, n = self.source, len(self.labels)
        fix = "restore the labels.json that `dtrain prepare finetune` wrote, or prepare the data again"
        if manifest.get("task", self.task) != self.task:
            raise ShardError(f"{src} says task {self.task!r}, but {folder / MANIFEST} says {manifest.get('task')!r}; "
                             f"{fix}")
        kind = TASKS.get(self.task)
        if kind is not None and not kind.named_labels:
            return
        want = manifest.get("num_labels")
        if want is not None and want != n:
            shown = ", ".join(self.labels[:10]) + (" ..." if n > 10 else "")
            raise ShardError(f"{src} lists {n} labels ({shown}), but the dataset was prepared with {want} "
                             f"({MANIFEST} num_labels); {fix}")
        ids = _shard_label_ids(folder, manifest, kind.label_column if kind else "label")
        if ids is None:
            return
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ShardError(f"{src} has {n} labels, but the shards of {folder} hold label id {int(ids.max())}; "
                             f"{fix}")
        if isinstance(counts, dict) and kind is not None and kind.counts_per_label:
            held = np.bincount(ids, minlength=n)
            for i, name in enumerate(self.labels):
                if int(counts.get(name, 0)) != int(held[i]):
                    raise ShardError(f"{src}: label {name!r} has id {i}, but the shards hold {int(held[i])} "
                                     f"examples with id {i} and labels.json counts {int(counts.get(name, 0))} "
                                     f"{name!r} (the order of the labels was changed?); {fix}")

    def check_trainable(self, values: Sequence[Any], where: Sequence[str], source: str) -> None:
        """A training set's labels (no --labels given) must make a task that can train (the task's checks)."""
        get_task(self.task).check_labels(self, values, where, source)

    def id(self, label: Any, where: str) -> int:
        try:
            return self.ids[str(label)]
        except KeyError:
            known = ", ".join(self.labels[:20]) + (" ..." if len(self.labels) > 20 else "")
            src = self.source or LABELS_FILE
            raise ShardError(f"{where}: label {str(label)!r} is not in {src} (known: {known}); fix the label or "
                             f"prepare the training set so that it includes it") from None

    def check_same(self, train: LabelMap, key: str) -> None:
        """A dev/test set must use the training set's label map (prepared with --labels TRAIN_DIR)."""
        if (self.task, self.labels) != (train.task, train.labels):
            extra = sorted(set(self.labels) - set(train.labels))
            detail = f"labels unknown to the model: {extra[:10]}" if extra else \
                f"task {self.task!r} with labels {self.labels[:10]} vs {train.task!r} with {train.labels[:10]}"
            raise ShardError(f"{key} ({self.source}) does not match the training set's label map ({detail}); prepare "
                             f"it with `dtrain prepare finetune ... --labels <train dir>`")

    def save(self, out: Path, counts: Counter | None = None, extra: dict | None = None) -> None:
        data = {"task": self.task, "labels": self.labels,
                "counts": {str(k): v for k, v in sorted((counts or {}).items())}, **(extra or {})}
        (out / LABELS_FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _label_list(raw: Any, path: Path) -> list[str]:
    """labels.json's `labels`: a list of names (id = position), or a mapping name → id (or id → name) whose ids are
    exactly 0..n-1; anything else is refused."""
    fix = "write the labels as a list in id order, or as {\"name\": id} with the ids 0..n-1 each once"
    if isinstance(raw, list):
        labels = raw
    elif isinstance(raw, dict):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            by_id = {v: str(k) for k, v in raw.items()}
        elif all(isinstance(v, str) and str(k).isdigit() for k, v in raw.items()):
            by_id = {int(k): v for k, v in raw.items()}
        else:
            raise ShardError(f"{path}: labels must map each name to its id (e.g. {{\"neg\": 0, \"pos\": 1}}); "
                             f"{fix}")
        if sorted(by_id) != list(range(len(raw))):
            raise ShardError(f"{path}: label ids {sorted(raw.values(), key=str)} are not 0..{len(raw) - 1}, each "
                             f"once; {fix}")
        labels = [by_id[i] for i in range(len(raw))]
    else:
        raise ShardError(f"{path}: labels must be a list or a mapping, got {type(raw).__name__}; {fix}")
    if not all(isinstance(x, str) for x in labels):
        odd = [x for x in labels if not isinstance(x, str)][:3]
        raise ShardError(f"{path}: labels must be names (strings), got {odd}; {fix}")
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise ShardError(f"{path}: labels {twice} appear twice; {fix}")
    return labels


def _shard_label_ids(folder: Path, manifest: dict[str, Any], column: str) -> np.ndarray | None:
    """Every label id the shards hold (IGNORE dropped; windows of long documents: their document's once), or None
    when a shard cannot be read (the dataset's own checks report that)."""
    parts = []
    last_doc = None
    try:
        for shard in manifest.get("shards", []):
            table = pa.ipc.open_file(pa.memory_map(str(folder / shard["file"]), "r")).read_all()
            if "doc" in table.column_names:  # (a document's windows are consecutive rows: keep its first)
                docs = table.column("doc").to_numpy()
                first = np.ones(len(docs), dtype=bool)
                first[1:] = docs[1:] != docs[:-1]
                if len(docs) and last_doc is not None:
                    first[0] = docs[0] != last_doc
                last_doc = docs[-1] if len(docs) else last_doc
                table = table.filter(pa.array(first))
            array = table.column(column).combine_chunks()
            if pa.types.is_list(array.type):
                array = array.flatten()
            parts.append(array.to_numpy(zero_copy_only=False).astype(np.int64))
    except (OSError, KeyError, TypeError, pa.ArrowInvalid):
        return None
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids[ids != IGNORE]
