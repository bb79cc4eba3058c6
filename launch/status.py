"""A run's state as the launchers see it, and what they do about it. `python -m launch.status RUN_DIR EXIT_STATUS`
(used by slurm/common.sh after the job step ends) settles and prints the state; launch.submit calls `settle` too.

dtrain writes <run_dir>/status.json on every way out of a run it started: `finished`, `stopped`
(schedule.stop_at_step), `preempted` (a stop signal; resume it) or `failed` (with the one-line reason, the last good
checkpoint and its step). Only a process that could not run any code — rank 0 killed with SIGKILL, out of memory,
its node lost — leaves `running` behind; once the training processes have ended, `settle` turns that into `failed`
(the reason names the exit status), so a reader never mistakes a dead run for a live one.

What a launcher does with each state after the training processes have ended:

| state       | requeue after a preemption warning (USR2) | job result            |
|-------------|-------------------------------------------|-----------------------|
| finished    | no                                        | success               |
| preempted   | yes: the next attempt resumes from latest | (requeued)            |
| stopped     | no (schedule.stop_at_step asked to stop)  | success, resume later |
| failed      | no (it would fail again; see the reason)  | failure               |
| unknown     | no (no status.json: it never started)     | failure               |
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STATUS = "status.json"
RUN_LOCK = ".dtrain.lock"  # dtrain.locks.RUN_LOCK
REQUEUE_STATES = ("preempted",)
SUCCESS_STATES = ("finished", "stopped")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """<run_dir>/status.json as dtrain wrote it, or {"state": "unknown"} when there is none (or it is unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"state": "unknown"}
    return status if isinstance(status, dict) and "state" in status else {"state": "unknown"}


def settle(run_dir: str | os.PathLike, exit_status: int) -> dict[str, Any]:
    """The run's state once its processes have ended: a `running` left by a process that was killed before it could
    write its state becomes `failed`, written back to status.json (atomically) so every later reader agrees."""
    status = read_status(run_dir)
    if status["state"] != "running" or _held(Path(run_dir) / RUN_LOCK):
        return status  # (a run that still holds its run dir's lock is alive: e.g. this job was the one refused)
    status = {**status, "state": "failed",
              "reason": f"the training processes ended with exit status {exit_status} while the run was at step "
                        f"{status.get('step', '?')} without writing their state: a process was killed (kill -9, "
                        f"out of memory, its node lost); see the job's log",
              "exit_status": exit_status}
    path = Path(run_dir) / STATUS
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{STATUS}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(status, default=float) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        print(f"launch.status: warning: could not record the failure in {path} ({e.strerror})", file=sys.stderr)
    return status


def _held(lock: Path) -> bool:
    """Whether a live process holds the flock on `lock` (dtrain/locks.py takes it for the life of a run)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing drops the probe's own lock, if it got one)
    return False


def requeue(status: dict[str, Any]) -> bool:
    """After a preemption warning: requeue only a run that saved for a resume (not a finished, stopped or failed
    one)."""
    return status["state"] in REQUEUE_STATES


def describe(status: dict[str, Any]) -> str:
    """One line: the state, and for a failed run its reason and last good checkpoint."""
    text = status["state"]
    if status["state"] == "failed":
        text += f": {status.get('reason', 'no reason recorded')}"
        if status.get("checkpoint"):
            text += f" (last good checkpoint {status['checkpoint']}, step {status.get('checkpoint_step')})"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].lstrip("-").isdigit():
        print("usage: python -m launch.status RUN_DIR EXIT_STATUS  (prints the settled state, then a description)",
              file=sys.stderr)
        return 2
    status = settle(args[0], int(args[1]))
    print(status["state"])
    print(describe(status))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
