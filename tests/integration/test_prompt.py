"""Cloze prompts through the commands: few-shot prompt fine-tuning (task.type=prompt) under torchrun with 2 ranks,
its export (a BertForMaskedLM whose config.json carries the template and verbalizer) evaluated and predicted by
`dtrain evaluate` / `dtrain predict` exactly as the run's own test evaluation did, `dtrain export` of its checkpoint,
and zero-shot `dtrain evaluate/predict --prompt` on a model with an MLM head and no training at all."""

import json

import pytest

from tests.conftest import run_cli
from tests.integration.test_training import run, write_sentiment

PROMPT = ("task.type=prompt", "task.template={text} it was [MASK].", "task.verbalizer={pos: [new], neg: [first]}")


def _labels(path):
    return [json.loads(line)["label"] for line in path.read_text().splitlines()]


def test_a_prompt_run_trains_exports_and_predicts_what_it_evaluated(tokenizer_dir, tmp_path):
    data = write_sentiment(tmp_path, tokenizer_dir)
    run_dir = tmp_path / "run"
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                 f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={run_dir}", "data.max_seq_len=32", "data.micro_batch_size=8", "optim.lr=2e-3",
                 "schedule.max_steps=30", "eval.every_steps=15", "logging.progress_bar=false", *PROMPT, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for prompt:" in result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "prompt" and report["test"]["accuracy"] >= 0.9, report["test"]
    matrix = report["test"]["confusion_matrix"]
    assert matrix[0][0] and matrix[1][1], matrix  # both labels predicted: the comparisons below mean something
    config = json.loads((run_dir / "export" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    assert config["dtrain_prompt"] == {"template": "{text} it was [MASK].",
                                       "verbalizer": {"neg": ["first"], "pos": ["new"]}}

    evaluated = run_cli("evaluate", "--model", str(run_dir), "--data", str(data["test"]), "--output",
                        str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["accuracy"] == report["test"]["accuracy"]
    assert again["confusion_matrix"] == report["test"]["confusion_matrix"]
    predicted = run_cli("predict", "--model", str(run_dir), "--input", str(tmp_path / "test.jsonl"), "--output",
                        str(tmp_path / "preds.jsonl"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    truth = _labels(tmp_path / "test.jsonl")
    labels = _labels(tmp_path / "preds.jsonl")
    assert sum(p == t for p, t in zip(labels, truth, strict=True)) / len(truth) == pytest.approx(
        report["test"]["accuracy"])

    offline = run_cli("export", str(run_dir / "checkpoints" / f"step-{report['model_step']:08d}"),
                      str(tmp_path / "offline"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert json.loads((tmp_path / "offline" / "config.json").read_text())["dtrain_prompt"] == config["dtrain_prompt"]
    run_cli("predict", "--model", str(tmp_path / "offline"), "--input", str(tmp_path / "test.jsonl"), "--output",
            str(tmp_path / "offline.jsonl"))
    assert _labels(tmp_path / "offline.jsonl") == labels

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(run_dir / "export"), device=-1)  # the export is a plain MLM model
    words = [out["token_str"] for out in fill("the market had growth it was [MASK].", targets=["new", "first"])]
    assert words[0] == "new"  # the verbalizer word of pos, as the prompt classifier says


def test_zero_shot_evaluate_and_predict_need_no_training(tokenizer_dir, tmp_path):
    """A pretraining model (BertForPreTraining, as `dtrain pretrain` exports it) with a --prompt file: evaluate and
    predict agree on every example, labels in the data's order; a classifier without an MLM head is refused."""
    import torch
    from transformers import AutoTokenizer, BertForPreTraining

    from dtrain.model.presets import preset_config

    data = write_sentiment(tmp_path, tokenizer_dir)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    mlm = tmp_path / "pretrained"
    BertForPreTraining(preset_config("tiny", vocab_size=tok.vocab_size)).save_pretrained(str(mlm))
    tok.save_pretrained(str(mlm))
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text('template: "{text} it was [MASK]."\nverbalizer: {pos: [new, more], neg: first}\n')

    evaluated = run_cli("evaluate", "--model", str(mlm), "--data", str(data["test"]), "--prompt", str(prompt),
                        "--output", str(tmp_path / "zero.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "zero.json").read_text())
    assert report["prompt"] == str(prompt) and list(report["per_class"]) == ["neg", "pos"]
    predicted = run_cli("predict", "--model", str(mlm), "--prompt", str(prompt), "--input",
                        str(tmp_path / "test.jsonl"), "--output", str(tmp_path / "zero.jsonl"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "zero.jsonl").read_text().splitlines()]
    assert set(rows[0]["probabilities"]) == {"pos", "neg"}
    right = sum(r["label"] == t for r, t in zip(rows, _labels(tmp_path / "test.jsonl"), strict=True))
    assert right / len(rows) == pytest.approx(report["accuracy"])

    classifier = tmp_path / "classifier"
    run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
        "data.eval=null", "data.test=null", f"model.tokenizer={tokenizer_dir}", f"run_dir={classifier}",
        "data.max_seq_len=32", "schedule.max_steps=2", "logging.progress_bar=false")
    refused = run_cli("evaluate", "--model", str(classifier), "--data", str(data["test"]), "--prompt", str(prompt))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"dtrain: error: {classifier}/export has no trained MLM head (cls.predictions.transform is not in its "
        f"weights), and a prompt task scores the verbalizer words with it; continue pretraining it first (python -m "
        f"dtrain.pretrain, e.g. configs/pretrain/minilm_bbc_mlm.yaml) and use that run's export")
