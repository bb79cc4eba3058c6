"""`dtrain predict` and `dtrain evaluate`: a fine-tuned model (a run dir or its HF export) on new text or on a
prepared labelled set, in one process (CPU or one GPU), batched in length order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.data.rows import JSONL_SUFFIXES, TABLE_SUFFIXES, iter_table_rows, read_text
from dtrain.data.shards import ShardedDataset, tokenizer_fingerprint
from dtrain.data.stream import StreamingDataset, StreamLoader
from dtrain.data.windows import CONFIG_KEY as TEXT_KEY
from dtrain.data.windows import Cut, text_room
from dtrain.engine.local import LocalEngine
from dtrain.errors import DtrainError
from dtrain.evaluation import Evaluator, forward_pass, scalar_metrics
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
from dtrain.metrics import format_report
from dtrain.model import adapters
from dtrain.model.bert import load_model, quiet_transformers, set_encoder
from dtrain.model.heads import export_dir_of
from dtrain.model.tokenizer import load_tokenizer
from dtrain.tasks import TASKS, FinetuneCollator, Head, LabelMap, Task, get_task, task_of_model
from dtrain.tasks.prompt import CONFIG_KEY, read_prompt_file


def load_finetuned(path: str | Path, prompt: str | Path | None = None
                   ) -> tuple[torch.nn.Module, Any, Task, list[str], Any]:
    """(model, tokenizer, task, label names, task settings) of an exported fine-tuned model (or a run dir with
    export/). The task is the registry's, not yet bound: its settings (a prompt model's template and verbalizer, from
    its config.json) go to `Task.bind` once the caller knows the labels and fields. `prompt`: a --prompt file, which
    makes any model with a trained MLM head (a pretraining run's export) a zero-shot prompt classifier."""
    import transformers

    source = export_dir_of(path)
    config = json.loads((source / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    tok = load_tokenizer(source)
    if prompt is not None:
        options = read_prompt_file(prompt)
        kind = get_task("prompt")
        model, fresh = load_model(getattr(transformers, kind.hf_class), str(source))
        kind.check_loaded(str(source), fresh, False)
        model = adapters.load(model, source)  # (an adapter-trained prompt export keeps its adapters)
        labels = [str(k) for k in options.verbalizer] if isinstance(options.verbalizer, dict) else []
        return model, tok, kind, labels, options
    kind = task_of_model(config)
    if kind is None:
        kinds = ", ".join(sorted({t.hf_class for t in TASKS.values()}))
        raise DtrainError(f"{source}: a {arch}, not a fine-tuned task model ({kinds}); pass the run dir or export of "
                          f"`dtrain finetune` (or --prompt FILE: a cloze prompt on a model with an MLM head)")
    with quiet_transformers():
        model = getattr(transformers, arch).from_pretrained(str(source), local_files_only=True)
    model = adapters.load(model, source)  # an export's bottleneck adapters, when it has them
    names = model.config.id2label
    labels = [names[i] for i in range(len(names))] if kind.named_labels else []
    options = kind.saved_options(config)
    if options is None and kind.needs_settings:  # (a plain BertForMaskedLM: no template saved)
        raise DtrainError(f"{source}: a {arch} without dtrain's saved task settings (not an export of `dtrain "
                          f"finetune`); pass --prompt FILE to use it as a zero-shot cloze prompt classifier")
    return model, tok, kind, labels, options


def _bind(kind: Task, options: Any, tok: Any, labels: list[str], pairs: bool, max_seq_len: int,
          prompt: str | None, model_path: str | Path, data: str, recalled: tuple[Cut, str | None],
          pooling: str | None) -> Task:
    """The task with its settings (from --prompt, or as the model saved them), reading long texts as the model was
    trained to (`recalled`: its saved Cut and pooling, Cut.recall; `pooling`: --window-pooling, else the saved one);
    errors name where they came from."""
    where = f"--prompt {prompt}: {{key}}" if prompt is not None else \
        f"{export_dir_of(model_path)}/config.json: {CONFIG_KEY}.{{key}}"
    cut, saved = recalled
    at = "--window-pooling" if pooling is not None else f"{export_dir_of(model_path)}/config.json: {TEXT_KEY}.pooling"
    return kind.bind(options, tok, labels, pairs, max_seq_len, where, data).reading(cut, pooling or saved, at)


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


def _batches(enc: dict[str, list], size: int, fields: tuple[str, ...] = ()) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of the encoded rows in length order (similar lengths together: little padding); "row": each
    sample's index in `enc`; `fields`: per-row integers of `enc` the batch carries too (the task's batch_fields)."""
    ids = enc["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(ids), size):
        chosen = order[start:start + size].tolist()
        width = max(len(ids[i]) for i in chosen)
        batch = {"input_ids": torch.zeros(len(chosen), width, dtype=torch.long),
                 "attention_mask": torch.zeros(len(chosen), width, dtype=torch.long),
                 "token_type_ids": torch.zeros(len(chosen), width, dtype=torch.long),
                 "row": torch.tensor(chosen, dtype=torch.long),
                 **{k: torch.tensor([enc[k][i] for i in chosen], dtype=torch.long) for k in fields}}
        for j, i in enumerate(chosen):
            n = len(ids[i])
            batch["input_ids"][j, :n] = torch.tensor(ids[i])
            batch["attention_mask"][j, :n] = 1
            batch["token_type_ids"][j, :n] = torch.tensor(enc["token_type_ids"][i])
        yield batch


def predict_rows(model: torch.nn.Module, tok: Any, task: str | Task, labels: list[str], rows: list[dict[str, Any]],
                 fields: dict[str, str | None], max_seq_len: int = 512, batch_size: int = 32, threshold: float = 0.5,
                 doc_stride: int = 128, max_answer_length: int = 30, device: str | None = None) -> list[dict]:
    """One prediction dict per input row, in input order (the evaluation loop over length-sorted batches)."""
    kind = get_task(task)
    enc = kind.predict_encode(tok, rows, fields, max_seq_len, doc_stride)
    head = Head(kind)

    def forward(model: torch.nn.Module, batch: dict) -> dict:
        return {"logits": head.forward(model, batch)}

    def records(logits: torch.Tensor, batch: dict) -> list[tuple]:
        width = batch["attention_mask"].sum(1).tolist()
        return [(i, kind.output_of(row, n)) for i, row, n in
                zip(batch["row"].tolist(), logits.cpu().numpy(), width, strict=True)]

    batches = _batches(enc, batch_size, kind.batch_fields)
    totals = forward_pass(LocalEngine(model, device), batches, forward, records=records)
    outputs = [output for _, output in totals.records]
    if "doc" in enc:  # windows of long texts (kind.cut): one output per row, its windows pooled
        outputs = [r[1] for r in kind.pool_windows([(i, x) for i, x in enumerate(outputs)], enc["doc"])]
    return kind.decode(outputs, enc, rows, fields, labels, threshold, max_answer_length)


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
            overwrite: bool = False, prompt: str | None = None, window_pooling: str | None = None) -> int:
    _check_options(batch_size, threshold, max_seq_len)
    read = [("--input", input_path), ("--model", export_dir_of(model_path)), ("--prompt", prompt)]
    check_output(output, PREDICTIONS, [(k, v) for k, v in read if v], overwrite, "--output")
    model, tok, kind, labels, options = load_finetuned(model_path, prompt)
    set_encoder(model)  # unpadded: the same outputs, sooner
    if max_seq_len and max_seq_len > model.config.max_position_embeddings:
        raise DtrainError(f"--max-seq-len {max_seq_len}: the model has {model.config.max_position_embeddings} "
                          f"positions; pass at most that (or leave it out)")
    recalled = Cut.recall(model.config.to_dict())
    trained = recalled[0]  # (a model of cut or windowed texts: its training length)
    limit = max_seq_len or (None if trained.plain else trained.max_seq_len) or model.config.max_position_embeddings
    if trained.windows and trained.stride >= text_room(limit, text_pair_field is not None):
        pair = " with --text-pair-field (half the window for the pair)" if text_pair_field else ""
        raise DtrainError(f"--max-seq-len {limit}{pair}: a window would hold {text_room(limit, bool(pair))} tokens "
                          f"of text, but the model {export_dir_of(model_path)} reads windows sharing "
                          f"{trained.stride}; pass --max-seq-len {trained.max_seq_len} (its training length) or "
                          f"leave it out")
    task = _bind(kind, options, tok, labels, text_pair_field is not None, limit, prompt, model_path,
                 "the input (--text-pair-field)", recalled, window_pooling)
    fields = {"text": text_field, "text_pair": text_pair_field, "question": question_field, "context": context_field}
    need = task.input_fields(fields)
    rows = read_inputs(Path(input_path), need)
    if not rows:
        raise DtrainError(f"--input {input_path}: holds no rows to predict (the file is empty); pass a file with one "
                          f"text per line or row")
    preds = predict_rows(model, tok, task, labels, rows, fields, limit, batch_size, threshold)
    _write_new(Path(output), "".join(json.dumps({**row, **p}, ensure_ascii=False) + "\n"
                                     for row, p in zip(rows, preds, strict=True)), overwrite, PREDICTIONS)
    return len(preds)


def evaluate(model_path: str, data_path: str, batch_size: int = 32, threshold: float = 0.5,
             output: str | None = None, overwrite: bool = False, prompt: str | None = None,
             window_pooling: str | None = None) -> dict[str, Any]:
    """The full report of a fine-tuned model (or of a cloze prompt on an MLM model: `prompt`) on a prepared
    labelled set."""
    _check_options(batch_size, threshold)
    if output:
        read = [("--data", data_path), ("--model", export_dir_of(model_path)), ("--prompt", prompt)]
        check_output(output, REPORT, [(k, v) for k, v in read if v], overwrite, "--output")
    model, tok, kind, labels, options = load_finetuned(model_path, prompt)
    set_encoder(model)  # unpadded: the same outputs, sooner
    data = ShardedDataset(data_path, expect_fingerprint=tokenizer_fingerprint(tok))
    prepared = LabelMap.load(Path(data_path))
    if prompt is not None:  # zero-shot: the data's labels, in its order (the verbalizer must cover them)
        labels = prepared.labels
    expected = LabelMap(prepared.task if kind.trains_on(prepared.task) else kind.name, labels)
    prepared.check_same(expected, f"--data {data_path}")  # (before the prompt is checked against its labels)
    task = _bind(kind, options, tok, labels, get_task(prepared.task).has_pairs, model.config.max_position_embeddings,
                 prompt, model_path, f"--data {data_path}", Cut.recall(model.config.to_dict()), window_pooling)
    head = Head(task)
    loader = StreamLoader(StreamingDataset(data, batch_size, shuffle=False, drop_last=False, rank=0, world_size=1),
                          FinetuneCollator(task, tok.pad_token_id, len(labels)), num_workers=0)
    evaluator = Evaluator(head, labels, data, threshold)
    report = evaluator.report(*evaluator.collect(LocalEngine(model), loader))
    title = f"{model_path} with --prompt {prompt}" if prompt else str(model_path)
    print(format_report(report, f"{title} on {data_path}"))
    if output:
        _write_new(Path(output), json.dumps({"model": str(model_path), **({"prompt": str(prompt)} if prompt else {}),
                                             "data": str(data_path), **report}, indent=1, default=float) + "\n",
                   overwrite, REPORT)
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
