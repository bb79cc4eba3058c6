"""Extractive question answering (SQuAD v1.1/v2.0 JSON): windows over long contexts, start/end logits, the best
span per question over its windows (shared by evaluation and `dtrain predict`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dtrain import metrics as M
from dtrain.data import IGNORE
from dtrain.data.rows import read_text
from dtrain.data.shards import ShardError
from dtrain.data.windows import PLAIN, QA_STRIDE, Cut
from dtrain.tasks.base import FEATURES, Task

EXAMPLES = "examples.jsonl"


def read_squad(path: Path, data: Any) -> list[dict[str, Any]]:
    """SQuAD v1.1/v2.0 JSON → [{id, question, context, answers: [{text, answer_start}]}], answers checked against
    the context."""
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


def best_spans(start: np.ndarray, end: np.ndarray, context: np.ndarray, n_best: int,
               max_answer_length: int) -> list[tuple[float, int, int]]:
    """(score, start, end) of the valid answer spans of one window, best first: both ends inside the context
    (`context`: bool per token), end ≥ start, at most max_answer_length tokens, among the n_best starts and ends."""
    if not context.any():
        return []
    masked_s = np.where(context, start, -np.inf)
    masked_e = np.where(context, end, -np.inf)
    starts = np.argsort(-masked_s)[:n_best]
    ends = np.argsort(-masked_e)[:n_best]
    spans = [(float(start[s] + end[e]), int(s), int(e)) for s in starts for e in ends
             if context[s] and context[e] and s <= e < s + max_answer_length]
    return sorted(spans, reverse=True)


def decode_answer(windows: Sequence[dict[str, Any]], context: str, n_best: int, max_answer_length: int,
                  allow_null: bool) -> tuple[str, float, int, int]:
    """The best answer over all windows of one example: (text, score, char start, char end). With allow_null
    (SQuAD v2 data), "" when the [CLS] score (start+end at 0) beats every span."""
    best: tuple[float, str, int, int] = (-np.inf, "", -1, -1)
    null = np.inf
    for w in windows:
        offsets_s, offsets_e = np.asarray(w["offset_start"]), np.asarray(w["offset_end"])
        null = min(null, float(w["start"][0] + w["end"][0]))
        spans = best_spans(w["start"], w["end"], offsets_s >= 0, n_best, max_answer_length)
        if spans and spans[0][0] > best[0]:
            _, s, e = spans[0]
            lo, hi = int(offsets_s[s]), int(offsets_e[e])
            best = (spans[0][0], context[lo:hi], lo, hi)
    if allow_null and null > best[0]:
        return "", null, -1, -1
    return best[1], best[0], best[2], best[3]


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """examples.jsonl of a prepared QA set (id, question, context, answers), by example number."""
    with open(Path(path) / EXAMPLES, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def qa_stride(cut: Cut) -> int:
    return cut.stride if cut.stride is not None else QA_STRIDE


class Qa(Task):
    name = "qa"
    distills = False  # (no soft-target loss written yet)
    reads_windows = False  # (its windows are its own: the best span over them)
    own_stride = True
    hf_class = "BertForQuestionAnswering"
    default_metric = "f1"
    head_module = "qa_outputs"
    peft_task_type = "QUESTION_ANS"
    sequence_level = False
    named_labels = False
    label_column = None  # type: ignore[assignment]  # spans, not labels
    input_suffixes = {".json"}

    def read_rows(self, files: list[Path], text_field: str, text_pair_field: str | None,
                  label_field: str) -> tuple[list[tuple], list[str]]:
        rows, where = [], []
        for f in files:
            if f.suffix.lower() != ".json":
                raise ShardError(f"{f}: QA input must be SQuAD-style .json; got {f.suffix}")
            try:
                squad = json.loads(read_text(f))
            except ValueError as e:
                raise ShardError(f"{f}: not valid JSON ({e}); fix the file") from None
            for example in read_squad(f, squad):
                rows.append((example["question"], example["context"], example))
                where.append(f"{f} question {example['id']}")
        return rows, where

    def label_ids(self, value: Any, label_map: Any, where: str, counts: Counter) -> Any:
        return value

    def schema(self, cut: Cut = PLAIN) -> pa.Schema:  # answer span in tokens (0, 0 = [CLS]: none here) + offsets
        return pa.schema([*FEATURES, ("start_position", pa.int32()), ("end_position", pa.int32()),
                          ("example", pa.int64()), ("offset_start", pa.list_(pa.int32())),
                          ("offset_end", pa.list_(pa.int32()))])

    def encode(self, tok: Any, rows: list[tuple], first: int, max_seq_len: int, cut: Cut) -> dict[str, list]:
        return encode_qa(tok, [r[2] for r in rows], first, max_seq_len, qa_stride(cut))

    def write_extra(self, out: Path, encoded: list[tuple], cut: Cut) -> dict[str, Any]:
        doc_stride = qa_stride(cut)
        with open(out / EXAMPLES, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r[2], ensure_ascii=False) + "\n" for r in encoded)
        return {"examples": len(encoded), "doc_stride": doc_stride}

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        batch = {name: np.where(pad, IGNORE, np.array([int(s[name]) for s in samples]))
                 for name in ("start_position", "end_position")}
        batch["example"] = np.array([int(s["example"]) for s in samples])
        return batch

    def model_config(self, labels: Sequence[str]) -> dict[str, Any]:
        return {}  # two outputs (start, end): the HF class's default

    def logits(self, out: Any) -> torch.Tensor:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        width = logits.shape[1]  # the mean of the start and end cross-entropies; answers past the end ignored
        start = batch["start_position"].clamp(max=width - 1)
        end = batch["end_position"].clamp(max=width - 1)
        # padding is never an answer: out of the softmax, so a window's loss does not depend on its batch-mates
        logits = logits.masked_fill(~batch["attention_mask"].bool()[..., None], torch.finfo(logits.dtype).min)
        ce = sum(F.cross_entropy(logits[..., i], pos, ignore_index=IGNORE, reduction="sum")
                 for i, pos in enumerate((start, end)))
        return {"span": ce / 2}

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        return {"span": (batch["start_position"] != IGNORE).sum()}

    def records(self, x: np.ndarray, batch: dict[str, torch.Tensor], keep: list[int]) -> list[tuple]:
        index, lengths = batch["index"], batch["attention_mask"].sum(1).tolist()
        return [(int(index[i]), int(batch["example"][i]), x[i, :lengths[i], 0], x[i, :lengths[i], 1]) for i in keep]

    def predictions(self, records: list[tuple], evaluator: Any) -> dict[str, str]:
        """Question id → predicted answer text, from the windows' start/end logits."""
        data = evaluator.data
        examples = read_examples(data.path)
        allow_null = any(not e["answers"] for e in examples)
        windows: dict[int, list[dict[str, Any]]] = {}
        for index, example, start, end in records:
            windows.setdefault(example, []).append(
                {"start": start, "end": end, "offset_start": data.get(index, "offset_start")[:len(start)],
                 "offset_end": data.get(index, "offset_end")[:len(start)]})
        return {examples[i]["id"]: decode_answer(w, examples[i]["context"], evaluator.n_best,
                                                 evaluator.max_answer_length, allow_null)[0]
                for i, w in windows.items()}

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        examples = read_examples(evaluator.data.path)
        return M.squad_metrics(self.predictions(records, evaluator),
                               {e["id"]: [a["text"] for a in e["answers"]] for e in examples})

    def input_fields(self, fields: dict[str, str | None]) -> list[str]:
        return [str(fields["question"]), str(fields["context"])]

    def predict_encode(self, tok: Any, rows: list[dict[str, Any]], fields: dict[str, str | None], max_seq_len: int,
                       doc_stride: int) -> Any:
        return tok([r[fields["question"]] for r in rows], [r[fields["context"]] for r in rows],
                   truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                   return_overflowing_tokens=True, return_offsets_mapping=True)

    def output_of(self, logits: np.ndarray, length: int) -> np.ndarray:
        return logits[:length]

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
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
