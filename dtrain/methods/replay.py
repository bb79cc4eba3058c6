"""Replay when re-fine-tuning (`continual.replay_fraction`): a fixed, seeded sample of the data the earlier model
learnt from is mixed into every epoch of the new training set (dtrain.data.mix.MixedDataset), so the model keeps
seeing the old distribution while it learns the new one.

Which data: `continual.replay_data` when set, else what the model.init_from run recorded in its data.json (the
training set it streamed, by absolute path and manifest sha256, and the sets that run itself replayed: a chain
movies → amazon → nyt replays movies and amazon at the third stage). A recorded set that is gone, or whose
manifest is no longer the one trained on (re-prepared), is refused with the fix, never silently replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtrain.data.mix import MixedDataset
from dtrain.data.shards import MANIFEST, ShardedDataset
from dtrain.errors import DtrainError
from dtrain.model.heads import export_dir_of
from dtrain.tasks import LabelMap

KEY = "continual.replay_fraction"


def run_dir_of(path: str) -> Path | None:
    """The run dir of model.init_from (a run dir, or the export inside one); None for a bare export."""
    source = export_dir_of(path)
    for candidate in (Path(path), source.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def recorded_sources(init_from: str) -> list[dict[str, Any]]:
    """The sets the model.init_from run trained on: its data.json's train set and the sets it replayed."""
    run = run_dir_of(init_from)
    record = run / "data.json" if run is not None else None
    if record is None or not record.is_file():
        raise DtrainError(f"{KEY}: model.init_from={init_from} has no data.json (a run of an earlier dtrain, or a "
                          f"bare export), so what it trained on is unknown; set continual.replay_data to that set")
    try:
        train = json.loads(record.read_text(encoding="utf-8"))["train"]
    except (ValueError, KeyError, TypeError):
        raise DtrainError(f"{KEY}: {record} is not a dtrain data record; set continual.replay_data to the set "
                          f"model.init_from trained on") from None
    sources = [{k: v for k, v in train.items() if k not in ("replayed", "replayed_rows")}, *train.get("replayed", [])]
    return list({(s.get("path"), s.get("manifest_sha256")): s for s in sources}.values())  # each set once


def open_recorded(source: dict[str, Any], init_from: str, open_data: Callable[[str, str], ShardedDataset]) \
        -> ShardedDataset:
    path = Path(source["path"])
    if not (path / MANIFEST).is_file():
        raise DtrainError(f"{KEY}: {path}, which model.init_from={init_from} trained on, no longer exists (or has "
                          f"no {MANIFEST}); restore it, or set continual.replay_data to a copy")
    data = open_data(str(path), KEY)
    if data.record()["manifest_sha256"] != source.get("manifest_sha256"):
        raise DtrainError(f"{KEY}: {path} no longer matches the manifest model.init_from={init_from} trained on "
                          f"(re-prepared since: its {MANIFEST} changed); restore that data, or set "
                          f"continual.replay_data to replay the set as it is now")
    return data


def keyed(mixed: MixedDataset | None) -> dict[str, ShardedDataset]:
    """The replayed sets by what names them (for checks that name the set): {} without replay."""
    return {f"{KEY} ({d.path})": d for d in mixed.old} if mixed is not None else {}


def pinned_sources(cfg: Any) -> list[dict[str, Any]] | None:
    """The sets this run itself replayed when it started (its own data.json), for a resume: the model.init_from
    run's record may have changed since (re-run, re-exported); None for a first start."""
    own = Path(cfg.run_dir) / "data.json"
    if cfg.checkpoint.resume == "none" or not own.is_file():
        return None
    try:
        return json.loads(own.read_text(encoding="utf-8"))["train"]["replayed"]
    except (ValueError, KeyError, TypeError):
        return None


def mix_replay(cfg: Any, train: ShardedDataset, labels: LabelMap,
               open_data: Callable[[str, str], ShardedDataset]) -> MixedDataset | None:
    """data.train with the replayed rows mixed in, or None without continual.replay_fraction. `open_data(path,
    key)`: a prepared set opened as the run opens its own (the tokenizer's fingerprint checked)."""
    c = cfg.continual
    if not c.replay_fraction:
        return None
    if c.replay_data:
        old = [open_data(c.replay_data, "continual.replay_data")]
        keys = ["continual.replay_data"]
    else:
        sources = pinned_sources(cfg) or recorded_sources(cfg.model.init_from)
        old = [open_recorded(s, cfg.model.init_from, open_data) for s in sources]
        keys = [f"{KEY} ({s['path']}, recorded by model.init_from)" for s in sources]
    for data, key in zip(old, keys, strict=True):
        LabelMap.load(data.path).check_same(labels, key)
    return MixedDataset(train, old, replay_count(c.replay_fraction, train, old), cfg.seed)


def replay_count(fraction: float, new: ShardedDataset, old: list[ShardedDataset]) -> int:
    """Old rows to mix in for `fraction` old documents per new document. A windowed set's rows are windows that weigh
    1/windows each in the loss (a document counts once), and a window drawn uniformly from a set weighs its
    documents/rows on average: so the draw takes the old sets' windows per document times as many rows, and old and
    new documents weigh alike whether either set is windowed or not."""
    def documents(data: ShardedDataset) -> int:
        return int(data.manifest.get("documents") or len(data))

    rows_per_document = sum(len(d) for d in old) / max(1, sum(documents(d) for d in old))
    return max(1, round(fraction * documents(new) * rows_per_document))
