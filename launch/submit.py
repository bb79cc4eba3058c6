"""`python -m launch.submit pretrain|finetune --config X [--nodes N --gpus-per-node G --partition P] [key=value]`

Submits a dtrain run through submitit: to Slurm (one task per node; each starts torchrun with the rendezvous of
launch.torchrun), or with --local to this machine through submitit's local executor. Waits for the job and prints
its final metrics as JSON (--no-wait: print the job id and return).

The job is checkpointable: when Slurm warns of preemption or the time limit (USR2, --signal-delay seconds before),
every process of the job step gets the signal, torchrun forwards it to its workers, and they save a checkpoint at the
next step boundary through the same path as a scheduled save; submitit then calls `DtrainJob.checkpoint`, which waits
for that save and requeues the same job, which resumes from checkpoints/latest. A finished run is not requeued.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.status import SUCCESS_STATES, describe, read_status, requeue, settle
from launch.torchrun import LaunchError, node_command

PREEMPTED_GRACE_S = 60


class DtrainJob:
    """What submitit runs on every node: torchrun for this node, then the run's final status (+ test report)."""

    def __init__(self, entry: str, config: str, overrides: list[str], run_dir: str, nproc_per_node: int | None):
        self.entry, self.config, self.overrides = entry, config, overrides
        self.run_dir, self.nproc_per_node = run_dir, nproc_per_node
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}

    def __call__(self) -> dict[str, Any]:
        env = dict(os.environ)
        if self.nproc_per_node:
            env["DTRAIN_NPROC_PER_NODE"] = str(self.nproc_per_node)
        command, rendezvous = node_command(self.entry, ["--config", self.config, *self.overrides], env)
        for line in (rendezvous, " ".join(command)):
            if line:
                print("launch.submit: " + line, file=sys.stderr, flush=True)
        self._proc = subprocess.Popen(command, env=env)
        while self._proc.poll() is None:  # poll, not wait(): checkpoint() may run in between, in a signal handler
            time.sleep(0.5)
        status = settle(self.run_dir, self._proc.returncode)  # a killed rank 0's `running` becomes failed
        if status["state"] == "preempted":
            # saved after a SIGTERM (Slurm preempts or cancels) or before submitit's USR2 handler took over: give
            # Slurm (kill and requeue) or the handler (checkpoint → requeue → exit) the time to act first
            time.sleep(PREEMPTED_GRACE_S)
        if status["state"] not in SUCCESS_STATES:
            raise RuntimeError(f"{self.entry} ended with exit status {self._proc.returncode} and run state "
                               f"{describe(status)} ({self.run_dir}/status.json); see the job's log")
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on the job's first task on preemption/timeout: let the workers finish their save,
        then requeue this job unless the run finished meanwhile."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR2)  # torchrun forwards it (a second signal to a worker is harmless)
            while proc.poll() is None:
                time.sleep(0.5)
        if proc is None:
            if read_status(self.run_dir)["state"] == "finished":
                return None  # an earlier attempt finished the run: nothing to requeue
        elif not requeue(settle(self.run_dir, proc.returncode)):
            return None  # finished, stopped or failed meanwhile: submitit does not requeue
        return submitit.helpers.DelayedSubmission(
            DtrainJob(self.entry, self.config, self.overrides, self.run_dir, self.nproc_per_node))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["pretrain", "finetune"])
    ap.add_argument("--config", required=True, help="YAML config")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (1)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: none requested)")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="processes per node (default: the GPUs granted, else 1 CPU process)")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node")
    ap.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    ap.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (1440)")
    ap.add_argument("--signal-delay", type=int, default=120,
                    help="seconds before the time limit or preemption that the job is told to save (120)")
    ap.add_argument("--folder", default=None, help="submitit's logs and pickles (default: <run_dir>/submitit)")
    ap.add_argument("--local", action="store_true", help="run on this machine through submitit's local executor")
    ap.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for dtrain")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    import submitit

    for handler in logging.getLogger("submitit").handlers:  # stdout carries only the final metrics (JSON)
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)

    from dtrain.config import load_config
    from dtrain.errors import DtrainError

    try:
        if not Path(args.config).is_file():
            raise LaunchError(f"--config {args.config}: no such file")
        if args.nodes < 1:
            raise LaunchError(f"--nodes {args.nodes}: needs at least 1 node")
        run_dir = Path(load_config(args.config, args.overrides).run_dir).resolve()
    except (LaunchError, DtrainError) as e:
        print(f"launch.submit: error: {e}", file=sys.stderr)
        return 2
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    folder = Path(args.folder or run_dir / "submitit").resolve()
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else None)
    params: dict[str, Any] = {"name": f"dtrain-{args.command}", "nodes": args.nodes, "tasks_per_node": 1,
                              "timeout_min": args.time, "slurm_signal_delay_s": args.signal_delay}
    for key, value in (("gpus_per_node", args.gpus_per_node), ("cpus_per_task", args.cpus_per_task),
                       ("slurm_partition", args.partition)):
        if value is not None:
            params[key] = value
    executor.update_parameters(**params)
    from launch.submit import DtrainJob as Job  # not __main__'s copy: pickled by reference, not by value

    job = executor.submit(Job(f"dtrain.{args.command}", str(Path(args.config).resolve()), overrides,
                                    str(run_dir), args.nproc_per_node))
    print(f"launch.submit: job {job.job_id} ({executor.cluster}), run dir {run_dir}, logs {folder}",
          file=sys.stderr, flush=True)
    if args.no_wait:
        print(job.job_id)
        return 0
    try:
        result = job.results()[0]  # one task per node, each returns the run's status: node 0's
    except Exception as e:  # submitit re-raises the job's failure with its traceback text
        print(f"launch.submit: job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
