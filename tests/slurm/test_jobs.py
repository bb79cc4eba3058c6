"""dtrain on a real Slurm cluster: sbatch slurm/pretrain.sh to completion; preemption (the warning signal mid-run →
checkpoint → requeue → resume → completion, every sample once); launch.submit through submitit."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_training import write_sentiment
from tests.ledger import assert_exactly_once, expected_ledger
from tests.slurm.cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = "configs/pretrain/debug.yaml"
# the scripts' #SBATCH defaults ask for 8 GPUs and 32 cores: a user overrides them on the command line, as here
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=20"]


def _sbatch(slurm: SlurmCluster, script: str, tmp_path: Path, config: str, run_dir: Path, overrides: list[str]) -> int:
    env = {**slurm.env, "DTRAIN_PYTHON": sys.executable, "DTRAIN_CONFIG": config, "DTRAIN_RUN_DIR": str(run_dir),
           "DTRAIN_OVERRIDES": " ".join(overrides), "DTRAIN_NPROC_PER_NODE": "2", "HF_HUB_OFFLINE": "1"}
    return slurm.sbatch([*CPU_NODE, f"--output={tmp_path}/slurm-%j.out", f"slurm/{script}"], cwd=REPO, env=env)


def _pretrain_overrides(data: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [f"data.train={data}", f"model.tokenizer={tokenizer}", "logging.progress_bar=false", *extra]


def _wait_steps(slurm: SlurmCluster, job: int, run_dir: Path, steps: int) -> None:
    ledger, deadline = run_dir / "ledger" / "rank-0.jsonl", time.monotonic() + 240
    while not ledger.exists() or len(ledger.read_text().splitlines()) < steps:
        assert time.monotonic() < deadline, slurm.job_state(job)
        time.sleep(0.2)


def test_sbatch_pretrain_debug_completes(slurm, pretrain_data, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = _sbatch(slurm, "pretrain.sh", tmp_path, PRETRAIN, run_dir, _pretrain_overrides(pretrain_data, tokenizer_dir))
    slurm.wait_job(job, timeout=300)
    state = slurm.job_state(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), out[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000020"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "export" / "config.json").exists()
    log = (run_dir / "logs" / f"slurm-{job}.log").read_text()
    assert "SLURM_RESTART_COUNT=0" in log and "--nproc-per-node=2" in log and "step 20/20" in log
    assert "run state: finished" in log and "requeueing" not in log


def test_preempted_job_checkpoints_requeues_and_resumes_exactly_once(slurm, pretrain_data, tokenizer_dir, tmp_path):
    run_dir, steps = tmp_path / "run", 100
    overrides = _pretrain_overrides(pretrain_data, tokenizer_dir, f"schedule.max_steps={steps}",
                                    "logging.ledger=true", "logging.every_steps=25", "checkpoint.export=false")
    job = _sbatch(slurm, "pretrain.sh", tmp_path, PRETRAIN, run_dir, overrides)
    _wait_steps(slurm, job, run_dir, 25)  # past two checkpoint intervals (every 10 steps)
    slurm.run("scancel", "--signal=USR2", "--batch", str(job))  # what --signal=B:USR2@120 delivers
    slurm.wait_job(job, timeout=400)
    state = slurm.job_state(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), out[-4000:]
    stopped = int(out.split("saving at step ")[1].split()[0])
    assert 25 <= stopped < steps
    for line in ("caught SIGUSR2", "run state: preempted", f"requeueing job {job}", "SLURM_RESTART_COUNT=1",
                 f"resumed from {run_dir}/checkpoints/step-{stopped:08d} at step {stopped}", "run state: finished"):
        assert line in out, line
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", steps)
    assert_exactly_once(run_dir, expected_ledger(PRETRAIN, overrides, world_size=2, steps=steps), world_size=2)


def _submit(slurm_env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**slurm_env, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _finetune_args(tmp_path: Path, tokenizer_dir: Path, run_dir: Path) -> list[str]:
    data = write_sentiment(tmp_path, tokenizer_dir)
    return ["finetune", "--config", "configs/finetune/debug.yaml", "--nproc-per-node", "2",
            f"data.train={data['train']}", f"data.eval={data['dev']}", f"data.test={data['test']}",
            f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}", "logging.progress_bar=false"]


def test_submitit_finetune_on_the_cluster_returns_its_metrics(slurm, tokenizer_dir, tmp_path):
    result = _submit(slurm.env, *_finetune_args(tmp_path, tokenizer_dir, tmp_path / "run"), "--cpus-per-task", "2",
                     "--time", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert (metrics["state"], metrics["step"]) == ("finished", 20)
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["model_step"] in (10, 20)
    assert "(slurm)" in result.stderr


def test_submitit_job_is_checkpointed_and_requeued_on_preemption(slurm, pretrain_data, tokenizer_dir, tmp_path):
    run_dir, steps = tmp_path / "run", 80
    overrides = _pretrain_overrides(pretrain_data, tokenizer_dir, f"run_dir={run_dir}", f"schedule.max_steps={steps}",
                                    "logging.ledger=true", "logging.every_steps=20", "checkpoint.export=false")
    result = _submit(slurm.env, "pretrain", "--config", PRETRAIN, "--nproc-per-node", "2", "--cpus-per-task", "2",
                     "--time", "20", "--no-wait", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    job = int(result.stdout.strip())
    _wait_steps(slurm, job, run_dir, 20)
    slurm.run("scancel", "--signal=USR2", str(job))  # as submitit's --signal=USR2@N: every process of the step
    slurm.wait_job(job, timeout=400)
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", steps), slurm.job_state(job)
    assert slurm.job_state(job)["Restarts"] == "1"
    assert_exactly_once(run_dir, expected_ledger(PRETRAIN, overrides, world_size=2, steps=steps), world_size=2)


def test_submitit_local_executor_needs_no_slurm(tokenizer_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = _submit(env, *_finetune_args(tmp_path, tokenizer_dir, tmp_path / "run"), "--local")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert (metrics["state"], metrics["step"]) == ("finished", 20) and "accuracy" in metrics["test"]
    assert "(local)" in result.stderr
