"""DeepSpeed ZeRO 0–3 under `torchrun --nproc_per_node=2` on CPU (gloo): the same losses as DDP in fp32, bf16
runs, exact resume, a ZeRO-3 model built partitioned (zero.Init), and a ZeRO-3 export that Hugging Face loads with
the weights DDP reaches. The comparisons with DDP start from a checkpoint dir: a random-init preset is built by
transformers' ZeRO-3 initialisation under ZeRO-3, whose draws differ from the plain model's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.test_training import losses, pretrain_args, run

STEPS = ("schedule.max_steps=4", "data.micro_batch_size=4", "data.eval=null", "schedule.warmup=0")


@pytest.fixture(scope="module")
def steps(tiny_checkpoint):
    return (*STEPS, f"model.name_or_path={tiny_checkpoint}")


@pytest.fixture(scope="module")
def ddp_reference(corpus_data, tokenizer_dir, tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("ddp")
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, out, *steps), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(result), out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_ddp_in_fp32(corpus_data, tokenizer_dir, tmp_path, ddp_reference, steps, stage):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, *steps,
                                                   "parallel.engine=deepspeed", f"parallel.zero_stage={stage}"),
                 nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, ddp_dir = ddp_reference
    ours = losses(result)
    assert sorted(ours) == [1, 2, 3, 4]
    for step in ours:
        assert ours[step] == pytest.approx(reference[step], abs=1e-5), (stage, step)
    if stage == 3:  # the export gathers the partitions: the same weights as DDP's export
        from transformers import AutoModelForPreTraining

        mine = AutoModelForPreTraining.from_pretrained(tmp_path / "export").state_dict()
        theirs = AutoModelForPreTraining.from_pretrained(ddp_dir / "export").state_dict()
        for name, value in theirs.items():
            assert torch.allclose(mine[name], value, atol=1e-5), name
        # and `dtrain export` rebuilds the same model from the ZeRO-3 checkpoint alone
        from tests.conftest import run_cli

        exported = run_cli("export", str(tmp_path), str(tmp_path / "exported"))
        assert exported.returncode == 0, exported.stderr[-2000:]
        again = AutoModelForPreTraining.from_pretrained(tmp_path / "exported").state_dict()
        assert all(torch.equal(again[k], v) for k, v in mine.items())


def test_zero3_builds_the_model_partitioned(tiny_checkpoint, tmp_path):
    """No rank holds the whole model: each keeps half of every tensor, the gathered weights are the checkpoint's, and
    after the build transformers builds plain models again (a distillation teacher, predict)."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/integration/zero3_build_worker.py", str(tiny_checkpoint), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["own"] == rank["whole"] // 2 and rank["whole"] > 2_000_000, rank
        assert rank["same_weights"] and rank["fresh"] == [] and not rank["after"] and rank["plain_after"], rank


def test_zero2_matches_ddp_over_twenty_steps(corpus_data, tokenizer_dir, tmp_path):
    twenty = ("schedule.max_steps=20", "data.micro_batch_size=4", "data.eval=null", "checkpoint.export=false")
    ddp = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "ddp", *twenty), nproc=2)
    zero = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "z2", *twenty,
                                                 "parallel.engine=deepspeed", "parallel.zero_stage=2"), nproc=2)
    assert ddp.returncode == 0 and zero.returncode == 0, (ddp.stderr + zero.stderr)[-3000:]
    a, b = losses(ddp), losses(zero)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_in_bf16(corpus_data, tokenizer_dir, tmp_path, stage):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, "schedule.max_steps=12",
                                                   "data.micro_batch_size=4", "data.eval=null", "optim.lr=3e-3",
                                                   "schedule.warmup=0", f"checkpoint.export={stage == 3}",
                                                   "parallel.engine=deepspeed", f"parallel.zero_stage={stage}",
                                                   "precision.dtype=bf16"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = losses(result)
    assert sorted(per_step) == list(range(1, 13))
    assert sum(per_step[s] for s in (10, 11, 12)) < sum(per_step[s] for s in (1, 2, 3))
    if stage == 3:  # the run's export is the fp32 master copy, as `dtrain export` reconstructs it
        from transformers import AutoModelForPreTraining

        from tests.conftest import run_cli

        assert run_cli("export", str(tmp_path), str(tmp_path / "exported")).returncode == 0
        a = AutoModelForPreTraining.from_pretrained(tmp_path / "export").state_dict()
        b = AutoModelForPreTraining.from_pretrained(tmp_path / "exported").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_gives_the_same_losses(corpus_data, tokenizer_dir, tmp_path, stage):
    common = (*STEPS, "checkpoint.export=false", "parallel.engine=deepspeed", f"parallel.zero_stage={stage}",
              "model.dropout=null")  # dropout as the model has it (on): resume restores its random stream exactly
    straight = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "a", *common), nproc=2)
    first = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common,
                                                  "schedule.stop_at_step=2"), nproc=2)
    second = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path / "b", *common), nproc=2)
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(straight), losses(first) | losses(second)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), (stage, step)
    state = json.loads((tmp_path / "b/checkpoints/step-00000004/trainer.json").read_text())
    assert state["stream"]["position"] == 4 * 8


