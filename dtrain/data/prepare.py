"""`dtrain prepare`: raw files → tokenized shards, in parallel, atomically.

pretrain: text documents → paragraphs (blank lines) → sentences (blingfire) → WordPiece ids → chunks of consecutive
sentences that fill max_seq_len − 3 tokens (10% shorter, as in BERT), each chunk keeping its sentence boundaries
so that NSP pairs are cut at read time. One chunk is one sample.
finetune: CSV/TSV/JSONL rows or CoNLL sentences → the task's features + labels.json. What is generic lives here
(the workers, the shard writer; the readers are data/rows.py); the task object (dtrain/tasks/) that its caller passes
reads, labels and encodes the rows. data/ never imports dtrain.tasks.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dtrain.data.rows import JSONL_SUFFIXES, input_files, jsonl_rows, read_text
from dtrain.data.shards import ShardError, ShardWriter, tokenizer_fingerprint
from dtrain.data.windows import Cut
from dtrain.files import DATASET, atomic_output_dir, check_output
from dtrain.model.bounds import MIN_SEQ_LEN, check_prepare_len, check_workers
from dtrain.model.tokenizer import load_tokenizer

PRETRAIN_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("sentence_ends", pa.list_(pa.int32())),
                             ("doc", pa.int64()), ("length", pa.int32())])
TEXT_SUFFIXES = {".txt", ".text"}
DOCS_PER_TASK = 32


def tokenizer_meta(tok: Any, name: str) -> dict[str, Any]:
    return {"name": str(name), "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
            "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id, "mask_id": tok.mask_token_id,
            "pad_id": tok.pad_token_id, "special_ids": sorted(set(tok.all_special_ids))}


# ---------------------------------------------------------------------------------------------------------------------
# Reading raw inputs
# ---------------------------------------------------------------------------------------------------------------------


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def iter_documents(inputs: Iterable[str | os.PathLike], text_field: str = "text",
                   doc_split: str = "file") -> Iterator[str]:
    """Raw documents from .txt files (a file is a document, or with doc_split="blank-line" every blank-line
    separated block is), .jsonl files (one document per line, in `text_field`) and saved HF datasets dirs."""
    if doc_split not in ("file", "blank-line"):
        raise ShardError(f"doc_split must be 'file' or 'blank-line', got {doc_split!r}")
    for item in inputs:
        p = Path(item)
        if _is_hf_dataset(p):
            import datasets

            ds = datasets.load_from_disk(str(p))
            parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
            for part in parts:
                if text_field not in part.column_names:
                    raise ShardError(f"{p}: the dataset has no column {text_field!r} (columns: "
                                     f"{', '.join(part.column_names)}); pass --text-field")
                yield from (t for t in part[text_field] if t and t.strip())
            continue
        for f in input_files([p], TEXT_SUFFIXES | JSONL_SUFFIXES):
            if f.suffix.lower() in JSONL_SUFFIXES:
                for lineno, row in jsonl_rows(f):
                    if not isinstance(row.get(text_field), str):
                        raise ShardError(f"{f} line {lineno}: no string field {text_field!r}; pass --text-field "
                                         f"with the field that holds the text")
                    if row[text_field].strip():
                        yield row[text_field]
            else:
                text = read_text(f)
                blocks = [text] if doc_split == "file" else re.split(r"\n\s*\n", text)
                yield from (b for b in blocks if b.strip())


def split_sentences(document: str) -> list[str]:
    """Paragraphs (blank-line separated) → sentences, with blingfire's sentence breaker."""
    import blingfire

    sentences = []
    for paragraph in re.split(r"\n\s*\n", document):
        flat = " ".join(paragraph.split())
        if flat:
            sentences.extend(s for s in blingfire.text_to_sentences(flat).split("\n") if s.strip())
    return sentences


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining chunks
# ---------------------------------------------------------------------------------------------------------------------


