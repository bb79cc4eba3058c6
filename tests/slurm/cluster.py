"""A real single-node Slurm cluster (slurmctld + slurmd + munged on this machine) for tests.

Installs the Debian packages when missing, writes a slurm.conf into a fresh temporary folder (so job ids restart
at 1 every session), links it to /etc/slurm/slurm.conf (clients inside `sbatch --export=NONE` jobs cannot see
SLURM_CONF), and runs the daemons in the foreground as children of this process so that `stop()` can end them by pid.
Needs root on Linux."""

from __future__ import annotations

import atexit
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

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
LINK = Path("/etc/slurm/slurm.conf")
PREFIX = "dtrain-slurm-"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be had on this machine (e.g. the packages cannot be installed): a reason to skip, not a bug."""


def _live_pid(pid_file: Path) -> int | None:
    """The pid in pid_file if that process still runs (a zombie does not: init here may be slow to reap)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        return pid if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" else None
    except (OSError, ValueError, IndexError):
        return None


def _end_orphans(folder: Path) -> None:
    """End the jobs and daemons of a cluster whose test session was killed before it could stop them."""
    if _live_pid(folder / "slurmctld.pid"):
        env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
    for pid_file in (folder / "slurmd.pid", folder / "slurmctld.pid"):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if pid := _live_pid(pid_file):
                os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while _live_pid(pid_file) and time.monotonic() < deadline:
                    time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


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
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"this machine's hostname {host!r} does not resolve (Slurm needs it to)"
    return _link_conflict()


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(missing)"]
    return f"--- {path.name} ---\n" + "\n".join(text)


class SlurmCluster:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}  # the daemons we started, in order; stopped in reverse
        self.linked = False

    @property
    def conf(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, scontrol, ...) against this cluster."""
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    # -- starting and stopping -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        if reason := why_unavailable():
            raise SlurmUnavailable(reason)
        atexit.register(self.stop)
        try:
            self._install()
            self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
            self._start_munge()
            self._write_conf()
            (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
            LINK.parent.mkdir(parents=True, exist_ok=True)
            if LINK.is_symlink():  # left by a killed session (checked by why_unavailable)
                _end_orphans(Path(os.readlink(LINK)).parent)
                LINK.unlink()
            LINK.symlink_to(self.conf)
            self.linked = True
            for daemon in ("slurmctld", "slurmd"):  # -D: in the foreground, as our children
                with open(self.dir / f"{daemon}.out", "wb") as out:
                    self.procs[daemon] = subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=out,
                                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                          start_new_session=True)
            self._wait_idle(timeout)
        except BaseException:
            self.stop(keep_dir=True)
            self.dir = None  # keep its logs for a look
            raise

    def _wait_idle(self, timeout: float) -> None:
        assert self.dir is not None
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if dead := [name for name, p in self.procs.items() if p.poll() is not None]:
                raise RuntimeError(f"{', '.join(dead)} exited at start\n{self._logs()}")
            state = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=10).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node is not idle after {timeout:.0f} s (state {state!r})\n{self._logs()}")

    def _logs(self) -> str:
        assert self.dir is not None
        names = ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out")
        return "\n".join(_tail(self.dir / n) for n in names) + f"\n(files in {self.dir})"

    def stop(self, keep_dir: bool = False) -> None:
        """End the jobs and the daemons this cluster started (SIGTERM, then SIGKILL); safe to call twice."""
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
        if self.linked and LINK.is_symlink() and self.dir and Path(os.readlink(LINK)) == self.conf:
            LINK.unlink()
        self.linked = False
        if self.dir and not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

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
        node = next(line for line in probe.splitlines() if line.startswith("NodeName="))
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""\
ClusterName=dtrain-test
SlurmctldHost={host}(127.0.0.1)
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
KillWait=30
JobRequeue=1
MinJobAge=300
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
{node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
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
