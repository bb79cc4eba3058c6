"""Fine-tuning features: label maps, (pair) classification / multi-label / regression rows and NER sentences
→ token ids, and the collator that pads each batch only as far as its longest sequence."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dtrain.data import IGNORE
from dtrain.data.shards import ShardError

TASKS = ("classification", "pair", "multilabel", "regression", "ner", "qa")
LABELS_FILE = "labels.json"


def schema_for(task: str) -> pa.Schema:
    fields = [("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())), ("length", pa.int32())]
    label = {"classification": ("label", pa.int32()), "pair": ("label", pa.int32()),
             "regression": ("label", pa.float32()), "multilabel": ("labels", pa.list_(pa.int32())),
             "ner": ("labels", pa.list_(pa.int32()))}.get(task)
    if task == "qa":  # answer span in tokens (0, 0 = [CLS]: no answer in this window) + context character offsets
        return pa.schema([*fields, ("start_position", pa.int32()), ("end_position", pa.int32()),
                          ("example", pa.int64()), ("offset_start", pa.list_(pa.int32())),
                          ("offset_end", pa.list_(pa.int32()))])
    return pa.schema([*fields, label])


def infer_task(first_label: Any, has_pair: bool) -> str:
    if isinstance(first_label, list):
        return "multilabel"
    if isinstance(first_label, float):
        return "regression"
    return "pair" if has_pair else "classification"


class LabelMap:
    """label ↔ id, saved as labels.json beside the shards (and reused to prepare dev/test sets)."""

    def __init__(self, task: str, labels: Sequence[str], source: str = ""):
        self.task, self.labels, self.source = task, list(labels), source
        self.ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def build(cls, task: str, values: Sequence[Any]) -> LabelMap:
        if task in ("regression", "qa"):
            return cls(task, [])
        flat = [v for vs in values for v in vs] if task in ("multilabel", "ner") else list(values)
        names = sorted({str(v) for v in flat})
        if task == "ner" and "O" in names:  # O first, then B-/I- grouped by entity type
            names = ["O"] + sorted((n for n in names if n != "O"), key=lambda n: (n[2:], n[:1]))
        return cls(task, names)

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """labels.json (or the dataset dir that holds it), checked against the dataset's manifest.json beside it:
        the task, the number of labels and the label ids its shards hold (and their counts) must agree, so an
        edited file cannot silently renumber the labels. `labels` is a list (id = position) or a mapping
        {"name": id, ...} (read by id, which must run 0..n-1)."""
        path = Path(path)
        path = path / LABELS_FILE if path.is_dir() else path
        if not path.exists() and (path.parent / "manifest.json").is_file():
            from dtrain.data.shards import read_manifest

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
        from dtrain.data.shards import MANIFEST, read_manifest

        if not (folder / MANIFEST).is_file():
            return  # a labels.json on its own (prepare --labels FILE): nothing to check it against
        manifest = read_manifest(folder)
        src, n = self.source, len(self.labels)
        fix = "restore the labels.json that `dtrain prepare finetune` wrote, or prepare the data again"
        if manifest.get("task", self.task) != self.task:
            raise ShardError(f"{src} says task {self.task!r}, but {folder / MANIFEST} says {manifest.get('task')!r}; "
                             f"{fix}")
        if self.task in ("regression", "qa"):
            return
        want = manifest.get("num_labels")
        if want is not None and want != n:
            shown = ", ".join(self.labels[:10]) + (" ..." if n > 10 else "")
            raise ShardError(f"{src} lists {n} labels ({shown}), but the dataset was prepared with {want} "
                             f"({MANIFEST} num_labels); {fix}")
        ids = _shard_label_ids(folder, manifest, self.task)
        if ids is None:
            return
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ShardError(f"{src} has {n} labels, but the shards of {folder} hold label id {int(ids.max())}; "
                             f"{fix}")
        if isinstance(counts, dict) and self.task in ("classification", "pair", "multilabel"):
            held = np.bincount(ids, minlength=n)
            for i, name in enumerate(self.labels):
                if int(counts.get(name, 0)) != int(held[i]):
                    raise ShardError(f"{src}: label {name!r} has id {i}, but the shards hold {int(held[i])} "
                                     f"examples with id {i} and labels.json counts {int(counts.get(name, 0))} "
                                     f"{name!r} (the order of the labels was changed?); {fix}")

    def check_trainable(self, values: Sequence[Any], where: Sequence[str], source: str) -> None:
        """A training set's labels (no --labels given) must make a task that can train: one kind of label (names or
        numbers, not both), and at least two classes (NER: at least one entity tag)."""
        if self.task in ("regression", "qa"):
            return
        flat = [(v, w) for vs, w in zip(values, where, strict=True) for v in vs] \
            if self.task in ("multilabel", "ner") else list(zip(values, where, strict=True))
        if self.task != "ner" and flat:
            first, first_at = flat[0]
            kind = _is_number(first)
            for v, at in flat:
                if _is_number(v) != kind:
                    names = [x for x in self.labels if not _is_number(x)][:4]
                    numbers = [x for x in self.labels if _is_number(x)][:4]
                    raise ShardError(f"{at}: label {v!r} is a {'number' if not kind else 'name'}, but {first_at} "
                                     f"has the {'number' if kind else 'name'} {first!r}: labels that mix numbers "
                                     f"({', '.join(numbers)}) and names ({', '.join(names)}) become "
                                     f"{len(self.labels)} separate classes; give every row a name or every row a "
                                     f"number")
        if self.task == "multilabel" and not self.labels:
            raise ShardError(f"{source}: no row has a label, so there is nothing to learn; give the rows their "
                             f"labels (a JSON list or 'a;b')")
        if self.task in ("classification", "pair") and len(self.labels) < 2:
            raise ShardError(f"{source}: all {len(values)} examples have the label "
                             f"{self.labels[0] if self.labels else None!r}, but a classifier needs two classes at "
                             f"least; add examples of the other class(es) (a dev/test set: prepare it with "
                             f"--labels <train dir>)")
        if self.task == "ner" and not any(x != "O" for x in self.labels):
            raise ShardError(f"{source}: every tag is O, so there is no entity to learn; add sentences with B-/I- "
                             f"tags (a dev/test set: prepare it with --labels <train dir>)")

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


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or bool(_NUMBER.match(str(value).strip()))


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


def _shard_label_ids(folder: Path, manifest: dict[str, Any], task: str) -> np.ndarray | None:
    """Every label id the shards hold (IGNORE dropped), or None when a shard cannot be read (the dataset's own
    checks report that)."""
    column = "labels" if task in ("multilabel", "ner") else "label"
    parts = []
    try:
        for shard in manifest.get("shards", []):
            table = pa.ipc.open_file(pa.memory_map(str(folder / shard["file"]), "r")).read_all()
            array = table.column(column).combine_chunks()
            if pa.types.is_list(array.type):
                array = array.flatten()
            parts.append(array.to_numpy(zero_copy_only=False).astype(np.int64))
    except (OSError, KeyError, TypeError, pa.ArrowInvalid):
        return None
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids[ids != IGNORE]


def encode_rows(tok: Any, texts: list[str], pairs: list[str] | None, max_seq_len: int) -> dict[str, list]:
    """Tokenize (text[, text_pair]) rows with [CLS] A [SEP] (B [SEP]), longest-first truncation."""
    enc = tok(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_seq_len,
              return_token_type_ids=True)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]]}


def encode_ner(tok: Any, sentences: list[list[str]], tag_ids: list[list[int]], max_seq_len: int,
               label_all_pieces: bool = False) -> dict[str, list]:
    """Word-level tags → word-piece labels: a word's first piece carries its tag, the other pieces IGNORE (or the
    I- form of the tag with label_all_pieces); [CLS]/[SEP] IGNORE. Sentences longer than max_seq_len are truncated."""
    enc = tok(sentences, is_split_into_words=True, truncation=True, max_length=max_seq_len,
              return_token_type_ids=True)
    labels = []
    for i, tags in enumerate(tag_ids):
        row, prev = [], None
        for word in enc.word_ids(i):
            if word is None:
                row.append(IGNORE)
            elif word != prev:
                row.append(tags[word])
            else:
                row.append(tags[word] if label_all_pieces else IGNORE)
            prev = word
        labels.append(row)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]], "labels": labels}


def read_squad(path: Path, data: Any) -> list[dict[str, Any]]:
    """SQuAD v1.1/v2.0 JSON → [{id, question, context, answers: [{text, answer_start}]}], answers checked against
    the context."""
    from dtrain.data.shards import ShardError

    examples = []
    try:
        articles = data["data"]
        for article in articles:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    for a in answers:
                        start = int(a["answer_start"])
                        if context[start:start + len(a["text"])] != a["text"]:
                            raise ShardError(f"{path}: question {qa['id']}: answer {a['text']!r} is not at "
                                             f"answer_start {start} of its context; fix answer_start")
                    examples.append({"id": str(qa["id"]), "question": qa["question"], "context": context,
                                     "answers": [{"text": a["text"], "answer_start": int(a["answer_start"])}
                                                 for a in answers]})
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: not SQuAD-style JSON (missing {e}); expected "
                         f"{{data: [{{paragraphs: [{{context, qas: [{{id, question, answers}}]}}]}}]}}") from None
    return examples


def encode_qa(tok: Any, examples: list[dict[str, Any]], first: int, max_seq_len: int,
              doc_stride: int) -> dict[str, list]:
    """Question + context → windows of max_seq_len tokens overlapping by doc_stride; each window labelled with the
    token span of the first answer, or (0, 0) when the answer is not wholly inside it (or there is none)."""
    enc = tok([e["question"] for e in examples], [e["context"] for e in examples], truncation="only_second",
              max_length=max_seq_len, stride=doc_stride, return_overflowing_tokens=True,
              return_offsets_mapping=True, return_token_type_ids=True)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "length", "start_position",
                                             "end_position", "example", "offset_start", "offset_end")}
    for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
        seq = enc.sequence_ids(i)
        offsets = [o if s == 1 else (-1, -1) for o, s in zip(enc["offset_mapping"][i], seq, strict=True)]
        answers = examples[example_index]["answers"]
        start = end = 0
        if answers:
            a_start = answers[0]["answer_start"]
            a_end = a_start + len(answers[0]["text"])
            inside = [t for t, (lo, hi) in enumerate(offsets) if lo >= 0 and lo < a_end and hi > a_start]
            ctx = [t for t, o in enumerate(offsets) if o[0] >= 0]
            if inside and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
                start, end = inside[0], inside[-1]
        cols["input_ids"].append(enc["input_ids"][i])
        cols["token_type_ids"].append(enc["token_type_ids"][i])
        cols["length"].append(len(enc["input_ids"][i]))
        cols["start_position"].append(start)
        cols["end_position"].append(end)
        cols["example"].append(first + example_index)
        cols["offset_start"].append([o[0] for o in offsets])
        cols["offset_end"].append([o[1] for o in offsets])
    return cols


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_2d(rows: Sequence[np.ndarray], width: int, value: int) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class FinetuneCollator:
    """Pads a batch to its longest sequence (rounded up to a multiple of 8), not to max_seq_len.

    Output (numpy; StreamLoader hands tensors to the loop): input_ids, attention_mask, token_type_ids, labels (int;
    float for regression; multi-hot float for multilabel; per token for ner) or, for qa, start_position,
    end_position and example (the row of examples.jsonl the window comes from), index, pad. Padding repeats (pad=True)
    get ignored labels (-100; NaN for regression) so they add nothing to the loss.
    """

    def __init__(self, task: str, pad_id: int, num_labels: int = 0, pad_to_multiple_of: int = 8):
        if task not in TASKS:
            raise ShardError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        self.task, self.pad_id, self.num_labels, self.multiple = task, pad_id, num_labels, pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        lengths = np.array([len(s["input_ids"]) for s in samples])
        width = _round_up(int(lengths.max()), self.multiple)
        pad = np.array([bool(s["pad"]) for s in samples])
        batch = {"input_ids": pad_2d([s["input_ids"] for s in samples], width, self.pad_id),
                 "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
                 "token_type_ids": pad_2d([s["token_type_ids"] for s in samples], width, 0),
                 "index": np.array([int(s["index"]) for s in samples]), "pad": pad}
        if self.task == "qa":
            for name in ("start_position", "end_position"):
                batch[name] = np.where(pad, IGNORE, np.array([int(s[name]) for s in samples]))
            batch["example"] = np.array([int(s["example"]) for s in samples])
            return batch
        if self.task == "ner":
            labels = pad_2d([s["labels"] for s in samples], width, IGNORE)
        elif self.task == "multilabel":
            labels = np.zeros((len(samples), self.num_labels), dtype=np.float32)
            for i, s in enumerate(samples):
                labels[i, np.asarray(s["labels"], dtype=np.int64)] = 1.0
        elif self.task == "regression":
            labels = np.array([float(s["label"]) for s in samples], dtype=np.float32)
        else:
            labels = np.array([int(s["label"]) for s in samples], dtype=np.int64)
        labels[pad] = np.nan if self.task == "regression" else IGNORE
        batch["labels"] = labels
        return batch
