"""The one run lifecycle (`main`): arguments and the resolved config → process group → tokenizer, datasets → the
entry point's description of the run (`Run`) → streams, engine, checkpointer, logger, Trainer → resume → fit →
status.json → the entry point's report → close and teardown, always in `finally`. Imported by entry points only."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.checkpoint import Checkpointer
from dtrain.config import Config, load_config, save_run_config
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
from dtrain.files import check_apart, place_problem, write_atomic
from dtrain.locks import lock_run_dir
from dtrain.logging import RunLogger, peak_flops
from dtrain.methods.distill import weights_source
from dtrain.model.bert import set_encoder
from dtrain.model.source import origin, origin_line
from dtrain.model.tokenizer import tokenizer_for
from dtrain.trainer import Objective, Plan, Trainer, TrainerSections

_TIMEOUT = [0]  # parallel.timeout_s of this run, for the one-line error when a collective times out


def parse(argv: Sequence[str] | None, prog: str,
          derive: Callable[[Config], Sequence[str]] | None = None) -> Config:
    """The run's config, resolved once by load_config (debug mode, example names, what `derive` adds)."""
    ap = argparse.ArgumentParser(prog=prog, description="Run from a YAML config plus key=value overrides.")
    ap.add_argument("--config", help="YAML config (may extend others with base:)")
    ap.add_argument("--debug", action="store_true", help="same as debug=true")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)  # flags may sit among the key=value overrides
    return load_config(args.config, [*args.overrides, *(["debug=true"] if args.debug else [])], derive=derive,
                       examples=True)


def setup(cfg: Config) -> DistEnv:
    _TIMEOUT[0] = cfg.parallel.timeout_s
    env = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    problem = broadcast_object(run_dir_problem(cfg) if env.is_main else None)  # rank 0 decides
    if problem:
        raise DtrainError(problem)
    lock_run_dir(cfg.run_dir, env.is_main)  # one run per run_dir: rank 0 holds it until exit, every rank is refused
    check_shared_dir(Path(cfg.run_dir), "run_dir")
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
    inputs += [(f"data.eval_extra.{k}", p) for k, p in (cfg.data.eval_extra or {}).items()]
    inputs += [("continual.replay_data", cfg.continual.replay_data), ("distill.teacher", cfg.distill.teacher)]
    try:
        check_apart(path, [(name, p) for name, p in inputs if p and Path(p).exists()], f"run_dir={path}")
    except DtrainError as e:
        return str(e)
    if path.exists() and not path.is_dir():
        return f"run_dir={path} is a file, not a folder; point run_dir at a new folder or an earlier run's folder"
    return place_problem(path, f"run_dir={path}", "the run dir", "point run_dir elsewhere",
                         "point run_dir at a folder you can write")


def open_data(cfg: Config, path: str | None, key: str, tokenizer: Any) -> ShardedDataset:
    if not path:
        raise DtrainError(f"{key} is not set; point it at a dataset dir made by `dtrain prepare`")
    return ShardedDataset(path, verify=cfg.data.verify, expect_fingerprint=tokenizer_fingerprint(tokenizer))


def stream(cfg: Config, data: ShardedDataset, collate: Callable, env: DistEnv, train: bool) -> StreamLoader:
    # A collator that builds its samples at read time (pretraining's NSP pairs) says how long they will be.
    dataset = StreamingDataset(data, cfg.data.micro_batch_size, seed=cfg.seed, shuffle=train and cfg.data.shuffle,
                               drop_last=train and cfg.data.drop_last, shuffle_block=cfg.data.shuffle_block,
                               bucket_window=cfg.data.bucket_window, rank=env.rank,
                               world_size=env.world_size, lengths=getattr(collate, "bucket_lengths", None))
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


@dataclass
class Run:
    """What an entry point describes (from the config, the tokenizer and the opened datasets): the model, how a
    dataset is collated, what is learned, how the run is judged, and what follows fit."""

    model: torch.nn.Module
    collate: Callable[[ShardedDataset], Callable]  # a dataset → its collator (the same one for every split, or not)
    objective: Objective
    flops_per_token: float
    metric: str | None = None  # the default eval metric (eval.metric overrides it)
    evaluate: Callable[[Any, dict[str, StreamLoader]], dict[str, float]] | None = None  # (engine, the streams of
    # every split but train) → metrics; runs when data.eval is set
    keep_best: bool = False  # test and export the best evaluation's model
    report: Callable[[Trainer, dict[str, StreamLoader]], dict[str, Any] | None] | None = None  # after fit (also after
    # an interruption: trainer.interrupted says which) with the streams of every split but train; returns
    # status.json's extra fields
    data: dict[str, Any] | None = None  # the datasets streamed, by split, when not the opened ones (a training set
    # with replayed rows mixed in; more evaluation sets)


