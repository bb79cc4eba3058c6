"""status.json tells the truth on every way out of a run (issue: it stayed `running` after a crash), and the launchers
(slurm/common.sh, launch.submit) act on each state as launch/status.py's table says."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.test_training import write_sentiment
from tests.reliability.test_faults import _launch, _overrides, _steps, _wait_for, _workers

REPO = Path(__file__).resolve().parents[2]


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# -- dtrain writes the true state ---------------------------------------------------------------------------------

def test_an_error_inside_a_step_is_recorded_as_failed_with_the_last_good_checkpoint(pretrain_data, tokenizer_dir,
                                                                                     tmp_path):
    # a real exception from inside the loop (not a dtrain check): a shape error at step 7, after the step-5 save
    run_dir = tmp_path / "run"
    script = textwrap.dedent("""
        import sys
        import dtrain.trainer as t
        step = t.Trainer.train_step
        def broken(self, micro):
            if self.state.step == 6:
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x32)")
            return step(self, micro)
        t.Trainer.train_step = broken
        from dtrain.pretrain import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = ["--config", "configs/pretrain/debug.yaml",
            *_overrides(pretrain_data, tokenizer_dir, run_dir, "checkpoint.every_steps=5", "schedule.max_steps=20")]
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr[-3000:]
    status = _status(run_dir)
    assert status["state"] == "failed" and status["step"] == 6, status
    assert status["reason"] == "RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x64 and 32x32)"
    assert status["checkpoint"] == str(run_dir / "checkpoints" / "step-00000005") and status["checkpoint_step"] == 5


def test_an_error_found_after_the_start_is_recorded_as_failed(tokenizer_dir, tmp_path):
    sentiment_dirs = write_sentiment(tmp_path, tokenizer_dir)
    # eval.metric naming a metric the task does not report is found at the step-0 evaluation, after "running"
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dtrain.finetune", "--config", "configs/finetune/debug.yaml",
                             f"data.train={sentiment_dirs['train']}", f"data.eval={sentiment_dirs['dev']}",
                             "data.test=null", f"model.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                             "eval.metric=f1", "logging.progress_bar=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and line.startswith("dtrain: error: eval.metric=f1:"), result.stderr[-2000:]
    status = _status(run_dir)
    assert (status["state"], status["step"], status["checkpoint"]) == ("failed", 0, None), status
    assert status["reason"] == line.removeprefix("dtrain: error: ")


def test_a_killed_rank_leaves_failed_and_a_killed_rank_0_is_settled_by_the_launcher(pretrain_data, tokenizer_dir,
                                                                                    tmp_path):
    from launch.status import settle

    for victim in (1, 0):
        run_dir = tmp_path / f"kill-rank-{victim}"
        proc = _launch(_overrides(pretrain_data, tokenizer_dir, run_dir, "schedule.max_steps=100000",
                                  "checkpoint.every_steps=5", "parallel.timeout_s=60"))
        _wait_for(proc, lambda rd=run_dir: (rd / "checkpoints" / "step-00000005").is_dir() and _steps(rd) >= 7)
        os.kill(_workers(proc)[victim], signal.SIGKILL)  # workers in rank order: torchrun starts rank 0 first
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode != 0, out[-3000:]
        status = _status(run_dir)
        if victim == 1:  # rank 0 saw its peer go and wrote why
            assert status["state"] == "failed", status
            assert status["reason"].startswith("lost rank 1 on "), status
            assert status["checkpoint_step"] >= 5 and status["step"] >= 7
        else:  # rank 0 could run no code: `running` (with its pid) stays until the launcher settles it
            assert status["state"] == "running" and status["pid"] > 0, status
            settled = settle(run_dir, proc.returncode)
            assert settled["state"] == "failed" and _status(run_dir) == settled
            assert "without writing their state: a process was killed" in settled["reason"]


# -- the launchers act on each state ----------------------------------------------------------------------------

STATES = {  # state → (requeued after USR2, exit status of the job script for a step that exited 0)
    "finished": (False, 0), "stopped": (False, 0), "preempted": (True, 0), "failed": (False, 0),
    "running": (False, 0), "unknown": (False, 0),
}


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_slurm_script_requeues_only_a_preempted_run(state, tmp_path):
    run_dir, bin_dir, calls = tmp_path / "run", tmp_path / "bin", tmp_path / "calls"
    run_dir.mkdir()
    bin_dir.mkdir()
    status = "" if state == "unknown" else json.dumps({"state": state, "step": 7, "reason": "lost rank 1 on n2"})
    # srun: the scheduler's warning arrives (USR2 to the batch script), the "training" records its state and ends
    (bin_dir / "srun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        trap 'echo "srun: got USR2"' USR2
        kill -USR2 $PPID
        sleep 1
        [ -n '{status}' ] && printf '%s\\n' '{status}' > {run_dir}/status.json
        exit 0
    """))
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DTRAIN_"))}
    result = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sh")], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**clean, "PATH": f"{bin_dir}:{clean['PATH']}", "SLURM_JOB_ID": "77",
                                              "DTRAIN_PYTHON": sys.executable, "DTRAIN_RUN_DIR": str(run_dir)})
    requeued, code = STATES[state]
    assert result.returncode == code, result.stdout + result.stderr
    assert (calls.read_text().strip() == "requeue 77") if requeued else not calls.exists(), result.stdout
    expected = {"running": "failed", "unknown": "unknown"}.get(state, state)
    assert f"training ended (exit status 0), run state: {expected}" in result.stdout, result.stdout
    if state == "running":  # the step ended: a `running` cannot be true any more
        assert _status(run_dir)["state"] == "failed"
    if not requeued:
        assert f"not requeueing job 77: the run is {expected}, not preempted" in result.stdout


@pytest.mark.parametrize("state", sorted(STATES))
def test_submitit_jobs_return_requeue_or_fail_by_state(state, tmp_path, monkeypatch):
    import launch.submit as submit

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if state != "unknown":
        (run_dir / "status.json").write_text(json.dumps({"state": state, "step": 7, "reason": "lost rank 1 on n2"}))
    monkeypatch.setattr(submit, "node_command", lambda entry, args, env: (["sh", "-c", "exit 3"], None))
    monkeypatch.setattr(submit, "PREEMPTED_GRACE_S", 0)
    job = submit.DtrainJob("dtrain.pretrain", "c.yaml", [], str(run_dir), None)
    if state in ("finished", "stopped"):
        assert job()["state"] == state
    else:
        with pytest.raises(RuntimeError) as e:
            job()
        shown = {"running": "failed", "unknown": "unknown"}.get(state, state)
        assert f"ended with exit status 3 and run state {shown}" in str(e.value)
        if state in ("failed", "running"):
            assert ": lost rank 1 on n2" in str(e.value) or "without writing their state" in str(e.value)
    requeued = job.checkpoint()  # submitit's preemption hook, after the step ended
    assert (requeued is not None) == (state == "preempted"), state


def test_settle_leaves_a_run_that_still_holds_its_lock_alone(tmp_path):
    # a second job refused by the run dir's lock must not mark the live run as failed when its launcher settles
    from dtrain.locks import RUN_LOCK, acquire_lock
    from launch.status import settle

    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "step": 3}))
    lock = acquire_lock(tmp_path / RUN_LOCK, "busy", "x")
    try:
        assert settle(tmp_path, 2)["state"] == "running" and _status(tmp_path)["state"] == "running"
    finally:
        lock.release()
    assert settle(tmp_path, 2)["state"] == "failed"  # its holder is gone: now it is a dead run
