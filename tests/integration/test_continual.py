"""Re-fine-tuning on a second domain with replay and the previous model as teacher (2 ranks), and a student built
from a teacher's layers (DeepSpeed ZeRO-2 in bf16, 2 ranks): what they stream, report, record and export."""

import json

import pytest

from dtrain.data.shards import ShardedDataset
from tests.integration.test_training import run, write_sentiment
from tests.ledger import read_ledger

COMMON = ["--config", "configs/finetune/debug.yaml", "data.max_seq_len=32", "logging.every_steps=1",
          "logging.progress_bar=false", "eval.every_steps=5"]


@pytest.fixture(scope="module")
def domains(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    (root / "movies").mkdir()
    (root / "shop").mkdir()
    movies = write_sentiment(root / "movies", tokenizer_dir)
    shop = write_sentiment(root / "shop", tokenizer_dir, pos="market", neg="court", sizes=(160, 32, 32), seed=1,
                           labels=str(movies["train"]))  # another domain: other signal words, the same labels
    return {"movies": movies, "shop": shop}


@pytest.fixture(scope="module")
def first(domains, tokenizer_dir, tmp_path_factory):
    """Stage 1: a finished run on the first domain."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    d = domains["movies"]
    result = run("dtrain.finetune", *COMMON, f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                 f"data.train={d['train']}", f"data.eval={d['dev']}", f"data.test={d['test']}",
                 "schedule.max_steps=30", "optim.lr=3e-3", "schedule.warmup=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_re_fine_tuning_with_replay_and_the_previous_model_as_teacher(domains, first, tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dtrain.methods import replay

    movies, shop = domains["movies"], domains["shop"]
    run_dir = tmp_path / "second"
    result = run("dtrain.finetune", *COMMON, f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                 f"data.train={shop['train']}", f"data.eval={shop['dev']}", f"data.test={shop['test']}",
                 f"model.init_from={first}", "continual.replay_fraction=0.5", "continual.distill_weight=1.0",
                 f"data.eval_extra={{movies: {movies['test']}}}", "logging.ledger=true",
                 "schedule.max_steps=15", "data.drop_last=false",  # one epoch: 240 rows, global batch 16
                 "data.micro_batch_size=8", nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "dtrain: replay: 160 rows of" in log and "+ 80 replayed rows (80 distinct)" in log
    assert f"dtrain: teacher {first} (frozen, eval mode): loss = 1·(task loss) + 1·T²·KL" in log
    # one epoch of the mix: every new row and every replayed row exactly once over both ranks
    ledger = read_ledger(run_dir)
    ids = sorted(i for records in ledger.values() for _, batch in records for i in batch)
    assert ids == list(range(160 + 80))
    # the old domain's test set in the report, status.json, every evaluation and TensorBoard
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["extra"]) == {"movies"} and 0 <= report["extra"]["movies"]["accuracy"] <= 1
    assert "confusion_matrix" in report["extra"]["movies"] and "accuracy" in report["test"]
    assert all("movies/accuracy" in h for h in report["eval_history"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["extra"]["movies"]["accuracy"] == report["extra"]["movies"][
        "accuracy"]
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/distill_loss", "train/cls_loss", "eval/movies/accuracy", "extra/movies/accuracy",
            "test/accuracy"} <= tags
    assert all(e.value > 0 for e in events.Scalars("train/distill_loss"))
    # what it trained on, for the next stage: the new set, and the set it replayed
    record = json.loads((run_dir / "data.json").read_text())
    assert record["train"]["path"] == str(shop["train"].resolve()) and record["train"]["replayed_rows"] == 80
    assert [r["path"] for r in record["train"]["replayed"]] == [str(movies["train"].resolve())]
    assert record["extra/movies"]["manifest_sha256"] == ShardedDataset(movies["test"]).record()["manifest_sha256"]
    assert [s["path"] for s in replay.recorded_sources(str(run_dir))] == [str(shop["train"].resolve()),
                                                                          str(movies["train"].resolve())]


def test_a_student_of_the_teachers_layers_trains_under_zero2_bf16_and_predicts(domains, first, tokenizer_dir, tmp_path):
    from transformers import pipeline

    import dtrain

    movies = domains["movies"]
    teacher_files = {p.relative_to(first): p.read_bytes() for p in (first / "export").rglob("*") if p.is_file()}
    run_dir = tmp_path / "student"
    result = run("dtrain.finetune", *COMMON, f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                 f"data.train={movies['train']}", f"data.eval={movies['dev']}", f"data.test={movies['test']}",
                 f"distill.teacher={first}", "distill.student_layers=[1]", "distill.alpha=0.0",
                 "distill.temperature=1.0", "schedule.max_steps=10", "parallel.engine=deepspeed",
                 "parallel.zero_stage=2", "precision.dtype=bf16", nproc=2, timeout=600)  # a bf16 teacher
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "export" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["id2label"] == {"0": "neg", "1": "pos"}
    status = json.loads((run_dir / "status.json").read_text())
    assert status["model"]["name_or_path"] == str(first)  # where its weights started: the teacher
    assert {p.relative_to(first): p.read_bytes() for p in (first / "export").rglob("*") if p.is_file()} == \
        teacher_files  # the teacher untouched
    texts = ["the growth of the year", "police and the court"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "pred.jsonl"
    predicted = run("dtrain", "predict", "--model", str(run_dir), "--input", str(tmp_path / "in.txt"), "--output",
                    str(out))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    classify = pipeline("text-classification", model=dtrain.load_model(run_dir / "export"),
                        tokenizer=str(run_dir / "export"))
    assert [r["label"] for r in classify(texts)] == labels
    # `dtrain export` of the kept checkpoint builds the student's architecture (the teacher's config, 1 layer)
    kept = json.loads((run_dir / "report.json").read_text())["model_step"]
    exported = run("dtrain", "export", str(run_dir / "checkpoints" / f"step-{kept:08d}"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    from safetensors.torch import load_file

    ours, theirs = load_file(tmp_path / "hf" / "model.safetensors"), load_file(run_dir / "export" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours)