def chunk_document(sentences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Greedy packing of consecutive sentences into chunks of at most `max_tokens` tokens; a sentence longer than
    max_tokens is cut into pieces. A chunk is a sample; its NSP pair is made at read time (dtrain/data/pretraining.py:
    A from the chunk, B filling the target length from the document's next chunks or another document, and the
    short-sequence rate drawn there), so no text is dropped here and the pairs change from epoch to epoch."""
    pieces = [s[i:i + max_tokens] for s in sentences if s for i in range(0, len(s), max_tokens)]
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > max_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        chunks.append(current)
    return chunks


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = tok = load_tokenizer(tokenizer_path)
    backend = copy.deepcopy(tok.backend_tokenizer)  # the Rust tokenizer without a saved truncation/padding setting
    backend.no_truncation()
    backend.no_padding()
    _WORKER["backend"] = backend


def _token_ids(texts: list[str]) -> list[list[int]]:
    """Word-piece ids without special tokens, straight from the Rust tokenizer (no per-text Python wrapper)."""
    return [e.ids for e in _WORKER["backend"].encode_batch(texts, add_special_tokens=False)] if texts else []


def _pretrain_task(task: tuple[int, list[str]], max_tokens: int) -> dict:
    first_doc, docs = task
    doc_sentences = [split_sentences(d) for d in docs]
    ids = _token_ids([s for sents in doc_sentences for s in sents])
    cols: dict[str, list] = {"input_ids": [], "sentence_ends": [], "doc": [], "length": []}
    stats = {"documents": 0, "sentences": 0}
    at = 0
    for i, sents in enumerate(doc_sentences):
        tokens = ids[at:at + len(sents)]
        at += len(sents)
        doc = first_doc + i
        chunks = chunk_document(tokens, max_tokens)
        stats["documents"] += bool(chunks)
        stats["sentences"] += sum(len(c) for c in chunks)
        for chunk in chunks:
            cols["input_ids"].append([t for s in chunk for t in s])
            cols["sentence_ends"].append(np.cumsum([len(s) for s in chunk]).tolist())
            cols["doc"].append(doc)
            cols["length"].append(len(cols["input_ids"][-1]))
    # built here, in the worker: an Arrow batch crosses the process boundary as buffers, not Python lists
    return {"batch": pa.RecordBatch.from_pydict(cols, schema=PRETRAIN_SCHEMA), "tokens": sum(cols["length"]), **stats}


def _batches(items: Iterable[Any], n: int) -> Iterator[tuple[int, list[Any]]]:
    it, start = iter(items), 0
    while batch := list(islice(it, n)):
        yield start, batch
        start += len(batch)


def run_parallel(fn: Callable, tasks: Iterable[Any], workers: int, tokenizer_path: str) -> Iterator[Any]:
    """fn over tasks in `workers` processes (each with its own tokenizer), results in task order."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        yield from map(fn, tasks)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        yield from pool.imap(fn, tasks, chunksize=1)


def _progress(desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


def check_prepare_out(out: str | os.PathLike, inputs: list[str], tokenizer: str, labels: str | None,
               overwrite: bool) -> None:
    """--out before any work: never one of the inputs, inside or above one; --overwrite replaces only a dataset."""
    named = [("the input", i) for i in inputs] + [("--tokenizer", tokenizer), ("--labels", labels)]
    check_output(out, DATASET, named, overwrite, "--out", ShardError)


def prepare_pretrain(inputs: list[str], out: str | os.PathLike, tokenizer: str, max_seq_len: int = 128,
                     short_seq_prob: float = 0.1, text_field: str = "text", doc_split: str = "file",
                     workers: int | None = None, shard_bytes: int = 64 << 20,
                     overwrite: bool = False, command: str | None = None) -> dict[str, Any]:
    """Raw text → pretraining shards in `out`; returns the manifest."""
    check_workers(workers)
    if not 0 <= short_seq_prob <= 1:
        raise ShardError(f"--short-seq-prob {short_seq_prob}: it is the share of NSP pairs cut short; pass a value "
                         f"from 0 to 1 (BERT's: 0.1)")
    if max_seq_len < MIN_SEQ_LEN:  # before any work (the upper bound needs the tokenizer: below)
        check_prepare_len(max_seq_len, None, tokenizer, None)
    check_prepare_out(out, inputs, tokenizer, None, overwrite)
    workers = workers or min(os.cpu_count() or 1, 8)
    tok = load_tokenizer(tokenizer)
    check_prepare_len(max_seq_len, tok, tokenizer, tok.name_or_path)
    meta_tok = tokenizer_meta(tok, tokenizer)
    docs = iter_documents(inputs, text_field, doc_split)
    fn = partial(_pretrain_task, max_tokens=max_seq_len - 3)
    totals = {"documents": 0, "sentences": 0, "tokens": 0}
    with atomic_output_dir(out, overwrite, kind=DATASET, error=ShardError) as tmp:
        writer = ShardWriter(tmp, PRETRAIN_SCHEMA, shard_bytes)
        with _progress("prepare pretrain", "doc") as bar:
            for result in run_parallel(fn, _batches(docs, DOCS_PER_TASK), workers, tokenizer):
                writer.write(result["batch"])
                totals["documents"] += result["documents"]
                totals["sentences"] += result["sentences"]
                totals["tokens"] += result["tokens"]
                bar.update(result["documents"])
        if totals["tokens"] == 0:
            raise ShardError(f"no text found in {', '.join(map(str, inputs))}: the corpus is empty; point "
                             f"`dtrain prepare pretrain` at .txt/.jsonl files or a saved datasets dir with text")
        if totals["documents"] < 2:
            raise ShardError(f"{', '.join(map(str, inputs))}: one document only, but NSP pairs need a segment of "
                             f"another document; add documents (or --doc-split blank-line if blank lines separate "
                             f"the documents of a file)")
        manifest = writer.close(kind="pretrain", tokenizer=meta_tok, max_seq_len=max_seq_len,
                                total_tokens=totals["tokens"], documents=totals["documents"],
                                sentences=totals["sentences"], short_seq_prob=short_seq_prob,
                                prepare={"command": command or " ".join(sys.argv), "inputs": [str(i) for i in inputs],
                                         "doc_split": doc_split, "text_field": text_field})
    return manifest


ROWS_PER_TASK = 512


def _finetune_task(chunk: tuple[int, list[tuple]], task: Any, max_seq_len: int, cut: Cut) -> dict:
    first, rows = chunk
    return task.encode(_WORKER["tok"], rows, first, max_seq_len, cut)


def write_finetune(encoded: list[tuple], out: str | os.PathLike, tokenizer: str, task: Any, max_seq_len: int,
                   workers: int | None, shard_bytes: int, overwrite: bool, cut: Cut,
                   save_labels: Callable[[Path, dict[str, Any]], int], prepare: dict[str, Any]) -> dict:
    """Labelled rows (text, pair, label ids) → the task's shards in `out`, with the task's extra files and the label
    map (`save_labels(dir, stats)` writes it and returns the number of labels); returns the manifest. `task`: a
    dtrain.tasks.Task (its name, schema(), encode(), write_extra()); `cut`: how long texts are cut (windows: the
    manifest counts documents, windows and the documents cut at --max-windows)."""
    tok = load_tokenizer(tokenizer)
    check_prepare_len(max_seq_len, tok, tokenizer, tok.name_or_path)
    fn = partial(_finetune_task, task=task, max_seq_len=max_seq_len, cut=cut)
    truncated = tokens = cut_documents = 0
    with atomic_output_dir(out, overwrite, kind=DATASET, error=ShardError) as tmp:
        writer = ShardWriter(tmp, task.schema(cut), shard_bytes)
        with _progress("prepare finetune", "row") as bar:
            for cols in run_parallel(fn, _batches(encoded, ROWS_PER_TASK), workers or min(os.cpu_count() or 1, 8),
                                     tokenizer):
                cut_documents += sum(cols.pop("truncated_documents", [0]))
                writer.write(cols)
                tokens += sum(cols["length"])
                truncated += 0 if cut.windows else sum(n >= max_seq_len for n in cols["length"])
                bar.update(len(cols["length"]))
        num_labels = save_labels(tmp, task.write_extra(tmp, encoded, cut))
        windows = {"documents": len(encoded), "truncated_documents": cut_documents} if cut.windows else {}
        manifest = writer.close(kind="finetune", task=task.name, tokenizer=tokenizer_meta(tok, tokenizer),
                                max_seq_len=max_seq_len, num_labels=num_labels, total_tokens=tokens,
                                truncated=truncated, **windows, cut=None if cut.plain else cut.record(),
                                prepare=prepare)
    return manifest
