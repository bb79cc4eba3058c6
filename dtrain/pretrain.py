"""`python -m dtrain.pretrain --config configs/pretrain/x.yaml [key=value ...]`: MLM + NSP (continued) pretraining.

One process (debug), or under torchrun / srun on any number of ranks; the same command either way. This file
describes the run; dtrain.runner.main runs it (setup, resume, fit, status, teardown)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from dtrain import runner
from dtrain.config import Config
from dtrain.data.pretraining import PretrainingCollator
from dtrain.data.shards import ShardedDataset
from dtrain.distributed import DistEnv
from dtrain.engine import model_building
from dtrain.evaluation import evaluate_terms
from dtrain.logging import training_flops_per_token
from dtrain.model.bert import fresh_summary, pretraining_counts, pretraining_losses, pretraining_model
from dtrain.model.bounds import check_pretrain_lengths
from dtrain.model.source import origin_line
from dtrain.trainer import Objective, Trainer


def describe(cfg: Config, env: DistEnv, tokenizer: Any, data: dict[str, ShardedDataset]) -> runner.Run:
    with model_building(cfg, env):  # (ZeRO-3: built partitioned)
        model, fresh = pretraining_model(cfg.model.name_or_path, cfg.model.dropout, cfg.model.attn_implementation)
    if env.is_main:
        print(f"dtrain: model {cfg.model.name_or_path}: {fresh_summary(fresh)}", file=sys.stderr)
        print(f"dtrain: {origin_line(cfg.model.name_or_path)}", file=sys.stderr)
    d = cfg.data

    def collate(dataset: ShardedDataset) -> PretrainingCollator:
        # widths that are multiples of 8 suit GPU tensor cores; on a CPU they only add work
        return PretrainingCollator(dataset, tokenizer, d.max_seq_len, cfg.seed, d.mlm_probability,
                                   d.max_predictions_per_seq, d.whole_word_masking, d.nsp_probability,
                                   pad_to_multiple_of=8 if env.device.type == "cuda" else 1)

    for warning in check_pretrain_lengths(model.config, d.max_seq_len, {f"data.{k}": v for k, v in data.items()}):
        if env.is_main:
            print(warning, file=sys.stderr)
    objective = Objective(pretraining_losses, pretraining_counts)
    masked = min(d.max_predictions_per_seq, d.mlm_probability * d.max_seq_len) / d.max_seq_len

    def report(trainer: Trainer, streams: Any) -> None:
        history = [h for h in trainer.state.history if "mlm_loss" in h]
        if env.is_main and len(history) >= 2:
            first, last = history[0], history[-1]
            print(f"dtrain: held-out MLM loss {first['mlm_loss']:.4f} (step {first['step']}) → {last['mlm_loss']:.4f} "
                  f"(step {last['step']}); NSP loss {first['nsp_loss']:.4f} → {last['nsp_loss']:.4f}")

    return runner.Run(model, collate, objective, training_flops_per_token(model.config, d.max_seq_len, masked),
                      metric="mlm_loss",
                      evaluate=lambda engine, streams: evaluate_terms(engine, streams["eval"], objective),
                      report=report)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dtrain.pretrain", describe, splits=("train", "eval"))


if __name__ == "__main__":
    raise SystemExit(main())
