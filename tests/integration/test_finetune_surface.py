"""The fine-tuning surface around the heads: early stopping, the best checkpoint, continued fine-tuning
(model.init_from), PEFT through the entry point, and one-line errors for bad input."""

import json

import pytest

from tests.conftest import run_cli
from tests.integration.test_training import run, write_sentiment

BASE = ("logging.progress_bar=false", "data.max_seq_len=32", "data.micro_batch_size=16", "data.num_workers=0")


def finetune(tmp_path, tokenizer_dir, data, run_dir, *extra):
    return run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
               f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
               f"run_dir={run_dir}", *BASE, *extra)


@pytest.fixture
def sentiment(tokenizer_dir, tmp_path):
    return write_sentiment(tmp_path, tokenizer_dir)


def test_early_stopping_stops_at_the_evaluation_that_runs_out_of_patience(sentiment, tokenizer_dir, tmp_path):
    # a learning rate too small to change accuracy: the step-0 baseline stays best, the 2nd later eval stops
    result = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", "optim.lr=1e-12",
                      "schedule.max_steps=100", "eval.every_steps=10", "early_stopping.patience=2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [h["step"] for h in report["eval_history"]] == [0, 10, 20]
    assert report["steps"] == 20 and "early stopping: accuracy has not improved for 2 evaluations" in result.stdout
    # the step-0 baseline counts for patience but is never the model kept: the best trained one (step 10) is
    assert report["baseline"] == report["eval_history"][0]["accuracy"] and "never the model kept" in report["selection"]
    assert (report["best_step"], report["model_step"]) == (10, 10)
    assert report["best"] == report["eval_history"][1]["accuracy"]


def test_the_best_checkpoint_is_kept_tested_and_exported(sentiment, tokenizer_dir, tmp_path):
    result = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", "optim.lr=2e-3", "schedule.max_steps=60",
                      "eval.every_steps=10", "eval.metric=loss", "checkpoint.keep_last=1", "checkpoint.every_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    history = report["eval_history"]
    best = min(history, key=lambda h: (h["loss"], h["step"]))
    assert report["metric"] == "loss" and report["best"] == pytest.approx(best["loss"])
    ckpts = tmp_path / "run" / "checkpoints"
    if best["step"] > 0:
        assert (ckpts / "best").read_text().strip() == f"step-{best['step']:08d}"
        assert (ckpts / f"step-{best['step']:08d}").is_dir() and report["model_step"] == best["step"]
    assert (ckpts / "step-00000060").is_dir()  # the rolling one (keep_last=1) beside the best
    ev = run_cli("evaluate", "--model", str(tmp_path / "run"), "--data", str(sentiment["dev"]))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert f"loss{'':>1}" in ev.stdout or "loss" in ev.stdout


def test_continued_fine_tuning_from_a_run_and_label_map_checks(sentiment, tokenizer_dir, tmp_path):
    first = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "a", "optim.lr=2e-3", "schedule.max_steps=40")
    assert first.returncode == 0, first.stderr[-3000:]
    acc = json.loads((tmp_path / "a" / "report.json").read_text())["test"]["accuracy"]
    again = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "b", f"model.init_from={tmp_path / 'a'}",
                     "optim.lr=1e-12", "schedule.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["eval_history"][0]["accuracy"] > 0.8 and report["test"]["accuracy"] == pytest.approx(acc)

    # new data with a third label: refused unless extended explicitly
    from dtrain.tasks import prepare_finetune

    rows = [json.dumps({"text": t, "label": lab}) for t, lab in
            [("the growth market", "pos"), ("the police report", "neg"), ("the a of", "neutral")] * 40]
    (tmp_path / "new.jsonl").write_text("\n".join(rows) + "\n")
    prepare_finetune([str(tmp_path / "new.jsonl")], tmp_path / "new", str(tokenizer_dir), max_seq_len=32, workers=1)
    args = [f"data.train={tmp_path / 'new'}", "data.eval=null", "data.test=null", f"model.init_from={tmp_path / 'a'}",
            "schedule.max_steps=4"]
    refused = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "c", *args)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert "model.init_from" in errors[0] and "task.extend_labels=true" in errors[0]
    assert not (tmp_path / "c" / "checkpoints").exists()
    grown = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "d", *args, "task.extend_labels=true")
    assert grown.returncode == 0, grown.stderr[-3000:]
    config = json.loads((tmp_path / "d" / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}


@pytest.mark.parametrize("method", ["lora", "bitfit", "prompt_tuning"])
def test_peft_through_the_entry_point_trains_and_exports(method, sentiment, tokenizer_dir, tmp_path):
    result = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", f"peft.method={method}",
                      "optim.lr=5e-3", "schedule.max_steps=40")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable parameters:" in result.stderr
    if method == "prompt_tuning":  # virtual tokens cannot be merged: the export is a peft adapter dir
        assert (tmp_path / "run" / "export" / "adapter_config.json").is_file()
        return
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path / "run" / "export"))
    assert classify("the market had growth")[0]["label"] in ("pos", "neg")
    files = {p.name for p in (tmp_path / "run" / "export").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files


def test_bad_input_gets_one_line_errors(sentiment, tokenizer_dir, tmp_path):
    # a LoRA target module that does not exist
    result = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", "peft.method=lora",
                      "peft.lora_target_modules=[qkv]", "schedule.max_steps=2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "'qkv'" in errors[0], result.stderr[-2000:]
    # a test set prepared with its own label map (a label the model does not know)
    rows = [json.dumps({"text": "the growth", "label": lab}) for lab in ("pos", "neg", "meh")]
    (tmp_path / "odd.jsonl").write_text("\n".join(rows) + "\n")
    from dtrain.tasks import prepare_finetune

    prepare_finetune([str(tmp_path / "odd.jsonl")], tmp_path / "odd", str(tokenizer_dir), max_seq_len=32, workers=1)
    result = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run2", f"data.test={tmp_path / 'odd'}",
                      "schedule.max_steps=2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "data.test" in errors[0] and "'meh'" in errors[0] and "--labels" in errors[0]
    # the pair field missing from a pair task's file; NER tags that are not BIO
    (tmp_path / "pairs.csv").write_text("premise,label\nthe growth,pos\n")
    out = run_cli("prepare", "finetune", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "p"), "--tokenizer",
                  str(tokenizer_dir), "--text-field", "premise", "--text-pair-field", "hypothesis")
    assert out.returncode == 2 and "no column 'hypothesis'" in out.stderr and "--text-pair-field" in out.stderr
    (tmp_path / "bad.conll").write_text("the\tO\nteam\tE-ORG\n")
    out = run_cli("prepare", "finetune", str(tmp_path / "bad.conll"), "--out", str(tmp_path / "n"), "--tokenizer",
                  str(tokenizer_dir))
    assert out.returncode == 2 and "line 2: tag 'E-ORG' is not BIO" in out.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "n").exists()


def test_a_run_stopped_for_resume_writes_no_report_until_it_finishes(sentiment, tokenizer_dir, tmp_path):
    args = ("optim.lr=2e-3", "schedule.max_steps=20", "eval.every_steps=10")
    first = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", *args, "schedule.stop_at_step=10")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "saving at step 10 and stopping" in first.stdout
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "export").exists()
    second = finetune(tmp_path, tokenizer_dir, sentiment, tmp_path / "run", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 20 and [h["step"] for h in report["eval_history"]] == [0, 10, 20]