def main(argv: Sequence[str] | None, prog: str, describe: Callable[[Config, DistEnv, Any, dict], Run],
         splits: Sequence[str] = ("train", "eval"), derive: Callable[[Config], Sequence[str]] | None = None) -> int:
    """The run, start to end: describe(cfg, env, tokenizer, {split: dataset}) says what it trains (`splits`: the
    data.* datasets it reads; train is required). One-line errors (rank-tagged under torchrun) with exit status 2
    (3: a lost or hung rank), status.json "failed" on every other way out once it said "running"; the logger's
    close and the teardown always."""
    from dtrain.distributed import teardown

    restore_signals = catch_stop_signals()  # a stop signal from now on means: save at the next step, then exit
    clean = False
    try:
        cfg = parse(argv, prog, derive)
        env = setup(cfg)
        tokenizer = tokenizer_for(cfg)
        data = {s: open_data(cfg, getattr(cfg.data, s), f"data.{s}", tokenizer) for s in splits
                if s == "train" or getattr(cfg.data, s)}
        run = describe(cfg, env, tokenizer, data)
        data = run.data or data
        streams = {s: stream(cfg, d, run.collate(d), env, train=s == "train") for s, d in data.items()}
        trainer = build_trainer(cfg, env, run, streams, tokenizer)
        trainer.resume(cfg.checkpoint.resume)
        # every check has passed: only now does the run dir change (a bad input leaves an earlier run as it was)
        if env.is_main:
            save_run_config(cfg)
            write_atomic(Path(cfg.run_dir) / "data.json", json.dumps({s: d.record() for s, d in data.items()},
                                                                     indent=1) + "\n")  # what it trained on
        trainer.logger.text("config", "```\n" + cfg.to_yaml() + "\n```")
        write_status(cfg, env, "running", trainer)
        trainer.fit()
        if trainer.interrupted:  # saved for a later resume
            write_status(cfg, env, trainer.interrupted, trainer)
        extra = run.report(trainer, {s: x for s, x in streams.items() if s != "train"}) if run.report else None
        if not trainer.interrupted:
            write_status(cfg, env, "finished", trainer, **(extra or {}))
        clean = True
        return 0
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


def build_trainer(cfg: Config, env: DistEnv, run: Run, streams: dict[str, StreamLoader], tokenizer: Any) -> Trainer:
    """The engine, checkpointer, logger and loop of a described run (built from the config sections they read)."""
    train = streams["train"]
    steps = total_steps(cfg, train)
    evaluate = None
    if run.evaluate is not None and "eval" in streams:
        def evaluate(engine):  # noqa: ANN001, ANN202
            return run.evaluate(engine, {s: x for s, x in streams.items() if s != "train"})

    eval_every = cfg.eval.every_steps or (steps_per_epoch(cfg, train) if evaluate else None)
    m = cfg.model
    engine = build_engine(cfg, set_encoder(run.model, m.unpad, m.gradient_checkpointing, m.compile), env, steps)
    logger = _RUN.logger = RunLogger(cfg.run_dir, env.is_main, steps, cfg.logging.every_steps, cfg.logging.tensorboard,
                                     cfg.logging.progress_bar, run.flops_per_token, peak_flops(env.device),
                                     env.world_size)
    checkpointer = Checkpointer(cfg.run_dir, env, cfg.checkpoint.keep_last, cfg.to_yaml())
    plan = Plan(steps, evaluate, eval_every, run.metric, run.keep_best, tokenizer)
    return Trainer(env, engine, train, run.objective, checkpointer, logger, TrainerSections.of(cfg), plan)


class _Run:
    """This process's run, for the ways out of `main`: once it has written "running", an exception writes "failed"
    with its one-line reason, and the logger is closed whatever happens."""

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.env: DistEnv | None = None
        self.trainer: Trainer | None = None
        self.logger: RunLogger | None = None
        self.state: str | None = None  # the last state written to status.json by this process

    def fail(self, reason: str) -> None:
        if self.state == "running" and self.cfg is not None and self.env is not None and self.trainer is not None:
            try:
                latest = self.trainer.checkpointer.latest()
            except OSError:  # the way out of a failing disk: the status still says failed, without a checkpoint
                latest = None
            write_status(self.cfg, self.env, "failed", self.trainer, reason=reason,
                         checkpoint=str(latest) if latest else None,
                         checkpoint_step=int(latest.name.removeprefix("step-")) if latest else None)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
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
    status["model"] = origin(weights_source(cfg))  # random init is never silent
    if state == "running":  # who runs it: a reader can tell a live run from one whose rank 0 was killed
        status.update(host=socket.gethostname(), pid=os.getpid())
    elif state == "finished":
        print(f"dtrain: finished at step {trainer.state.step}; "
              f"{origin_line(weights_source(cfg))}", file=sys.stderr)
    try:
        write_atomic(Path(cfg.run_dir) / "status.json", json.dumps(status, default=float) + "\n")
    except OSError as e:  # e.g. the disk is full: the run's own error line says why; this one says what is missing
        print(f"dtrain: warning: could not write {Path(cfg.run_dir) / 'status.json'} (state {state}): "
              f"{e.strerror or e}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _error(message: str, status: int) -> int:
    """The one line on stderr; status.json says failed with the same line if this run had started."""
    # one write of the whole line: print() writes the text and the newline apart, and two ranks' lines interleaved
    sys.stderr.write(f"dtrain: error: {message}\n")
    sys.stderr.flush()
    _RUN.fail(message)
    return status


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text
