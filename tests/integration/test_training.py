"""The training core on CPU: debug runs, resume and accumulation equivalence, fp16 loss scaling, TensorBoard,
export to Hugging Face, one-line errors for bad combinations."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtrain.config import OptimConfig, PrecisionConfig
from dtrain.distributed import DistEnv
from dtrain.engine.base import EngineSections
from dtrain.engine.ddp import DDPEngine

REPO = Path(__file__).resolve().parents[2]
STEP = re.compile(r"^step (\d+)/\d+ (.*)$")


def run(module, *args, nproc=1, timeout=600):
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               module, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL)


def losses(result):
    """{step: loss} from the one-line summaries (logging.every_steps=1)."""
    out = {}
    for line in (result.stdout + result.stderr).splitlines():
        m = STEP.match(line.strip())
        if m:
            fields = dict(kv.split("=") for kv in m.group(2).split())
            out[int(m.group(1))] = float(fields["loss"])
    return out


def pretrain_args(corpus_data, tokenizer_dir, run_dir, *extra):
    return ["--config", "configs/pretrain/debug.yaml", f"data.train={corpus_data / 'train'}",
            f"data.eval={corpus_data / 'eval'}", f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
            "data.max_seq_len=64", "data.micro_batch_size=8", "schedule.grad_accum_steps=1", "logging.every_steps=1",
            "logging.progress_bar=false", "model.dropout=0.0", *extra]


def test_debug_pretrain_learns_checkpoints_logs_and_exports(corpus_data, tokenizer_dir, tmp_path):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "run", "--debug",
                                                   "optim.lr=3e-3", "schedule.warmup=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = losses(result)
    assert sorted(per_step) == list(range(1, 21))
    assert sum(per_step[s] for s in range(16, 21)) < sum(per_step[s] for s in range(1, 6))  # it learns
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000020"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000020"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/lr", "train/grad_norm",
                "train/skipped_steps", "train/samples_per_s", "train/tokens_per_s", "train/mfu", "eval/mlm_loss"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in events.Scalars("eval/mlm_loss")] == [0, 10, 20]  # a baseline before training
    assert events.Scalars("train/loss")[4].value == pytest.approx(per_step[5], rel=1e-4)
    from transformers import AutoModelForPreTraining

    model = AutoModelForPreTraining.from_pretrained(run_dir / "export")
    state = torch.load(run_dir / "checkpoints" / "step-00000020" / "engine.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_resume_gives_the_same_losses_and_weights(corpus_data, tokenizer_dir, tmp_path):
    common = ("schedule.max_steps=8", "checkpoint.every_steps=100", "data.eval=null", "checkpoint.export=false",
              "model.dropout=null")  # dropout as the model has it (on): resume restores its random stream exactly
    straight = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "a", *common))
    first = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common,
                                                  "schedule.stop_at_step=4"))
    second = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common))
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b1, b2 = losses(straight), losses(first), losses(second)
    assert sorted(b1) == [1, 2, 3, 4] and sorted(b2) == [5, 6, 7, 8]
    for step in range(1, 9):
        assert (b1 | b2)[step] == pytest.approx(a[step], abs=1e-6), step
    wa = torch.load(tmp_path / "a/checkpoints/step-00000008/engine.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/step-00000008/engine.pt", weights_only=False)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    trainer = json.loads((tmp_path / "b/checkpoints/step-00000008/trainer.json").read_text())
    assert trainer["stream"]["position"] == 8 * 8 and trainer["step"] == 8


def test_accumulation_and_ranks_split_the_same_global_batch(corpus_data, tokenizer_dir, tmp_path):
    # dropout stays off (pretrain_args): other splits of a batch legitimately draw other dropout masks
    common = ("schedule.max_steps=4", "data.eval=null", "checkpoint.export=false", "data.micro_batch_size=8")
    one = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "one", *common))
    accum = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "accum", *common,
                                                  "data.micro_batch_size=4", "schedule.grad_accum_steps=2"))
    ranks = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "ranks", *common,
                                                  "data.micro_batch_size=4"), nproc=2)
    for r in (one, accum, ranks):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = losses(one), losses(accum), losses(ranks)
    assert sorted(a) == sorted(b) == sorted(c) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
        assert c[step] == pytest.approx(a[step], abs=1e-5)


def test_fp16_overflow_skips_exactly_that_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    fp16 = PrecisionConfig(dtype="fp16", initial_loss_scale_power=10)
    sections = EngineSections(fp16, OptimConfig(max_grad_norm=1.0))
    engine = DDPEngine(model, opt, sched, env, sections)

    def loss_of(scale):
        out = engine.forward(lambda m, b: {"y": m(b["x"])}, {"x": torch.ones(3, 4)})
        return out["y"].float().sum() * scale

    engine.backward(loss_of(1.0))
    info = engine.step()
    assert not info.skipped and info.loss_scale == 1024.0
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(loss_of(float("inf")))  # an injected inf gradient
    info = engine.step()
    assert info.skipped and info.loss_scale == 512.0 and sched.last_epoch == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    engine.backward(loss_of(1.0))
    info = engine.step()
    assert not info.skipped and all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_combinations_fail_at_start_in_one_line(corpus_data, tokenizer_dir, tmp_path):
    cases = [("schedule.grad_accum_steps=0", "schedule.grad_accum_steps: must be >= 1"),
             ("parallel.zero_stage=4", "parallel.zero_stage: expected one of 0, 1, 2, 3"),
             ("parallel.engine=ddp parallel.zero_stage=2", "needs parallel.engine=deepspeed"),
             ("parallel.engine=deepspeed precision.dtype=fp16", "DeepSpeed refuses fp16 on a CPU"),
             ("precision.dtype=fp8", "precision.dtype: expected one of 'fp32', 'bf16', 'fp16'")]
    for overrides, message in cases:
        result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "x", "--debug",
                                                       *overrides.split()))
        errors = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (overrides, result.stderr[-2000:])


def test_resume_into_a_different_model_shape_is_refused(corpus_data, tokenizer_dir, tmp_path):
    first = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "r", "schedule.max_steps=2",
                                                  "data.eval=null", "checkpoint.export=false"))
    assert first.returncode == 0, first.stderr[-2000:]
    other = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "r", "schedule.max_steps=4",
                                                  "data.eval=null", "model.name_or_path=preset:bert-base-uncased"))
    errors = [line for line in other.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert other.returncode == 2 and len(errors) == 1, other.stderr[-2000:]
    assert "does not fit this model/optimizer" in errors[0] and "checkpoint.resume=none" in errors[0]


def write_sentiment(root, tokenizer_dir, pos="growth", neg="police", sizes=(240, 48, 48), seed=0, labels=None,
                    length=(3, 12), at_end=False, max_seq_len=32, **prepare):
    """A learnable toy sentiment task ("growth" → pos, "police" → neg), prepared as train/dev/test shards (dev and
    test with the training set's label map; all three with `labels`' when given: another domain of the same task).
    `length`: the range of filler words per text; at_end: the keyword among the last 3 words (long documents);
    `prepare`: more prepare_finetune options (windows=True, ...)."""
    import random

    from dtrain.tasks import prepare_finetune
    from tests.conftest import WORDS

    rng = random.Random(seed)
    for split, n in zip(("train", "dev", "test"), sizes, strict=True):
        rows = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(*length))]
            at = rng.randint(max(len(words) - 2, 0) if at_end else 0, len(words))
            words.insert(at, pos if label == "pos" else neg)
            rows.append(json.dumps({"text": " ".join(words), "label": label}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        prepare_finetune([str(root / f"{split}.jsonl")], root / split, str(tokenizer_dir), max_seq_len=max_seq_len,
                         workers=1, labels=labels or (None if split == "train" else str(root / "train")), **prepare)
    return {split: root / split for split in ("train", "dev", "test")}


def test_finetune_classification_reports_and_exports_a_pipeline_model(tokenizer_dir, tmp_path):
    write_sentiment(tmp_path, tokenizer_dir)
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={tmp_path / 'train'}",
                 f"data.eval={tmp_path / 'dev'}", f"data.test={tmp_path / 'test'}", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={tmp_path / 'run'}", "schedule.max_steps=60", "eval.every_steps=30",
                 "optim.lr=2e-3", "data.micro_batch_size=16", "logging.progress_bar=false", "data.max_seq_len=32")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())["test"]
    assert report["accuracy"] > 0.9 and set(report) >= {"loss", "accuracy", "macro_f1"}
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path / "run" / "export"))
    assert classify("the market had growth")[0]["label"] == "pos"
    assert classify("the police was new")[0]["label"] == "neg"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_ddp_mixed_precision_on_two_ranks_learns(corpus_data, tokenizer_dir, tmp_path, dtype):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, "schedule.max_steps=12",
                                                   "data.micro_batch_size=4", "data.eval=null", "optim.lr=3e-3",
                                                   "schedule.warmup=0", "checkpoint.export=false",
                                                   f"precision.dtype={dtype}"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = losses(result)
    assert sorted(per_step) == list(range(1, 13))
    assert sum(per_step[s] for s in (10, 11, 12)) < sum(per_step[s] for s in (1, 2, 3))
    if dtype == "fp16":
        assert "loss_scale=" in result.stdout + result.stderr


def test_ddp_resume_at_another_world_size_continues_the_same_run(corpus_data, tokenizer_dir, tmp_path):
    """Stop a 2-rank run (micro 4) at step 2 and finish it on 1 rank (micro 8): the same global batches, the same
    losses as an uninterrupted 1-rank run."""
    # dropout stays off (pretrain_args): 2 ranks of 4 and 1 of 8 legitimately draw other dropout masks
    common = ("schedule.max_steps=4", "data.eval=null", "checkpoint.export=false")
    straight = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "a", *common,
                                                     "data.micro_batch_size=8"))
    first = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common,
                                                  "data.micro_batch_size=4", "schedule.stop_at_step=2"), nproc=2)
    second = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common,
                                                   "data.micro_batch_size=8"))
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(straight), losses(first) | losses(second)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


def test_a_nan_without_loss_scaling_stops_with_the_step_and_saves_nothing(corpus_data, tokenizer_dir, tmp_path):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, "schedule.max_steps=6",
                                                   "data.eval=null", "optim.lr=1e30", "schedule.warmup=0",
                                                   "optim.max_grad_norm=null", "checkpoint.every_steps=1"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert re.match(r"dtrain: error: step \d+: (the gradient norm is|the loss is) (nan|inf)", errors[0]), errors[0]
    step = int(re.search(r"step (\d+)", errors[0]).group(1))
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert all(int(name.split("-")[1]) < step for name in saved)  # nothing from the diverged step on
    last_good = f"last good checkpoint: {tmp_path / 'checkpoints' / saved[-1]}" if saved else "no checkpoint was saved"
    assert last_good in errors[0], errors[0]
