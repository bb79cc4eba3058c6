"""A real multi-host Slurm cluster on this one machine, for tests: slurmctld + one munged in this machine's own
namespaces, and N nodes (2 by default), each a Linux network namespace with its own address on a bridge this module
creates, its own hostname (UTS namespace) and a bind-mounted hosts file naming every node (mount namespace), with
one slurmd running inside those namespaces (per-node spool, pid and log files: `%n` in slurm.conf). Jobs that the
slurmds start inherit their node's namespaces, so a 2-node job really crosses a network: node1 and node2 reach each
other only through the bridge. The filesystem stays shared (one run dir, one munge socket), as on a cluster with a
shared filesystem.

The addresses (198.18.42.0/24, the benchmarking block) exist only on that bridge, with no route out. Installs the
Debian packages when missing, writes a slurm.conf into a fresh temporary folder (so job ids restart at 1 every
session), links it to /etc/slurm/slurm.conf (clients inside `sbatch --export=NONE` jobs cannot see SLURM_CONF), runs
the daemons in the foreground as children of this process, and `stop()` ends them by pid, then every process left in
a node's namespace, then deletes the namespaces, links and files it made (also those of a killed earlier session).
Needs root on Linux, `ip` (iproute2), `nsenter` and `unshare` (util-linux)."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
LINK = Path("/etc/slurm/slurm.conf")
PREFIX = "dtrain-slurm-"
SUBNET = "198.18.42"  # .1: the bridge (slurmctld, the tests); .11, .12, ...: node1, node2, ...
BRIDGE = "dtrain-br0"
NETNS = "dtrain-node"  # + the node number: the network namespace of node<i>
VETH = "dtrain-veth"  # + the node number: the bridge's end of node<i>'s link (its own end is eth0)
IFNAME = "eth0"
LOCK = Path(tempfile.gettempdir()) / "dtrain-slurm.lock"  # held (flock) by the session whose cluster runs


def _lock() -> int | None:
    """This machine's test-cluster lock, taken without waiting: its fd, or None when another session holds it."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be had on this machine (e.g. the packages cannot be installed): a reason to skip, not a bug."""


def _live_pid(pid_file: Path) -> int | None:
    """The pid in pid_file if that process still runs (a zombie does not: init here may be slow to reap)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        return pid if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" else None
    except (OSError, ValueError, IndexError):
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _end_orphans(folder: Path) -> None:
    """End the jobs and daemons of a cluster whose test session was killed before it could stop them."""
    if _live_pid(folder / "slurmctld.pid"):
        env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
    for pid_file in (*sorted(folder.glob("slurmd*.pid")), folder / "slurmctld.pid"):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if (pid := _live_pid(pid_file)) and _command(pid).startswith("slurm"):  # not a reused pid
                os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while _live_pid(pid_file) and time.monotonic() < deadline:
                    time.sleep(0.1)
    _remove_network()
    shutil.rmtree(folder, ignore_errors=True)


def _ip(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _our_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines()
            if line.split() and line.split()[0].startswith(NETNS)]


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process whose network namespace is `netns` (a node's daemons and jobs), and wait for them."""
    deadline = time.monotonic() + 10
    while (pids := [int(p) for p in _ip("netns", "pids", netns).stdout.split()]) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _remove_network() -> None:
    """Delete the namespaces, links and bridge of a test cluster (ours, or a killed session's); quiet if absent."""
    for netns in _our_namespaces():
        _kill_namespace(netns)
        _ip("link", "del", VETH + netns.removeprefix(NETNS))  # gVisor keeps the peer of a deleted namespace
        _ip("netns", "del", netns)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(VETH):
            _ip("link", "del", name)
    _ip("link", "del", BRIDGE)


def _link_conflict() -> str | None:
    """Why /etc/slurm/slurm.conf cannot be ours: a real config, or the link of a cluster that is still running."""
    if LINK.is_symlink():
        target = Path(os.readlink(LINK))
        if not target.parent.name.startswith(PREFIX):
            return f"{LINK} links to {target}, not to a test cluster's config; not touching it"
        if owner := _live_pid(target.parent / "owner.pid"):
            return f"another test Slurm cluster is running (process {owner}, {target.parent})"
        return None  # left by a killed session: start() ends its daemons and replaces the link
    if LINK.exists():
        return f"{LINK} is a real Slurm config; not replacing it with a test cluster's"
    return None


