"""Reading raw inputs: text files (UTF-8, not binary), the files under folders, JSONL/CSV/TSV rows and CoNLL
sentences, and the labelled rows of fine-tuning (the task decides how a label cell is parsed)."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from dtrain.data.shards import ShardError

JSONL_SUFFIXES = {".jsonl"}
TABLE_SUFFIXES = {".csv", ".tsv"}
CONLL_SUFFIXES = {".conll", ".bio", ".iob"}


def read_text(path: Path) -> str:
    """A file's text, or a one-line error naming it when it is binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    if b"\x00" in data[:65536]:
        raise ShardError(f"{path}: looks binary (NUL bytes), not text; remove it from the input or convert it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8) or remove it from the input") from None


def input_files(inputs: Iterable[str | os.PathLike], suffixes: set[str]) -> list[Path]:
    """The files named, and the matching files under the folders named, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ShardError(f"input {p} does not exist; pass existing files or folders")
    return files


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ShardError(f"{path} line {lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise ShardError(f"{path} line {lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield lineno, row




def iter_table_rows(path: Path, fields: list[str]) -> Iterator[tuple[int, dict]]:
    """(line, row) of a CSV/TSV/JSONL file; every name in `fields` must be present in every row."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        rows: Iterable[tuple[int, dict]] = jsonl_rows(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        text = read_text(path)
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        missing = [f for f in fields if f not in header]
        if missing:
            flag = {0: "text", len(fields) - 1: "label"}.get(fields.index(missing[0]), "text-pair")
            raise ShardError(f"{path}: no column {missing[0]!r} in the header (columns: {', '.join(header)}); "
                             f"rename the column or pass --{flag}-field")
        rows = ((reader.line_num, row) for row in reader)
    else:
        raise ShardError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .jsonl, .conll (or .json "
                         f"with --task qa)")
    for lineno, row in rows:
        for f in fields:
            if row.get(f) is None or row.get(f) == "":
                raise ShardError(f"{path} line {lineno}: no value for {f!r}; every row needs "
                                 f"{' and '.join(repr(x) for x in fields)} (or drop the row)")
        yield lineno, row


BIO_TAG = re.compile(r"^(O|[BI]-\S+)$")


def iter_conll(path: Path) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line, tokens, tags) per sentence of a CoNLL file: `token<TAB or space>tag` lines, blank line between."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for lineno, line in enumerate(read_text(path).splitlines() + [""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                yield start, tokens, tags
            tokens, tags, start = [], [], lineno + 1
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise ShardError(f"{path} line {lineno}: expected 'token<TAB>tag', got {line!r}")
        tag = parts[-1].strip()
        if not BIO_TAG.match(tag):
            raise ShardError(f"{path} line {lineno}: tag {tag!r} is not BIO/IOB2 (O, B-TYPE or I-TYPE); convert the "
                             f"tags (e.g. BIOES E-/S- to I-/B-, bare types to B-/I-)")
        tokens.append(parts[0])
        tags.append(tag)
    return


def read_labelled_rows(files: list[Path], text_field: str, text_pair_field: str | None, label_field: str,
                       parse: Callable[[Any, str], Any]) -> tuple[list[tuple], list[str]]:
    """(text or tokens, text_pair, label(s)) per example of CSV/TSV/JSONL rows (the label through `parse`) or CoNLL
    sentences (by the file's suffix), and where each came from (file line N)."""
    rows, where = [], []
    for f in files:
        if f.suffix.lower() in CONLL_SUFFIXES:
            for lineno, tokens, tags in iter_conll(f):
                rows.append((tokens, None, tags))
                where.append(f"{f} line {lineno}")
            continue
        fields = [text_field] + ([text_pair_field] if text_pair_field else []) + [label_field]
        for lineno, row in iter_table_rows(f, fields):
            loc = f"{f} line {lineno}"
            text, pair = row[text_field], row[text_pair_field] if text_pair_field else None
            for name, value in ((text_field, text), *([(text_pair_field, pair)] if pair is not None else [])):
                if not isinstance(value, str):
                    raise ShardError(f"{loc}: {name!r} must be a string, got {json.dumps(value)}; quote it or fix "
                                     f"the row")
            rows.append((text, pair, parse(row[label_field], loc)))
            where.append(loc)
    return rows, where
