"""Every fine-tuning task end to end on a tiny BERT: the loss goes down, the test report has the task's metrics,
the export serves through the matching transformers pipeline, and `dtrain predict` / `dtrain evaluate` work on it."""

import json

import pytest

from tests.conftest import run_cli
from tests.integration.task_data import write_task
from tests.integration.test_training import run

COMMON = ("logging.progress_bar=false", "data.max_seq_len=32", "data.micro_batch_size=16", "optim.lr=3e-3",
          "schedule.warmup=0.05", "eval.every_steps=20", "data.num_workers=0", "eval.metric=null",
          "early_stopping.patience=null", "data.bucket_window=0")


def finetune(tmp_path, tokenizer_dir, data, *extra, steps=80):
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                 f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={tmp_path / 'run'}", f"schedule.max_steps={steps}", *COMMON, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    history = report["eval_history"]
    assert history[0]["step"] == 0 and history[-1]["loss"] < 0.7 * history[0]["loss"], history
    return result, report


@pytest.mark.parametrize("task, metric, floor", [("multilabel", "micro_f1", 0.75), ("regression", "pearson", 0.8),
                                                 ("ner", "f1", 0.8), ("qa", "f1", 0.3)])
def test_task_trains_reports_and_serves(task, metric, floor, tokenizer_dir, tmp_path):
    data = write_task(task, tmp_path / "data", tokenizer_dir)
    # multilabel at lr 3e-3 for 160 steps depends on the dropout stream (seed 42 collapses to micro-F1 0.74, seeds
    # 1-3 reach 0.85-1.0); at 2e-3 for 240 steps seed 42 reaches 1.0 (seeds 1-3: 1.0, 0.85, 1.0)
    # ner at 80 steps sits at the floor with some dropout streams (unpadded encoder, seeds 42/1/2/3: F1 0.80, 0.77,
    # 0.86, 0.83; padded: 0.85, 0.88, 0.90, 0.85; equal without dropout, equal mean gradients); 120 steps: 0.85-0.92
    lr = ["optim.lr=2e-3"] if task == "multilabel" else []
    result, report = finetune(tmp_path, tokenizer_dir, data, f"task.type={task}", *lr,
                              steps={"regression": 80, "ner": 120, "multilabel": 240}.get(task, 160))
    assert report["task"] == task and report["metric"] == metric
    assert report["test"][metric] >= floor, report["test"]
    assert f"test set {data['test']}" in result.stdout
    export = tmp_path / "run" / "export"
    from transformers import pipeline

    if task == "multilabel":
        out = pipeline("text-classification", model=str(export), top_k=None)(["the market of team"])[0]
        scores = {d["label"]: d["score"] for d in out}
        assert scores["arts"] < min(scores["econ"], scores["sport"]), scores  # music is absent, market and team not
    elif task == "regression":
        out = pipeline("text-classification", model=str(export), function_to_apply="none")
        assert out("market market market of the")[0]["score"] > out("of the a")[0]["score"]
    elif task == "ner":
        out = pipeline("token-classification", model=str(export), aggregation_strategy="first")("the team of music")
        assert {e["entity_group"] for e in out} >= {"ORG"}, out
    else:  # transformers 5 has no question-answering pipeline any more: the export loads as the Auto class
        from transformers import AutoModelForQuestionAnswering

        assert type(AutoModelForQuestionAnswering.from_pretrained(str(export))).__name__ == "BertForQuestionAnswering"

    # dtrain evaluate reproduces the run's test metrics from the export
    ev = run_cli("evaluate", "--model", str(tmp_path / "run"), "--data", str(data["test"]), "--output",
                 str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again[metric] == pytest.approx(report["test"][metric], abs=1e-6)


def test_predict_writes_one_line_per_input_for_each_task(tokenizer_dir, tmp_path):
    data = write_task("ner", tmp_path / "data", tokenizer_dir)
    finetune(tmp_path, tokenizer_dir, data, "task.type=token_classification")
    (tmp_path / "in.txt").write_text("the team of music was\n\nof the a\n")  # an empty line is a row too
    out = run_cli("predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt"), "--output",
                  str(tmp_path / "preds.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the team of music was", "", "of the a"]
    org = [e for e in rows[0]["entities"] if e["type"] == "ORG"]
    assert org and org[0]["text"].startswith("team") and org[0]["start"] == 4
    assert "the team of music was"[org[0]["start"]:org[0]["end"]] == org[0]["text"]
    assert rows[1]["entities"] == [] and rows[2]["entities"] == []
    again = run_cli("predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt"), "--output",
                    str(tmp_path / "preds.jsonl"))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
