"""Cloze prompts (PET / LM-BFF style): classify a text by what the MLM head puts at the [MASK] of a template.

`task.template` wraps the text (and text pair) around one mask — `"{text} It was [MASK]."`, `"{text} ? [MASK],
{text_pair}"` — and `task.verbalizer` maps each label to one or more words. A label's score is the mean of its
words' log-probabilities (log-softmax over the whole vocabulary) at the mask, so a label with more words is not
favoured; the scores are the classifier's logits: cross-entropy over them is the few-shot objective (PET), their
argmax the prediction, and everything downstream (report, confusion matrix, decode) is classification's. A
verbalizer word must be one WordPiece: a multi-piece word is refused (one mask predicts one piece), with the pieces
named so a one-piece synonym can be chosen.

The same task serves three uses: zero-shot (`dtrain evaluate/predict --prompt FILE` on a model with a trained MLM
head: a pretraining run or its export), few-shot prompt fine-tuning (`task.type=prompt` on classification data), and
the model it trains (a BertForMaskedLM whose config.json carries the template and verbalizer as `dtrain_prompt`, so
`dtrain predict/evaluate` read them back; `pipeline("fill-mask")` loads it as it is).

The template is applied when a batch is collated (data prepared for classification or pair works unchanged): a
shard row's [CLS] A [SEP] (B [SEP]) is split back into A and B, and the template's literal pieces (tokenized once,
alone: BERT splits words at spaces and punctuation, so that equals tokenizing the whole string) go around them; A
and B are cut longest-first to fit data.max_seq_len. The sequence is one segment (token_type 0).

Written here, not taken from a library: peft has no hard prompts, and OpenPrompt / PET are research code pinned to
transformers 4; what is needed is a template, a lookup and a gather at one position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dtrain.data import IGNORE
from dtrain.data.pretraining import sample_keys, uniform
from dtrain.data.shards import ShardError
from dtrain.errors import DtrainError
from dtrain.tasks.classification import Classification

SLOTS = ("text", "text_pair")
CONFIG_KEY = "dtrain_prompt"  # where a prompt model's config.json keeps its template and verbalizer
HEAD = "cls.predictions.transform"  # the MLM head's transform: trains under PEFT (the decoder is the tied embeddings)
_FIX = 'e.g. task.template="{text} It was [MASK]."'
_LM_SEED, _LM_PROBABILITY = 0x50E7, 0.15  # the auxiliary MLM loss: its hash seed, the share of text tokens it masks
_LM_SELECT, _LM_ACTION, _LM_REPLACE = (np.uint64(k) for k in (11, 12, 13))


class PromptError(DtrainError):
    """A template or verbalizer that cannot work (names the key and the fix)."""


@dataclass(frozen=True)
class Prompt:
    """A parsed template and verbalizer in token ids of one tokenizer, for one label order."""

    template: str
    verbalizer: dict[str, list[str]]
    labels: tuple[str, ...]
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # ("ids", literal ids), ("text"|"text_pair"|"mask", ())
    word_ids: tuple[tuple[int, ...], ...]  # per label (in `labels` order): its words' vocabulary ids
    special: tuple[int, int, int]  # cls, sep, mask ids
    max_seq_len: int
    lm_weight: float = 0.0  # the auxiliary MLM loss on the training texts (0: off)
    vocab_size: int = 0

    @property
    def fixed(self) -> int:
        """Tokens the template adds: [CLS], [SEP], the mask and the literal pieces."""
        return 3 + sum(len(ids) for kind, ids in self.parts if kind == "ids")

    @property
    def has_pair(self) -> bool:
        return any(kind == "text_pair" for kind, _ in self.parts)

    def saved(self) -> dict[str, Any]:
        return {"template": self.template, "verbalizer": {k: list(self.verbalizer[k]) for k in self.labels}}

    def encode(self, a: Sequence[int], b: Sequence[int] | None, max_len: int | None = None) -> tuple[list[int], int]:
        """(input ids, mask position) of a text's (and pair's) ids without special tokens."""
        ids, position, _ = self.encode_spans(a, b, max_len)
        return ids, position

    def encode_spans(self, a: Sequence[int], b: Sequence[int] | None,
                     max_len: int | None = None) -> tuple[list[int], int, list[int]]:
        """encode, and the positions of the text's (and pair's) tokens (where the auxiliary MLM loss may mask)."""
        room = max((max_len or self.max_seq_len) - self.fixed, 0)
        a, b = list(a), list(b or [])
        while len(a) + len(b) > room:  # longest first, from the end
            (a if len(a) >= len(b) else b).pop()
        cls, sep, mask = self.special
        ids, position, text = [cls], -1, []
        for kind, literal in self.parts:
            if kind == "ids":
                ids += literal
            elif kind == "mask":
                position = len(ids)
                ids.append(mask)
            else:
                piece = a if kind == "text" else b
                text += range(len(ids), len(ids) + len(piece))
                ids += piece
        ids.append(sep)
        return ids, position, text


def parse_template(template: str | None, tok: Any, pairs: bool, where: str, data: str) -> tuple:
    """The template's parts (literal ids, slots, the mask); every way it cannot work is one line."""
    if not template or not template.strip():
        raise PromptError(f"{where} is not set: a prompt task needs a template with {{text}} and one "
                          f"{tok.mask_token}, {_FIX}")
    mask = tok.mask_token
    pieces = [p for p in re.split(r"(\{[^{}]*\}|" + re.escape(mask) + ")", template) if p]
    slots = [p[1:-1] for p in pieces if p.startswith("{") and p.endswith("}")]
    for slot in slots:
        if slot not in SLOTS:
            raise PromptError(f"{where}={template!r}: unknown slot {{{slot}}}; the slots are {{text}} and "
                              f"{{text_pair}}")
    masks = pieces.count(mask)
    if masks != 1:
        raise PromptError(f"{where}={template!r} has {'no' if not masks else masks} {mask}"
                          f"{'' if masks < 2 else 's'}: the label is read at one mask; write exactly one, {_FIX}")
    for slot in SLOTS:
        if slots.count(slot) > 1:
            raise PromptError(f"{where}={template!r} has {{{slot}}} {slots.count(slot)} times; use it once")
    if "text" not in slots:
        raise PromptError(f"{where}={template!r} has no {{text}} slot: the text must go into the prompt, {_FIX}")
    if pairs and "text_pair" not in slots:
        raise PromptError(f"{where}={template!r} has no {{text_pair}}, but {data} has text pairs; add it, e.g. "
                          f'"{{text}} ? {mask}, {{text_pair}}"')
    if not pairs and "text_pair" in slots:
        raise PromptError(f"{where}={template!r} has {{text_pair}}, but {data} has no text pairs; remove it (or "
                          f"prepare the data with --text-pair-field)")
    parts = []
    for p in pieces:
        if p == mask:
            parts.append(("mask", ()))
        elif p[1:-1] in SLOTS and p.startswith("{"):
            parts.append((p[1:-1], ()))
        else:
            ids = tuple(tok(p, add_special_tokens=False)["input_ids"])
            if ids:
                parts.append(("ids", ids))
    return tuple(parts)


