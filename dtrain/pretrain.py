"""`python -m dtrain.pretrain --config configs/pretrain/x.yaml [key=value ...]`: MLM + NSP (continued) pretraining.

One process (debug), or under torchrun / srun on any number of ranks; the same command either way."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dtrain import runner
from dtrain.data.pretraining import PretrainingCollator
from dtrain.logging import training_flops_per_token
from dtrain.model.bert import fresh_summary, pretraining_counts, pretraining_losses, pretraining_model
from dtrain.model.bounds import check_pretrain_lengths
from dtrain.model.source import origin_line
from dtrain.trainer import Objective, evaluate_terms


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = runner.parse(argv, "python -m dtrain.pretrain")
        env = runner.setup(cfg)
        tokenizer = runner.tokenizer_for(cfg)
        model, fresh = pretraining_model(cfg.model.name_or_path, cfg.model.dropout, cfg.model.attn_implementation)
        if env.is_main:
            print(f"dtrain: model {cfg.model.name_or_path}: {fresh_summary(fresh)}", file=sys.stderr)
            print(f"dtrain: {origin_line(cfg.model.name_or_path)}", file=sys.stderr)
        d = cfg.data

        def collator(data):  # noqa: ANN001, ANN202
            # widths that are multiples of 8 suit GPU tensor cores; on a CPU they only add work
            return PretrainingCollator(data, tokenizer, d.max_seq_len, cfg.seed, d.mlm_probability,
                                       d.max_predictions_per_seq, d.whole_word_masking, d.nsp_probability,
                                       pad_to_multiple_of=8 if env.device.type == "cuda" else 1)

        train = runner.open_data(cfg, d.train, "data.train", tokenizer)
        objective = Objective(pretraining_losses, pretraining_counts)
        evaluate = None
        if d.eval:
            held_out = runner.open_data(cfg, d.eval, "data.eval", tokenizer)
            eval_loader = runner.stream(cfg, held_out, collator(held_out), env, train=False)

            def evaluate(engine):  # noqa: ANN001, ANN202
                return evaluate_terms(engine, eval_loader, objective)

        masked = min(d.max_predictions_per_seq, d.mlm_probability * d.max_seq_len) / d.max_seq_len
        flops = training_flops_per_token(model.config, d.max_seq_len, masked)
        datasets = {"data.train": train, **({"data.eval": held_out} if d.eval else {})}
        for warning in check_pretrain_lengths(model.config, d.max_seq_len, datasets):
            if env.is_main:
                print(warning, file=sys.stderr)
        trainer = runner.run(cfg, env, model, objective, runner.stream(cfg, train, collator(train), env, train=True),
                             evaluate, tokenizer, flops, metric="mlm_loss")
        history = [h for h in trainer.state.history if "mlm_loss" in h]
        if env.is_main and len(history) >= 2:
            first, last = history[0], history[-1]
            print(f"dtrain: held-out MLM loss {first['mlm_loss']:.4f} (step {first['step']}) → {last['mlm_loss']:.4f} "
                  f"(step {last['step']}); NSP loss {first['nsp_loss']:.4f} → {last['nsp_loss']:.4f}")
        if not trainer.interrupted:
            runner.write_status(cfg, env, "finished", trainer)
        return 0

    return runner.main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
