"""Long documents: how a text longer than the model's window becomes model inputs (`Cut`), the same at prepare and
at `dtrain predict`.

- truncation `head` (the default: the first tokens, as every trainer does), `tail` (the last ones) or `head_tail`
  (a share of the kept tokens from the start, the rest from the end: Sun et al. 2019, "How to Fine-Tune BERT for Text
  Classification?", found head 128 + tail 382 best on IMDb at 512 → `head_share` 0.25 by default);
- `windows`: overlapping windows of the whole text (consecutive windows share `stride` tokens, as QA's doc stride),
  each a sample that carries its document's number (`doc`) and its document's window count (`windows`), at most
  `max_windows` per document (the first ones). With a text pair, the pair (cut to half the window at most) is
  repeated in every window and the first text is windowed. Training weighs each window 1/windows (every document
  counts once, as a long one would otherwise dominate the loss); evaluation and prediction pool the windows of a
  document into one output (Task.pool_windows, task.window_pooling).

Written here because the tokenizers' own overflow (`return_overflowing_tokens`) neither truncates at the tail nor
keeps head and tail, and predict must cut a text exactly as prepare did: one function does both. (No pyarrow or
torch import at the top: the CLI's choices come from this module.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dtrain.config import POOLINGS

TRUNCATIONS = ("head", "tail", "head_tail")
__all__ = ["PLAIN", "POOLINGS", "TRUNCATIONS", "Cut"]
CONFIG_KEY = "dtrain_text"  # the model's config.json entry that keeps a non-default Cut (and the pooling)
QA_STRIDE = 128  # qa's default overlap of consecutive windows (the HF/SQuAD examples' doc stride)


@dataclass(frozen=True)
class Cut:
    truncation: str = "head"
    head_share: float = 0.25
    windows: bool = False
    stride: int | None = None  # tokens shared by consecutive windows (None: a quarter of the window; qa: 128)
    max_windows: int | None = None
    max_seq_len: int | None = None  # the window the model was trained on (predict cuts at it)

    @property
    def plain(self) -> bool:
        """Head truncation and no windows: what the tokenizer's own truncation does."""
        return self.truncation == "head" and not self.windows

    def overlap(self, max_seq_len: int) -> int:
        return self.stride if self.stride is not None else max(max_seq_len // 4, 0)

    def check(self, max_seq_len: int, pairs: bool) -> None:
        """Bad settings, one line each (before any work)."""
        from dtrain.data.shards import ShardError  # (pyarrow: not at import, the CLI reads the choices above)

        if self.truncation not in TRUNCATIONS:
            raise ShardError(f"--truncation {self.truncation}: choose from {', '.join(TRUNCATIONS)}")
        if not 0 < self.head_share < 1:
            raise ShardError(f"--head-share {self.head_share:g}: the share of kept tokens taken from the start, "
                             f"between 0 and 1 (exclusive), e.g. 0.25")
        if self.max_windows is not None and self.max_windows < 1:
            raise ShardError(f"--max-windows {self.max_windows}: a document keeps at least 1 window; pass 1 or more "
                             f"(or leave it out: every window)")
        if self.max_windows is not None and not self.windows:
            raise ShardError("--max-windows caps the windows of --windows; add --windows or remove --max-windows")
        if not self.windows:
            return
        if self.truncation != "head":
            raise ShardError(f"--truncation {self.truncation} with --windows: windows keep the whole text (at most "
                             f"--max-windows from the start); drop one of the two")
        room = text_room(max_seq_len, pairs)
        if self.overlap(max_seq_len) >= room or self.overlap(max_seq_len) < 0:
            raise ShardError(f"--doc-stride {self.overlap(max_seq_len)}: consecutive windows share that many tokens, "
                             f"but a window holds {room} tokens of text at --max-seq-len {max_seq_len}"
                             f"{' (half is kept for the text pair)' if pairs else ''}; pass --doc-stride from 0 to "
                             f"{room - 1} (e.g. {room // 4})")

    def describe(self) -> str:
        """The prepare options that made this cut."""
        if self.windows:
            return f"--windows --doc-stride {self.stride}" + (f" --max-windows {self.max_windows}"
                                                              if self.max_windows else "")
        return f"--truncation {self.truncation}" + (f" --head-share {self.head_share:g}"
                                                    if self.truncation == "head_tail" else "")

    def saved(self, pooling: str | None) -> dict[str, Any]:
        """What a model's config.json keeps (CONFIG_KEY): the cut, its window length and the pooling."""
        return {**asdict(self), "pooling": pooling}

    def record(self) -> dict[str, Any]:
        """What a dataset's manifest keeps ("cut"; its max_seq_len is the manifest's own)."""
        return {k: v for k, v in asdict(self).items() if k != "max_seq_len"}

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Cut:
        """The Cut a prepared dataset was made with (an older dataset: plain head truncation)."""
        saved = manifest.get("cut") or {}
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__},
                   max_seq_len=manifest.get("max_seq_len"))

    @classmethod
    def recall(cls, config: dict[str, Any]) -> tuple[Cut, str | None]:
        """(Cut, pooling) an exported model keeps in its config.json (none: plain, no pooling)."""
        saved = dict(config.get(CONFIG_KEY) or {})
        pooling = saved.pop("pooling", None)
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__}), pooling

    # -- encoding ---------------------------------------------------------------------------------------------------

    def encode(self, tok: Any, texts: list[str], pairs: list[str] | None, max_seq_len: int,
               first: int = 0) -> dict[str, list]:
        """Texts (and pairs) → input_ids, token_type_ids, length per sample; with windows also doc (first + the
        row's number) and windows (its document's count) per window, and `truncated_documents` (a one-element list:
        documents with more windows than max_windows)."""
        a_ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]  # (whole: no length warning)
        b_ids = tok(pairs, add_special_tokens=False, verbose=False)["input_ids"] if pairs is not None else \
            [None] * len(texts)
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        cols: dict[str, list] = {"input_ids": [], "token_type_ids": [], "length": []}
        if self.windows:
            self.check(max_seq_len, pairs is not None)  # (windows that advance: callers name the option first)
            cols.update(doc=[], windows=[], truncated_documents=[0])

        def add(a: list[int], b: list[int] | None) -> None:
            ids = [cls_id, *a, sep_id] + ([*b, sep_id] if b is not None else [])
            cols["input_ids"].append(ids)
            cols["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1 if b is not None else 0))
            cols["length"].append(len(ids))

        room = max_seq_len - (3 if pairs is not None else 2)
        for row, (a, b) in enumerate(zip(a_ids, b_ids, strict=True)):
            if not self.windows:
                keep_a, keep_b = allot(len(a), len(b) if b is not None else 0, room)
                add(self.keep(a, keep_a), self.keep(b, keep_b) if b is not None else None)
                continue
            if b is not None:
                b = b[:min(len(b), room // 2)]
            parts = spans(len(a), room - (len(b) if b is not None else 0), self.overlap(max_seq_len))
            if self.max_windows is not None and len(parts) > self.max_windows:
                parts = parts[:self.max_windows]
                cols["truncated_documents"][0] += 1
            for lo, hi in parts:
                add(a[lo:hi], b)
                cols["doc"].append(first + row)
                cols["windows"].append(len(parts))
        return cols

    def keep(self, ids: list[int], n: int) -> list[int]:
        """n of a segment's tokens by the truncation: the first, the last, or head_share of them first + the rest
        last."""
        if n >= len(ids):
            return list(ids)
        if self.truncation == "head":
            return ids[:n]
        if self.truncation == "tail":
            return ids[len(ids) - n:] if n else []
        head = round(n * self.head_share)
        return ids[:head] + ids[len(ids) - (n - head):]


PLAIN = Cut()  # head truncation by the tokenizer, no windows: every dataset prepared before this module


def text_room(max_seq_len: int, pairs: bool) -> int:
    """Tokens of the (first) text in one window: the sequence less [CLS] and [SEP]s, less the pair's half."""
    room = max_seq_len - (3 if pairs else 2)
    return room - room // 2 if pairs else room


def allot(la: int, lb: int, room: int) -> tuple[int, int]:
    """Tokens kept of a text and its pair within `room`, longest first (as the tokenizers' longest_first)."""
    if la + lb <= room:
        return la, lb
    if min(la, lb) <= room // 2:
        return (la, room - la) if la <= lb else (room - lb, lb)
    return room - room // 2, room // 2


def spans(n: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """[lo, hi) token ranges of the windows over n tokens: `room` long, consecutive ones sharing `overlap`; the last
    ends at n (an empty text: one empty window)."""
    room = max(room, 1)
    step = max(room - overlap, 1)
    out = [(0, min(room, n))]
    while out[-1][1] < n:
        lo = out[-1][0] + step
        out.append((lo, min(lo + room, n)))
    return out