def why_unavailable() -> str | None:
    """The reason a test cluster cannot be started here, or None when it can."""
    if platform.system() != "Linux":
        return f"a test Slurm cluster needs Linux, not {platform.system()}"
    if os.geteuid() != 0:
        return "a test Slurm cluster needs root (to install Slurm and run its daemons)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if not shutil.which(tool):
            return f"the multi-host test cluster needs `{tool}` ({package}) to make its network namespaces"
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"this machine's hostname {host!r} does not resolve (Slurm needs it to)"
    if (fd := _lock()) is None:
        return f"another test Slurm cluster is running on this machine (a session holds {LOCK})"
    os.close(fd)  # (closing releases it: start() takes it for good)
    return _link_conflict()


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(missing)"]
    return f"--- {path.name} ---\n" + "\n".join(text)


class SlurmCluster:
    def __init__(self, nodes: int = 2) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}  # the daemons we started, in order; stopped in reverse
        self.linked = False
        self.network = False
        self.lock: int | None = None  # the fd holding LOCK while this cluster runs
        self.killed: set[str] = set()  # nodes lost by kill_node, not revived yet

    @property
    def conf(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @staticmethod
    def address(node: str) -> str:
        """node<i>'s address on the bridge (the only interface it has besides lo)."""
        return f"{SUBNET}.{10 + int(node.removeprefix('node'))}"

    @staticmethod
    def netns(node: str) -> str:
        return NETNS + node.removeprefix("node")

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, scontrol, ...) against this cluster."""
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def on_node(self, node: str, *cmd: str, **popen: Any) -> subprocess.Popen:
        """Start `cmd` inside node's namespaces (network, hostname, hosts file), as its jobs run."""
        slurmd = self.procs[f"slurmd-{node}"]
        return subprocess.Popen(["nsenter", f"--target={slurmd.pid}", "--net", "--uts", "--mount", *cmd], **popen)

    # -- starting and stopping -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        if reason := why_unavailable():
            raise SlurmUnavailable(reason)
        if (lock := _lock()) is None:
            raise SlurmUnavailable(f"another test Slurm cluster is running on this machine (a session holds {LOCK})")
        self.lock = lock  # from here on no other session touches the namespaces, the link or the daemons
        atexit.register(self.stop)
        try:
            self._install()
            self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
            self._start_munge()
            (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
            LINK.parent.mkdir(parents=True, exist_ok=True)
            if LINK.is_symlink():  # left by a killed session (checked by why_unavailable)
                _end_orphans(Path(os.readlink(LINK)).parent)
                LINK.unlink()
            _remove_network()  # a killed session's namespaces (we hold the lock: nobody else's are running)
            self._make_network()
            self._write_conf()
            LINK.symlink_to(self.conf)
            self.linked = True
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in self.nodes:
                self.start_node(node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop(keep_dir=True)
            self.dir = None  # keep its logs for a look
            raise

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        assert self.dir is not None
        with open(self.dir / f"{name}.out", "ab") as out:  # -D: in the foreground, as our child
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)

    def _make_network(self) -> None:
        """The bridge (with an address of its own, for slurmctld and the tests) and one namespace per node."""
        _ip("link", "add", BRIDGE, "type", "bridge", check=True)
        self.network = True
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE, check=True)
        _ip("link", "set", BRIDGE, "up", check=True)
        for node in self.nodes:
            ns, veth = self.netns(node), VETH + node.removeprefix("node")
            _ip("netns", "add", ns, check=True)
            _ip("link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", ns, check=True)
            _ip("link", "set", veth, "master", BRIDGE, check=True)
            _ip("link", "set", veth, "up", check=True)
            for args in (("addr", "add", f"{self.address(node)}/24", "dev", IFNAME), ("link", "set", IFNAME, "up"),
                         ("link", "set", "lo", "up")):  # no default route: nothing leaves the bridge
                _ip("-n", ns, *args, check=True)

    def start_node(self, node: str) -> None:
        """Start node's slurmd inside its namespaces (again, after kill_node)."""
        assert self.dir is not None
        running = self.procs.get(f"slurmd-{node}")
        if running is not None and running.poll() is None:
            raise RuntimeError(f"{node}'s slurmd is running already (pid {running.pid})")
        (self.dir / "spool" / node).mkdir(parents=True, exist_ok=True)
        # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup tree slurmd reads
        inner = f"mount --bind {self.dir / 'hosts'} /etc/hosts && hostname {node} && " \
                f"exec slurmd -D -N {node} -f {self.conf}"
        self._start_daemon(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--uts",
                                              "--mount", "sh", "-c", inner])

    def kill_node(self, node: str) -> None:
        """Lose node: SIGKILL every process in its namespace at once (its slurmd, its job steps, dtrain's ranks)."""
        self.killed.add(node)
        self.procs.pop(f"slurmd-{node}", None)
        _kill_namespace(self.netns(node))

    def revive_node(self, node: str, timeout: float = 60) -> None:
        """After kill_node: start its slurmd again and wait until every node is idle (nothing for a live node)."""
        if node not in self.killed:
            return
        self.killed.discard(node)
        self.start_node(node)
        self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
        self._wait_idle(timeout)

    def _wait_idle(self, timeout: float) -> None:
        assert self.dir is not None
        deadline, states = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if dead := [name for name, p in self.procs.items() if p.poll() is not None]:
                raise RuntimeError(f"{', '.join(dead)} exited at start\n{self._logs()}")
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.strip()
            if sorted(states.split()) == sorted([*self.nodes, *["idle"] * len(self.nodes)]):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes are not idle after {timeout:.0f} s ({states!r})\n{self._logs()}")

    def _logs(self) -> str:
        assert self.dir is not None
        names = ["slurmctld.log", "slurmctld.out", *(f"slurmd-{n}.{e}" for n in self.nodes for e in ("log", "out"))]
        return "\n".join(_tail(self.dir / n) for n in names) + f"\n(files in {self.dir})"

    def stop(self, keep_dir: bool = False) -> None:
        """End the jobs, the daemons, every process left in a node and the network this cluster made (SIGTERM,
        then SIGKILL); safe to call twice."""
        ctld = self.procs.get("slurmctld")
        if ctld and ctld.poll() is None:  # end the jobs first, so that no slurmstepd outlives the cluster
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        procs = list(self.procs.values())[::-1]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.network:
            _remove_network()
            self.network = False
        if self.linked and LINK.is_symlink() and self.dir and Path(os.readlink(LINK)) == self.conf:
            LINK.unlink()
        self.linked = False
        if self.dir and not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def _install(self) -> None:
        if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
        res = subprocess.run(install, env=env, capture_output=True, text=True)
        if res.returncode:  # stale or missing package lists
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            res = subprocess.run(install, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)}: {(res.stdout + res.stderr)[-2000:]}")

    def _start_munge(self) -> None:
        """Reuse a munged that works; else start one (as the munge user), with the key and folders it needs."""
        if self._munge_works():
            return
        munge = pwd.getpwnam("munge")
        for path, mode in (("/etc/munge", 0o700), ("/var/lib/munge", 0o700), ("/var/log/munge", 0o700),
                           ("/run/munge", 0o755)):
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chown(key, munge.pw_uid, munge.pw_gid)
            key.chmod(0o400)
        assert self.dir is not None
        with open(self.dir / "munged.out", "wb") as out:
            self.procs["munged"] = proc = subprocess.Popen(["munged", "-F"], user="munge", group="munge",
                                                           extra_groups=[], stdout=out, stderr=subprocess.STDOUT,
                                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._munge_works():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{_tail(self.dir / 'munged.out')}")
            time.sleep(0.2)

    @staticmethod
    def _munge_works() -> bool:
        cred = subprocess.run(["munge", "-n"], capture_output=True)
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True)
        return cred.returncode == 0 and check.returncode == 0

    def _write_conf(self) -> None:
        assert (d := self.dir) is not None
        (d / "state").mkdir()
        (d / "spool").mkdir()
        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        hardware = next(line for line in probe.splitlines() if line.startswith("NodeName="))
        hardware = re.sub(r"^NodeName=\S+\s*|\s*UpTime=.*$", "", hardware)  # CPUs=2 ... RealMemory=...
        host = socket.gethostname().split(".")[0]
        (d / "hosts").write_text(f"127.0.0.1 localhost\n{SUBNET}.1 {host}\n"
                                 + "".join(f"{self.address(n)} {n}\n" for n in self.nodes))
        nodes = "".join(f"NodeName={n} NodeAddr={self.address(n)} {hardware} State=UNKNOWN\n" for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=dtrain-test
SlurmctldHost={host}({SUBNET}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
SlurmdTimeout=20
KillWait=30
JobRequeue=1
MinJobAge=300
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # -- jobs ------------------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> int:
        res = subprocess.run(["sbatch", *args], cwd=cwd, env=env or self.env, capture_output=True, text=True,
                             timeout=30)
        if res.returncode or not (m := re.search(r"Submitted batch job (\d+)", res.stdout)):
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return int(m.group(1))

    def wait_job(self, job_id: int, timeout: float = 120) -> None:
        """Wait until the job has left the queue (finished, failed or cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", str(job_id), check=False).stdout.strip():
                return
            time.sleep(0.5)
        show = self.run("scontrol", "show", "job", str(job_id), check=False)
        raise TimeoutError(f"job {job_id} still queued after {timeout:.0f} s:\n{show.stdout}{show.stderr}")

    def job_state(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        return {m[1]: m[2] for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", line)}
