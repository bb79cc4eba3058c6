"""`dtrain predict` and `dtrain evaluate`: a fine-tuned model (a run dir or its HF export) on new text or on a
prepared labelled set, in one process (CPU or one GPU), batched in length order."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.data.prepare import JSONL_SUFFIXES, TABLE_SUFFIXES, iter_table_rows, load_tokenizer, read_text
from dtrain.data.shards import ShardedDataset, tokenizer_fingerprint
from dtrain.data.stream import StreamingDataset, StreamLoader
from dtrain.data.tasks import FinetuneCollator, LabelMap
from dtrain.engine.base import to_device
from dtrain.errors import DtrainError
from dtrain.evaluation import Evaluator, decode_answer, scalar_metrics
from dtrain.files import (
    PREDICTIONS,
    REPORT,
    check_output,
    disk_full,
    disk_full_message,
    remove_leftovers,
    write_atomic,
)
from dtrain.locks import output_lock
from dtrain.metrics import entity_spans, format_report, sigmoid
from dtrain.model.bert import quiet_transformers
from dtrain.model.heads import HF_CLASS, Head, export_dir_of


class LocalEngine:
    """The slice of the Engine interface evaluation needs, for one process without an optimizer."""

    def __init__(self, model: torch.nn.Module, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()

    def forward(self, fn: Callable, batch: dict) -> Any:
        batch = to_device(batch, self.device, non_blocking=False)
        with torch.inference_mode():
            return fn(self.model, batch)


def load_finetuned(path: str | Path) -> tuple[torch.nn.Module, Any, str, list[str]]:
    """(model, tokenizer, data task, label names) of an exported fine-tuned model (or a run dir with export/)."""
    import transformers

    source = export_dir_of(path)
    config = json.loads((source / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch == "BertForSequenceClassification":
        task = {"multi_label_classification": "multilabel", "regression": "regression"}.get(
            config.get("problem_type"), "classification")
    else:
        task = {"BertForTokenClassification": "ner", "BertForQuestionAnswering": "qa"}.get(arch, "")
    if not task:
        kinds = ", ".join(sorted(set(HF_CLASS.values())))
        raise DtrainError(f"{source}: a {arch}, not a fine-tuned task model ({kinds}); pass the run dir or export of "
                          f"`dtrain finetune`")
    with quiet_transformers():
        model = getattr(transformers, arch).from_pretrained(str(source), local_files_only=True)
    labels = [] if task in ("regression", "qa") else [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, load_tokenizer(source), task, labels


def read_inputs(path: Path, fields: list[str]) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.csv/.tsv file (the named fields must be there) or lines of a .txt file (as fields[0]): one
    output row per input row, an empty line included (predicted as an empty text), so the output lines up."""
    if not path.is_file():
        raise DtrainError(f"--input {path}: no such file")
    if path.suffix.lower() == ".txt":
        lines = read_text(path).split("\n")  # not splitlines(): \f, \v or U+2028 inside a line do not end it
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        return [{fields[0]: line.removesuffix("\r")} for line in lines]
    if path.suffix.lower() not in JSONL_SUFFIXES | TABLE_SUFFIXES:
        raise DtrainError(f"--input {path}: use .jsonl, .csv, .tsv or .txt (one text per line)")
    return [row for _, row in iter_table_rows(path, fields)]


