"""One node's share of a run: the torchrun command for this node, derived from Slurm's environment (or one local
node), then exec'd. slurm/*.sh run `srun --ntasks-per-node=1 python -m launch.torchrun dtrain.pretrain --config ...`;
launch.submit builds the same command with `node_command`.

- Rendezvous: c10d on the first host of `scontrol show hostnames $SLURM_JOB_NODELIST` (the head node; override
  with $DTRAIN_RDZV_HOST), port $DTRAIN_RDZV_PORT (default 15000 + job id mod 15000, so two jobs sharing a head node
  do not collide), id dtrain-<job id>. Each node prints the endpoint with the address it resolves to; the head node
  refuses a port that something already listens on, and another node refuses a head that resolves to loopback.
- Processes per node: $DTRAIN_NPROC_PER_NODE, else the GPUs Slurm granted ($SLURM_GPUS_ON_NODE, else the entries of
  $CUDA_VISIBLE_DEVICES), else 1 CPU process.
- Signals: torchrun forwards SIGTERM/SIGUSR1/SIGUSR2 (a scheduler's stop or warning) to its workers, which save at
  the next step boundary, and waits $DTRAIN_SHUTDOWN_TIMEOUT seconds (default 300) before killing them.
- Restarts of failed workers: $DTRAIN_MAX_RESTARTS (default 0); each restart resumes from checkpoints/latest.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


class LaunchError(ValueError):
    pass


def _int(environ: Mapping[str, str], key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    text = environ.get(key, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{key}={text!r} is not a whole number; set it to an integer ≥ {minimum} or unset it") \
            from None
    if value < minimum:
        raise LaunchError(f"{key}={value} is below {minimum}; set it to an integer ≥ {minimum} or unset it")
    if maximum is not None and value > maximum:
        raise LaunchError(f"{key}={value} is above {maximum}; set it to an integer ≤ {maximum} or unset it")
    return value


def hostnames(nodelist: str) -> list[str]:
    """Slurm's compressed node list (gpu[01-04],cpu7) expanded by `scontrol show hostnames`, in Slurm's order."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise LaunchError("scontrol is not on PATH: launch.torchrun needs the Slurm client tools inside a Slurm job")\
            from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {e.stderr.strip()}") from None
    hosts = out.stdout.split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts


def nproc_per_node(environ: Mapping[str, str]) -> int:
    explicit = _int(environ, "DTRAIN_NPROC_PER_NODE", 0, minimum=1 if environ.get("DTRAIN_NPROC_PER_NODE") else 0)
    if explicit:
        return explicit
    gpus = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus:
        return max(1, _int(environ, "SLURM_GPUS_ON_NODE", 1))
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip() and d.strip() != "-1"]
    return len(visible) or 1


def torchrun_command(entry: str, args: Sequence[str], environ: Mapping[str, str] | None = None,
                     python: str = sys.executable) -> list[str]:
    """`python -m torch.distributed.run <rendezvous for this job> -m <entry> <args>`."""
    environ = os.environ if environ is None else environ
    command = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node(environ)}",
               f"--max-restarts={_int(environ, 'DTRAIN_MAX_RESTARTS', 0)}",
               f"--signals-to-handle={FORWARDED_SIGNALS}",
               f"--shutdown-timeout={_int(environ, 'DTRAIN_SHUTDOWN_TIMEOUT', 300, minimum=1)}"]
    job = environ.get("SLURM_JOB_ID")
    if job:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
        if not nodelist:
            raise LaunchError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside an sbatch/salloc job")
        nodes = _int(environ, "SLURM_JOB_NUM_NODES", 0, minimum=1) or _int(environ, "SLURM_NNODES", 1, minimum=1)
        port = _int(environ, "DTRAIN_RDZV_PORT", 15000 + _int(environ, "SLURM_JOB_ID", 0) % 15000, minimum=1,
                    maximum=65535)
        head = environ.get("DTRAIN_RDZV_HOST") or hostnames(nodelist)[0]
        command += [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{port}",
                    f"--rdzv-id=dtrain-{job}"]
    else:
        command += ["--standalone", "--nnodes=1"]
    return [*command, "-m", entry, *args]


def rendezvous_endpoint(command: Sequence[str]) -> tuple[str, int] | None:
    for arg in command:
        if arg.startswith("--rdzv-endpoint="):
            host, _, port = arg.removeprefix("--rdzv-endpoint=").rpartition(":")
            return host, int(port)
    return None


def _is_loopback_name(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback  # a literal 127.x / ::1 (a name is not)
    except ValueError:
        return False


def _is_head(host: str) -> bool:
    here = socket.gethostname()
    return host in (here, here.split(".")[0], "localhost") or host == _resolve(here)


def _resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def check_rendezvous(host: str, port: int, nodes: int, environ: Mapping[str, str]) -> str:
    """The line this node prints about the rendezvous; raises LaunchError where the rendezvous cannot work."""
    address = _resolve(host)
    if nodes > 1 and (host == "localhost" or (address is not None and _is_loopback_name(host))):
        raise LaunchError(f"the rendezvous host {host} is a loopback name: the other nodes cannot reach it; set "
                          f"DTRAIN_RDZV_HOST to the head node's name or address on the cluster network")
    if address is None:
        raise LaunchError(f"the rendezvous host {host} does not resolve on {socket.gethostname()}; fix the node's "
                          f"name resolution (/etc/hosts, DNS) or set DTRAIN_RDZV_HOST to the head node's address")
    if _is_head(host):
        with socket.socket() as probe:  # SO_REUSEADDR: only a listening socket makes the bind fail
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise LaunchError(f"the rendezvous port {port} on the head node {host} is already in use (another "
                                      f"job or service listens on it); set DTRAIN_RDZV_PORT to a free port") from None
                raise LaunchError(f"the rendezvous port {port} on the head node {host} cannot be opened ({e.strerror});"
                                  f" set DTRAIN_RDZV_PORT to another port (1024-65535)") from None
    elif nodes > 1 and _is_loopback_name(address):
        raise LaunchError(f"the rendezvous host {host} resolves to {address} on {socket.gethostname()}, a loopback "
                          f"address: the other nodes cannot reach it there; fix the name resolution or set "
                          f"DTRAIN_RDZV_HOST to the head node's address on the cluster network")
    node = environ.get("SLURM_NODEID", "0")
    return f"node {node} of {nodes} ({socket.gethostname()}): rendezvous at {host}:{port} = {address}:{port}"


def node_command(entry: str, args: Sequence[str], environ: Mapping[str, str] | None = None,
                 python: str = sys.executable) -> tuple[list[str], str | None]:
    """This node's torchrun command, checked, and the line to print about its rendezvous (None: standalone)."""
    environ = os.environ if environ is None else environ
    command = torchrun_command(entry, args, environ, python)
    if (endpoint := rendezvous_endpoint(command)) is None:
        return command, None
    nodes = next(int(a.split("=")[1]) for a in command if a.startswith("--nnodes="))
    return command, check_rendezvous(*endpoint, nodes, environ)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m launch.torchrun dtrain.pretrain|dtrain.finetune --config X [key=value ...]\n\n"
              + (__doc__ or ""), file=sys.stderr)
        return 0 if argv else 2
    try:
        command, rendezvous = node_command(argv[0], argv[1:])
        if rendezvous:
            print("launch.torchrun: " + rendezvous, file=sys.stderr, flush=True)
    except LaunchError as e:
        print(f"launch.torchrun: error: {e}", file=sys.stderr)
        return 2
    print("launch.torchrun: " + " ".join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
