"""Checkpoints: atomic directories under <run_dir>/checkpoints, a `latest` pointer, keep-last-K, resume (the HF
export of a run or a checkpoint: export.py).

A checkpoint is the dict of every stateful part, handed to `save` / `load` as one dict (Trainer.parts): the engine
writes its own files (model, optimizer, scheduler, loss scaler: DeepSpeed's layout is its own), the RNG one file per
rank, and the JSON parts (trainer counters at the top level, the data stream's position under "stream") go into
trainer.json, as earlier versions wrote it; plus the resolved config (written, never restored). It is
written into `.tmp-step-N` and renamed to `step-N` only when complete, so a crash mid-save leaves the previous
checkpoint as `latest` and nothing half-written that resume could pick up (the next resume removes the leftover, saying
so). manifest.json (size and SHA-256 of every file, written last) lets resume detect a checkpoint damaged on disk
later and fall back to the one before it. A save that fails (e.g. the disk is full) removes its partial directory and
stops the run with one line; the previous checkpoints are untouched.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.distributed import DistEnv, any_rank, barrier, broadcast_object
from dtrain.engine.base import CheckpointError
from dtrain.errors import DtrainError
from dtrain.files import sha256_file, write_atomic

TRAINER_FILE = "trainer.json"
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"  # names the checkpoint with the best evaluation; never pruned


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNG:
    """This process's random generators as a stateful part; one file per rank (`rng-rank{R}.pt`)."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def _seal(path: Path) -> None:
    """Hash and fsync every file in one read, then write manifest.json (fsynced) last."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                files[str(f.relative_to(path))] = [os.fstat(fh.fileno()).st_size,
                                                   hashlib.file_digest(fh, "sha256").hexdigest()]
                os.fsync(fh.fileno())
    write_atomic(path / MANIFEST, json.dumps({"files": files}, indent=0) + "\n")


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a file missing, truncated or changed since it was written),
    or None. Checkpoints written before manifests existed are checked for completeness only."""
    if not (path / TRAINER_FILE).is_file():
        return f"no {TRAINER_FILE}"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if sha256_file(f) != digest:
            return f"{name} does not match its SHA-256"
    return None


