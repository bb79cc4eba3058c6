"""`python -m dtrain.finetune --config configs/finetune/x.yaml [key=value ...]`: sequence classification
(more task heads come with the fine-tuning issue), periodic evaluation, early stopping, test report, export."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dtrain import runner
from dtrain.data.tasks import FinetuneCollator, LabelMap
from dtrain.distributed import all_reduce_sum
from dtrain.errors import DtrainError
from dtrain.logging import training_flops_per_token
from dtrain.metrics import classification_metrics
from dtrain.model.bert import classification_counts, classification_losses, classification_model, fresh_summary
from dtrain.trainer import Objective


def evaluate_classification(engine, loader) -> dict[str, float]:  # noqa: ANN001
    """Loss, accuracy and macro-F1 over a whole stream, in one pass (predictions gathered from every rank)."""
    loss_sum, rows = 0.0, []
    for batch in loader:
        logits = engine.forward(lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                               token_type_ids=b["token_type_ids"]).logits, batch).float().cpu()
        keep = ~batch["pad"]
        loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum"))
        rows.append(torch.stack([logits.argmax(-1)[keep], batch["labels"][keep]]))
    local = torch.cat(rows, dim=1) if rows else torch.zeros(2, 0, dtype=torch.long)
    parts = [local]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
    both = torch.cat(parts, dim=1)
    total = all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64, device=engine.device)).item()
    return {"loss": total / max(both.shape[1], 1), **classification_metrics(both[0].numpy(), both[1].numpy())}


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = runner.parse(argv, "python -m dtrain.finetune")
        if cfg.task.type not in ("classification", "pair"):
            raise DtrainError(f"task.type={cfg.task.type}: this version fine-tunes classification and pair tasks; "
                              f"the other heads come with the fine-tuning issue")
        env = runner.setup(cfg)
        tokenizer = runner.tokenizer_for(cfg)
        train = runner.open_data(cfg, cfg.data.train, "data.train", tokenizer)
        labels = LabelMap.load(Path(cfg.data.train))
        model, fresh = classification_model(cfg.model.name_or_path, len(labels.labels), cfg.model.dropout,
                                            cfg.model.attn_implementation)
        model.config.id2label = dict(enumerate(labels.labels))
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        if env.is_main:
            print(f"dtrain: model {cfg.model.name_or_path}: {fresh_summary(fresh)}", file=sys.stderr)
        collate = FinetuneCollator(cfg.task.type, tokenizer.pad_token_id, len(labels.labels))
        objective = Objective(classification_losses, classification_counts)
        streams = {k: runner.stream(cfg, runner.open_data(cfg, p, f"data.{k}", tokenizer), collate, env, False)
                   for k, p in (("eval", cfg.data.eval), ("test", cfg.data.test)) if p}
        evaluate = (lambda engine: evaluate_classification(engine, streams["eval"])) if "eval" in streams else None
        flops = training_flops_per_token(model.config, cfg.data.max_seq_len, 0.0)
        trainer = runner.run(cfg, env, model, objective, runner.stream(cfg, train, collate, env, train=True),
                             evaluate, tokenizer, flops, metric=cfg.task.metric or "accuracy")
        if "test" in streams:
            with trainer.engine.evaluating():
                report = evaluate_classification(trainer.engine, streams["test"])
            trainer.logger.eval(trainer.state.step, report, prefix="test")
            if env.is_main:
                out = Path(cfg.run_dir) / "test_report.json"
                out.write_text(json.dumps({k: float(np.round(v, 6)) for k, v in report.items()}, indent=1))
        trainer.logger.close()
        return 0

    return runner.main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
