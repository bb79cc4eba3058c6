"""`python -m dtrain.finetune --config configs/finetune/x.yaml [key=value ...]`: a task head on BERT (classification,
pairs, multi-label, regression, NER, extractive QA), evaluation on data.eval with early stopping, the best checkpoint
tested on data.test (report.json + a printed report), export in Hugging Face format."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtrain import runner
from dtrain.config import Config
from dtrain.data.shards import ShardedDataset
from dtrain.distributed import DistEnv
from dtrain.errors import DtrainError
from dtrain.evaluation import Evaluator, scalar_metrics
from dtrain.files import write_atomic
from dtrain.logging import training_flops_per_token
from dtrain.metrics import format_report
from dtrain.model.bert import fresh_summary
from dtrain.model.bounds import check_finetune_lengths
from dtrain.model.peft import trainable_summary
from dtrain.model.source import origin, origin_line
from dtrain.tasks import FinetuneCollator, Head, LabelMap, apply_peft, get_task, init_from_run, resolve_task, task_model
from dtrain.trainer import Objective, Trainer

SELECTION = ("the model tested and exported is the best evaluation after training started (step > 0; ties: the "
             "earlier); the step-0 baseline has an untrained head: it is reported and early stopping must beat it, but "
             "it is never the model kept")


def task_type(cfg: Config) -> list[str]:
    """load_config's derive: task.type as the training set's labels.json says (checked against a configured one)."""
    if not cfg.data.train:
        raise DtrainError("data.train is not set; point it at a dataset dir made by `dtrain prepare finetune`")
    prepared = LabelMap.load(Path(cfg.data.train)).task
    return [f"task.type={resolve_task(cfg.task.type, prepared, f'{cfg.data.train}/labels.json')}"]


def describe(cfg: Config, env: DistEnv, tokenizer: Any, data: dict[str, ShardedDataset]) -> runner.Run:
    labels = LabelMap.load(Path(cfg.data.train))
    task = get_task(cfg.task.type).bind(cfg.task, tokenizer, labels.labels, get_task(labels.task).has_pairs,
                                        cfg.data.max_seq_len)  # a prompt: its template and verbalizer built in
    if cfg.model.init_from:
        model, fresh = init_from_run(task, cfg.model.init_from, labels.labels, cfg.task.extend_labels,
                                     cfg.model.dropout, cfg.model.attn_implementation)
    else:
        model, fresh = task_model(task, cfg.model.name_or_path, labels.labels, cfg.model.dropout,
                                  cfg.model.attn_implementation)
    flops, model_config = training_flops_per_token(model.config, cfg.data.max_seq_len, 0.0), model.config  # pre-PEFT
    model = apply_peft(model, cfg.peft, task)
    if env.is_main:
        print(f"dtrain: model {cfg.model.init_from or cfg.model.name_or_path} for {task.name}: {fresh_summary(fresh)}; "
              f"{trainable_summary(model)}" + ("" if cfg.model.init_from else
                                               f"\ndtrain: {origin_line(cfg.model.name_or_path)}"), file=sys.stderr)
    head, trains = (Head(t, cfg.task.class_weights, cfg.task.label_smoothing, len(labels.labels))
                    for t in (task, task.for_training()))  # (the training side may add terms: prompt's MLM loss)
    multiple = 8 if env.device.type == "cuda" else 1  # widths of 8k suit tensor cores; a CPU: only more work (+25%)
    collate = {h.task: FinetuneCollator(h.task, tokenizer.pad_token_id, len(labels.labels), multiple)
               for h in (head, trains)}
    evaluators = {}
    for split in ("eval", "test"):
        if split in data:
            LabelMap.load(Path(getattr(cfg.data, split))).check_same(labels, f"data.{split}")
            evaluators[split] = Evaluator(head, labels.labels, data[split], cfg.task.threshold, cfg.task.n_best,
                                          cfg.task.max_answer_length)
    check_finetune_lengths(model_config, {f"data.{k}": v for k, v in data.items()})

    def after_fit(trainer: Trainer, test: Any) -> dict[str, Any] | None:
        if trainer.interrupted:  # saved for a later resume: no test report and no export yet
            return None
        report = {"task": task.name, "steps": trainer.state.step, "model_step": trainer.model_step,
                  "metric": trainer.metric, "best": trainer.state.best, "best_step": trainer.state.best_step,
                  "baseline": trainer.state.baseline, "selection": SELECTION, "eval_history": trainer.state.history}
        report["model"] = origin(cfg.model.init_from or cfg.model.name_or_path)
        if test is not None:
            evaluator = evaluators["test"]
            with trainer.engine.evaluating():
                report["test"] = evaluator.report(*evaluator.collect(trainer.engine, test))
            trainer.logger.eval(trainer.model_step, scalar_metrics(report["test"]), prefix="test")
            if env.is_main:
                print(format_report(report["test"], f"test set {cfg.data.test}, model of step {trainer.model_step}"))
        if env.is_main:
            write_atomic(Path(cfg.run_dir) / "report.json", json.dumps(report, indent=1, default=float) + "\n")
        return {"model_step": trainer.model_step, "test": scalar_metrics(report["test"]) if "test" in report else None}

    return runner.Run(model, lambda dataset: collate[(trains if dataset is data["train"] else head).task],
                      Objective(trains.losses, trains.counts), flops,
                      metric=task.default_metric, keep_best=True, report=after_fit,
                      evaluate=evaluators["eval"].scalars if "eval" in evaluators else None)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dtrain.finetune", describe, ("train", "eval", "test"), derive=task_type)


if __name__ == "__main__":
    raise SystemExit(main())
