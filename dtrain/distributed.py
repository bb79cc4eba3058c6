"""Process group from torchrun or Slurm, device choice, the collectives the loop needs, clean teardown."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dtrain.errors import DtrainError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def _env_from_launcher() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else srun's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:  # srun without torchrun
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000))
        return rank, world, local
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return 0, 1, 0


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """After torchrun restarts a failed group (--max-restarts), the new workers meet in the same store as the old
    ones, whose keys are still there: a rank can read a dead peer's address and never connect (pytorch/pytorch
    #167288). Keys under a prefix per attempt avoid that. None (plain env://) outside a restart-capable torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or world == 1:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"dtrain/attempt-{attempt}", store)


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join (or create) the process group. CUDA → nccl and one GPU per local rank; CPU → gloo."""
    rank, world, local = _env_from_launcher()
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        os.environ[key] = str(value)  # DeepSpeed and DataLoader helpers read them
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise DtrainError("parallel.backend=nccl needs CUDA GPUs, and none is visible; use parallel.backend=gloo "
                          "or auto")
    if cuda:
        if local >= torch.cuda.device_count():
            raise DtrainError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); launch at most "
                              f"one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_attempt_store(rank, world, timeout))
    return DistEnv(rank, world, local, device, backend)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); a no-op without a process group."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (agreed stop/skip decisions)."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


# SIGTERM: the scheduler ends the job (scancel, time limit, preemption); SIGUSR1/SIGUSR2: its warning before that
# (sbatch --signal=B:USR2@120 in slurm/, submitit's USR2). torchrun forwards them to the workers (slurm/ asks it to).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_caught: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _caught.append(signum)


def catch_stop_signals() -> Callable[[], None]:
    """From now on a stop signal is remembered instead of killing the process; the training loop asks
    `stop_requested` at each step boundary, saves and exits. Returns the function that restores the old handlers."""
    _caught.clear()
    previous = {s: signal.signal(s, _remember) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


def stop_requested() -> str | None:
    """The name of the first stop signal this process caught (SIGUSR2, ...), or None."""
    return signal.Signals(_caught[0]).name if _caught else None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's `obj` on every rank (a decision one rank makes for all); itself without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown(synchronise: bool = True) -> None:
    """barrier, then destroy the process group (ZeRO-3 can abort at exit otherwise). After a failure that other
    ranks may not share (a timeout, a crash), no barrier: it would wait for a rank that is gone."""
    if dist.is_initialized():
        try:
            if synchronise:
                barrier()
        finally:
            dist.destroy_process_group()
