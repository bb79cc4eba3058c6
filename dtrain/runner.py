"""What both entry points do around the model: arguments, debug mode, process group, tokenizer, streams, the
engine, checkpointer and logger, resume, fit, teardown. Imported by entry points only."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.checkpoint import Checkpointer
from dtrain.config import Config, load_config, save_run_config
from dtrain.data.examples import example_or_path
from dtrain.data.shards import ShardedDataset, tokenizer_fingerprint
from dtrain.data.stream import StreamingDataset, StreamLoader
from dtrain.distributed import (
    DistEnv,
    broadcast_object,
    catch_stop_signals,
    check_shared_dir,
    init_distributed,
    lost_peer,
)
from dtrain.engine import build_engine
from dtrain.errors import DtrainError
from dtrain.files import check_apart, write_atomic
from dtrain.locks import lock_run_dir
from dtrain.logging import RunLogger, peak_flops
from dtrain.model.source import origin, origin_line, preset_of
from dtrain.trainer import Objective, Trainer

DEBUG_STEPS = 20
_TIMEOUT = [0]  # parallel.timeout_s of this run, for the one-line error when a collective times out


def parse(argv: Sequence[str] | None, prog: str) -> Config:
    ap = argparse.ArgumentParser(prog=prog, description="Run from a YAML config plus key=value overrides.")
    ap.add_argument("--config", help="YAML config (may extend others with base:)")
    ap.add_argument("--debug", action="store_true", help="same as debug=true")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)  # flags may sit among the key=value overrides
    cfg = load_config(args.config, [*args.overrides, *(["debug=true"] if args.debug else [])])
    if cfg.debug:
        if preset_of(cfg.model.name_or_path):  # a random-init preset becomes the tiny one; checkpoints stay
            cfg.model.name_or_path = "tiny"
        cfg.schedule.max_steps = min(cfg.schedule.max_steps or DEBUG_STEPS, DEBUG_STEPS)
        cfg.eval.every_steps = cfg.checkpoint.every_steps = max(1, cfg.schedule.max_steps // 2)
        cfg.data.num_workers = 0
    return cfg


def setup(cfg: Config) -> DistEnv:
    _TIMEOUT[0] = cfg.parallel.timeout_s
    env = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    problem = broadcast_object(run_dir_problem(cfg) if env.is_main else None)  # rank 0 decides
    if problem:
        raise DtrainError(problem)
    lock_run_dir(cfg.run_dir, env.is_main)  # one run per run_dir: rank 0 holds it until exit, every rank is refused
    check_shared_dir(Path(cfg.run_dir), "run_dir")
    cfg.model.name_or_path = example_or_path(cfg.model.name_or_path)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: replicas start identical
    if env.is_main:
        if "SLURM_JOB_ID" in os.environ:  # a requeued job runs again under the same id with the count raised
            print(f"dtrain: Slurm job {os.environ['SLURM_JOB_ID']}, SLURM_RESTART_COUNT="
                  f"{os.environ.get('SLURM_RESTART_COUNT', 0)}", file=sys.stderr)
    return env


def run_dir_problem(cfg: Config) -> str | None:
    """Why a run cannot write into run_dir (one of its inputs or inside/above one, a file, under a file, an
    unwritable place such as /proc), or None; checked before anything is built, and by a probe file that is removed
    again (an earlier run stays as it was)."""
    path = Path(cfg.run_dir)
    inputs = [(f"data.{k}", getattr(cfg.data, k)) for k in ("train", "eval", "test")]
    inputs += [(f"model.{k}", getattr(cfg.model, k)) for k in ("init_from", "name_or_path", "tokenizer")]
    try:
        check_apart(path, [(name, p) for name, p in inputs if p and Path(p).exists()], f"run_dir={path}")
    except DtrainError as e:
        return str(e)
    if path.exists() and not path.is_dir():
        return f"run_dir={path} is a file, not a folder; point run_dir at a new folder or an earlier run's folder"
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"run_dir={path}: {folder} is a file, so the run dir cannot be created under it; point run_dir " \
               f"elsewhere"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dtrain-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"run_dir={path}: cannot create files in {folder} ({e.strerror}); point run_dir at a folder you " \
               f"can write"
    return None


def tokenizer_for(cfg: Config) -> Any:
    from dtrain.data.prepare import load_tokenizer

    name = cfg.model.tokenizer
    if name is None:
        preset = preset_of(cfg.model.name_or_path)
        if preset:
            if "uncased" not in preset and preset != "tiny":
                raise DtrainError(f"model.tokenizer: the preset {preset} has a cased vocabulary and no tokenizer "
                                  f"ships for it; set model.tokenizer to a cased tokenizer dir")
            name = "minilm"  # the uncased BERT WordPiece vocabulary (30,522), as the presets
        else:
            name = cfg.model.name_or_path  # a checkpoint dir or Hub id brings its own tokenizer
    return load_tokenizer(example_or_path(name), "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")


def open_data(cfg: Config, path: str | None, key: str, tokenizer: Any) -> ShardedDataset:
    if not path:
        raise DtrainError(f"{key} is not set; point it at a dataset dir made by `dtrain prepare`")
    return ShardedDataset(path, verify=cfg.data.verify, expect_fingerprint=tokenizer_fingerprint(tokenizer))


def stream(cfg: Config, data: ShardedDataset, collate: Callable, env: DistEnv, train: bool) -> StreamLoader:
    dataset = StreamingDataset(data, cfg.data.micro_batch_size, seed=cfg.seed, shuffle=train and cfg.data.shuffle,
                               drop_last=train and cfg.data.drop_last, shuffle_block=cfg.data.shuffle_block,
                               bucket_window=cfg.data.bucket_window, rank=env.rank,
                               world_size=env.world_size)
    return StreamLoader(dataset, collate, num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda")


def steps_per_epoch(cfg: Config, loader: StreamLoader) -> int:
    per_epoch = len(loader) // cfg.schedule.grad_accum_steps
    if per_epoch < 1:
        raise DtrainError(f"one epoch holds fewer than schedule.grad_accum_steps={cfg.schedule.grad_accum_steps} "
                          f"micro-batches; lower data.micro_batch_size or grad_accum_steps, or set max_steps")
    return per_epoch


def total_steps(cfg: Config, loader: StreamLoader) -> int:
    if cfg.schedule.max_steps:
        return cfg.schedule.max_steps
    return math.ceil(cfg.schedule.epochs * steps_per_epoch(cfg, loader))


def run(cfg: Config, env: DistEnv, model: torch.nn.Module, objective: Objective, loader: StreamLoader,
        evaluate: Callable | None, tokenizer: Any, flops_per_token: float, metric: str | None,
        keep_best: bool = False) -> Trainer:
    """Build the engine and the loop's helpers, resume if asked, train, export."""
    steps = total_steps(cfg, loader)
    eval_every = cfg.eval.every_steps or (steps_per_epoch(cfg, loader) if evaluate else None)
    engine = build_engine(cfg, model, env, steps)
    ledger = Path(cfg.run_dir) / "ledger" / f"rank-{env.rank}.jsonl" if cfg.logging.ledger else None
    if ledger is not None:
        ledger.parent.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(cfg.run_dir, env.is_main, steps, cfg.logging.every_steps, cfg.logging.tensorboard,
                       cfg.logging.progress_bar, flops_per_token, peak_flops(env.device), env.world_size)
    trainer = Trainer(env, engine, loader, objective, steps, cfg.schedule.grad_accum_steps,
                      Checkpointer(cfg.run_dir, env, cfg.checkpoint.keep_last), logger, cfg.to_yaml(),
                      evaluate=evaluate, eval_every=eval_every, checkpoint_every=cfg.checkpoint.every_steps,
                      metric=cfg.eval.metric or metric, mode=cfg.eval.mode, patience=cfg.early_stopping.patience,
                      min_delta=cfg.early_stopping.min_delta, keep_best=keep_best,
                      export_dir=Path(cfg.run_dir) / "export" if cfg.checkpoint.export else None, tokenizer=tokenizer,
                      stop_at_step=cfg.schedule.stop_at_step, ledger=ledger,
                      min_loss_scale=cfg.precision.min_loss_scale,
                      max_consecutive_skips=cfg.precision.max_consecutive_skips)
    _RUN.trainer = trainer  # the exit paths close its logger (main_guard)
    trainer.resume(cfg.checkpoint.resume)
    # every check has passed: only now does the run dir change (a bad input leaves an earlier run as it was)
    if env.is_main:
        save_run_config(cfg)
    logger.text("config", "```\n" + cfg.to_yaml() + "\n```")
    write_status(cfg, env, "running", trainer)
    trainer.fit()
    if trainer.interrupted:
        write_status(cfg, env, trainer.interrupted, trainer)
    return trainer


