"""The launch helpers and Slurm scripts without a cluster: torchrun arguments from a fake Slurm environment, script
hygiene (bash -n, shellcheck), and the scripts' one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.torchrun import LaunchError, nproc_per_node, torchrun_command

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` on PATH that expands gpu[01-04] as Slurm does and records how it was called."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n'
                      '[ "$1 $2 $3" = "show hostnames gpu[01-04]" ] && printf "gpu01\\ngpu02\\ngpu03\\ngpu04\\n"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return calls


def test_rendezvous_of_four_nodes_with_eight_gpus_each(fake_scontrol):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_NODEID": "2"}
    cmd = torchrun_command("dtrain.pretrain", ["--config", "c.yaml", "optim.lr=1e-4"], env, python="/py")
    assert cmd[:3] == ["/py", "-m", "torch.distributed.run"]
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:19242",
            "--rdzv-id=dtrain-4242", "--max-restarts=0"} <= set(cmd)
    assert "--standalone" not in cmd
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" in cmd
    assert cmd[-5:] == ["-m", "dtrain.pretrain", "--config", "c.yaml", "optim.lr=1e-4"]
    assert fake_scontrol.read_text().split("\n")[0] == "show hostnames gpu[01-04]"
    # the port and the restart budget are settings; the GPUs may come from CUDA_VISIBLE_DEVICES instead
    env = {**env, "DTRAIN_RDZV_PORT": "29400", "DTRAIN_MAX_RESTARTS": "2", "SLURM_GPUS_ON_NODE": "",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    cmd = torchrun_command("dtrain.pretrain", [], env)
    assert {"--rdzv-endpoint=gpu01:29400", "--max-restarts=2", "--nproc-per-node=4"} <= set(cmd)


def test_processes_per_node():
    assert nproc_per_node({}) == 1  # no GPU: one CPU process
    assert nproc_per_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert nproc_per_node({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert nproc_per_node({"SLURM_GPUS_ON_NODE": "8", "DTRAIN_NPROC_PER_NODE": "2"}) == 2
    with pytest.raises(LaunchError, match=r"DTRAIN_NPROC_PER_NODE='two' is not a whole number"):
        nproc_per_node({"DTRAIN_NPROC_PER_NODE": "two"})
    with pytest.raises(LaunchError, match=r"DTRAIN_NPROC_PER_NODE=0 is below 1"):
        nproc_per_node({"DTRAIN_NPROC_PER_NODE": "0"})


def test_outside_slurm_one_standalone_node():
    cmd = torchrun_command("dtrain.finetune", ["--debug"], {"DTRAIN_NPROC_PER_NODE": "2"})
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd and not any("rdzv" in c for c in cmd)


def test_a_job_without_its_node_list_is_refused():
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not"):
        torchrun_command("dtrain.pretrain", [], {"SLURM_JOB_ID": "7"})


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, "-x", str(script.relative_to(REPO))], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def _sbatch_script(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a job script as sbatch would, but outside Slurm (the checks before srun)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DTRAIN_"))}
    return subprocess.run(["bash", str(REPO / "slurm" / name)], cwd=REPO, capture_output=True, text=True,
                          env={**clean, "DTRAIN_PYTHON": sys.executable, **env}, timeout=120)


def test_scripts_refuse_a_missing_config_in_one_line(tmp_path):
    result = _sbatch_script("pretrain.sh", tmp_path, DTRAIN_CONFIG="configs/pretrain/nope.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == ("dtrain-slurm: error: DTRAIN_CONFIG=configs/pretrain/nope.yaml: no such file "
                                     f"(relative paths start at {REPO})")
    result = _sbatch_script("finetune.sh", tmp_path, DTRAIN_PYTHON="/no/python")
    assert result.returncode == 2 and "DTRAIN_PYTHON=/no/python: not found" in result.stderr
    result = _sbatch_script("finetune.sh", tmp_path, DTRAIN_OVERRIDES="optim.nope=1")
    assert result.returncode == 2 and "does not resolve" in result.stderr and "optim.nope" in result.stderr


def test_the_head_node_refuses_a_rendezvous_port_that_is_taken():
    import socket

    from launch.torchrun import check_rendezvous

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match=f"rendezvous port {port} on the head node localhost is already in use"):
            check_rendezvous("localhost", port, 1, {})
    line = check_rendezvous("localhost", port, 1, {"SLURM_NODEID": "0"})  # free again
    assert line.endswith(f"rendezvous at localhost:{port} = 127.0.0.1:{port}")


def test_another_node_refuses_a_head_that_resolves_to_loopback(monkeypatch):
    import launch.torchrun as launcher

    with pytest.raises(LaunchError, match="the rendezvous host localhost is a loopback name"):
        launcher.check_rendezvous("localhost", 15000, 2, {})  # on every node, the head included
    with pytest.raises(LaunchError, match="does not resolve"):
        launcher.check_rendezvous("no-such-host.invalid", 15000, 2, {})
    monkeypatch.setattr(launcher, "_is_head", lambda host: False)
    monkeypatch.setattr(launcher, "_resolve", lambda host: "127.0.1.1")  # Debian's line for the own hostname
    with pytest.raises(LaunchError, match="resolves to 127.0.1.1 .* a loopback address"):
        launcher.check_rendezvous("head", 15000, 2, {})


def test_a_rendezvous_port_out_of_range_is_one_line():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "DTRAIN_RDZV_PORT": "70000"}
    with pytest.raises(LaunchError, match="DTRAIN_RDZV_PORT=70000 is above 65535"):
        torchrun_command("dtrain.pretrain", [], env)


def test_a_lost_peer_is_named_by_rank_and_host(monkeypatch):
    from dtrain import distributed

    world = [distributed.Peer(0, 0, "node1", "198.18.42.11", "eth0", 1),
             distributed.Peer(1, 1, "node2", "198.18.42.12", "eth0", 1)]
    monkeypatch.setattr(distributed, "_WORLD", world)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [198.18.42.12]:41184")
    assert distributed.lost_peer(gloo).startswith(
        "lost rank 1 on node2 (198.18.42.12): a collective failed (connection closed by peer)")
    assert distributed.lost_peer(RuntimeError("Timed out waiting 10000ms for recv")) is None
    monkeypatch.setattr(distributed, "_WORLD", world + [distributed.Peer(2, 1, "node2", "198.18.42.12", "eth0", 2)])
    assert distributed.lost_peer(gloo).startswith("lost a rank on node2 (198.18.42.12) (one of ranks 1,2)")
    monkeypatch.setattr(distributed, "_WORLD", [])  # a single process, or before the world is known
    assert distributed.lost_peer(gloo) is None


def test_gloo_across_hosts_with_a_loopback_hostname_stops_before_joining(monkeypatch):
    from dtrain import distributed
    from dtrain.errors import DtrainError

    monkeypatch.setattr(distributed, "network_interface", lambda backend: ("lo", "127.0.1.1"))
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts
    with pytest.raises(DtrainError, match="resolves to 127.0.1.1, a loopback address, but the run spans several "
                                          "hosts: set GLOO_SOCKET_IFNAME"):
        distributed._check_interface_before_init("gloo")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one host: loopback is what it should use
    distributed._check_interface_before_init("gloo")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")  # the user chose the interface
    distributed._check_interface_before_init("gloo")
