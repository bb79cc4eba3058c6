"""Process group from torchrun or Slurm, device choice, the collectives the loop needs, clean teardown, and what a
run across several hosts needs: who runs where (host, address and interface of every rank, gathered and printed
at start), the checks that every node agrees (same processes per node, one shared run dir) and the one line that names
the rank and host a failed collective lost."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class Peer:
    """One rank of the world: where it runs and which address its collectives use."""

    rank: int
    node_rank: int
    host: str
    address: str
    interface: str
    local_world_size: int


_WORLD: list[Peer] = []  # every rank's Peer, gathered once at init (empty for a single process)


def _ipv4_of(interface: str) -> str | None:
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def network_interface(backend: str) -> tuple[str, str]:
    """(interface, address) this process's collectives use: the interface named by GLOO_SOCKET_IFNAME /
    NCCL_SOCKET_IFNAME, else (gloo's own rule) the address this host's name resolves to."""
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    if os.environ.get(variable):
        value = os.environ[variable]
        name = value.split(",")[0].lstrip("=")
        return f"{value} ({variable})", (_ipv4_of(name) if not name.startswith("^") else None) or "?"
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "?", "?"
    names = [n for _, n in socket.if_nameindex() if _ipv4_of(n) == address]
    return (names[0] if names else "?"), address


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_interface_before_init(backend: str) -> None:
    """Several hosts and a hostname that resolves to loopback (Debian's 127.0.1.1): gloo would offer the other
    hosts 127.0.1.1 and the group would hang until the timeout. Say so before joining."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0)
    if backend != "gloo" or not local or world <= local or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    _, address = network_interface(backend)
    if _is_loopback(address):
        raise DtrainError(f"this host's name {socket.gethostname()} resolves to {address}, a loopback address, but "
                          f"the run spans several hosts: set GLOO_SOCKET_IFNAME to the interface of the cluster "
                          f"network (e.g. GLOO_SOCKET_IFNAME=eth0), or fix the host's name resolution")


def _node_rank() -> int:
    for key in ("GROUP_RANK", "SLURM_NODEID"):  # torchrun's node rank, else srun's
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _gather_world(env: DistEnv) -> None:
    """Every rank's Peer on every rank; rank 0 prints who runs where; nodes must run the same number of ranks."""
    _WORLD.clear()
    if env.world_size == 1:
        return
    interface, address = network_interface(env.backend)
    mine = Peer(env.rank, _node_rank(), socket.gethostname(), address, interface,
                int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0))
    box: list[Any] = [None] * env.world_size
    dist.all_gather_object(box, mine)
    _WORLD.extend(sorted(box, key=lambda p: p.rank))
    nodes: dict[tuple[int, str], list[Peer]] = {}
    for peer in _WORLD:
        nodes.setdefault((peer.node_rank, peer.host), []).append(peer)
    if env.is_main:
        described = "; ".join(f"node rank {n} {h} {ps[0].address} ({ps[0].interface}): rank"
                              f"{'s' if len(ps) > 1 else ''} {','.join(str(p.rank) for p in ps)}"
                              for (n, h), ps in sorted(nodes.items()))
        print(f"dtrain: world size {env.world_size} on {len(nodes)} node{'s' if len(nodes) > 1 else ''} "
              f"({env.backend}): {described}", file=sys.stderr, flush=True)
    counts = {host: ps[0].local_world_size or len(ps) for (_, host), ps in sorted(nodes.items(), key=lambda n: n[0][1])}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{host} {n}" for host, n in counts.items())
        raise DtrainError(f"the nodes run different numbers of processes ({listed}): DTRAIN_NPROC_PER_NODE (or the "
                          f"GPUs per node) differs between nodes; give every node the same number (torchrun "
                          f"--nproc-per-node)")


def check_shared_dir(path: Path, key: str, timeout_s: float = 10.0) -> None:
    """Across several hosts, `path` must be on a filesystem every node sees at the same path (checkpoints, the
    stream's position and status.json are written by one rank and read by all). Rank 0 writes a marker next to it
    (in the nearest existing folder; removed again, so an earlier run dir stays as it was) and every rank reads it."""
    if len({p.host for p in _WORLD}) < 2:
        return
    marker, error = None, None
    if dist.get_rank() == 0:
        folder = path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        marker = folder / f".dtrain-shared-check-{secrets.token_hex(8)}"
        try:
            marker.write_text(marker.name, encoding="utf-8")
        except OSError as e:
            error = f"{key}={path}: rank 0 cannot write in {folder} ({e.strerror}); point {key} at a writable " \
                    f"shared folder"
    marker, error = broadcast_object((marker, error))
    if error:
        raise DtrainError(error)
    deadline = time.monotonic() + timeout_s  # a network filesystem may show a new file a moment later
    while not (sees := _reads(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, (dist.get_rank(), socket.gethostname(), sees))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, seen in box if not seen]
    if blind:
        who = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise DtrainError(f"{key}={path} is not on a filesystem every node sees: rank 0 on {socket.gethostname()} "
                          f"wrote {marker.name} in {marker.parent}, but {who} cannot read it; put {key} (and the "
                          f"data) on a shared filesystem (NFS, Lustre, GPFS, ...) mounted at the same path on every "
                          f"node")


def _reads(marker: Path) -> bool:
    try:
        return marker.read_text(encoding="utf-8") == marker.name
    except OSError:
        return False


_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def lost_peer(error: BaseException) -> str | None:
    """For a collective that failed because a peer's connection broke (its process or its node died): one
    sentence naming the rank(s) and host(s) lost, from the address in the message; None for other errors."""
    text = str(error)
    if not _WORLD or not any(k in text.lower() for k in _LOST):  # (no world yet: not a collective's failure)
        return None
    addresses = re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?", text)
    me = dist.get_rank() if dist.is_initialized() else -1
    lost = [p for p in _WORLD if p.address in addresses and p.rank != me]
    reason = next(k for k in _LOST if k in text.lower())
    hosts = sorted({(p.host, p.address) for p in lost})
    where = "; ".join(f"{h} ({a})" for h, a in hosts)
    if len(lost) == 1:
        what = f"lost rank {lost[0].rank} on {where}"
    elif lost:  # several ranks share the address (processes of one node): the message does not say which one
        what = f"lost a rank on {where} (one of ranks {','.join(str(p.rank) for p in lost)})"
    else:
        what = f"lost a peer{' at ' + ', '.join(dict.fromkeys(addresses)) if addresses else ''}"
    return f"{what}: a collective failed ({reason}), so that process or its node died; this rank stops too. " \
           f"Resubmit the run: it resumes from checkpoints/latest, also on fewer nodes (the world size may change)"


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
        _check_interface_before_init(backend)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_attempt_store(rank, world, timeout))
    env = DistEnv(rank, world, local, device, backend)
    _gather_world(env)
    return env


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
