"""dtrain across hosts: a real Slurm cluster of two namespace nodes (tests/slurm/cluster.py), each with its own
address, hostname and slurmd, so every collective crosses the bridge between them.

- 2-node jobs (1 process per node) end with the same weights (≤ 1e-6, dropout off) as a 1-node 2-process run of the
  same global batch: DDP, ZeRO-2, ZeRO-3 (slurm/pretrain.sh), fine-tuning (slurm/finetune.sh), launch.submit;
- the warning signal to a 2-node job: every rank saves at the same step, requeue, resume, every sample once;
- node loss: every process of node2 killed mid-run; the survivor names the lost rank and host and exits at once, Slurm
  requeues the job once it declares the node dead; the run resumes on 1 node (world size 2 → 1), DDP and ZeRO-3;
- the bad inputs only several hosts can have (docs/errors.md, "Across nodes"), each one line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.integration.test_training import run, write_sentiment
from tests.ledger import assert_exactly_once, expected_ledger
from tests.slurm.cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
PRETRAIN, FINETUNE = "configs/pretrain/debug.yaml", "configs/finetune/debug.yaml"
NODE1, NODE2 = SlurmCluster.address("node1"), SlurmCluster.address("node2")
CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
ENGINES = {"ddp": [], "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
           "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"]}


def sbatch(slurm: SlurmCluster, tmp_path: Path, run_dir: Path, overrides: list[str], nodes: int = 2,
           script: str = "pretrain.sh", config: str = PRETRAIN, nproc: int = 1, **env: str) -> int:
    job_env = {**slurm.env, "DTRAIN_PYTHON": sys.executable, "DTRAIN_CONFIG": config, "DTRAIN_RUN_DIR": str(run_dir),
               "DTRAIN_OVERRIDES": " ".join(overrides), "DTRAIN_NPROC_PER_NODE": str(nproc), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", **env}
    return slurm.sbatch([*CPU, f"--nodes={nodes}", f"--output={tmp_path}/slurm-%j.out", f"slurm/{script}"], cwd=REPO,
                        env=job_env)


def output(tmp_path: Path, job: int) -> str:
    path = tmp_path / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def completed(slurm: SlurmCluster, tmp_path: Path, job: int, restarts: str = "0") -> str:
    slurm.wait_job(job, timeout=400)
    state, out = slurm.job_state(job), output(tmp_path, job)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", restarts), out[-4000:]
    return out


def pretrain_overrides(data: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [f"data.train={data}", f"model.tokenizer={tokenizer}", "logging.progress_bar=false", "model.dropout=0.0",
            "logging.tensorboard=false", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    x, y = weights(a), weights(b)
    assert sorted(x) == sorted(y)
    worst = max((float((x[k].float() - y[k].float()).abs().max()), k) for k in x)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} in {worst[1]} (allowed {atol})"


def assert_crossed_hosts(out: str) -> None:
    """The log shows the rendezvous on node1's bridge address from both nodes, and one rank on each host."""
    rendezvous = re.findall(r"launch\.(?:torchrun|submit): node (\d) of 2 \((node\d)\): rendezvous at (\S+) = (\S+)",
                            out)
    assert sorted((n, h) for n, h, _, _ in rendezvous) == [("0", "node1"), ("1", "node2")], out[-3000:]
    for _, _, endpoint, address in rendezvous:
        assert endpoint.startswith("node1:") and address.startswith(f"{NODE1}:"), (endpoint, address)
        assert "127.0.0.1" not in endpoint + address and "localhost" not in endpoint + address
    world = re.search(r"dtrain: world size 2 on 2 nodes \(gloo\): (.*)", out)
    assert world, out[-3000:]
    ranks = re.findall(r"node rank (\d) (node\d) (\S+) \((\S+)\): rank (\d)", world.group(1))
    assert sorted(r[0] for r in ranks) == ["0", "1"], world.group(0)
    assert sorted((h, a, i) for _, h, a, i, _ in ranks) == [("node1", NODE1, "eth0"), ("node2", NODE2, "eth0")]


