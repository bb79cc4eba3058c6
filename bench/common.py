"""What every benchmark shares: the machine line, medians, goal lines, the measured CPU matmul peak, and writing
one section of BENCHMARKS.md between its markers (<!-- bench:NAME --> ... <!-- /bench:NAME -->)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dtrain.logging import cpu_matmul_peak  # noqa: F401 - the one CPU peak measurement (dtrain/logging.py)

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is rewritten by its script (`make bench` runs them all). dtrain and its peer "
          "run in the same invocation on the same machine; numbers are medians of repetitions.\n")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    # BENCHMARKS.md itself is rewritten section by section during `make bench`: not a change to what is measured
    dirty = git("status", "--porcelain", "--", ".", ":!BENCHMARKS.md")
    return git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if dirty else "")


def machine_line(*packages: str) -> str:
    """`Machine: ... torch ..., <packages>, dtrain <commit>. Written <date>.`"""
    import importlib

    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            versions.append(f"{name} (not installed)")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}){gpu}, {_memory_gib():.0f} GiB RAM, Python "
            f"{platform.python_version()}, torch {torch.__version__}{''.join(', ' + v for v in versions)}, dtrain "
            f"{git_commit()}. Written {time.strftime('%Y-%m-%d')}.")


def _memory_gib() -> float:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return kb / 2 ** 20
    except (OSError, AttributeError):
        return 0.0


def processes() -> Iterator[tuple[int, str, int]]:
    """(pid, state, parent pid) of every process, from /proc/<pid>/stat (ones that exit meanwhile are skipped)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue
        yield int(stat.parent.name), fields[0], int(fields[1])


def busy_elsewhere(seconds: float = 1.0, samples: int = 10) -> float:
    """Mean number of runnable processes other than this one (and its children) over `seconds`: other work on the
    cores. (The load average would count this benchmark's own processes and decay from the previous one.)"""
    me = os.getpid()
    counts = []
    for _ in range(samples):
        counts.append(sum(state == "R" and me not in (pid, ppid) for pid, state, ppid in processes()))
        time.sleep(seconds / samples)
    return float(np.mean(counts))


def median(values: list[float]) -> float:
    return float(np.median(values))


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    """`median (min–max)` of the repetitions."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def goal(ok: bool, text: str) -> str:
    return f"**{'PASS' if ok else 'MISS'}**: {text}"


def ratio_goal(name: str, ratio: float, target: float, higher_is_better: bool = True) -> str:
    """`- ≥ 2.5× name: **MISS**: 2.21× (-12% vs the goal)`."""
    ok = ratio >= target if higher_is_better else ratio <= target
    margin = (ratio / target - 1) * 100
    return f"- {'≥' if higher_is_better else '≤'} {target:g}× {name}: " + goal(ok, f"{ratio:.2f}× ({margin:+.0f}% vs "
                                                                                  f"the goal)")


def reproduce(script: str) -> str:
    return f"Reproduce: `cd <repo> && .venv/bin/python {script} {shlex.join(sys.argv[1:])}`".replace(" `", " `", 1)


def write_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the section between <!-- bench:name --> and <!-- /bench:name --> (append it when missing)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    i, j = text.find(start), text.find(end)
    text = text[:i] + block + text[j + len(end):] if 0 <= i < j else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


@contextlib.contextmanager
def work_dir(keep: str | None, prefix: str) -> Iterator[Path]:
    """Where a benchmark keeps its data and runs: `keep` (its --work), else a temporary dir removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


def output_args(ap: argparse.ArgumentParser) -> None:
    """--work and --out, as every benchmark that trains takes them."""
    ap.add_argument("--work", help="keep the data and runs here (default: a temporary dir)")
    ap.add_argument("--out", default=str(BENCHMARKS))


TRAINED_RE = re.compile(r"trained (\d+) samples in ([\d.]+) s")


def torchrun_finetune(config: str, run_dir: Path, data: Path, nproc: int, *overrides: str) -> dict:
    """`torchrun -m dtrain.finetune` on data/{train,dev,test} into run_dir (a failure ends the benchmark with its log):
    {"report": report.json, "train_s": dtrain's training time (evaluations excluded), "samples", "wall_s", "log"}."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m",
           "dtrain.finetune", "--config", config, f"data.train={data / 'train'}", f"data.eval={data / 'dev'}",
           f"data.test={data / 'test'}", f"run_dir={run_dir}", "logging.progress_bar=false", "checkpoint.keep_last=1",
           *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"{run_dir.name} failed ({proc.returncode}):\n{log[-4000:]}")
    trained = TRAINED_RE.findall(log)
    return {"report": json.loads((run_dir / "report.json").read_text()), "wall_s": time.perf_counter() - t0,
            "train_s": float(trained[-1][1]) if trained else float("nan"),
            "samples": int(trained[-1][0]) if trained else 0, "log": log}