def test_user_deepspeed_json_is_merged_and_changes_reported(tmp_path):
    from dtrain.config import load_config
    from dtrain.engine.deepspeed import deepspeed_config, merge_user_config

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                                  "gradient_clipping": 0.5}))
    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=1", "data.micro_batch_size=4"])
    merged, changes = merge_user_config(deepspeed_config(cfg, 2), str(tmp_path / "ds.json"))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_batch_size"] == 8 and merged["gradient_clipping"] == 0.5
    assert sorted(changes) == ["gradient_clipping: dtrain 1.0 → ds.json 0.5",
                               "zero_optimization.stage: dtrain 1 → ds.json 2"]


def test_zero_buffers_are_sized_to_the_model_and_the_user_json_wins(tmp_path):
    from dtrain.config import load_config
    from dtrain.engine.deepspeed import deepspeed_config, merge_user_config

    stage3 = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=3"])
    zero = deepspeed_config(stage3, 2, hidden_size=1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024 and zero["allgather_bucket_size"] == 50_000_000
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
    assert zero["stage3_param_persistence_threshold"] == 10240
    stage2 = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=2"])
    zero = deepspeed_config(stage2, 2, hidden_size=1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024 and not any(k.startswith("stage3") for k in zero)
    assert "reduce_bucket_size" not in deepspeed_config(stage2, 2)["zero_optimization"]  # size unknown: DeepSpeed's
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 500_000_000}}))
    merged, changes = merge_user_config(deepspeed_config(stage3, 2, hidden_size=1024), str(tmp_path / "ds.json"))
    assert merged["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert changes == ["zero_optimization.reduce_bucket_size: dtrain 1048576 → ds.json 500000000"]


def test_zero3_with_cpu_offload_matches_ddp(corpus_data, tokenizer_dir, tmp_path, ddp_reference, steps):
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, *steps,
                                                   "checkpoint.export=false", "parallel.engine=deepspeed",
                                                   "parallel.zero_stage=3", "parallel.offload_optimizer=true",
                                                   "parallel.offload_params=true"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, _ = ddp_reference
    ours = losses(result)
    assert sorted(ours) == [1, 2, 3, 4]
    for step in ours:
        assert ours[step] == pytest.approx(reference[step], abs=1e-5), step


def test_finetune_on_two_ranks_with_zero2_bf16(tokenizer_dir, tmp_path):
    from tests.integration.test_training import write_sentiment

    data = write_sentiment(tmp_path, tokenizer_dir)
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                 f"data.eval={data['dev']}", f"data.test={data['test']}", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={tmp_path / 'run'}", "schedule.max_steps=40", "eval.every_steps=20",
                 "optim.lr=2e-3", "data.micro_batch_size=8", "logging.progress_bar=false", "data.max_seq_len=32",
                 "parallel.engine=deepspeed", "parallel.zero_stage=2", "precision.dtype=bf16", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())["test"]
    assert report["accuracy"] > 0.8


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_zero3_peft_export_is_the_checkpoints(tokenizer_dir, tmp_path, method):
    """Under ZeRO-3 the model is built partitioned and peft wraps it; the run's own export (LoRA merged into a plain
    model, or a prompt-tuning adapter dir) holds the weights `dtrain export` rebuilds from the checkpoint of the
    model it kept."""
    from safetensors.torch import load_file

    from tests.conftest import run_cli
    from tests.integration.test_training import write_sentiment

    data = write_sentiment(tmp_path, tokenizer_dir)
    result = run("dtrain.finetune", "--config", "configs/finetune/debug.yaml", f"data.train={data['train']}",
                 f"data.eval={data['dev']}", "data.test=null", f"model.tokenizer={tokenizer_dir}",
                 f"run_dir={tmp_path / 'run'}", "schedule.max_steps=6", "eval.every_steps=3", "optim.lr=2e-3",
                 "data.micro_batch_size=8",
                 "logging.progress_bar=false", "data.max_seq_len=32", "parallel.engine=deepspeed",
                 "parallel.zero_stage=3", f"peft.method={method}", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    step = json.loads((tmp_path / "run/report.json").read_text())["model_step"]  # (the best evaluation's)
    exported = run_cli("export", str(tmp_path / f"run/checkpoints/step-{step:08d}"), str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    name = "adapter_model.safetensors" if method == "prompt_tuning" else "model.safetensors"
    ours, rebuilt = (load_file(tmp_path / d / name) for d in ("run/export", "exported"))
    assert sorted(ours) == sorted(rebuilt) and len(ours) > 1
    assert all(torch.equal(ours[k], rebuilt[k]) for k in ours)


@pytest.fixture(scope="module")
def eager_without_dropout(corpus_data, tokenizer_dir, tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("eager")
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, out, *steps, "model.dropout=0",
                                                   "checkpoint.export=false"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(result)


@pytest.mark.parametrize("engine", [("parallel.engine=ddp",), ("parallel.engine=deepspeed", "parallel.zero_stage=2")],
                         ids=["ddp", "zero2"])
def test_compiled_encoder_trains_as_the_eager_one_under_ddp_and_zero2(corpus_data, tokenizer_dir, tmp_path,
                                                                       eager_without_dropout, steps, engine):
    """model.compile under a 2-rank DDP or DeepSpeed ZeRO-2 engine: the same losses as eager (dropout off: inductor
    draws its own dropout masks)."""
    result = run("dtrain.pretrain", *pretrain_args(corpus_data, tokenizer_dir, tmp_path, *steps, "model.dropout=0",
                                                   "model.compile=true", "checkpoint.export=false", *engine), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = losses(result)
    assert sorted(ours) == sorted(eager_without_dropout) == [1, 2, 3, 4]
    for step, loss in ours.items():
        assert loss == pytest.approx(eager_without_dropout[step], abs=1e-4), (engine, step)