def _test_pause(tmp: Path) -> None:
    """Test hook (tests/reliability): with DTRAIN_TEST_PAUSE_IN_CHECKPOINT=step-N, stop inside that save, after
    the engine's files are written and before the checkpoint is complete, so a test can kill the process there."""
    if os.environ.get("DTRAIN_TEST_PAUSE_IN_CHECKPOINT") == tmp.name.removeprefix(".tmp-"):
        (tmp / "PAUSED").touch()
        time.sleep(3600)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def _warn(message: str) -> None:
    print(f"dtrain: warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """parts: {name: stateful part}. A part with save(dir)/load(dir) writes its own files (the engine); one marked
    per_rank (RNG) is `{name}-rank{R}.pt`; the others' state_dict() go into trainer.json ("trainer" at the top)."""

    def __init__(self, run_dir: str | os.PathLike, env: DistEnv, keep_last: int = 3, config_yaml: str = ""):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.env, self.keep_last, self.config_yaml = env, keep_last, config_yaml

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def save(self, step: int, parts: dict[str, Any], best: bool = False) -> Path:
        """Every rank calls this; returns the final checkpoint dir. best: also point `best` at it."""
        name = self.name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        error = None
        try:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            error = e
        if any_rank(error is not None, self.env.device):
            self._failed(tmp, name, error)
        try:
            for key, part in parts.items():
                if hasattr(part, "save"):
                    part.save(tmp)
                elif getattr(part, "per_rank", False):
                    torch.save(part.state_dict(), tmp / f"{key}-rank{self.env.rank}.pt")
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            error = e
        if any_rank(error is not None, self.env.device):  # every rank stops, not only the one that failed
            self._failed(tmp, name, error)
        if self.env.is_main:
            _test_pause(tmp)
            try:
                (tmp / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
                state = {**_json_state(parts), "step": step, "world_size": self.env.world_size}
                (tmp / TRAINER_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
                _seal(tmp)
            except OSError as e:
                error = e
        if any_rank(error is not None, self.env.device):
            self._failed(tmp, name, error)
        if self.env.is_main:
            if final.exists():  # the same step saved again (e.g. the end of a resumed run): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.root / LATEST, name + "\n")
            if best:
                write_atomic(self.root / BEST, name + "\n")
            self._prune()
        barrier()
        return final

    def _failed(self, tmp: Path, name: str, error: BaseException | None) -> None:
        chained, seen = error, set()
        while chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            # the tracebacks (of the error and of those it was raised from) hold the frames of the failed write, and
            # with them its open file: until that is closed, the removed partial file still occupies the disk
            chained.__traceback__ = None
            chained = chained.__context__ or chained.__cause__
        gc.collect()
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = self.latest()
        what = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" if error is not None else \
            "another rank failed to write its part"
        try:
            what += f"; {_size(shutil.disk_usage(self.root).free)} free on its disk after the cleanup"
        except OSError:
            pass
        raise DtrainError(f"could not write checkpoint {self.root / name} ({what}); the partial checkpoint was removed "
                          f"and {f'the last good one, {latest}, is intact' if latest else 'no earlier one exists'}: "
                          f"free disk space (or point run_dir elsewhere) and resume")

    def _prune(self) -> None:
        best = self.best()
        done = sorted(p for p in self.root.glob("step-*") if (p / TRAINER_FILE).is_file() and p != best)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def best(self) -> Path | None:
        """The checkpoint with the best evaluation so far (kept apart from the rolling keep_last ones)."""
        pointer = self.root / BEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if (named / TRAINER_FILE).is_file():
                return named
        return None

    def resolve(self, resume: str) -> Path | None:
        """checkpoint.resume → the dir to resume from (None: start fresh). auto: the newest intact checkpoint; a
        damaged one is skipped with a warning, leftovers of interrupted saves are removed. Rank 0 decides."""
        if resume == "none":
            return None
        choice: Path | None = None
        error: str | None = None
        if self.env.is_main:
            if resume == "auto":
                for partial in sorted(self.root.glob(".tmp-step-*")):
                    _warn(f"removing {partial}: an incomplete checkpoint left by a save that was interrupted")
                    shutil.rmtree(partial, ignore_errors=True)
                choice, error = self._newest_intact()
            else:
                path = Path(resume)
                why = damage(path)
                if why:
                    error = f"checkpoint.resume={resume}: not a complete, intact dtrain checkpoint ({why}); pass " \
                            f"another step-N dir, auto or none"
                choice = path
        choice, error = broadcast_object((choice, error))
        if error:
            raise DtrainError(error)
        return choice

    def _newest_intact(self) -> tuple[Path | None, str | None]:
        latest = latest_checkpoint(self.root)
        steps = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        candidates = list(dict.fromkeys([*([latest] if latest else []), *steps]))
        damaged = []
        for path in candidates:
            why = damage(path)
            if why is None:
                if damaged:
                    _warn(f"resuming from {path.name}, the newest intact checkpoint (skipped: {'; '.join(damaged)})")
                return path, None
            damaged.append(f"{path.name}: {why}")
            _warn(f"checkpoint {path} is damaged ({why}); falling back to the one before it")
        if damaged:
            return None, (f"no intact checkpoint in {self.root} ({'; '.join(damaged)}); restore one, or start fresh "
                          f"with checkpoint.resume=none (or another run_dir)")
        return None, None

    def load(self, path: Path, parts: dict[str, Any]) -> None:
        """Restore every part from the checkpoint at `path`: the engine's files, this rank's RNG, then trainer.json."""
        try:
            for part in parts.values():
                if hasattr(part, "load"):
                    part.load(path)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise DtrainError(f"checkpoint {path} does not fit this model/optimizer ({first}); resume with the "
                              f"config it was written with, or start fresh (checkpoint.resume=none or another "
                              f"run_dir)") from None
        for name, part in parts.items():
            own = path / f"{name}-rank{self.env.rank}.pt"
            if getattr(part, "per_rank", False) and own.is_file():  # missing when resuming at a larger world size:
                part.load_state_dict(torch.load(own, weights_only=False))  # that rank keeps its seeded RNG
        state = json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))
        for name, part in parts.items():
            if not hasattr(part, "load") and not getattr(part, "per_rank", False):
                part.load_state_dict(state if name == "trainer" else state[name])


def _json_state(parts: dict[str, Any]) -> dict[str, Any]:
    """trainer.json's content: the trainer counters at the top level (as earlier versions wrote it, so their
    checkpoints resume), every other JSON part under its name."""
    out: dict[str, Any] = {}
    for name, part in parts.items():
        if not hasattr(part, "save") and not getattr(part, "per_rank", False):
            out.update(part.state_dict() if name == "trainer" else {name: part.state_dict()})
    return out


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`: the one `latest` names, else the highest complete step dir."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / TRAINER_FILE).is_file():
            return named
    done = sorted(p for p in root.glob("step-*") if (p / TRAINER_FILE).is_file())
    return done[-1] if done else None
