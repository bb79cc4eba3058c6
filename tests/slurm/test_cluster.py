"""Smoke tests of the test Slurm cluster itself: a job runs to completion, and a requeued job runs again."""

import time
from pathlib import Path

from tests.slurm.cluster import SlurmCluster


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


def test_job_completes(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = _script(tmp_path / "job.sh", "echo hello $SLURM_JOB_ID\n")
    job = slurm.sbatch(["--output", str(out), str(script)], cwd=tmp_path)
    slurm.wait_job(job, timeout=60)
    assert out.read_text().split() == ["hello", str(job)]
    state = slurm.job_state(job)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), state


def test_requeued_job_restarts(slurm: SlurmCluster, tmp_path: Path) -> None:
    started, restarted = tmp_path / "started", tmp_path / "restarted"
    script = _script(tmp_path / "job.sh", f"""\
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo $SLURM_RESTART_COUNT > {restarted}; exit 0; fi
touch {started}
sleep 30
""")
    job = slurm.sbatch(["--requeue", "--output", str(tmp_path / "out-%j.txt"), str(script)], cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, slurm.job_state(job)
        time.sleep(0.2)
    slurm.run("scontrol", "requeue", str(job))
    slurm.wait_job(job, timeout=60)
    assert restarted.read_text().strip() == "1"
    state = slurm.job_state(job)
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), state