class _Run:
    """This process's run, for the ways out of an entry point: once `run` has written "running", an exception
    writes "failed" with its one-line reason (main_guard), and the logger is closed whatever happens."""

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.env: DistEnv | None = None
        self.trainer: Trainer | None = None
        self.state: str | None = None  # the last state written to status.json by this process

    def fail(self, reason: str) -> None:
        if self.state == "running" and self.cfg is not None and self.env is not None and self.trainer is not None:
            latest = self.trainer.checkpointer.latest()
            write_status(self.cfg, self.env, "failed", self.trainer, reason=reason,
                         checkpoint=str(latest) if latest else None,
                         checkpoint_step=int(latest.name.removeprefix("step-")) if latest else None)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.logger.close()
        self.__init__()


_RUN = _Run()


def write_status(cfg: Config, env: DistEnv, state: str, trainer: Trainer, **extra: Any) -> None:
    """<run_dir>/status.json: running, preempted (a stop signal: resume), stopped (schedule.stop_at_step), finished
    or failed (with the reason and the last good checkpoint). slurm/ and launch/ read it to decide whether a job
    requeues itself (launch/status.py)."""
    _RUN.cfg, _RUN.env, _RUN.trainer, _RUN.state = cfg, env, trainer, state
    if not env.is_main:
        return
    status = {"state": state, "step": trainer.state.step, "total_steps": trainer.total_steps,
              "eval": trainer.state.history[-1] if trainer.state.history else None, **extra}
    status["model"] = origin(cfg.model.init_from or cfg.model.name_or_path)  # random init is never silent
    if state == "running":  # who runs it: a reader can tell a live run from one whose rank 0 was killed
        status.update(host=socket.gethostname(), pid=os.getpid())
    elif state == "finished":
        print(f"dtrain: finished at step {trainer.state.step}; "
              f"{origin_line(cfg.model.init_from or cfg.model.name_or_path)}", file=sys.stderr)
    try:
        write_atomic(Path(cfg.run_dir) / "status.json", json.dumps(status, default=float) + "\n")
    except OSError as e:  # e.g. the disk is full: the run's own error line says why; this one says what is missing
        print(f"dtrain: warning: could not write {Path(cfg.run_dir) / 'status.json'} (state {state}): "
              f"{e.strerror or e}", file=sys.stderr)