def parse_verbalizer(verbalizer: Any, labels: Sequence[str], tok: Any, where: str, data: str) -> tuple:
    """Each label's one-piece word ids, in `labels` order."""
    example = "{" + ", ".join(f"{x}: [word]" for x in list(labels)[:3]) + "}"
    if not verbalizer:
        raise PromptError(f"{where} is not set: map each label to a word, e.g. {where}={example}")
    if not isinstance(verbalizer, dict):
        raise PromptError(f"{where}: expected a mapping of label → words, e.g. {example}; got {verbalizer!r}")
    words = {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in verbalizer.items()}
    for label in labels:
        if label not in words:
            raise PromptError(f"{where} has no word for label {label!r} of {data} (labels: {list(labels)[:10]}); "
                              f"add `{label}: [word]` to it")
    extra = [k for k in words if k not in labels]
    if extra:
        raise PromptError(f"{where} maps {extra[0]!r}, which is not a label of {data} (labels: {list(labels)[:10]}); "
                          f"remove it, or use the labels' names as labels.json spells them")
    seen: dict[int, str] = {}
    out = []
    for label in labels:
        if not words[label]:
            raise PromptError(f"{where}: label {label!r} has no words; give it one at least")
        ids = []
        for word in words[label]:
            if not isinstance(word, str) or not word.strip():
                raise PromptError(f"{where}: label {label!r} has the word {word!r}; give words as text")
            pieces = tok(word.strip(), add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                shown = tok.convert_ids_to_tokens(pieces)
                raise PromptError(f"{where}: {word!r} (label {label!r}) is {len(pieces)} word pieces for this "
                                  f"tokenizer ({', '.join(shown)}); use a word that is one piece: the mask "
                                  f"predicts one piece")
            if pieces[0] == tok.unk_token_id:
                raise PromptError(f"{where}: {word!r} (label {label!r}) is not in the tokenizer's vocabulary (it "
                                  f"becomes {tok.unk_token}); use a word the vocabulary has")
            if pieces[0] in seen and seen[pieces[0]] != label:
                raise PromptError(f"{where}: {word!r} is a word of both {seen[pieces[0]]!r} and {label!r}; give each "
                                  f"label its own words")
            seen[pieces[0]] = label
            ids.append(pieces[0])
        out.append(tuple(ids))
    return tuple(out), {k: [str(w).strip() for w in v] for k, v in words.items()}


def build_prompt(options: Any, tok: Any, labels: Sequence[str], pairs: bool, max_seq_len: int,
                 where: str = "task.{key}", data: str = "data.train") -> Prompt:
    """The Prompt of `options.template` / `options.verbalizer` (where: how errors name a key of them, e.g.
    "task.{key}" or "--prompt p.yaml: {key}"; data: the data the labels and pairs come from)."""
    parts = parse_template(options.template, tok, pairs, where.format(key="template"), data)
    word_ids, words = parse_verbalizer(options.verbalizer, labels, tok, where.format(key="verbalizer"), data)
    prompt = Prompt(options.template, words, tuple(labels), parts, word_ids,
                    (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id), max_seq_len,
                    float(getattr(options, "prompt_lm_weight", 0.0) or 0.0), len(tok))
    if max_seq_len - prompt.fixed < 2:
        raise PromptError(f"{where.format(key='template')} takes {prompt.fixed} tokens with [CLS], [SEP] and the "
                          f"mask; a length limit of {max_seq_len} leaves no room for the text; shorten it or "
                          f"raise data.max_seq_len")
    return prompt


def read_prompt_file(path: str | Path) -> SimpleNamespace:
    """`--prompt FILE`: a YAML (or JSON) file with `template` and `verbalizer` (top level, or in a `task` section:
    a fine-tuning config with a prompt serves too)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--prompt {path}: no such file; write a YAML file with template: and verbalizer:")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PromptError(f"--prompt {path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    raw = raw.get("task", raw) if isinstance(raw, dict) and isinstance(raw.get("task"), dict) else raw
    if not isinstance(raw, dict) or "template" not in raw or "verbalizer" not in raw:
        raise PromptError(f"--prompt {path}: needs the keys template and verbalizer (e.g. template: \"{{text}} It "
                          f"was [MASK].\" and verbalizer: {{positive: [great], negative: [terrible]}})")
    if not isinstance(raw["template"], str):
        raise PromptError(f"--prompt {path}: template must be text, e.g. \"{{text}} It was [MASK].\"; got "
                          f"{raw['template']!r}")
    verbalizer = raw["verbalizer"]
    bad = [k for k, v in verbalizer.items() if not isinstance(v, (str, list))] if isinstance(verbalizer, dict) else []
    if not isinstance(verbalizer, dict) or bad:
        raise PromptError(f"--prompt {path}: verbalizer must map each label to a word or a list of words, e.g. "
                          f"{{positive: [great], negative: [terrible]}}; got {verbalizer!r} (YAML reads yes/no/on/off "
                          f"keys as true/false: quote them)")
    return SimpleNamespace(template=raw["template"], verbalizer=verbalizer)


def _masked_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The BertForMaskedLM inside a peft wrapper (LoRA layers are in it, in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class PromptTask(Classification):
    """Classification by cloze prompt. The registry's instance has no prompt; `bind` gives a run's (a Prompt)."""

    name = "prompt"
    also_fits = ("classification", "pair")
    hf_class = "BertForMaskedLM"
    problem_type = None
    head_module = HEAD
    peft_task_type = None
    reads_windows = False
    sequence_level = False  # soft prompts (peft prompt tuning) would shift the mask position: refused
    prepares = False
    needs_settings = True  # a template and a verbalizer
    label_rows = False  # a label is its verbalizer words: no weights of its own
    batch_fields = ("mask_position",)

    def __init__(self, prompt: Prompt | None = None, lm: bool = False):
        self.prompt, self.lm = prompt, lm  # lm: this is the training side, with the auxiliary MLM loss

    def __reduce__(self) -> tuple:  # with its prompt (the collator runs in loader worker processes)
        return PromptTask, (self.prompt, self.lm)

    def for_training(self) -> PromptTask:
        return PromptTask(self.prompt, lm=True) if self.prompt is not None and self.prompt.lm_weight > 0 else self

    def trains_on(self, prepared: str) -> bool:
        return prepared in self.also_fits

    def _bound(self) -> Prompt:
        if self.prompt is None:
            raise RuntimeError("the prompt task was used without a prompt: call bind() first")  # a bug, not input
        return self.prompt

    def bind(self, options: Any, tokenizer: Any, labels: Sequence[str], pairs: bool, max_seq_len: int,
             where: str = "task.{key}", data: str = "data.train") -> PromptTask:
        return PromptTask(build_prompt(options, tokenizer, labels, pairs, max_seq_len, where, data))

    def saved_options(self, config: dict[str, Any]) -> Any:
        saved = config.get(CONFIG_KEY)
        return SimpleNamespace(**saved) if isinstance(saved, dict) else None

    def check_loaded(self, source: str, fresh: Sequence[str], preset: bool) -> None:
        if not preset and any(k.startswith(f"{HEAD}.") for k in fresh):
            raise DtrainError(f"{source} has no trained MLM head ({HEAD} is not in its weights), and a prompt task "
                              f"scores the verbalizer words with it; continue pretraining it first (python -m "
                              f"dtrain.pretrain, e.g. configs/pretrain/minilm_bbc_mlm.yaml) and use that run's "
                              f"export")

    def model_config(self, labels: Sequence[str]) -> dict[str, Any]:
        extra = super().model_config(labels)
        extra.pop("num_labels", None)  # (a BertForMaskedLM has no classifier; id2label still names the labels)
        return extra

    def saved_config(self) -> dict[str, Any]:
        return {CONFIG_KEY: self._bound().saved()}

    # -- collation --------------------------------------------------------------------------------------------------

    def inputs(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompt = self._bound()
        out = []
        for s in samples:
            ids, types = list(s["input_ids"]), list(s["token_type_ids"])
            first = sum(1 for t in types if t == 0)  # [CLS] A [SEP]
            a, b = ids[1:first - 1], ids[first:-1] if first < len(ids) else None
            if b is not None and not prompt.has_pair:
                raise ShardError("the data has text pairs, but task.template has no {text_pair}; add it, e.g. "
                                 '"{text} ? [MASK], {text_pair}"')
            new, position, text = prompt.encode_spans(a, b)
            out.append({**s, "input_ids": new, "token_type_ids": [0] * len(new), "mask_position": position,
                        "text_positions": text})
        return out

    def targets(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int, num_labels: int) -> dict:
        out = {**super().targets(samples, pad, width, num_labels),
               "mask_position": np.array([s["mask_position"] for s in samples], dtype=np.int64)}
        return {**out, **self._lm_inputs(samples, pad, width)} if self.lm else out

    def _lm_inputs(self, samples: list[dict[str, Any]], pad: np.ndarray, width: int) -> dict[str, np.ndarray]:
        """The auxiliary MLM loss's inputs: the prompted sequence with 15% of its text tokens selected (BERT's
        80% [MASK] / 10% a random token / 10% kept) and their original ids as labels. The choices hash (epoch, sample
        index, position), as pretraining's masking does: the same on any rank or worker, and on resume."""
        prompt = self._bound()
        keys = sample_keys(_LM_SEED, int(samples[0]["epoch"]), np.array([int(s["index"]) for s in samples]))
        counters = np.arange(width)
        select = uniform(keys[:, None], _LM_SELECT, counters) < _LM_PROBABILITY
        action = uniform(keys[:, None], _LM_ACTION, counters)
        replace = (uniform(keys[:, None], _LM_REPLACE, counters) * prompt.vocab_size).astype(np.int64)
        ids = np.full((len(samples), width), 0, dtype=np.int64)
        labels = np.full((len(samples), width), IGNORE, dtype=np.int64)
        for i, s in enumerate(samples):
            ids[i, :len(s["input_ids"])] = s["input_ids"]
            text = np.array(s["text_positions"], dtype=np.int64)
            chosen = text[select[i, text]] if len(text) and not pad[i] else text[:0]
            labels[i, chosen] = ids[i, chosen]
            masked, randomised = chosen[action[i, chosen] < 0.8], chosen[(action[i, chosen] >= 0.8)
                                                                          & (action[i, chosen] < 0.9)]
            ids[i, masked] = prompt.special[2]
            ids[i, randomised] = replace[i, randomised]
        return {"lm_input_ids": ids, "lm_labels": labels}

    # -- model ------------------------------------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, labels]: each label's mean log-probability of its words at the mask (the MLM head runs there only)."""
        mlm = _masked_lm(model)
        hidden = mlm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"])[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at_mask = hidden[rows, batch["mask_position"]]
        log_probs = mlm.cls.predictions(at_mask).float().log_softmax(-1)
        return torch.stack([log_probs[:, list(ids)].mean(-1) for ids in self._bound().word_ids], -1)

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        """The cloze loss, and on the training side with task.prompt_lm_weight > 0 the auxiliary MLM loss (PET): a
        second pass over the batch with some text tokens masked, the vocabulary head on those positions only, its
        summed cross-entropy times the weight (so the logged lm_loss is weighted)."""
        terms = super().losses(model, batch, head)
        if not self.lm:
            return terms
        mlm = _masked_lm(model)
        hidden = mlm.bert(input_ids=batch["lm_input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"])[0]
        chosen = batch["lm_labels"] != IGNORE
        logits = mlm.cls.predictions(hidden[chosen]).float()
        lm = F.cross_entropy(logits, batch["lm_labels"][chosen], reduction="sum")
        return {**terms, "lm": self._bound().lm_weight * lm}

    def counts(self, batch: dict[str, torch.Tensor], head: Any) -> dict[str, torch.Tensor]:
        out = super().counts(batch, head)
        return {**out, "lm": (batch["lm_labels"] != IGNORE).sum()} if self.lm else out

    # -- prediction -------------------------------------------------------------------------------------------------

    def predict_encode(self, tok: Any, rows: list[dict[str, Any]], fields: dict[str, str | None], max_seq_len: int,
                       doc_stride: int) -> dict[str, list]:
        prompt = self._bound()
        text, pair = fields["text"], fields.get("text_pair")
        a = tok([r[text] for r in rows], add_special_tokens=False)["input_ids"]
        b = tok([r[pair] for r in rows], add_special_tokens=False)["input_ids"] if pair else [None] * len(rows)
        encoded = [prompt.encode(x, y, max_seq_len) for x, y in zip(a, b, strict=True)]
        return {"input_ids": [e[0] for e in encoded], "token_type_ids": [[0] * len(e[0]) for e in encoded],
                "mask_position": [e[1] for e in encoded]}
