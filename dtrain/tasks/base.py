"""The Task interface: what one fine-tuning task owns, from raw rows to decoded predictions.

A task object is stateless (one instance per task, in the registry); the per-run options (class weights, label
smoothing, the labels, thresholds) reach its methods through the objects that carry them: the Head (loss), the
LabelMap (labels), the Evaluator (report). The defaults here are those of a sequence-level task over the text (and
text pair) of a table row; the task modules override what differs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dtrain.data import IGNORE
from dtrain.data.rows import CONLL_SUFFIXES, JSONL_SUFFIXES, TABLE_SUFFIXES, read_labelled_rows
from dtrain.data.shards import ShardError
from dtrain.data.windows import CONFIG_KEY, PLAIN, Cut
from dtrain.errors import DtrainError

FEATURES = [("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())), ("length", pa.int32())]
PROMPT_KEYS = ("template", "verbalizer", "prompt_lm_weight")  # task settings only the prompt task reads
WINDOW_COLUMNS = [("doc", pa.int64()), ("windows", pa.int32())]  # a window's document and its count of windows
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or bool(_NUMBER.match(str(value).strip()))


def pad_2d(rows: Sequence[np.ndarray], width: int, value: int) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def summed(loss: Callable[[str], torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A per-sample loss (`loss(reduction)`) summed over the batch, each sample weighed by batch["weight"] when the
    batch has one (windows of long documents: 1/windows, so a document counts once)."""
    weight = batch.get("weight")
    return loss("sum") if weight is None else (loss("none") * weight).sum()