def main_guard(main: Callable[[], int]) -> int:
    """Entry points: one-line errors (rank-tagged under torchrun), exit status 2, teardown always."""
    from dtrain.distributed import teardown

    restore_signals = catch_stop_signals()  # a stop signal from now on means: save at the next step, then exit
    clean = False
    try:
        status = main()
        clean = True
        return status
    except DtrainError as e:
        clean = True  # every rank raises it at the same point (the checks are agreed), so teardown can synchronise
        return _error(str(e), 2)
    except RuntimeError as e:
        if lost := lost_peer(e):
            return _error(lost, 3)
        if not _is_timeout(e):
            _RUN.fail(_first_line(e))
            raise
        return _error(f"a collective waited longer than parallel.timeout_s={_TIMEOUT[0]} s for the other ranks (one "
                      f"hung or died): {_first_line(e)[:200]}; find the stuck rank, or raise parallel.timeout_s if "
                      f"steps or checkpoints are legitimately that slow", 3)
    except BaseException as e:  # any other error (a traceback follows), Ctrl-C twice, SystemExit
        _RUN.fail(_first_line(e) or type(e).__name__)
        raise
    finally:
        _RUN.close()
        teardown(synchronise=clean)
        restore_signals()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _error(message: str, status: int) -> int:
    """The one line on stderr; status.json says failed with the same line if this run had started."""
    print(f"dtrain: error: {message}", file=sys.stderr)
    _RUN.fail(message)
    return status


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text