def one_node_reference(tmp_path: Path, module: str, config: str, run_dir: Path, overrides: list[str]):
    """The same run as 2 processes on one host (torchrun --standalone), started in the background."""
    pool = ThreadPoolExecutor(1)
    return pool.submit(run, module, "--config", config, *overrides, f"run_dir={run_dir}", nproc=2)


# -- equal to one node ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_two_node_pretraining_equals_one_node(slurm, pretrain_data, tokenizer_dir, tmp_path, engine):
    overrides = pretrain_overrides(pretrain_data, tokenizer_dir, "schedule.max_steps=6", "checkpoint.every_steps=3",
                                   *ENGINES[engine])
    reference = one_node_reference(tmp_path, "dtrain.pretrain", PRETRAIN, tmp_path / "one", overrides)
    out = completed(slurm, tmp_path, sbatch(slurm, tmp_path, tmp_path / "two", overrides))
    assert_crossed_hosts(out)
    ref = reference.result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "step 6/6" in out and "run state: finished" in out
    assert_same_weights(tmp_path / "two", tmp_path / "one")


def test_two_node_finetuning_equals_one_node(slurm, tokenizer_dir, tmp_path):
    data = write_sentiment(tmp_path, tokenizer_dir)
    overrides = [f"data.train={data['train']}", f"data.eval={data['dev']}", f"data.test={data['test']}",
                 f"model.tokenizer={tokenizer_dir}", "logging.progress_bar=false", "model.dropout=0.0",
                 "schedule.max_steps=8", "eval.every_steps=4", "logging.tensorboard=false"]
    reference = one_node_reference(tmp_path, "dtrain.finetune", FINETUNE, tmp_path / "one", overrides)
    out = completed(slurm, tmp_path, sbatch(slurm, tmp_path, tmp_path / "two", overrides, script="finetune.sh",
                                            config=FINETUNE))
    assert_crossed_hosts(out)
    ref = reference.result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    two, one = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one"))
    assert two["test"]["accuracy"] == one["test"]["accuracy"] and two["test"]["loss"] == pytest.approx(
        one["test"]["loss"], abs=1e-6)


