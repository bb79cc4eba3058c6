"""The on-disk dataset format: Arrow IPC (Feather v2) shard files plus `manifest.json`.

A dataset directory holds `shard-00000.arrow`, `shard-00001.arrow`, ... (each one uncompressed record batch, so a
reader memory-maps it and reads columns without copying) and a manifest that records the format version, the
schema, every shard's rows/bytes/sha256, the tokenizer (name and a fingerprint of its vocabulary), max_seq_len and
the command that prepared it. Every problem a reader can find is a `ShardError` that names the file and the fix.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dtrain import files
from dtrain.errors import DtrainError

FORMAT = "dtrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ShardError(DtrainError):
    """A dataset directory that cannot be read as it is."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary (token → id) and the special tokens: equal iff ids mean the same tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    lower = bool(getattr(tokenizer, "do_lower_case", False))
    blob = json.dumps({"vocab": vocab, "special": special, "lower": lower}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]




# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------




class ShardWriter:
    """Buffers record batches and writes a shard each time the buffer reaches `target_bytes`."""

    def __init__(self, out_dir: Path, schema: pa.Schema, target_bytes: int = 64 << 20):
        if target_bytes <= 0:
            raise ShardError(f"shard size must be positive, got {target_bytes}")
        self.out_dir, self.schema, self.target_bytes = Path(out_dir), schema, target_bytes
        self.shards: list[dict[str, Any]] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self.rows = 0

    def write(self, columns: Mapping[str, Any] | pa.RecordBatch) -> None:
        batch = columns if isinstance(columns, pa.RecordBatch) else pa.RecordBatch.from_pydict(dict(columns),
                                                                                                 schema=self.schema)
        if batch.num_rows == 0:
            return
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        if self._pending_bytes >= self.target_bytes:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        """Write the buffered rows as shards of about target_bytes; keep a remainder unless `final`."""
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema).combine_chunks()
        while table.num_rows and (final or table.nbytes >= self.target_bytes):
            rows = max(1, min(table.num_rows, int(self.target_bytes * table.num_rows / max(table.nbytes, 1))))
            self._write_shard(table.slice(0, rows).combine_chunks().to_batches()[0])
            table = table.slice(rows)
        self._pending = table.combine_chunks().to_batches() if table.num_rows else []
        self._pending_bytes = table.nbytes if table.num_rows else 0

    def _write_shard(self, batch: pa.RecordBatch) -> None:
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(batch)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        self.shards.append({"file": path.name, "rows": batch.num_rows, "bytes": path.stat().st_size,
                            "sha256": files.sha256_file(path)})
        self.rows += batch.num_rows

    def close(self, **meta: Any) -> dict[str, Any]:
        """Flush, then write manifest.json with the shard table and `meta` (tokenizer, max_seq_len, command...)."""
        self.flush()
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "rows": self.rows,
                    "schema": {f.name: str(f.type) for f in self.schema}, **meta, "shards": self.shards}
        path = self.out_dir / MANIFEST
        path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class _Column:
    """One column of one shard as numpy views into the memory map (lists: offsets + flat values)."""

    def __init__(self, array: pa.Array):
        if pa.types.is_list(array.type):
            self.offsets = array.offsets.to_numpy()
            self.values = array.values.to_numpy(zero_copy_only=False)
            self.scalars = None
        else:
            self.offsets = self.values = None
            self.scalars = array.to_numpy(zero_copy_only=False)

    def get(self, row: int) -> Any:
        if self.scalars is not None:
            return self.scalars[row]
        return self.values[self.offsets[row]:self.offsets[row + 1]]


