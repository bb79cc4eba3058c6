"""Faults done for real to a 2-rank run under torchrun (CPU, gloo): a rank that hangs, a rank killed mid-run, a
process killed inside a checkpoint write, a checkpoint damaged on disk, a full disk. Nothing the user had is lost."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ledger import assert_exactly_once, expected_ledger

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain/debug.yaml"


def _overrides(data: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={data}", f"model.tokenizer={tokenizer}", f"run_dir={run_dir}", "logging.ledger=true",
            "logging.progress_bar=false", "logging.every_steps=10", *extra]


def _launch(overrides: list[str], nproc: int = 2, **env: str) -> subprocess.Popen:
    env = {**os.environ, "DTRAIN_NPROC_PER_NODE": str(nproc), "HF_HUB_OFFLINE": "1", "DTRAIN_SHUTDOWN_TIMEOUT": "5",
           **env}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-m", "launch.torchrun", "dtrain.pretrain", "--config", CONFIG,
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, done, timeout: float = 180) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def _steps(run_dir: Path, rank: int = 0) -> int:
    path = run_dir / "ledger" / f"rank-{rank}.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _workers(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def test_a_hung_rank_fails_the_others_within_the_collective_timeout(pretrain_data, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(_overrides(pretrain_data, tokenizer_dir, run_dir, "schedule.max_steps=100000",
                              "parallel.timeout_s=10", "checkpoint.every_steps=null"))
    _wait_for(proc, lambda: _steps(run_dir) >= 3)
    hung = _workers(proc)[-1]
    os.kill(hung, signal.SIGSTOP)  # it stops answering, as a rank stuck in a driver call or a dead NFS would
    stopped = time.monotonic()
    try:
        out = proc.communicate(timeout=120)[0]
    finally:
        subprocess.run(["kill", "-9", str(hung)], capture_output=True)
    assert proc.returncode != 0
    assert "dtrain: error: a collective waited longer than parallel.timeout_s=10 s for the other ranks" in out, \
        out[-3000:]
    assert time.monotonic() - stopped < 10 + 60


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"], ["parallel.engine=deepspeed", "parallel.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_a_killed_rank_restarts_the_group_from_latest_with_identical_weights(engine, pretrain_data, tokenizer_dir,
                                                                             tmp_path):
    steps = 30
    extra = [f"schedule.max_steps={steps}", "checkpoint.every_steps=5", *engine]  # dropout on, as shipped
    run_dir = tmp_path / "killed"
    overrides = _overrides(pretrain_data, tokenizer_dir, run_dir, *extra)
    killed = _launch(overrides, DTRAIN_MAX_RESTARTS="1")
    _wait_for(killed, lambda: (run_dir / "checkpoints" / "step-00000010").is_dir() and _steps(run_dir) >= 12)
    os.kill(_workers(killed)[-1], signal.SIGKILL)  # mid-run, after at least one checkpoint
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == 0, out[-3000:]
    resumed = re.findall(r"resumed from \S+/checkpoints/step-(\d+) at step", out)
    assert resumed and int(resumed[0]) >= 10, out[-3000:]  # torchrun restarted the group, which resumed
    straight = _launch(_overrides(pretrain_data, tokenizer_dir, tmp_path / "straight", *extra))
    assert straight.wait(timeout=300) == 0, straight.communicate()[0][-3000:]
    a, b = _weights(tmp_path / "straight"), _weights(run_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert_exactly_once(run_dir, expected_ledger(CONFIG, overrides, world_size=2, steps=steps), world_size=2,
                        retrained=True)


def test_a_process_killed_inside_a_checkpoint_write_loses_nothing(pretrain_data, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(pretrain_data, tokenizer_dir, run_dir, "schedule.max_steps=20", "checkpoint.every_steps=5",
                           "checkpoint.export=false")
    proc = _launch(overrides, nproc=1, DTRAIN_TEST_PAUSE_IN_CHECKPOINT="step-00000010")
    paused = run_dir / "checkpoints" / ".tmp-step-00000010" / "PAUSED"
    _wait_for(proc, paused.exists)  # the engine's files of step 10 are written, the checkpoint is not complete
    for worker in _workers(proc):  # the process writing the checkpoint dies there; torchrun then gives up
        os.kill(worker, signal.SIGKILL)
    proc.communicate(timeout=60)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000005"
    assert (checkpoints / ".tmp-step-00000010").is_dir() and not (checkpoints / "step-00000010").exists()
    resumed = _launch(overrides, nproc=1)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"dtrain: warning: removing {checkpoints / '.tmp-step-00000010'}: an incomplete checkpoint" in out
    assert f"resumed from {checkpoints / 'step-00000005'} at step 5" in out
    assert not list(checkpoints.glob(".tmp-*")) and (checkpoints / "latest").read_text().strip() == "step-00000020"
    assert_exactly_once(run_dir, expected_ledger(CONFIG, overrides, world_size=1, steps=20), world_size=1,
                        retrained=True)


def test_a_checkpoint_damaged_on_disk_is_detected_and_resume_falls_back(pretrain_data, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(pretrain_data, tokenizer_dir, run_dir, "schedule.max_steps=12", "checkpoint.every_steps=5",
                           "checkpoint.export=false")
    first = _launch([*overrides, "schedule.stop_at_step=10"], nproc=1)
    assert first.wait(timeout=300) == 0, first.communicate()[0][-3000:]
    newest = run_dir / "checkpoints" / "step-00000010"
    weights = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(weights, "r+b") as f:  # a flipped byte in the middle of the biggest file, size unchanged
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = _launch(overrides, nproc=1)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out[-3000:]
    name = weights.relative_to(newest)
    assert (f"dtrain: warning: checkpoint {newest} is damaged ({name} does not match its SHA-256); falling back to "
            f"the one before it") in out, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000005'} at step 5" in out
    # a truncated file is caught by its size, and with nothing intact left resume refuses instead of starting over
    for step_dir in (run_dir / "checkpoints").glob("step-*"):
        victim = max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        os.truncate(victim, victim.stat().st_size // 2)
    third = _launch(overrides, nproc=1)
    out = third.communicate(timeout=300)[0]
    assert third.returncode != 0  # the worker exits 2; torchrun reports any failed worker as 1
    assert "dtrain: error: no intact checkpoint in" in out and "were written" in out, out[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: room for one checkpoint of the tiny model (~25 MB with its optimizer state), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot simulate a full disk here (mount -t tmpfs failed: {result.stderr.strip()}; needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_fails_the_checkpoint_cleanly_and_keeps_the_previous_one(pretrain_data, tokenizer_dir,
                                                                             small_disk):
    from dtrain.checkpoint import damage

    run_dir = small_disk / "run"
    proc = _launch(_overrides(pretrain_data, tokenizer_dir, run_dir, "schedule.max_steps=20",
                              "checkpoint.every_steps=5", "logging.tensorboard=false"), nproc=1)
    out = proc.communicate(timeout=300)[0]
    checkpoints = run_dir / "checkpoints"
    assert proc.returncode != 0, out[-3000:]
    assert (f"dtrain: error: could not write checkpoint {checkpoints / 'step-00000010'} (") in out, out[-3000:]
    free = re.search(r"; ([\d.,]+) MiB free on its disk after the cleanup\); the partial", out)
    assert free and float(free.group(1)) > 5, out[-3000:]  # the partial checkpoint's space is really free again
    assert (f"the partial checkpoint was removed and the last good one, {checkpoints / 'step-00000005'}, is intact: "
            f"free disk space") in out, out[-3000:]
    assert not list(checkpoints.glob(".tmp-*")) and sorted(p.name for p in checkpoints.glob("step-*")) == \
        ["step-00000005"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000005" and damage(checkpoints / "step-00000005") \
        is None
    status = json.loads((run_dir / "status.json").read_text())  # the true state, for the launchers
    assert (status["state"], status.get("checkpoint_step")) == ("failed", 5), status
    assert status["reason"].startswith(f"could not write checkpoint {checkpoints / 'step-00000010'} ("), status
