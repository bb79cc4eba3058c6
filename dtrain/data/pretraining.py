"""Pretraining examples built at read time: NSP sentence pairs and dynamic MLM masking.

Every random choice for a sample is a counter-based hash of (seed, epoch, sample index, position), so a sample comes
out the same whichever rank, worker or batch builds it, it changes from epoch to epoch (dynamic masking), and the
masking of a whole batch is a handful of vectorised numpy operations rather than a loop over its tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtrain.data import IGNORE
from dtrain.data.shards import ShardedDataset, ShardError

IS_NEXT, IS_RANDOM = 0, 1  # next_sentence_label, as in transformers' BertForPreTraining
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_PAIR, _STREAM_SELECT, _STREAM_ACTION, _STREAM_REPLACE = (np.uint64(k) for k in (1, 2, 3, 4))
_PAIR_DRAWS = 38  # short?, short length, cut, is-next, up to 33 tries for another document, its start


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective uint64 hash with good avalanche (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per sample from (seed, epoch, index)."""
    base = _mix(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _mix(base ^ _mix(np.asarray(indices, dtype=np.uint64) + _GOLDEN))


def uniform(keys: np.ndarray, stream: np.uint64, counters: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per (key, counter) pair (broadcast): keys [B, 1] × counters [L] → [B, L]."""
    with np.errstate(over="ignore"):
        x = _mix(_mix(keys ^ (stream * _GOLDEN)) + np.asarray(counters, dtype=np.uint64) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
        self.short_seq_prob = float(data.manifest.get("short_seq_prob", 0.1))  # `prepare --short-seq-prob`
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
        self._rest: np.ndarray | None = None  # bucket_lengths' per-sample tokens to the document's end

    # -- NSP ------------------------------------------------------------------------------------------------------

    def _following(self, index: int, doc: int, ids: np.ndarray, need: int) -> np.ndarray:
        """`ids` continued with the samples after `index` while they belong to `doc`, until `need` tokens."""
        parts, have = [ids], len(ids)
        while have < need and not self._last_of_doc(index, doc):
            index += 1
            more = np.asarray(self.data.get(index, "input_ids"), dtype=np.int64)
            parts.append(more)
            have += len(more)
        return np.concatenate(parts)[:need] if len(parts) > 1 else ids[:need]

    def _last_of_doc(self, index: int, doc: int) -> bool:
        return index + 1 >= len(self.data) or int(self.data.get(index + 1, "doc")) != doc

    def _tokens_after(self, index: int, doc: int, need: int) -> int:
        """Tokens of `doc` in the samples after `index` (counted up to `need`)."""
        have = 0
        while have < need and not self._last_of_doc(index, doc):
            index += 1
            have += int(self.data.get(index, "length"))
        return have

    def _random_segment(self, doc: int, u: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
        """`budget` tokens from a random sentence on of a random sample of another document, continued into that
        document's next samples, and that document. Only starts with the whole budget after them in their document
        count; a sample without one is passed over for the next draw, and if no draw has one, B comes from the
        start of the drawn sample with the most text after it (short only then)."""
        budget, best = max(1, budget), None
        for attempt in range(len(u) - 1):
            index = int(u[attempt] * len(self.data))
            other = self.data[index]
            if int(other["doc"]) == doc:
                continue
            ends = other["sentence_ends"]
            starts = np.array([0, *ends[:-1]], dtype=np.int64) if len(ends) else np.zeros(1, dtype=np.int64)
            text = len(other["input_ids"]) + self._tokens_after(index, int(other["doc"]), budget)
            roomy = starts[text - starts >= budget]
            if len(roomy):
                best = (index, other, roomy)
                break
            if best is None or text > best[3]:
                best = (index, other, starts[:1], text)
        if best is None:
            raise ShardError(f"{self.data.path}: NSP negatives need at least two documents; add documents or "
                             f"check --doc-split")
        index, other, starts = best[:3]
        start = int(starts[int(u[-1] * len(starts))])
        ids = np.asarray(other["input_ids"], dtype=np.int64)
        return self._following(index, int(other["doc"]), ids[start:], budget), int(other["doc"])

    def target(self, u: np.ndarray) -> int:
        """Tokens A + B aim at: the whole budget, or (short_seq_prob of the samples) a random length from 2 on, as
        BERT's create_instances_from_document; decided here, at read time, so it varies from epoch to epoch."""
        max_tokens = self.max_seq_len - 3
        return max_tokens if u[0] >= self.short_seq_prob else 2 + int(u[1] * (max_tokens - 1))

    def bucket_lengths(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """The length each sample's pair will have in `epoch` ([CLS] and two [SEP] included), for data.bucket_window,
        from the draws `pair` makes and two columns: its target, or for a true-next pair the text up to its
        document's end where that is shorter (A + B run from the sample's start on into the document)."""
        if self._rest is None:  # tokens from each sample's start to its document's end
            lengths, docs = self.data.column("length").astype(np.int64), self.data.column("doc")
            last = np.flatnonzero(np.append(docs[1:] != docs[:-1], True))  # each document's last sample
            suffix = np.append(np.cumsum(lengths[::-1])[::-1], 0)
            self._rest = suffix[:-1] - suffix[last[np.searchsorted(last, np.arange(len(docs)))] + 1]
        indices = np.asarray(indices, dtype=np.int64)
        u = uniform(sample_keys(self.seed, epoch, indices)[:, None], _STREAM_PAIR, np.arange(4))
        max_tokens = self.max_seq_len - 3
        target = np.where(u[:, 0] >= self.short_seq_prob, max_tokens,
                          2 + (u[:, 1] * (max_tokens - 1)).astype(np.int64))
        rest = self._rest[indices]
        true_next = (u[:, 3] < self.nsp_probability) & (rest > 1)  # a document's last token alone: a random B
        return np.where(true_next, np.minimum(target, rest), target) + 3

    def pair(self, sample: dict[str, Any], u: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(segment A, segment B, next_sentence_label, the document B comes from) for one sample, from its
        uniform numbers `u` (the sample's row of the _STREAM_PAIR stream).

        A + B fill the target length (BERT's original data generation): A ends at a random sentence end of the
        sample below the target; the true next B runs on into the document's next samples, a random B is taken
        from a start with enough text after it. Only a document's last words leave a true-next pair short."""
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        ends = np.asarray(sample["sentence_ends"], dtype=np.int64)
        target, doc = self.target(u), int(sample["doc"])
        inner = ends[:-1][ends[:-1] < target]  # sentence ends that leave room for B
        if len(inner):
            cut = int(inner[int(u[2] * len(inner))])
        else:  # no sentence boundary fits: cut inside the first sentence
            span = min(len(ids), target)
            cut = 1 + int(u[2] * (span - 1)) if span >= 2 else span
        a = ids[:cut]
        index = int(sample["index"])
        more = len(ids) > cut or not self._last_of_doc(index, doc)
        if more and u[3] < self.nsp_probability:
            b, label, b_doc = self._following(index, doc, ids[cut:], target - len(a)), IS_NEXT, doc
        else:
            (b, b_doc), label = self._random_segment(doc, u[4:], target - len(a)), IS_RANDOM
        a, b = truncate_pair(a, b, self.max_seq_len - 3)
        return a, b, label, b_doc

    # -- MLM ------------------------------------------------------------------------------------------------------

    def mask_batch(self, tokens: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masked tokens, positions [B, P], original ids [B, P] with IGNORE where unused) for a padded batch.

        Per row: round(p × candidates) positions (at most max_predictions_per_seq), never a special token or
        padding; 80% → [MASK], 10% → a random non-special token, 10% unchanged. With whole-word masking a word's
        pieces (a piece and its ## continuations) are chosen together or not at all."""
        rows, width = tokens.shape
        cand = ~self.special[tokens]
        wanted = np.minimum(self.max_predictions, np.maximum(1, np.rint(cand.sum(1) * self.mlm_probability)))
        wanted = np.where(cand.any(1), wanted, 0).astype(np.int64)
        score = uniform(keys[:, None], _STREAM_SELECT, np.arange(width))
        if self.whole_word:
            chosen = self._whole_words(tokens, cand, score, wanted)
        else:
            score[~cand] = 2.0  # never chosen: only the `wanted` best (lowest) scores are taken, all candidates
            k = min(self.max_predictions, width)
            best = np.argpartition(score, k - 1, axis=1)[:, :k] if k < width else np.tile(np.arange(width), (rows, 1))
            ranked = np.take_along_axis(best, np.argsort(np.take_along_axis(score, best, 1), axis=1), 1)
            chosen = np.sort(np.where(np.arange(k)[None, :] < wanted[:, None], ranked, width), axis=1)
        positions = np.zeros((rows, self.max_predictions), dtype=np.int64)
        labels = np.full((rows, self.max_predictions), IGNORE, dtype=np.int64)
        take = min(chosen.shape[1], self.max_predictions)
        valid = chosen[:, :take] < width
        positions[:, :take] = np.where(valid, chosen[:, :take], 0)
        r, c = np.nonzero(valid)
        p = positions[r, c]
        labels[r, c] = tokens[r, p]
        out = tokens.copy()
        action = uniform(keys[:, None], _STREAM_ACTION, np.arange(width))[r, p]
        swap = uniform(keys[:, None], _STREAM_REPLACE, np.arange(width))[r, p]
        out[r[action < 0.8], p[action < 0.8]] = self.mask
        rand = (action >= 0.8) & (action < 0.9)
        out[r[rand], p[rand]] = self.replacements[(swap[rand] * len(self.replacements)).astype(np.int64)]
        return out, positions, labels

    def _whole_words(self, tokens: np.ndarray, cand: np.ndarray, score: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """Per row: words (a piece + its ## continuations) in random order, taken whole while they fit."""
        width = tokens.shape[1]
        chosen = np.full((len(tokens), self.max_predictions), width, dtype=np.int64)
        for i in range(len(tokens)):
            positions = np.flatnonzero(cand[i])
            if not len(positions):
                continue
            starts = ~self.continuation[tokens[i, positions]]
            starts[0] = True
            starts[1:] |= positions[1:] != positions[:-1] + 1  # a piece right after [SEP] starts a word
            groups = np.split(positions, np.flatnonzero(starts)[1:])
            picked, total = [], 0
            for g in np.argsort(score[i, positions[starts]], kind="stable"):
                if total + len(groups[g]) <= wanted[i]:
                    picked.append(groups[g])
                    total += len(groups[g])
                if total == wanted[i]:
                    break
            if picked:
                flat = np.sort(np.concatenate(picked))
                chosen[i, :len(flat)] = flat
        return chosen

    # -- batch ----------------------------------------------------------------------------------------------------

    def build(self, samples: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], list[tuple]]:
        """The batch as numpy arrays, plus each sample's (A, B, next_sentence_label, B's document)."""
        keys = sample_keys(self.seed, int(samples[0]["epoch"]), np.array([int(s["index"]) for s in samples]))
        u = uniform(keys[:, None], _STREAM_PAIR, np.arange(_PAIR_DRAWS))
        pairs = [self.pair(s, row) for s, row in zip(samples, u, strict=True)]
        n = len(samples)
        lengths = np.array([len(a) + len(b) + 3 for a, b, _, _ in pairs])
        width = -(-int(lengths.max()) // self.multiple) * self.multiple
        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, width), dtype=np.int64)
        for i, (a, b, _, _) in enumerate(pairs):
            la, lb = len(a), len(b)
            input_ids[i, 0], input_ids[i, la + 1], input_ids[i, la + lb + 2] = self.cls, self.sep, self.sep
            input_ids[i, 1:la + 1], input_ids[i, la + 2:la + lb + 2] = a, b
            token_type_ids[i, la + 2:la + lb + 3] = 1
        masked, positions, labels = self.mask_batch(input_ids, keys)
        pad = np.array([bool(s["pad"]) for s in samples])
        labels[pad] = IGNORE
        positions[pad] = 0
        nsp = np.where(pad, IGNORE, np.array([p[2] for p in pairs]))
        batch = {"input_ids": masked, "token_type_ids": token_type_ids,
                 "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
                 "next_sentence_label": nsp, "mlm_positions": positions, "mlm_labels": labels,
                 "index": np.array([int(s["index"]) for s in samples]), "pad": pad}
        return batch, pairs

    def example(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One sample on its own (the same as inside any batch): for inspection and tests."""
        batch, [(a, b, nsp, b_doc)] = self.build([sample])
        length = int(batch["attention_mask"][0].sum())
        keep = batch["mlm_labels"][0] != IGNORE
        return {"input_ids": batch["input_ids"][0, :length], "token_type_ids": batch["token_type_ids"][0, :length],
                "positions": batch["mlm_positions"][0][keep], "originals": batch["mlm_labels"][0][keep],
                "nsp": nsp, "a": a, "b": b, "b_doc": b_doc, "index": int(sample["index"]), "pad": bool(sample["pad"])}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """The batch as numpy arrays (cheap to send from a DataLoader worker; StreamLoader makes them tensors)."""
        return self.build(samples)[0]