def _batches(n: int, lengths: list[int], size: int) -> Iterator[list[int]]:
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    for i in range(0, n, size):
        yield order[i:i + size].tolist()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def predict_rows(model: torch.nn.Module, tok: Any, task: str, labels: list[str], rows: list[dict[str, Any]],
                 fields: dict[str, str | None], max_seq_len: int = 512, batch_size: int = 32, threshold: float = 0.5,
                 doc_stride: int = 128, max_answer_length: int = 30, device: str | None = None) -> list[dict]:
    """One prediction dict per input row, in input order."""
    engine = LocalEngine(model, device)
    text, pair = fields["text"], fields.get("text_pair")
    if task == "qa":
        enc = tok([r[fields["question"]] for r in rows], [r[fields["context"]] for r in rows],
                  truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
    else:
        enc = tok([r[text] for r in rows], [r[pair] for r in rows] if pair else None, truncation=True,
                  max_length=max_seq_len, return_offsets_mapping=task == "ner")
    ids = enc["input_ids"]
    outputs: list[np.ndarray] = [np.empty(0)] * len(ids)
    head = Head(task)
    for chosen in _batches(len(ids), [len(x) for x in ids], batch_size):
        width = max(len(ids[i]) for i in chosen)
        batch = {"input_ids": torch.zeros(len(chosen), width, dtype=torch.long),
                 "attention_mask": torch.zeros(len(chosen), width, dtype=torch.long),
                 "token_type_ids": torch.zeros(len(chosen), width, dtype=torch.long)}
        for j, i in enumerate(chosen):
            n = len(ids[i])
            batch["input_ids"][j, :n] = torch.tensor(ids[i])
            batch["attention_mask"][j, :n] = 1
            batch["token_type_ids"][j, :n] = torch.tensor(enc["token_type_ids"][i])
        logits = engine.forward(head.forward, batch).cpu().numpy()
        for j, i in enumerate(chosen):
            outputs[i] = logits[j, :len(ids[i])] if task in ("ner", "qa") else logits[j]
    if task == "qa":
        windows: dict[int, list[dict[str, Any]]] = {}
        for w, row in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(w)
            offsets = [o if s == 1 else (-1, -1) for o, s in zip(enc["offset_mapping"][w], seq, strict=True)]
            windows.setdefault(row, []).append({"start": outputs[w][:, 0], "end": outputs[w][:, 1],
                                                "offset_start": [o[0] for o in offsets],
                                                "offset_end": [o[1] for o in offsets]})
        out = []
        for r, row in enumerate(rows):
            answer, score, lo, hi = decode_answer(windows[r], row[fields["context"]], 20, max_answer_length, False)
            out.append({"answer": answer, "score": round(score, 4), "start": lo, "end": hi})
        return out
    if task == "ner":
        return [{"entities": _entities(outputs[i], enc, i, rows[i][text], labels)} for i in range(len(rows))]
    if task == "regression":
        return [{"score": float(x[0])} for x in outputs]
    if task == "multilabel":
        probs = [sigmoid(x) for x in outputs]
        return [{"labels": [labels[k] for k in np.flatnonzero(p >= threshold)],
                 "probabilities": {labels[k]: round(float(v), 4) for k, v in enumerate(p)}} for p in probs]
    probs = [_softmax(x) for x in outputs]
    return [{"label": labels[int(p.argmax())], "score": round(float(p.max()), 4),
             "probabilities": {labels[k]: round(float(v), 4) for k, v in enumerate(p)}} for p in probs]


def _entities(logits: np.ndarray, enc: Any, row: int, text: str, labels: list[str]) -> list[dict[str, Any]]:
    """Word-level entities: each word takes the tag of its first piece (as training labelled it)."""
    words, first = enc.word_ids(row), {}
    for t, w in enumerate(words):
        if w is not None and w not in first:
            first[w] = t
    pieces = [first[w] for w in sorted(first)]
    probs = _softmax(logits)
    tags = [labels[int(probs[t].argmax())] for t in pieces]
    offsets = enc["offset_mapping"][row]
    last = {w: t for t, w in enumerate(words) if w is not None}
    out = []
    for kind, s, e in entity_spans(tags):
        lo, hi = offsets[pieces[s]][0], offsets[last[sorted(first)[e - 1]]][1]
        score = float(np.mean([probs[pieces[k]].max() for k in range(s, e)]))
        out.append({"type": kind, "text": text[lo:hi], "start": lo, "end": hi, "score": round(score, 4)})
    return out


def _check_options(batch_size: int, threshold: float, max_seq_len: int | None = None) -> None:
    if batch_size < 1:
        raise DtrainError(f"--batch-size {batch_size}: pass a whole number >= 1")
    if not 0 < threshold < 1:
        raise DtrainError(f"--threshold {threshold:g}: a probability between 0 and 1 (exclusive), e.g. 0.5")
    if max_seq_len is not None and max_seq_len < 8:
        raise DtrainError(f"--max-seq-len {max_seq_len}: pass at least 8 (room for [CLS], [SEP] and the text)")


def predict(model_path: str, input_path: str, output: str, text_field: str = "text",
            text_pair_field: str | None = None, question_field: str = "question", context_field: str = "context",
            batch_size: int = 32, max_seq_len: int | None = None, threshold: float = 0.5,
            overwrite: bool = False) -> int:
    _check_options(batch_size, threshold, max_seq_len)
    check_output(output, PREDICTIONS, [("--input", input_path), ("--model", export_dir_of(model_path))], overwrite,
                 "--output")
    model, tok, task, labels = load_finetuned(model_path)
    fields = {"text": text_field, "text_pair": text_pair_field, "question": question_field, "context": context_field}
    need = [question_field, context_field] if task == "qa" else [text_field] + ([text_pair_field] if text_pair_field
                                                                               else [])
    rows = read_inputs(Path(input_path), need)
    if not rows:
        raise DtrainError(f"--input {input_path}: holds no rows to predict (the file is empty); pass a file with one "
                          f"text per line or row")
    if max_seq_len and max_seq_len > model.config.max_position_embeddings:
        raise DtrainError(f"--max-seq-len {max_seq_len}: the model has {model.config.max_position_embeddings} "
                          f"positions; pass at most that (or leave it out)")
    limit = max_seq_len or model.config.max_position_embeddings
    preds = predict_rows(model, tok, task, labels, rows, fields, limit, batch_size, threshold)
    _write_new(Path(output), "".join(json.dumps({**row, **p}, ensure_ascii=False) + "\n"
                                     for row, p in zip(rows, preds, strict=True)), overwrite, PREDICTIONS)
    return len(preds)


def evaluate(model_path: str, data_path: str, batch_size: int = 32, threshold: float = 0.5,
             output: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """The full report of a fine-tuned model on a prepared labelled set."""
    _check_options(batch_size, threshold)
    if output:
        check_output(output, REPORT, [("--data", data_path), ("--model", export_dir_of(model_path))], overwrite,
                     "--output")
    model, tok, task, labels = load_finetuned(model_path)
    data = ShardedDataset(data_path, expect_fingerprint=tokenizer_fingerprint(tok))
    prepared = LabelMap.load(Path(data_path))
    expected = LabelMap(prepared.task if task == "classification" and prepared.task == "pair" else task, labels)
    prepared.check_same(expected, f"--data {data_path}")
    head = Head(prepared.task)
    loader = StreamLoader(StreamingDataset(data, batch_size, shuffle=False, drop_last=False, rank=0, world_size=1),
                          FinetuneCollator(prepared.task, tok.pad_token_id, len(labels)), num_workers=0)
    evaluator = Evaluator(head, labels, data, threshold)
    report = evaluator.report(*evaluator.collect(LocalEngine(model), loader))
    print(format_report(report, f"{model_path} on {data_path}"))
    if output:
        _write_new(Path(output), json.dumps({"model": str(model_path), "data": str(data_path), **report}, indent=1,
                                            default=float) + "\n", overwrite, REPORT)
    return scalar_metrics(report)


def _write_new(out: Path, text: str, overwrite: bool, kind: str) -> None:
    """Write a file atomically, locked against a second writer; an existing one is replaced only with --overwrite,
    and only when it is an earlier output of the same kind (files.check_output, checked again under the lock)."""
    with output_lock(out, "--output"):
        check_output(out, kind, (), overwrite, "--output")
        remove_leftovers(out, "--output")
        try:
            write_atomic(out, text)
        except OSError as e:
            if not disk_full(e):
                raise
            raise DtrainError(disk_full_message(out, "--output")) from None
