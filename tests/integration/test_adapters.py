"""Bottleneck adapters through the entry point: a 2-rank DeepSpeed ZeRO-2 adapter run (the base frozen) on a model
fine-tuned before (model.init_from: on a random-init tiny BERT the frozen random attention cannot route the toy
task's word to [CLS], so adapters alone do not learn it; bench/adapters.py measures them on real MiniLM); its export
(at the end of the run, and `dtrain export` from its checkpoint) carries the adapters, and `dtrain evaluate`,
`dtrain predict` and pipeline(dtrain.load_model(...)) predict exactly what the run's own test evaluation did."""

import json
import re

import pytest

from tests.conftest import run_cli
from tests.integration.test_training import run, write_sentiment


@pytest.mark.parametrize("variant", ["houlsby"])
def test_an_adapter_run_trains_exports_and_predicts_what_it_evaluated(variant, tokenizer_dir, tmp_path):
    data = write_sentiment(tmp_path, tokenizer_dir)

    def finetune(run_dir, *extra, nproc=1):
        result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                     f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
                     f"run_dir={run_dir}", "data.max_seq_len=32", "data.micro_batch_size=8",
                     "logging.progress_bar=false", *extra, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    finetune(tmp_path / "full", "optim.lr=2e-3", "schedule.max_steps=40", "checkpoint.export=true")
    run_dir = tmp_path / "run"
    result = finetune(run_dir, f"model.init_from={tmp_path / 'full'}", "parallel.engine=deepspeed",
                      "parallel.zero_stage=2", "precision.dtype=fp32", "peft.method=adapter",
                      f"peft.adapter_variant={variant}", "peft.adapter_reduction_factor=4", "optim.lr=1e-2",
                      "schedule.max_steps=30", "eval.every_steps=15", nproc=2)
    share = re.search(r"trainable parameters: [\d,]+ of [\d,]+ \(([\d.]+)%\)", result.stderr)
    assert share and float(share.group(1)) < 5, result.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["test"]["accuracy"] >= 0.8, report["test"]
    matrix = report["test"]["confusion_matrix"]
    assert matrix[0][0] and matrix[1][1], matrix  # both labels predicted: the comparisons below mean something
    export = run_dir / "export"
    assert (export / "dtrain_adapters.safetensors").is_file() and (export / "dtrain_adapters.json").is_file()
    from safetensors.torch import load_file

    assert any(float(v.abs().sum()) > 0 for k, v in load_file(str(export / "dtrain_adapters.safetensors")).items()
               if ".adapter.up." in k)  # trained: no longer the identity
    offline = run_cli("export", str(run_dir), str(tmp_path / "offline"))  # from the checkpoint (ZeRO-2 partitions)
    assert offline.returncode == 0, offline.stderr[-2000:]

    evaluated = run_cli("evaluate", "--model", str(run_dir), "--data", str(data["test"]), "--output",
                        str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["accuracy"] == report["test"]["accuracy"]
    assert again["confusion_matrix"] == report["test"]["confusion_matrix"]

    texts = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    predicted = run_cli("predict", "--model", str(run_dir), "--input", str(tmp_path / "test.jsonl"), "--output",
                        str(tmp_path / "preds.jsonl"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    right = sum(p == t["label"] for p, t in zip(labels, texts, strict=True))
    assert right / len(texts) == pytest.approx(report["test"]["accuracy"])

    from transformers import pipeline

    import dtrain

    for source in (run_dir, tmp_path / "offline"):
        classify = pipeline("text-classification", model=dtrain.load_model(source), tokenizer=str(export), device=-1)
        assert [out["label"] for out in classify([t["text"] for t in texts])] == labels, source


def test_frozen_weights_survive_a_zero1_bf16_export_and_an_adapter_export_seeds_later_runs(tokenizer_dir, tmp_path):
    """ZeRO-1 saves no frozen parameters with its partitions (DeepSpeed saves them from stage 2 on): the export takes
    them from the module states, so the frozen base is there (bf16-rounded), not re-initialised at random. A run
    that starts from an adapter export (model.init_from) keeps the adapters, and `dtrain export` rebuilds it so."""
    import torch

    import dtrain

    data = write_sentiment(tmp_path, tokenizer_dir)

    def finetune(run_dir, *extra):
        result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                     f"data.eval={data['dev']}", "data.test=null", f"model.tokenizer={tokenizer_dir}",
                     f"run_dir={run_dir}", "data.max_seq_len=32", "logging.progress_bar=false", *extra)
        assert result.returncode == 0, result.stderr[-3000:]

    finetune(tmp_path / "full", "optim.lr=2e-3", "schedule.max_steps=10")
    finetune(tmp_path / "adapted", f"model.init_from={tmp_path / 'full'}", "peft.method=adapter",
             "parallel.engine=deepspeed", "parallel.zero_stage=1", "precision.dtype=bf16", "schedule.max_steps=6")
    base, adapted = dtrain.load_model(tmp_path / "full"), dtrain.load_model(tmp_path / "adapted")
    for name, weight in base.state_dict().items():
        if not name.startswith("classifier.") and "LayerNorm" not in name:  # the frozen part
            torch.testing.assert_close(adapted.state_dict()[name], weight, rtol=1e-2, atol=1e-2, msg=name)
    finetune(tmp_path / "again", f"model.init_from={tmp_path / 'adapted'}", "schedule.max_steps=4")
    again = dtrain.load_model(tmp_path / "again")
    assert hasattr(again.bert.encoder.layer[0].output, "adapter")  # the adapters came along and trained in full
    offline = run_cli("export", str(tmp_path / "again"), str(tmp_path / "offline"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    torch.testing.assert_close(dtrain.load_model(tmp_path / "offline").state_dict(), again.state_dict())
