"""What both entry points do around the model: arguments, debug mode, process group, tokenizer, streams, the
engine, checkpointer and logger, resume, fit, teardown. Imported by entry points only."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
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
from dtrain.distributed import DistEnv, catch_stop_signals, check_shared_dir, init_distributed, lost_peer
from dtrain.engine import build_engine
from dtrain.errors import DtrainError
from dtrain.files import write_atomic
from dtrain.logging import RunLogger, peak_flops
from dtrain.model.presets import PRESETS
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
        if cfg.model.name_or_path in PRESETS:
            cfg.model.name_or_path = "tiny"
        cfg.schedule.max_steps = min(cfg.schedule.max_steps or DEBUG_STEPS, DEBUG_STEPS)
        cfg.eval.every_steps = cfg.checkpoint.every_steps = max(1, cfg.schedule.max_steps // 2)
        cfg.data.num_workers = 0
    return cfg


def setup(cfg: Config) -> DistEnv:
    _TIMEOUT[0] = cfg.parallel.timeout_s
    env = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
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


def tokenizer_for(cfg: Config) -> Any:
    from dtrain.data.prepare import load_tokenizer

    name = cfg.model.tokenizer
    if name is None:
        if cfg.model.name_or_path in PRESETS:
            if "uncased" not in cfg.model.name_or_path and cfg.model.name_or_path != "tiny":
                raise DtrainError(f"model.tokenizer: the preset {cfg.model.name_or_path} has a cased vocabulary and "
                                  f"no tokenizer ships for it; set model.tokenizer to a cased tokenizer dir")
            name = "minilm"  # the uncased BERT WordPiece vocabulary (30,522), as the presets
        else:
            name = cfg.model.name_or_path
    return load_tokenizer(example_or_path(name))


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


def write_status(cfg: Config, env: DistEnv, state: str, trainer: Trainer, **extra: Any) -> None:
    """<run_dir>/status.json: running, preempted (a stop signal: resume), stopped (schedule.stop_at_step) or
    finished. slurm/ and launch/ read it to decide whether a job requeues itself."""
    if not env.is_main:
        return
    status = {"state": state, "step": trainer.state.step, "total_steps": trainer.total_steps,
              "eval": trainer.state.history[-1] if trainer.state.history else None, **extra}
    write_atomic(Path(cfg.run_dir) / "status.json", json.dumps(status, default=float) + "\n")


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
        print(f"dtrain: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if lost := lost_peer(e):
            print(f"dtrain: error: {lost}", file=sys.stderr)
            return 3
        if not _is_timeout(e):
            raise
        print(f"dtrain: error: a collective waited longer than parallel.timeout_s={_TIMEOUT[0]} s for the other "
              f"ranks (one hung or died): {str(e).strip().splitlines()[0][:200]}; find the stuck rank, or raise "
              f"parallel.timeout_s if steps or checkpoints are legitimately that slow", file=sys.stderr)
        return 3
    finally:
        teardown(synchronise=clean)
        restore_signals()


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text