def counted(keep: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The targets of a per-sample mask (`keep`: [B]), weighed as `summed` weighs their losses."""
    weight = batch.get("weight")
    return keep.sum() if weight is None else weight[keep].sum()


def encode_rows(tok: Any, texts: list[str], pairs: list[str] | None, max_seq_len: int) -> dict[str, list]:
    """Tokenize (text[, text_pair]) rows with [CLS] A [SEP] (B [SEP]), longest-first truncation."""
    enc = tok(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_seq_len,
              return_token_type_ids=True)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]]}


class Task:
    """One fine-tuning task. Rows at prepare are (text or tokens, text_pair or None, label value)."""

    name = ""
    also_fits: tuple[str, ...] = ()  # prepared tasks a model of this task also trains on (classification: pair)
    # model
    hf_class = "BertForSequenceClassification"
    problem_type: str | None = None
    default_metric = "accuracy"
    head_module = "classifier"  # the attribute of the HF model that holds the head (always trains under PEFT)
    peft_task_type = "SEQ_CLS"
    sequence_level = True  # one output per sequence (prompt tuning applies), not per token
    class_weights_ok = False
    # labels
    named_labels = True  # a label map of names (not regression's numbers, not qa's spans)
    label_column = "label"
    label_type: pa.DataType = pa.int32()
    list_labels = False  # a row has a list of labels (multilabel, ner)
    counts_per_label = True  # labels.json counts name the labels (ner counts entity types)
    input_suffixes = TABLE_SUFFIXES | JSONL_SUFFIXES | CONLL_SUFFIXES
    predict_offsets = False  # predict_encode keeps each token's character offsets (to decode spans of the text)
    prepares = True  # `dtrain prepare finetune --task NAME` makes its data (prompt: the data is classification's)
    has_pairs = False  # data prepared for it has a text pair in every row
    needs_settings = False  # bind needs task settings (a model without them saved cannot predict)
    label_rows = True  # the head has one row of weights per label (init_from with new labels grows it)
    batch_fields: tuple[str, ...] = ()  # per-row integers of predict_encode's output that the batches carry
    distills = True  # learns from a teacher's soft targets (distill_loss: a distribution over labels per target)
    reads_windows = True  # one output per text that windows of a long one pool into (not ner, qa, prompt)
    own_stride = False  # --doc-stride sets the overlap of the task's own windows (qa), not only of --windows
    cut = PLAIN  # how this run's task reads a long text (`reading`: the training data's --truncation/--windows)
    pooling: str | None = None  # how a document's windows pool (task.window_pooling; None: mean)

    def trains_on(self, prepared: str) -> bool:
        """Whether a model of this task trains on (and evaluates) data prepared for task `prepared`."""
        return prepared == self.name or prepared in self.also_fits

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __reduce__(self) -> tuple:  # pickled by name (prepare's worker processes): the registry's one instance
        from dtrain.tasks.registry import get_task

        if self.cut.plain and self.pooling is None:
            return get_task, (self.name,)
        return _reading, (self.name, self.cut, self.pooling)

    def reading(self, cut: Cut, pooling: str | None = None, where: str = "task.window_pooling") -> Task:
        """This task reading long texts as `cut` says (the training data's, or what a model saved) and pooling a
        document's windows by `pooling` (`where`: the key or option that set it, for errors)."""
        if cut.plain and pooling is None:
            return self
        if not self.reads_windows and pooling is not None:
            raise DtrainError(f"{where}={pooling}: task {self.name} has no per-document output to pool or cut (ner "
                              f"labels tokens, qa windows its contexts itself, prompt wraps the whole text); remove it")
        if not self.reads_windows:
            raise DtrainError(f"the training data was prepared with {cut.describe()}, but task {self.name} reads "
                              f"whole texts (a cloze prompt wraps the text in its template); prepare it without "
                              f"--truncation/--windows")
        if pooling is not None:
            self.check_pooling(pooling, where)
        task = object.__new__(type(self))  # (not copy.copy: __reduce__ would give the registry's instance back)
        task.__dict__.update(self.__dict__)
        task.cut, task.pooling = cut, pooling
        return task

    def check_pooling(self, pooling: str, where: str) -> None:
        pass

    def bind(self, options: Any, tokenizer: Any, labels: Sequence[str], pairs: bool, max_seq_len: int,
             where: str = "task.{key}", data: str = "data.train") -> Task:
        """This run's task: the registry's instance with the run's own task settings (`options`: the task config
        section, or a model's saved ones) built in; a task without such settings is itself (prompt: its template and
        verbalizer in token ids)."""
        stray = [k for k in PROMPT_KEYS if getattr(options, k, None)]
        if stray:
            raise DtrainError(f"{where.format(key=stray[0])} is set, but task {self.name} does not use it (a cloze "
                              f"prompt is task.type=prompt); remove it, or set task.type=prompt")
        return self

    def saved_options(self, config: dict[str, Any]) -> Any:
        """The settings `bind` needs, as an exported model of this task keeps them in its config.json; None: none."""
        return None

    def saved_config(self) -> dict[str, Any]:
        """Entries of the model's config.json that keep this run's task settings (what saved_options reads; how the
        model reads long texts: Cut.recall)."""
        return {} if self.cut.plain and self.pooling is None else {CONFIG_KEY: self.cut.saved(self.pooling)}

    def check_loaded(self, source: str, fresh: Sequence[str], preset: bool) -> None:
        """Refuse a checkpoint whose weights lack what the task cannot start without (`fresh`: weights that start
        from random values; preset: a random init the user asked for)."""

    # -- prepare: rows, labels, features ----------------------------------------------------------------------------

    def read_rows(self, files: list[Path], text_field: str, text_pair_field: str | None,
                  label_field: str) -> tuple[list[tuple], list[str]]:
        return read_labelled_rows(files, text_field, text_pair_field, label_field, self.parse_label)

    def parse_label(self, value: Any, where: str) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else str(value)

    def label_names(self, values: Sequence[Any]) -> list[str]:
        if not self.named_labels:
            return []
        flat = [v for vs in values for v in vs] if self.list_labels else list(values)
        return sorted({str(v) for v in flat})

    def check_labels(self, label_map: Any, values: Sequence[Any], where: Sequence[str], source: str) -> None:
        """A training set's labels (no --labels given) must make a task that can train: one kind of label (names or
        numbers, not both), and enough classes."""
        if not self.named_labels:
            return
        flat = [(v, w) for vs, w in zip(values, where, strict=True) for v in vs] \
            if self.list_labels else list(zip(values, where, strict=True))
        if flat:
            self.check_one_kind(label_map, flat)
        self.check_classes(label_map, values, source)

    def check_one_kind(self, label_map: Any, flat: list[tuple[Any, str]]) -> None:
        first, first_at = flat[0]
        kind = is_number(first)
        for v, at in flat:
            if is_number(v) != kind:
                names = [x for x in label_map.labels if not is_number(x)][:4]
                numbers = [x for x in label_map.labels if is_number(x)][:4]
                raise ShardError(f"{at}: label {v!r} is a {'number' if not kind else 'name'}, but {first_at} "
                                 f"has the {'number' if kind else 'name'} {first!r}: labels that mix numbers "
                                 f"({', '.join(numbers)}) and names ({', '.join(names)}) become "
                                 f"{len(label_map.labels)} separate classes; give every row a name or every row a "
                                 f"number")

    def check_classes(self, label_map: Any, values: Sequence[Any], source: str) -> None:
        pass

    def label_ids(self, value: Any, label_map: Any, where: str, counts: Counter) -> Any:
        """A parsed label → what the shard stores; `counts` (labels.json) updated."""
        counts[value] += 1
        return label_map.id(value, where)

    def schema(self, cut: Cut = PLAIN) -> pa.Schema:
        return pa.schema([*FEATURES, (self.label_column, self.label_type), *(WINDOW_COLUMNS if cut.windows else [])])

    def encode(self, tok: Any, rows: list[tuple], first: int, max_seq_len: int, cut: Cut) -> dict[str, list]:
        """Rows (text, pair, label id(s)) → shard columns (runs in prepare's worker processes); `cut`: how a long
        text is cut (windows: a row per window, its label repeated)."""
        pairs = [r[1] for r in rows] if rows[0][1] is not None else None
        texts = [r[0] for r in rows]
        cols = encode_rows(tok, texts, pairs, max_seq_len) if cut.plain else \
            cut.encode(tok, texts, pairs, max_seq_len, first)
        cols[self.label_column] = [rows[d - first][2] for d in cols["doc"]] if cut.windows else [r[2] for r in rows]
        return cols

    def write_extra(self, out: Path, encoded: list[tuple], cut: Cut) -> dict[str, Any]:
        """Files beside the shards and statistics for labels.json."""
        return {}

    # -- collation --------------------------------------------------------------------------------------------------

    def inputs(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model inputs of shard samples, before padding (prompt: the template around the text)."""
        return samples

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        """The batch's targets; padding repeats (pad) get ignored ones so they add nothing to the loss."""
        labels = np.array([int(s["label"]) for s in samples], dtype=np.int64)
        labels[pad] = IGNORE
        return {"labels": labels}

    # -- model ------------------------------------------------------------------------------------------------------

    def num_outputs(self, labels: Sequence[str]) -> int:
        return len(labels)

    def check_model_labels(self, labels: Sequence[str]) -> None:
        pass

    def model_config(self, labels: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments of the HF config: label names in it, so pipeline() prints them."""
        extra: dict[str, Any] = {"problem_type": self.problem_type} if self.problem_type else {}
        extra["num_labels"] = self.num_outputs(labels)
        if labels and self.named_labels:
            extra["id2label"] = dict(enumerate(labels))
            extra["label2id"] = {name: i for i, name in enumerate(labels)}
        return extra

    # -- loss -------------------------------------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits as float32: [B, C] (sequence tasks), [B, T, C] (ner), [B, T, 2] start/end (qa)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        return self.logits(out).float()

    def logits(self, out: Any) -> torch.Tensor:
        return out.logits

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        """The training objective's summed terms: the loss terms of the forward's outputs, and a teacher's term when
        the head has one (a task may add more)."""
        logits = self.forward(model, batch)
        return {**self.loss_terms(logits, batch, head), **head.soft_terms(logits, batch)}

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor],
                     temperature: float) -> torch.Tensor:
        """T²·KL(teacher ‖ student) of the temperature-softened distributions over the last axis, summed over the
        targets (the positions whose label is not ignored: real samples; ner: first pieces of words; windows weighed
        as their loss is)."""
        keep = batch["labels"] != IGNORE
        s = (student[keep].float() / temperature).log_softmax(-1)
        t = (teacher[keep].float() / temperature).log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1)
        weight = batch.get("weight")
        return temperature ** 2 * (kl * weight[keep] if weight is not None and keep.dim() == 1 else kl).sum()

    def distill_count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = batch["labels"] != IGNORE
        return counted(keep, batch) if keep.dim() == 1 else keep.sum()

    def for_training(self) -> Task:
        """The task as the training side sees it (the same unless training adds terms evaluation has not: the
        prompt task's auxiliary MLM loss); its collator and head are the training stream's."""
        return self

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------------------------

    def records(self, x: np.ndarray, batch: dict[str, torch.Tensor], keep: list[int]) -> list[tuple]:
        """(dataset index, task-specific arrays ...) per real (not padding) sample."""
        index = batch["index"]
        return [(int(index[i]), x[i], batch["labels"][i].cpu().numpy()) for i in keep]

    def report(self, records: list[tuple], evaluator: Any) -> dict[str, Any]:
        raise NotImplementedError

    # -- windows of long documents ----------------------------------------------------------------------------------

    def pool_windows(self, records: list[tuple], docs: Sequence[int]) -> list[tuple]:
        """One record per document (`docs`: each record's document, in record order): its windows' outputs pooled,
        the first window's index and label."""
        groups: dict[int, list[tuple]] = {}
        for record, doc in zip(records, docs, strict=True):
            groups.setdefault(int(doc), []).append(record)
        return [(rs[0][0], self.pool(np.stack([r[1] for r in rs])), *rs[0][2:]) for rs in groups.values()]

    def pool(self, outputs: np.ndarray) -> np.ndarray:
        """A document's output from its windows' ([windows, ...]): the mean or max of the probabilities (as logits
        again, so the report and decode read them as one window's), or of the logits (`*_logits`)."""
        how = self.pooling or "mean"
        reduce = np.max if how.startswith("max") else np.mean
        if how.endswith("_logits"):
            return reduce(outputs, axis=0)
        return self.as_logits(reduce(self.probabilities(outputs), axis=0))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def as_logits(self, probabilities: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(probabilities, 1e-12))

    # -- prediction -------------------------------------------------------------------------------------------------

    def input_fields(self, fields: dict[str, str | None]) -> list[str]:
        return [fields["text"]] + ([fields["text_pair"]] if fields.get("text_pair") else [])

    def predict_encode(self, tok: Any, rows: list[dict[str, Any]], fields: dict[str, str | None], max_seq_len: int,
                       doc_stride: int) -> Any:
        """The model inputs of new rows (cut as the model's training data was: self.cut; windows carry "doc", their
        row's number)."""
        text, pair = fields["text"], fields.get("text_pair")
        if not self.cut.plain:
            return self.cut.encode(tok, [r[text] for r in rows], [r[pair] for r in rows] if pair else None,
                                   max_seq_len)
        return tok([r[text] for r in rows], [r[pair] for r in rows] if pair else None, truncation=True,
                   max_length=max_seq_len, return_offsets_mapping=self.predict_offsets)

    def output_of(self, logits: np.ndarray, length: int) -> np.ndarray:
        """One input's output from its row of the batch's logits."""
        return logits

    def decode(self, outputs: list[np.ndarray], enc: Any, rows: list[dict[str, Any]], fields: dict[str, str | None],
               labels: list[str], threshold: float, max_answer_length: int) -> list[dict]:
        raise NotImplementedError


def _reading(name: str, cut: Cut, pooling: str | None) -> Task:
    from dtrain.tasks.registry import get_task

    return get_task(name).reading(cut, pooling)


def check_class_weights(task: Task, class_weights: Sequence[float] | None, num_labels: int) -> None:
    if class_weights is not None and not task.class_weights_ok:
        raise DtrainError(f"task.class_weights applies to classification, not {task.name}; remove it")
    if class_weights is not None and len(class_weights) != num_labels:
        raise DtrainError(f"task.class_weights has {len(class_weights)} values but the task has {num_labels} "
                          f"labels; give one weight per label in labels.json order")
