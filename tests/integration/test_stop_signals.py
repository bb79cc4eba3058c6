"""A stop signal (SIGUSR2: the scheduler's warning; SIGTERM: the end) makes every rank save at the same step boundary
and exit; the next run resumes there. The sample ledger proves each step was trained once, on the same samples as
an uninterrupted run. Runs through launch.torchrun, as the Slurm scripts do (no Slurm needed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.ledger import assert_exactly_once, expected_ledger

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain/debug.yaml"


def _launch(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "DTRAIN_NPROC_PER_NODE": "2", "HF_HUB_OFFLINE": "1"}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-m", "launch.torchrun", "dtrain.pretrain", "--config", CONFIG,
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "ledger" / "rank-0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _interrupt(proc: subprocess.Popen, run_dir: Path, after_steps: int, target: str, sig: int) -> str:
    deadline = time.monotonic() + 180
    while _steps_done(run_dir) < after_steps:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    if target == "worker":  # one rank only: the others learn of it through the agreed stop flag
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(sorted(workers, key=int)[-1]), sig)
    else:
        proc.send_signal(sig)  # torchrun forwards it to its workers
    out = proc.communicate(timeout=180)[0]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted", out[-3000:]
    return out


def test_stop_signals_save_at_one_step_and_resume_exactly_once(pretrain_data, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.train={pretrain_data}", f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                 "schedule.max_steps=60", "logging.ledger=true", "logging.progress_bar=false",
                 "logging.every_steps=40", "checkpoint.export=false"]
    first = _interrupt(_launch(overrides), run_dir, 10, "worker", signal.SIGUSR2)
    stopped = int(first.split("saving at step ")[1].split()[0])
    assert 10 <= stopped < 60 and (run_dir / "checkpoints" / f"step-{stopped:08d}").is_dir(), first[-3000:]
    second = _interrupt(_launch(overrides), run_dir, stopped + 10, "torchrun", signal.SIGTERM)
    assert f"resumed from {run_dir}/checkpoints/step-{stopped:08d} at step {stopped}" in second, second[-3000:]
    last = _launch(overrides)
    out = last.communicate(timeout=300)[0]
    assert last.returncode == 0, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 60)
    assert_exactly_once(run_dir, expected_ledger(CONFIG, overrides, world_size=2, steps=60), world_size=2)
