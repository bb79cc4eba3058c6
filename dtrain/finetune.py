"""`python -m dtrain.finetune --config configs/finetune/x.yaml [key=value ...]`: a task head on BERT (classification,
pairs, multi-label, regression, NER, extractive QA), evaluation on data.eval with early stopping, the best checkpoint
tested on data.test (report.json + a printed report), export in Hugging Face format."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dtrain import runner
from dtrain.data.tasks import FinetuneCollator, LabelMap
from dtrain.errors import DtrainError
from dtrain.evaluation import Evaluator, scalar_metrics
from dtrain.files import write_atomic
from dtrain.logging import training_flops_per_token
from dtrain.metrics import format_report
from dtrain.model.bert import fresh_summary
from dtrain.model.bounds import check_finetune_lengths
from dtrain.model.heads import DEFAULT_METRIC, Head, init_from_run, resolve_task, task_model
from dtrain.model.peft import apply_peft, trainable_summary
from dtrain.model.source import origin, origin_line
from dtrain.trainer import Objective

SELECTION = ("the model tested and exported is the best evaluation after training started (step > 0; ties: the "
             "earlier); the step-0 baseline has an untrained head: it is reported and early stopping must beat it, but "
             "it is never the model kept")


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = runner.parse(argv, "python -m dtrain.finetune")
        if not cfg.data.train:
            raise DtrainError("data.train is not set; point it at a dataset dir made by `dtrain prepare finetune`")
        labels = LabelMap.load(Path(cfg.data.train))
        task = cfg.task.type = resolve_task(cfg.task.type, labels.task, f"{cfg.data.train}/labels.json")
        env = runner.setup(cfg)
        tokenizer = runner.tokenizer_for(cfg)
        train = runner.open_data(cfg, cfg.data.train, "data.train", tokenizer)
        if cfg.model.init_from:
            model, fresh = init_from_run(task, cfg.model.init_from, labels.labels, cfg.task.extend_labels,
                                         cfg.model.dropout, cfg.model.attn_implementation)
        else:
            model, fresh = task_model(task, cfg.model.name_or_path, labels.labels, cfg.model.dropout,
                                      cfg.model.attn_implementation)
        flops = training_flops_per_token(model.config, cfg.data.max_seq_len, 0.0)
        model_config = model.config  # before PEFT wraps the model
        model = apply_peft(model, cfg.peft, task)
        if env.is_main:
            print(f"dtrain: model {cfg.model.init_from or cfg.model.name_or_path} for {task}: {fresh_summary(fresh)}; "
                  f"{trainable_summary(model)}", file=sys.stderr)
            if not cfg.model.init_from:
                print(f"dtrain: {origin_line(cfg.model.name_or_path)}", file=sys.stderr)
        head = Head(task, cfg.task.class_weights, cfg.task.label_smoothing, len(labels.labels))
        # widths that are multiples of 8 suit GPU tensor cores; on a CPU they only add work (27 → 32 tokens: +25%)
        collate = FinetuneCollator(task, tokenizer.pad_token_id, len(labels.labels),
                                   pad_to_multiple_of=8 if env.device.type == "cuda" else 1)
        evaluators = {}
        for split, path in (("eval", cfg.data.eval), ("test", cfg.data.test)):
            if path:
                data = runner.open_data(cfg, path, f"data.{split}", tokenizer)
                LabelMap.load(Path(path)).check_same(labels, f"data.{split}")
                evaluator = Evaluator(head, labels.labels, data, cfg.task.threshold, cfg.task.n_best,
                                      cfg.task.max_answer_length)
                evaluators[split] = (evaluator, runner.stream(cfg, data, collate, env, False))
        check_finetune_lengths(model_config, {"data.train": train,
                                              **{f"data.{k}": v[0].data for k, v in evaluators.items()}})
        evaluate = None
        if "eval" in evaluators:
            def evaluate(engine):  # noqa: ANN001, ANN202
                return evaluators["eval"][0].scalars(engine, evaluators["eval"][1])

        trainer = runner.run(cfg, env, model, Objective(head.losses, head.counts),
                             runner.stream(cfg, train, collate, env, train=True), evaluate, tokenizer, flops,
                             metric=DEFAULT_METRIC[task], keep_best=True)
        if trainer.interrupted:  # saved for a later resume: no test report and no export yet
            return 0
        report = {"task": task, "steps": trainer.state.step, "model_step": trainer.model_step,
                  "metric": trainer.metric, "best": trainer.state.best, "best_step": trainer.state.best_step,
                  "baseline": trainer.state.baseline, "selection": SELECTION, "eval_history": trainer.state.history}
        report["model"] = origin(cfg.model.init_from or cfg.model.name_or_path)
        if "test" in evaluators:
            evaluator, loader = evaluators["test"]
            with trainer.engine.evaluating():
                report["test"] = evaluator.report(*evaluator.collect(trainer.engine, loader))
            trainer.logger.eval(trainer.model_step, scalar_metrics(report["test"]), prefix="test")
            if env.is_main:
                print(format_report(report["test"], f"test set {cfg.data.test}, model of step {trainer.model_step}"))
        if env.is_main:
            write_atomic(Path(cfg.run_dir) / "report.json", json.dumps(report, indent=1, default=float) + "\n")
        runner.write_status(cfg, env, "finished", trainer, model_step=trainer.model_step,
                            test=scalar_metrics(report["test"]) if "test" in report else None)
        return 0

    return runner.main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
