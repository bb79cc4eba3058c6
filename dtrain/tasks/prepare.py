"""`dtrain prepare finetune`: labelled rows → the task (named, or inferred from the rows) → shards + labels.json.
The task reads and labels the rows; dtrain.data.prepare writes the shards."""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

from dtrain.data.prepare import check_prepare_out, write_finetune
from dtrain.data.rows import input_files, read_labelled_rows
from dtrain.data.shards import ShardError
from dtrain.data.windows import Cut
from dtrain.model.bounds import MIN_SEQ_LEN, check_prepare_len, check_workers
from dtrain.tasks.base import Task
from dtrain.tasks.labels import LabelMap
from dtrain.tasks.registry import TASKS, infer_task


def _raw_label(value: Any, where: str) -> Any:
    """A label cell before the task is known: a list, a number from JSON, or a name."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return value if isinstance(value, float) else str(value)


def prepare_finetune(inputs: list[str], out: str | os.PathLike, tokenizer: str, task: str | None = None,
                     max_seq_len: int = 128, text_field: str = "text", text_pair_field: str | None = None,
                     label_field: str = "label", labels: str | None = None, workers: int | None = None,
                     shard_bytes: int = 64 << 20, overwrite: bool = False, command: str | None = None,
                     doc_stride: int | None = None, truncation: str = "head", head_share: float | None = None,
                     windows: bool = False, max_windows: int | None = None) -> dict:
    """Labelled CSV/TSV/JSONL rows, CoNLL sentences or SQuAD JSON → fine-tuning shards + labels.json in `out`
    (for qa also examples.jsonl: id, question, context, answers, to turn predicted spans back into text).
    Long texts of sequence tasks: `truncation` head|tail|head_tail (`head_share` of the kept tokens from the start),
    or `windows` overlapping by `doc_stride` tokens (default a quarter of the window), at most `max_windows` per
    row (dtrain.data.windows)."""
    if task is not None and task not in TASKS:
        raise ShardError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task is not None and not TASKS[task].prepares:
        made_by = ", ".join(TASKS[task].also_fits)
        raise ShardError(f"--task {task}: its data is prepared as {made_by} (the task applies when training); pass "
                         f"--task {TASKS[task].also_fits[0]} or leave --task out")
    check_workers(workers)
    if max_seq_len < MIN_SEQ_LEN:  # before any work (the upper bound needs the tokenizer: below)
        check_prepare_len(max_seq_len, None, tokenizer, None)
    kind = TASKS[task] if task is not None else None
    if head_share is not None and truncation != "head_tail":
        raise ShardError(f"--head-share {head_share:g}: the share of the head in --truncation head_tail; add "
                         f"--truncation head_tail or remove --head-share")
    share = 0.25 if head_share is None else head_share
    cut = Cut(truncation, share, windows, doc_stride, max_windows)
    if windows and doc_stride is None:
        cut = Cut(truncation, share, windows, cut.overlap(max_seq_len), max_windows)
    cut.check(max_seq_len, text_pair_field is not None or (kind is not None and kind.has_pairs))
    check_prepare_out(out, inputs, tokenizer, labels, overwrite)
    files = input_files(inputs, (kind or Task).input_suffixes)
    if kind is None:
        rows, where = read_labelled_rows(files, text_field, text_pair_field, label_field, _raw_label)
    else:
        rows, where = kind.read_rows(files, text_field, text_pair_field, label_field)
    if not rows:
        raise ShardError(f"no examples found in {', '.join(map(str, inputs))}; check the files and --text-field")
    if kind is None:
        kind = infer_task(rows[0], text_pair_field is not None)
        rows = [(t, p, kind.parse_label(v, w)) for (t, p, v), w in zip(rows, where, strict=True)]
    if not cut.plain and not kind.reads_windows:
        flag = "--windows" if windows else f"--truncation {truncation}"
        raise ShardError(f"{flag}: task {kind.name} cuts its inputs its own way (ner: sentences; qa: windows of the "
                         f"context, --doc-stride); it applies to classification, pair, multilabel and regression")
    if doc_stride is not None and not windows and not kind.own_stride:
        raise ShardError(f"--doc-stride {doc_stride}: the overlap of --windows (and of qa's windows), but task "
                         f"{kind.name} is not cut into windows here; add --windows or remove --doc-stride")
    if labels:
        label_map = LabelMap.load(labels)
        if label_map.task != kind.name:
            raise ShardError(f"{label_map.source} is for task {label_map.task!r}, these inputs are {kind.name!r}; "
                             f"pass the labels.json of a {kind.name} training set")
    else:
        label_map = LabelMap.build(kind, [r[2] for r in rows])
        label_map.check_trainable([r[2] for r in rows], where, ", ".join(map(str, inputs)))
    counts: Counter = Counter()
    encoded = [(text, pair, kind.label_ids(value, label_map, loc, counts))
               for (text, pair, value), loc in zip(rows, where, strict=True)]

    def save_labels(folder: Any, stats: dict[str, Any]) -> int:
        label_map.save(folder, counts, stats)
        return len(label_map.labels)

    return write_finetune(encoded, out, tokenizer, kind, max_seq_len, workers, shard_bytes, overwrite, cut,
                          save_labels, {"command": command or " ".join(sys.argv), "inputs": [str(i) for i in inputs],
                                        "text_field": text_field, "text_pair_field": text_pair_field,
                                        "label_field": label_field, "labels": labels})
