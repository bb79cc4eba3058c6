"""A training set with a replayed sample of an earlier one mixed in (continual.replay_fraction).

The mix is a dataset like any other to the stream: ids [0, n) are the new set's rows, [n, n + k) the replayed rows,
presented as more "shards" of k / (new shards) rows each so that the epoch order (shard permutation, then a shuffle
within blocks) interleaves them with the new rows. The replayed rows are a fixed sample of the old set drawn from the
run's seed, so every epoch holds the same k old rows, the order stays a pure function of (seed, epoch), and resume,
exactly-once and the elastic world-size change hold as for any dataset (StreamingDataset is unchanged). Written here:
no data library mixes datasets with a resumable, world-size-free order (mosaicml/streaming's Stream proportions are
the nearest, and it is not a dependency).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtrain.data.shards import ShardedDataset


def replay_sample(old_rows: int, count: int, seed: int) -> np.ndarray:
    """`count` row ids of an old set of `old_rows`, deterministic in `seed`: without repeats while count <= old_rows,
    else every row count // old_rows times and the rest drawn."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7E9A1])
    whole, rest = divmod(count, old_rows)
    picked = np.concatenate([np.tile(np.arange(old_rows), whole), rng.permutation(old_rows)[:rest]])
    return np.sort(picked).astype(np.int64)


class MixedDataset:
    """`new` with `count` rows of the `old` sets (a seeded sample of their concatenation) appended; the
    ShardedDataset interface the stream reads."""

    def __init__(self, new: ShardedDataset, old: list[ShardedDataset], count: int, seed: int):
        if count < 1 or not old or not sum(len(d) for d in old):
            raise ValueError(f"a replay mix needs old rows and at least one replayed row, got {count}")
        self.new, self.old, self.count = new, list(old), count
        self.path, self.manifest = new.path, new.manifest
        self._old_starts = np.cumsum([0] + [len(d) for d in self.old])
        self.picked = replay_sample(int(self._old_starts[-1]), count, seed)
        pieces = max(1, min(len(new.shards), count))
        sizes = [len(part) for part in np.array_split(np.arange(count), pieces)]
        self.shards = [*new.shards, *({"file": "replay", "rows": n} for n in sizes)]

    def __len__(self) -> int:
        return len(self.new) + self.count

    @property
    def columns(self) -> list[str]:
        return self.new.columns

    def _old_row(self, i: int) -> tuple[ShardedDataset, int]:
        g = int(self.picked[i])
        k = int(np.searchsorted(self._old_starts, g, side="right")) - 1
        return self.old[k], g - int(self._old_starts[k])

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.new)
        if index < n:
            return self.new[index]
        if not 0 <= index - n < self.count:
            raise IndexError(f"row {index} out of range for {self.path} + replay ({len(self)} rows)")
        data, row = self._old_row(index - n)
        return data[row]

    def column(self, name: str) -> np.ndarray:
        old = np.concatenate([d.column(name) for d in self.old])
        return np.concatenate([self.new.column(name), old[self.picked]])

    def record(self) -> dict[str, Any]:
        """What data.json keeps: the new set, and the sets replayed (a later run replays them too)."""
        return {**self.new.record(), "replayed": [d.record() for d in self.old], "replayed_rows": self.count}

    def describe(self) -> str:
        return (f"replay: {len(self.new)} rows of {self.new.path} + {self.count} replayed rows "
                f"({len(set(self.picked.tolist()))} distinct) of {', '.join(str(d.path) for d in self.old)}")
