"""StreamingDataset: every rank and DataLoader worker gets its own slice of one global, deterministic epoch order.

The global order of an epoch is a pure function of (seed, epoch, the dataset's shard layout, the shuffle options):
shards are permuted, the resulting sequence is shuffled within blocks of `shuffle_block` samples, and it is
optionally sorted by length within windows of `bucket_window` samples (the rows' lengths, or what the collator says a
sample's length will be: pretraining's NSP pairs are built at read time, epoch by epoch). World size and worker count
never enter it. Ranks then take interleaved positions (rank r: start+r, start+r+W, ...) and each worker whole
micro-batches in turn (worker w: the rank's batches w, w+K, ...), which is exactly the order in which
`torch.utils.data.DataLoader` hands batches back, so the training loop sees the rank's slice in order.

The resume point is one number, the global position (samples of this epoch consumed by all ranks together), kept by
`StreamLoader`. Because the order does not depend on the world size, resuming at another world size or worker count
continues the same global order: nothing is lost or seen twice (the "elastic" case).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtrain.data.shards import ShardedDataset
from dtrain.errors import DtrainError

STATE_VERSION = 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class EpochOrder:
    """The global sample order of one epoch, computed block by block (memory ~ one block, not the dataset)."""

    def __init__(self, shard_rows: list[int], seed: int, epoch: int, shuffle: bool = True,
                 shuffle_block: int = 1 << 16, lengths: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
                 bucket_window: int = 0):
        rows = np.asarray(shard_rows, dtype=np.int64)
        self.n = int(rows.sum())
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
        perm = _rng(seed, epoch, 0).permutation(len(rows)) if shuffle else np.arange(len(rows))
        self._shard_starts = starts[perm]
        self._seq_starts = np.concatenate([[0], np.cumsum(rows[perm])])
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.block = max(1, int(shuffle_block))
        self.lengths, self.window = lengths, int(bucket_window)
        if self.window and lengths is None:
            raise ValueError("bucketing needs the samples' lengths")
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def _sequence(self, q0: int, q1: int) -> np.ndarray:
        """Sample ids at positions [q0, q1) of the shard-permuted (unshuffled within shards) sequence."""
        q = np.arange(q0, q1, dtype=np.int64)
        k = np.searchsorted(self._seq_starts, q, side="right") - 1
        return self._shard_starts[k] + (q - self._seq_starts[k])

    def _cached(self, kind: str, index: int, make: Callable[[], np.ndarray]) -> np.ndarray:
        key = (kind, index)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def _block(self, b: int) -> np.ndarray:
        def make() -> np.ndarray:
            q0, q1 = b * self.block, min((b + 1) * self.block, self.n)
            ids = self._sequence(q0, q1)
            return ids[_rng(self.seed, self.epoch, 1, b).permutation(len(ids))] if self.shuffle else ids
        return self._cached("block", b, make)

    def _shuffled(self, p0: int, p1: int) -> np.ndarray:
        out = []
        for b in range(p0 // self.block, (p1 - 1) // self.block + 1):
            ids = self._block(b)
            lo, hi = max(p0 - b * self.block, 0), min(p1 - b * self.block, len(ids))
            out.append(ids[lo:hi])
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _bucketed_window(self, w: int) -> np.ndarray:
        """Window w sorted by length, then cut into runs of similar length whose order is shuffled."""
        def make() -> np.ndarray:
            ids = self._shuffled(w * self.window, min((w + 1) * self.window, self.n))
            lengths = self.lengths(ids) if callable(self.lengths) else self.lengths[ids]
            ids = ids[np.argsort(lengths, kind="stable")]
            run = 64
            runs = [ids[i:i + run] for i in range(0, len(ids), run)]
            order = _rng(self.seed, self.epoch, 2, w).permutation(len(runs)) if self.shuffle else range(len(runs))
            return np.concatenate([runs[i] for i in order])
        return self._cached("window", w, make)

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at the given global positions (0 <= position < n)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return positions
        span = self.window or self.block
        out = np.empty_like(positions)
        for g in np.unique(positions // span):
            sel = positions // span == g
            if self.window:
                out[sel] = self._bucketed_window(int(g))[positions[sel] - g * span]
            else:
                out[sel] = self._shuffled(int(g) * span, min((int(g) + 1) * span, self.n))[positions[sel] - g * span]
        return out


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingDataset(IterableDataset):
    """One rank's samples of one epoch, from a global position on. Use through `StreamLoader`.

    Each sample is the dataset row (numpy arrays/scalars) plus `index` (its global id), `epoch` and `pad` (True for
    the repeats that fill the last global batch when drop_last is False; the collators give them no loss).
    """

    def __init__(self, path_or_data: str | os.PathLike | ShardedDataset, batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, shuffle_block: int = 1 << 16,
                 bucket_window: int = 0, rank: int | None = None, world_size: int | None = None,
                 verify: str = "size", expect_fingerprint: str | None = None,
                 lengths: Callable[[np.ndarray, int], np.ndarray] | None = None):
        self.data = (ShardedDataset(path_or_data, verify=verify, expect_fingerprint=expect_fingerprint)
                     if isinstance(path_or_data, (str, os.PathLike)) else path_or_data)  # or a mix (data/mix.py)
        if batch_size < 1:
            raise DtrainError(f"batch_size must be >= 1, got {batch_size}")
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise DtrainError(f"rank {self.rank} is not in a world of size {self.world_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.shuffle_block, self.bucket_window = shuffle_block, bucket_window
        # What bucketing sorts by: the length each sample will have in its batch, from (sample ids, epoch); by
        # default the rows' `length` column.
        self._length_of = lengths
        self._lengths = self.data.column("length") if bucket_window and lengths is None else None
        if bucket_window and lengths is not None:
            lengths(np.zeros(1, dtype=np.int64), 0)  # the collator's tables built once, before DataLoader workers fork
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.local_samples(0)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= len(self.data):
            raise DtrainError(f"stream position {start} is outside the dataset ({len(self.data)} samples)")
        self.epoch, self.start = epoch, start

    def local_samples(self, start: int | None = None) -> int:
        """How many samples this rank yields from global position `start` to the end of the epoch."""
        remaining = len(self.data) - (self.start if start is None else start)
        steps = remaining // self.global_batch if self.drop_last else math.ceil(remaining / self.global_batch)
        return steps * self.batch_size

    def order(self, epoch: int) -> EpochOrder:
        length_of = self._length_of
        lengths = self._lengths if length_of is None else (lambda ids: length_of(ids, epoch))
        return EpochOrder([s["rows"] for s in self.data.shards], self.seed, epoch, self.shuffle, self.shuffle_block,
                          lengths, self.bucket_window)

    def positions(self, batch: int) -> np.ndarray:
        """Global positions of this rank's `batch`-th micro-batch from the resume point (>= n: a padding repeat)."""
        k = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size, dtype=np.int64)
        return self.start + k * self.world_size + self.rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.order(self.epoch)
        n = len(self.data)
        for j in range(worker, self.local_samples() // self.batch_size, workers):
            pos = self.positions(j)
            pad = pos >= n
            ids = order.ids(np.where(pad, (pos - n) % max(n, 1), pos))
            for index, is_pad in zip(ids.tolist(), pad.tolist(), strict=True):
                yield {**self.data[index], "index": index, "epoch": self.epoch, "pad": is_pad}


def as_tensors(batch: Any) -> Any:
    """numpy arrays in a batch dict → torch tensors (zero-copy). Collators return numpy because numpy arrays
    travel from DataLoader workers several times faster than tensors, which each need a shared-memory file."""
    if isinstance(batch, dict):
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    return batch


class StreamLoader:
    """Batches of a StreamingDataset through a DataLoader, epoch after epoch, with an exact resume point.

    `state_dict()` is the global position after the batches handed out so far (all ranks advance together, one
    micro-batch each per step); `load_state_dict()` continues from there, at any world size or worker count.
    """

    def __init__(self, dataset: StreamingDataset, collate_fn: Callable[[list[dict]], Any],
                 num_workers: int = 0, prefetch_factor: int | None = None, pin_memory: bool = False):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank."""
        return self.dataset.local_samples(self.position) // self.dataset.batch_size

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; afterwards the loader stands at the start of the next one."""
        if self.position > 0 and len(self) == 0:  # the last batch of the epoch was handed out: start the next one
            self.epoch, self.position = self.epoch + 1, 0
        self.dataset.set_position(self.epoch, self.position)
        kwargs: dict[str, Any] = {}
        if self.num_workers and self.prefetch_factor:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # The DataLoader gets its own generator. Without one, every new iterator draws its workers' base seed from
        # the GLOBAL torch RNG (with num_workers=0 too), i.e. from the stream dropout uses; a resumed run creates
        # one iterator more after Checkpointer.load restored that RNG than the straight run did, which shifted
        # dropout and made resume inexact (issue 15). Seeded from where the stream stands, so the workers' seeds
        # are deterministic too (nothing in them draws from those: the collators hash (seed, epoch, index)).
        generator = torch.Generator()
        generator.manual_seed(int(_rng(self.dataset.seed, self.epoch, 3, self.position, self.dataset.rank)
                                  .integers(1 << 62)))
        loader = DataLoader(self.dataset, batch_size=self.dataset.batch_size, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator, **kwargs)
        for batch in loader:
            self.position = min(self.position + self.dataset.global_batch, len(self.dataset.data))
            yield as_tensors(batch)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "num_samples": len(self.dataset.data), "seed": self.dataset.seed, "world_size":
                self.dataset.world_size, "batch_size": self.dataset.batch_size,
                "bucket_window": self.dataset.bucket_window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DtrainError(f"data stream state has version {state.get('version')}, expected {STATE_VERSION}")
        n = len(self.dataset.data)
        if state["num_samples"] != n:
            raise DtrainError(f"the checkpoint's data stream covered {state['num_samples']} samples but "
                              f"{self.dataset.data.path} has {n}; resume with the dataset the run started with")
        if state["seed"] != self.dataset.seed:
            raise DtrainError(f"the checkpoint's data order used seed {state['seed']}, this run uses "
                              f"{self.dataset.seed}; resume with the same seed")
        window = state.get("bucket_window", self.dataset.bucket_window)  # (not recorded before)
        if int(state["position"]) > 0 and window != self.dataset.bucket_window:
            raise DtrainError(f"the checkpoint stopped inside an epoch ordered with data.bucket_window={window}, "
                              f"this run sets {self.dataset.bucket_window}: the rest of the epoch would repeat and "
                              f"skip samples; resume with data.bucket_window={window}")
        self.epoch, self.position = int(state["epoch"]), min(int(state["position"]), n)