class ShardedDataset:
    """Random access to the rows of a prepared dataset, shard files memory-mapped on first use.

    verify: "size" (default) checks every shard exists with the recorded size; "full" also checks its sha256.
    expect_fingerprint: the fingerprint of the tokenizer the caller will use; a different one is refused.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "size", expect_fingerprint: str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if expect_fingerprint is not None:
            have = self.manifest.get("tokenizer", {}).get("fingerprint")
            if have != expect_fingerprint:
                name = self.manifest.get("tokenizer", {}).get("name", "?")
                raise ShardError(f"{self.path / MANIFEST}: prepared with tokenizer {name} (fingerprint {have}), but "
                                 f"the model's tokenizer has fingerprint {expect_fingerprint}; re-run `dtrain prepare` "
                                 f"with the model's tokenizer")
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            self._check_shard(shard, full=(verify == "full"))
        rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        self._starts = self.starts.tolist()  # bisect on a list: far cheaper than np.searchsorted for one index
        self._open: dict[int, dict[str, _Column]] = {}

    def _check_shard(self, shard: dict, full: bool) -> None:
        f = self.path / shard["file"]
        if not f.is_file():
            raise ShardError(f"shard {f} is missing; re-run `dtrain prepare` for {self.path} (or restore the file)")
        size = f.stat().st_size
        if size != shard["bytes"]:
            raise ShardError(f"shard {f} is truncated or changed ({size} bytes, manifest says {shard['bytes']}); "
                             f"re-run `dtrain prepare` for {self.path}")
        if full and files.sha256_file(f) != shard["sha256"]:
            raise ShardError(f"shard {f} fails its checksum (sha256 differs from {MANIFEST}); the file is corrupted: "
                             f"re-run `dtrain prepare` for {self.path}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memory maps themselves
        return {**self.__dict__, "_open": {}}

    @property
    def columns(self) -> list[str]:
        return list(self.manifest["schema"])

    def _shard(self, i: int) -> dict[str, _Column]:
        if i not in self._open:
            f = self.path / self.shards[i]["file"]
            try:
                table = pa.ipc.open_file(pa.memory_map(str(f), "r")).read_all()
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"shard {f} is not a readable Arrow file ({e}); re-run `dtrain prepare`") from None
            if table.num_rows != self.shards[i]["rows"]:
                raise ShardError(f"shard {f} has {table.num_rows} rows, {MANIFEST} says {self.shards[i]['rows']}; "
                                 f"re-run `dtrain prepare`")
            self._open[i] = {name: _Column(table.column(name).combine_chunks()) for name in table.column_names}
        return self._open[i]

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {self.path} ({len(self)} rows)")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def get(self, index: int, column: str) -> Any:
        shard, row = self.locate(index)
        return self._shard(shard)[column].get(row)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self.locate(index)
        return {name: col.get(row) for name, col in self._shard(shard).items()}

    def record(self) -> dict[str, Any]:
        """What identifies this data later (a run's data.json): its absolute path, rows, manifest's sha256."""
        digest = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        return {"path": str(self.path.resolve()), "rows": len(self), "manifest_sha256": digest}

    def column(self, name: str) -> np.ndarray:
        """A scalar column over all shards (e.g. lengths, for bucketing)."""
        return np.concatenate([self._shard(i)[name].scalars for i in range(len(self.shards))])


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    f = path / MANIFEST
    if path.is_file():
        raise ShardError(f"{path} is a file, not a dataset dir; point at the folder that holds manifest.json"
                         f"{f' ({path.parent})' if (path.parent / MANIFEST).is_file() else ''}")
    if not path.is_dir():
        raise ShardError(f"dataset dir {path} does not exist; run `dtrain prepare` to create it")
    if not f.is_file():
        raise ShardError(f"{path} has no {MANIFEST}: not a prepared dataset (or preparation did not finish); "
                         f"run `dtrain prepare`")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{f} is not valid JSON ({e}); re-run `dtrain prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{f} is not a dtrain dataset manifest; run `dtrain prepare` to create one")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(f"{f} has format version {manifest.get('version')}, this dtrain reads version "
                         f"{FORMAT_VERSION}; re-run `dtrain prepare` with this version")
    if not manifest.get("shards"):
        raise ShardError(f"{f} lists no shards; re-run `dtrain prepare`")
    return manifest
