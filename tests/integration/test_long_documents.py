"""Long documents end to end on a tiny BERT: texts whose label word sits at their end, in windows of 16 tokens.
Training sees windows (each weighed 1/windows); the test report, TensorBoard's test metrics, `dtrain evaluate` and
`dtrain predict` count documents, not windows; the export remembers how it reads texts (config.json)."""

import json

import pytest
import torch
import transformers

from dtrain.data.shards import ShardedDataset
from dtrain.data.windows import Cut
from dtrain.model.tokenizer import load_tokenizer
from tests.conftest import WORDS, run_cli
from tests.integration.test_training import run, write_sentiment


def test_windowed_classification_learns_the_end_and_reports_and_predicts_per_document(tokenizer_dir, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_sentiment(tmp_path / "data", tokenizer_dir, sizes=(160, 32, 32), length=(20, 45), at_end=True,
                           max_seq_len=16, windows=True, doc_stride=4)
    test_windows = ShardedDataset(data["test"]).manifest
    assert test_windows["documents"] == 32 and test_windows["rows"] > 64  # 2-5 windows per document
    # the command line says what it cut: documents, windows and those cut at --max-windows
    prepared = run_cli("prepare", "finetune", str(tmp_path / "data" / "test.jsonl"), "--out", str(tmp_path / "cap"),
                       "--tokenizer", str(tokenizer_dir), "--max-seq-len", "16", "--windows", "--doc-stride", "4",
                       "--max-windows", "2", "--labels", str(data["train"]), "--workers", "1")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    capped = ShardedDataset(tmp_path / "cap").manifest
    assert capped["truncated_documents"] > 0 and capped["rows"] <= 64
    assert f"(32 documents in windows of 16, {capped['truncated_documents']} cut at --max-windows 2)" in \
        prepared.stdout

    run_dir = tmp_path / "run"
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                 f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={run_dir}", "schedule.max_steps=120", "eval.every_steps=40", "optim.lr=2e-3",
                 "data.micro_batch_size=16", "logging.progress_bar=false", "data.max_seq_len=16", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())["test"]
    assert report["documents"] == 32 and report["windows"] == test_windows["rows"]
    assert report["accuracy"] >= 0.8, report  # the label word is only in a document's last window (head: chance)
    assert sum(report["confusion_matrix"][0]) + sum(report["confusion_matrix"][1]) == 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("test/documents")] == [32.0]

    saved = json.loads((run_dir / "export" / "config.json").read_text())["dtrain_text"]
    assert saved == {"truncation": "head", "head_share": 0.25, "windows": True, "stride": 4, "max_windows": None,
                     "max_seq_len": 16, "pooling": None}

    # predict: one row per input row, however many windows (the first text has exactly 3 at 16 tokens)
    tok = load_tokenizer(str(tokenizer_dir))
    long_pos = " ".join(WORDS[i % 40] for i in range(24)) + " growth"  # 30 tokens
    long_neg = " ".join(WORDS[(i + 5) % 40] for i in range(24)) + " police"
    assert Cut(windows=True, stride=4).encode(tok, [long_pos], None, 16)["windows"] == [3, 3, 3]
    rows = [{"text": long_pos}, {"text": "the police"}, {"text": long_neg}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_cli("predict", "--model", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
                  str(tmp_path / "preds.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == [r["text"] for r in rows]
    # each long row's probabilities are the mean of its windows' (task.window_pooling null = mean), by the model
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(run_dir / "export")).eval()
    enc = Cut(windows=True, stride=4).encode(tok, [long_pos, long_neg], None, 16)
    with torch.no_grad():
        probs = torch.cat([model(input_ids=torch.tensor([ids])).logits.softmax(-1) for ids in enc["input_ids"]])
    names = [model.config.id2label[i] for i in range(probs.shape[1])]
    for row, doc in ((0, 0), (2, 1)):
        want = probs[[i for i, d in enumerate(enc["doc"]) if d == doc]].mean(0)
        assert [preds[row]["probabilities"][n] for n in names] == pytest.approx(want.tolist(), abs=1e-3), preds[row]
        assert preds[row]["label"] == names[int(want.argmax())]
    assert preds[1]["label"] == "neg", preds  # a short text holding the neg word

    # a window that would not advance past what consecutive windows share is refused, naming the option
    bad = run_cli("predict", "--model", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
                  str(tmp_path / "bad.jsonl"), "--max-seq-len", "8", "--text-pair-field", "text")
    assert bad.returncode == 2 and not (tmp_path / "bad.jsonl").exists()
    assert bad.stderr.strip().splitlines()[-1] == (
        "dtrain: error: --max-seq-len 8 with --text-pair-field (half the window for the pair): a window would hold 3 "
        f"tokens of text, but the model {run_dir / 'export'} reads windows sharing 4; pass --max-seq-len 16 (its "
        "training length) or leave it out")

    # evaluate pools as trained, or as --window-pooling says; per document either way
    for extra in ((), ("--window-pooling", "max")):
        ev = run_cli("evaluate", "--model", str(run_dir / "export"), "--data", str(data["test"]), "--output",
                     str(tmp_path / f"eval{len(extra)}.json"), *extra)
        assert ev.returncode == 0, ev.stderr[-2000:]
        again = json.loads((tmp_path / f"eval{len(extra)}.json").read_text())
        assert again["documents"] == 32 and again["accuracy"] >= 0.8
        if not extra:
            assert again["accuracy"] == report["accuracy"]