def test_submitit_two_nodes_equals_one_node(slurm, pretrain_data, tokenizer_dir, tmp_path):
    overrides = pretrain_overrides(pretrain_data, tokenizer_dir, "schedule.max_steps=6", "checkpoint.every_steps=3")
    reference = one_node_reference(tmp_path, "dtrain.pretrain", PRETRAIN, tmp_path / "one", overrides)
    env = {**slurm.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "launch.submit", "pretrain", "--config", PRETRAIN, "--nodes", "2",
                             "--nproc-per-node", "1", "--cpus-per-task", "1", "--time", "20",
                             "--folder", str(tmp_path / "submitit"), *overrides, f"run_dir={tmp_path / 'two'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "submitit").rglob("*.err")))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    assert (json.loads(result.stdout)["state"], json.loads(result.stdout)["step"]) == ("finished", 6)
    assert_crossed_hosts(logs)
    ref = reference.result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_weights(tmp_path / "two", tmp_path / "one")


# -- preemption across nodes ------------------------------------------------------------------------------------
def wait_steps(slurm: SlurmCluster, job: int, run_dir: Path, steps: int, timeout: float = 240) -> None:
    ledger, deadline = run_dir / "ledger" / "rank-0.jsonl", time.monotonic() + timeout
    while not ledger.exists() or len(ledger.read_text().splitlines()) < steps:
        assert time.monotonic() < deadline, slurm.job_state(job)
        time.sleep(0.2)


def test_preempted_two_node_job_saves_on_every_rank_requeues_and_resumes_exactly_once(slurm, pretrain_data,
                                                                                       tokenizer_dir, tmp_path):
    run_dir, steps = tmp_path / "run", 60
    overrides = pretrain_overrides(pretrain_data, tokenizer_dir, f"schedule.max_steps={steps}", "logging.ledger=true",
                                   "logging.every_steps=20", "checkpoint.export=false")
    job = sbatch(slurm, tmp_path, run_dir, overrides)
    wait_steps(slurm, job, run_dir, 15)
    slurm.run("scancel", "--signal=USR2", "--batch", str(job))  # what --signal=B:USR2@120 delivers
    out = completed(slurm, tmp_path, job, restarts="1")
    stopped = int(out.split("saving at step ")[1].split()[0])
    assert 15 <= stopped < steps
    for line in ("caught SIGUSR2", "run state: preempted", f"requeueing job {job}", "SLURM_RESTART_COUNT=1",
                 f"resumed from {run_dir}/checkpoints/step-{stopped:08d} at step {stopped}", "run state: finished"):
        assert line in out, line
    # both ranks, one per host, stopped after the same step: had either trained past the saved step, the resumed
    # attempt would train that step again and its ledger would hold it twice
    for rank in (0, 1):
        records = [json.loads(line) for line in (run_dir / "ledger" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), rank
    assert_exactly_once(run_dir, expected_ledger(PRETRAIN, overrides, world_size=2, steps=steps), world_size=2)


# -- node loss ------------------------------------------------------------------------------------------------------
def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_node_loss_ends_the_survivor_at_once_and_the_run_resumes_on_one_node(slurm, pretrain_data, tokenizer_dir,
                                                                              tmp_path, engine):
    from dtrain.checkpoint import damage, latest_checkpoint

    run_dir, steps, timeout_s = tmp_path / "run", 30, 30
    overrides = pretrain_overrides(pretrain_data, tokenizer_dir, f"schedule.max_steps={steps}",
                                   "checkpoint.every_steps=5", "logging.ledger=true", "checkpoint.export=false",
                                   f"parallel.timeout_s={timeout_s}", *ENGINES[engine])
    job = sbatch(slurm, tmp_path, run_dir, overrides)
    try:
        wait_steps(slurm, job, run_dir, 12)  # past the checkpoints of steps 5 and 10
        lost_at = time.monotonic()
        slurm.kill_node("node2")  # its slurmd, its slurmstepd, its torchrun and its dtrain rank, at once
        error = wait_for(lambda: re.search(r"dtrain: error: lost rank.*", output(tmp_path, job)), timeout_s + 30,
                         f"the survivor's error line (log: {output(tmp_path, job)[-2000:]})").group(0)
        wait_for(lambda: "failed (exitcode: 3)" in output(tmp_path, job), 30, "the survivor's exit")
        exit_s = time.monotonic() - lost_at
        # the peer's connections close when it dies: the survivor must not wait for parallel.timeout_s
        assert error.startswith(f"dtrain: error: lost rank 1 on node2 ({NODE2}): a collective failed") and \
            exit_s < 15, f"survivor exited after {exit_s:.1f} s with: {error}"
        print(f"\nnode loss ({engine}): survivor on node1 exited {exit_s:.1f} s after node2 died: {error}")
        # Slurm declares node2 dead (SlurmdTimeout), cancels the step and requeues the job (--requeue): it waits
        # for two nodes again; the user cancels it and resubmits on the nodes that are left
        state = wait_for(lambda: (s := slurm.job_state(job))["JobState"] == "PENDING" and s, 90, "the requeue")
        ctld = (Path(slurm.dir) / "slurmctld.log").read_text(errors="replace")
        assert state["Restarts"] == "1" and "node2 not responding, setting DOWN" in ctld and \
            f"Requeuing JobId={job}" in ctld, (state, ctld[-2000:])
        slurm.run("scancel", str(job))
        slurm.wait_job(job, timeout=60)
        latest = latest_checkpoint(run_dir / "checkpoints")
        assert latest is not None and damage(latest) is None and latest.name in ("step-00000010", "step-00000015")
        status = json.loads((run_dir / "status.json").read_text())  # the survivor recorded why, and where to resume
        assert status["state"] == "failed" and status["reason"] == error.removeprefix("dtrain: error: ") and \
            status["checkpoint"] == str(latest), status
        resumed_at = int(latest.name.split("-")[1])
        again = sbatch(slurm, tmp_path, run_dir, overrides, nodes=1)
        out = completed(slurm, tmp_path, again)
        assert f"resumed from {latest} at step {resumed_at}" in out, out[-3000:]
        if engine != "ddp":
            assert "was written at world size 2, this run has 1" in out, out[-3000:]
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["state"], status["step"]) == ("finished", steps)
    finally:
        slurm.run("scancel", str(job), check=False)
        slurm.revive_node("node2")


# -- bad inputs only several hosts can have (docs/errors.md, "Across nodes") ----------------------------------------
def documented(name: str) -> re.Pattern:
    """The message of row `name` in docs/errors.md's "Across nodes" table, as a pattern (<...>: placeholders)."""
    text = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    table = text[text.index("| Name | Bad input across nodes |"):]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == f"`{name}`":
            message = cells[2].removeprefix("`` ").removesuffix(" ``")
            return re.compile(re.sub(r"<[^>]+>", ".+?", re.escape(message).replace(r"\<", "<").replace(r"\>", ">")))
    raise AssertionError(f"docs/errors.md has no row {name}")


def failed_with(slurm: SlurmCluster, tmp_path: Path, job: int, name: str) -> str:
    slurm.wait_job(job, timeout=300)
    out, state = output(tmp_path, job), slurm.job_state(job)
    assert state["JobState"] == "FAILED", (state, out[-3000:])
    lines = [line for line in out.splitlines() if documented(name).fullmatch(line.split("]: ", 1)[-1].strip())]
    assert lines, f"no line matches docs/errors.md's {name}:\n{out[-3000:]}"
    return lines[0]


def test_run_dir_that_only_one_node_sees_is_refused(slurm, pretrain_data, tokenizer_dir, tmp_path):
    local = tmp_path / "node-local"
    local.mkdir()
    mount = slurm.on_node("node2", "mount", "-t", "tmpfs", "none", str(local))  # node2 sees its own empty folder
    assert mount.wait(timeout=30) == 0
    earlier = local / "earlier.txt"
    earlier.write_text("a user's file\n")
    try:
        job = sbatch(slurm, tmp_path, local / "run", pretrain_overrides(pretrain_data, tokenizer_dir))
        line = failed_with(slurm, tmp_path, job, "run-dir-not-shared")
        assert f"run_dir={local / 'run'}" in line and "node2" in line
        assert earlier.read_text() == "a user's file\n" and not list(local.glob(".dtrain-shared-check-*"))
        assert not (local / "run" / "checkpoints").exists()
    finally:
        slurm.on_node("node2", "umount", str(local)).wait(timeout=30)


def test_rendezvous_port_in_use_on_the_head_node_is_refused(slurm, pretrain_data, tokenizer_dir, tmp_path):
    port = 16789
    listener = slurm.on_node("node1", sys.executable, "-c", "import socket, time; s = socket.socket(); "
                             f"s.bind(('', {port})); s.listen(); print('listening', flush=True); time.sleep(600)",
                             stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "listening"
        job = sbatch(slurm, tmp_path, tmp_path / "run", pretrain_overrides(pretrain_data, tokenizer_dir),
                     DTRAIN_RDZV_PORT=str(port))
        line = failed_with(slurm, tmp_path, job, "rendezvous-port-in-use")
        assert f"port {port} on the head node node1" in line
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        listener.kill()
        listener.wait()


def test_nodes_with_different_process_counts_are_refused(slurm, pretrain_data, tokenizer_dir, tmp_path):
    python = tmp_path / "python"  # as a node whose environment sets another DTRAIN_NPROC_PER_NODE would
    python.write_text(f'#!/bin/sh\n[ "$(hostname)" = node2 ] && export DTRAIN_NPROC_PER_NODE=2\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    job = sbatch(slurm, tmp_path, tmp_path / "run", pretrain_overrides(pretrain_data, tokenizer_dir),
                 DTRAIN_PYTHON=str(python))
    line = failed_with(slurm, tmp_path, job, "nproc-per-node-differs")
    assert "(node1 1, node2 2)" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
