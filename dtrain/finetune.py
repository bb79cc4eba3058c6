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
from dtrain.engine import model_building
from dtrain.errors import DtrainError
from dtrain.evaluation import Evaluator, final_reports, scalar_metrics
from dtrain.files import write_atomic
from dtrain.logging import training_flops_per_token
from dtrain.methods import distill, replay
from dtrain.model.bert import fresh_summary
from dtrain.model.bounds import check_finetune_lengths
from dtrain.model.peft import trainable_summary
from dtrain.model.source import origin, origin_line
from dtrain.tasks import FinetuneCollator, Head, LabelMap, apply_peft, resolve_task, run_task
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
    task = run_task(cfg.task, tokenizer, labels, data["train"].manifest, cfg.data.max_seq_len)  # prompt, windows
    teacher = distill.teacher_for(cfg, task, labels.labels, tokenizer, env.device)  # frozen; None without one
    with model_building(cfg, env):  # ZeRO-3: built partitioned; the teacher's layers, init_from or a model; PEFT
        model, fresh = distill.student(cfg, task, labels.labels, teacher)
        flops, model_config = training_flops_per_token(model.config, cfg.data.max_seq_len, 0.0), model.config
        model = apply_peft(model, cfg.peft, task)
    opened = {**data, **{f"extra/{k}": runner.open_data(cfg, p, f"data.eval_extra.{k}", tokenizer)
                         for k, p in (cfg.data.eval_extra or {}).items()}}
    mixed = replay.mix_replay(cfg, data["train"], labels, lambda p, key: runner.open_data(cfg, p, key, tokenizer))
    if env.is_main:
        source = distill.weights_source(cfg)
        lines = [f"model {source} for {task.name}: {fresh_summary(fresh)}; {trainable_summary(model)}",
                 *([origin_line(source)] if source == cfg.model.name_or_path else []),
                 *(x.describe() for x in (teacher, mixed) if x)]  # a teacher, replay
        print("\n".join(f"dtrain: {x}" for x in lines), file=sys.stderr)
    head, trains = (Head(t, cfg.task.class_weights, cfg.task.label_smoothing, len(labels.labels), learns)  # training
                    for t, learns in ((task, None), (task.for_training(), teacher)))  # adds prompt MLM, a teacher
    collate = {h.task: FinetuneCollator(h.task, tokenizer.pad_token_id, len(labels.labels),  # widths of 8k suit
                                        8 if env.device.type == "cuda" else 1) for h in (head, trains)}  # tensor cores
    keys = {s: f"data.{s}".replace("data.extra/", "data.eval_extra.") for s in opened}  # (config keys of the sets)
    evaluators = {s: Evaluator.of(head, labels, d, keys[s], cfg.task) for s, d in opened.items() if s != "train"}
    check_finetune_lengths(model_config, {**{keys[k]: v for k, v in opened.items()}, **replay.keyed(mixed)})
    extras = [s for s in evaluators if s.startswith("extra/")]

    def evaluate(engine: Any, streams: dict[str, Any]) -> dict[str, float]:  # data.eval picks; extras only watched
        return {**evaluators["eval"].scalars(engine, streams["eval"]),
                **{f"{s[6:]}/{k}": v for s in extras for k, v in evaluators[s].scalars(engine, streams[s]).items()}}

    def after_fit(trainer: Trainer, streams: dict[str, Any]) -> dict[str, Any] | None:
        if trainer.interrupted:  # saved for a later resume: no test report and no export yet
            return None
        report = {"task": task.name, "steps": trainer.state.step, "model_step": trainer.model_step,
                  "metric": trainer.metric, "best": trainer.state.best, "best_step": trainer.state.best_step,
                  "baseline": trainer.state.baseline, "selection": SELECTION, "eval_history": trainer.state.history}
        report["model"] = origin(distill.weights_source(cfg))
        titles = {"test": "test set", **{s: f"data.eval_extra.{s[6:]}" for s in extras}}
        reports = final_reports(trainer, evaluators, streams, titles, env.is_main)
        report |= {"test": reports.pop("test")} if "test" in reports else {}
        report["extra"] = {k[6:]: v for k, v in reports.items()} or None
        if env.is_main:
            write_atomic(Path(cfg.run_dir) / "report.json", json.dumps(report, indent=1, default=float) + "\n")
        return {"model_step": trainer.model_step, "test": scalar_metrics(report["test"]) if "test" in report else None,
                "extra": {k: scalar_metrics(v) for k, v in (report["extra"] or {}).items()} or None}

    return runner.Run(model, lambda dataset: collate[(trains if dataset is (mixed or data["train"]) else head).task],
                      Objective(trains.losses, trains.counts), flops, metric=task.default_metric, keep_best=True,
                      report=after_fit, evaluate=evaluate if "eval" in evaluators else None,
                      data={**opened, "train": mixed or data["train"]})  # (replayed rows mixed in)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dtrain.finetune", describe, ("train", "eval", "test"), derive=task_type)


if __name__ == "__main__":
    raise SystemExit(main())
