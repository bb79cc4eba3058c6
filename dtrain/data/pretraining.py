"""Pretraining examples built at read time: NSP sentence pairs and dynamic MLM masking.

Every random choice for a sample comes from a generator keyed by (seed, epoch, sample index), so a batch is the
same whichever rank or DataLoader worker builds it, and it changes from epoch to epoch (dynamic masking).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dtrain.data.shards import ShardedDataset, ShardError

IGNORE = -100
IS_NEXT, IS_RANDOM = 0, 1  # next_sentence_label, as in transformers' BertForPreTraining


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest first: drop tokens from the end of the longer segment until both fit."""
    over = len(a) + len(b) - max_tokens
    if over <= 0:
        return a, b
    la, lb = len(a), len(b)
    # Remove from the longer one until equal, then alternate (a first), as tokenizers' longest_first does.
    cut_a = min(over, max(0, la - lb))
    cut_b = min(over - cut_a, max(0, lb - la))
    rest = over - cut_a - cut_b
    cut_a += (rest + 1) // 2
    cut_b += rest // 2
    return a[:la - cut_a], b[:lb - cut_b]


class PretrainingCollator:
    """Samples of a pretraining dataset (chunks of consecutive sentences) → an MLM+NSP batch.

    Batch: input_ids, token_type_ids, attention_mask [B, L] with L the longest sequence rounded up to a multiple of 8;
    next_sentence_label [B]; mlm_positions, mlm_labels [B, max_predictions_per_seq] (the masked positions and their
    original ids, padded with position 0 / label -100) so the model can run its vocabulary head on those positions
    only; index [B] (sample ids) and pad [B] (padding repeats; their labels are all -100).
    """

    def __init__(self, data: ShardedDataset, tokenizer: Any, max_seq_len: int, seed: int = 0,
                 mlm_probability: float = 0.15, max_predictions_per_seq: int = 20, whole_word_masking: bool = False,
                 nsp_probability: float = 0.5, pad_to_multiple_of: int = 8):
        if data.manifest.get("kind") != "pretrain":
            raise ShardError(f"{data.path}: prepared for {data.manifest.get('kind')!r}, not pretraining; run "
                             f"`dtrain prepare pretrain`")
        if not 0 < mlm_probability < 1 or not 0 <= nsp_probability <= 1 or max_predictions_per_seq < 1:
            raise ShardError("mlm_probability must be in (0, 1), nsp_probability in [0, 1], "
                             "max_predictions_per_seq >= 1")
        self.data, self.max_seq_len, self.seed = data, max_seq_len, seed
        self.mlm_probability, self.max_predictions = mlm_probability, max_predictions_per_seq
        self.whole_word, self.nsp_probability, self.multiple = whole_word_masking, nsp_probability, pad_to_multiple_of
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask, self.pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
        vocab = len(tokenizer)
        special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.special = np.zeros(vocab, dtype=bool)
        self.special[special] = True
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
        placeholder = np.array([p.startswith("[") and p.endswith("]") for p in pieces], dtype=bool)  # [unused12]
        self.replacements = np.flatnonzero(~self.special & ~placeholder)
        self.continuation = np.array([p.startswith("##") for p in pieces], dtype=bool)
        self._docs: np.ndarray | None = None

    # -- NSP ------------------------------------------------------------------------------------------------------

    def _doc(self, index: int) -> int:
        if self._docs is None:
            self._docs = self.data.column("doc")
        return int(self._docs[index])

    def _random_segment(self, doc: int, rng: np.random.Generator, budget: int) -> tuple[np.ndarray, int]:
        """Up to `budget` tokens from a random sentence on of a sample of another document, and that document."""
        for _ in range(32):
            j = int(rng.integers(len(self.data)))
            if self._doc(j) != doc:
                break
        else:
            raise ShardError(f"{self.data.path}: NSP negatives need at least two documents; add documents or "
                             f"check --doc-split")
        other = self.data[j]
        ends = other["sentence_ends"]
        start = 0 if len(ends) < 2 else int(([0, *ends[:-1]])[rng.integers(len(ends))])
        return np.asarray(other["input_ids"][start:start + max(1, budget)], dtype=np.int64), self._doc(j)

    def pair(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(segment A, segment B, next_sentence_label, the document B comes from) for one sample."""
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        ends = np.asarray(sample["sentence_ends"], dtype=np.int64)
        max_tokens = self.max_seq_len - 3
        if len(ends) >= 2:
            cut = int(ends[rng.integers(1, len(ends)) - 1])
        else:  # one sentence: the continuation is the rest of it
            cut = int(rng.integers(1, len(ids))) if len(ids) >= 2 else len(ids)
        a, rest = ids[:cut], ids[cut:]
        if len(rest) and rng.random() < self.nsp_probability:
            b, label, b_doc = rest, IS_NEXT, int(sample["doc"])
        else:
            (b, b_doc), label = self._random_segment(int(sample["doc"]), rng, max_tokens - len(a)), IS_RANDOM
        a, b = truncate_pair(a, b, max_tokens)
        return a, b, label, b_doc

    # -- MLM ------------------------------------------------------------------------------------------------------

    def mask_tokens(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masked tokens, positions, original ids): round(p × candidates) positions (capped), never a special
        token; 80% → [MASK], 10% → a random non-special token, 10% unchanged. With whole-word masking a word's
        pieces (a piece plus its ## continuations) are chosen together or not at all."""
        candidates = np.flatnonzero(~self.special[tokens])
        if len(candidates) == 0:
            return tokens, candidates, candidates
        n = min(self.max_predictions, max(1, int(round(len(candidates) * self.mlm_probability))))
        if self.whole_word:
            starts = ~self.continuation[tokens[candidates]]
            starts[0] = True
            starts[1:] |= candidates[1:] != candidates[:-1] + 1  # a piece right after [SEP] starts a word
            groups = np.split(candidates, np.flatnonzero(starts)[1:])
            chosen_groups, total = [], 0
            for g in rng.permutation(len(groups)):
                if total + len(groups[g]) <= n:
                    chosen_groups.append(groups[g])
                    total += len(groups[g])
                if total == n:
                    break
            positions = np.sort(np.concatenate(chosen_groups)) if chosen_groups else candidates[:0]
        else:
            positions = np.sort(rng.choice(candidates, size=n, replace=False))
        originals = tokens[positions].copy()
        action = rng.random(len(positions))
        out = tokens.copy()
        out[positions[action < 0.8]] = self.mask
        swap = positions[(action >= 0.8) & (action < 0.9)]
        out[swap] = self.replacements[rng.integers(len(self.replacements), size=len(swap))]
        return out, positions, originals

    # -- batch ----------------------------------------------------------------------------------------------------

    def example(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(sample["epoch"]), int(sample["index"]), 0x5EED])
        a, b, nsp, b_doc = self.pair(sample, rng)
        tokens = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int64)
        types = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        masked, positions, originals = self.mask_tokens(tokens, rng)
        return {"input_ids": masked, "token_type_ids": types, "nsp": nsp, "positions": positions,
                "originals": originals, "index": int(sample["index"]), "pad": bool(sample["pad"]),
                "a": a, "b": b, "b_doc": b_doc}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [self.example(s) for s in samples]
        n, width = len(examples), -(-max(len(e["input_ids"]) for e in examples) // self.multiple) * self.multiple
        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, width), dtype=np.int64)
        attention_mask = np.zeros((n, width), dtype=np.int64)
        mlm_positions = np.zeros((n, self.max_predictions), dtype=np.int64)
        mlm_labels = np.full((n, self.max_predictions), IGNORE, dtype=np.int64)
        nsp = np.empty(n, dtype=np.int64)
        for i, e in enumerate(examples):
            length, k = len(e["input_ids"]), len(e["positions"])
            input_ids[i, :length] = e["input_ids"]
            token_type_ids[i, :length] = e["token_type_ids"]
            attention_mask[i, :length] = 1
            nsp[i] = IGNORE if e["pad"] else e["nsp"]
            if not e["pad"]:
                mlm_positions[i, :k] = e["positions"]
                mlm_labels[i, :k] = e["originals"]
        return {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_type_ids),
                "attention_mask": torch.from_numpy(attention_mask), "next_sentence_label": torch.from_numpy(nsp),
                "mlm_positions": torch.from_numpy(mlm_positions), "mlm_labels": torch.from_numpy(mlm_labels),
                "index": torch.tensor([e["index"] for e in examples]),
                "pad": torch.tensor([e["pad"] for e in examples])}
