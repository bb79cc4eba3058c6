"""Memory per rank: peak RSS of each of 2 CPU ranks training BERT with DDP and DeepSpeed ZeRO-1/2/3 (+ offload).

  .venv/bin/python bench/memory.py                                  # writes its section of BENCHMARKS.md
  .venv/bin/python bench/memory.py --models base --out /tmp/bench-memory.md   # smoke run

Each run is the real entry point, `torchrun --standalone --nproc_per_node=2 -m dtrain.pretrain`, on
`configs/pretrain/debug.yaml` with a random-init preset (bert-base-uncased / bert-large-uncased), fp32, on 100 BBC
example articles (prepared once by `dtrain prepare pretrain` into a temp dir), no evaluation. Measured from outside,
dtrain unchanged: when rank 0 logs step --steps (of --steps + 1), this script reads /proc/<pid>/status VmHWM (the
kernel's peak resident set size) of both workers (torchrun's children, told apart by their RANK) and kills the run
(SIGKILL to its process group), so the final checkpoint dtrain always writes is neither measured nor waited for.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402

CONFIG = "configs/pretrain/debug.yaml"
MODELS = {"base": "preset:bert-base-uncased", "large": "preset:bert-large-uncased"}  # random init
NPROC, SEQ, GIB = 2, 128, 2 ** 30  # ranks unless a label says `@N`
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # a label's `:mmap`: glibc returns blocks ≥ 128 KiB to the kernel
# Key names as `dtrain config keys` lists them.
COMMON = ["model.tokenizer=minilm", f"data.max_seq_len={SEQ}", "data.num_workers=0", "data.train={data}",
          "data.eval=null", "run_dir={run_dir}", "schedule.max_steps={steps}", "schedule.grad_accum_steps=1",
          "schedule.warmup=1", "data.micro_batch_size={micro_batch}", "precision.dtype=fp32", "optim.name=adamw",
          "checkpoint.every_steps=null", "checkpoint.export=false", "checkpoint.resume=none", "logging.every_steps=1",
          "logging.tensorboard=false", "logging.progress_bar=false"]
OFFLOAD = "ZeRO-3 + CPU offload"
ENGINES = {  # label: overrides
    "DDP": ["parallel.engine=ddp", "parallel.zero_stage=0"],
    "ZeRO-1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "ZeRO-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "ZeRO-3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    OFFLOAD: ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.offload_optimizer=true",
              "parallel.offload_params=true"],
}
STEP_RE = re.compile(r"^step (\d+)/\d+ ")
NOTES = [
    "What limits it (fp32 on CPU, the DeepSpeed config dtrain generates):",
    "- dtrain sizes ZeRO's buffers to the model (hidden size h: reduce bucket h², ZeRO-3 prefetch bucket 0.9·h², "
    "parameters under 10·h not partitioned, as HF Trainer's \"auto\" values). With DeepSpeed's defaults (5e8-element "
    "reduce and all-gather buckets) ZeRO-3 measured 1.34× DDP for bert-base and 1.32× for bert-large; lowering "
    "`stage3_max_live_parameters` / `stage3_max_reuse_distance` alone changed nothing.",
    "- ZeRO-3 builds the model partitioned (`deepspeed.zero.Init` through transformers): no rank holds the whole "
    "model. Still, glibc keeps freed blocks of up to 32 MiB in its heap (its mmap threshold grows to the size of what "
    "was freed), so what the whole-tensor random init on rank 0, the per-layer gathers and the buckets free is not "
    "returned to the kernel: sampled every 2 s, a bert-large ZeRO-3 rank at 2 ranks grew from 0.8 GiB to 3.0 GiB "
    "while the model was built and to 4.8 GiB by the end of DeepSpeed's start. "
    "A fixed `MALLOC_MMAP_THRESHOLD_` (glibc then returns every block above it on free) trades that memory for time: "
    "at 4 ranks, 131072 and 1048576 measured 4.1-4.2 GiB at ~1.6× the s/step, 8388608 4.6 GiB at ~1.1×, none "
    "5.1 GiB; so dtrain's launchers leave it unset (export it for a run that is short of memory).",
    "- ZeRO-1/2 in fp32 keep the full flat parameters plus a cloned fp32 master copy of their partition, so sharding "
    "the moments (and gradients) over 2 ranks saves little; activations are never sharded; and the Python/torch/"
    "DeepSpeed baseline of each process (~0.5 GiB) weighs most for the smaller model.",
]


def parse_label(label: str) -> tuple[str, int, dict[str, str]]:
    """`ZeRO-3@4:mmap` → ("ZeRO-3", 4 ranks, the allocator environment); `DDP` → ("DDP", 2, {})."""
    base, _, mmap = label.partition(":")
    engine, _, ranks = base.partition("@")
    name, _, size = mmap.partition("=")
    if engine not in ENGINES or name not in ("", "mmap") or not (ranks or "2").isdigit() or not (size or "0").isdigit():
        raise ValueError(f"--engines: {label!r} is not ENGINE[@RANKS][:mmap[=BYTES]] with ENGINE one of "
                         f"{', '.join(ENGINES)}")
    return engine, int(ranks or NPROC), ({"MALLOC_MMAP_THRESHOLD_": size} if size else MMAP) if mmap else {}


def shown(label: str) -> str:
    """A run label as the table shows it: `ZeRO-3@4:mmap` → `ZeRO-3, 4 ranks, MALLOC_MMAP_THRESHOLD_=131072`."""
    engine, nproc, allocator = parse_label(label)
    ranks = [f"{nproc} ranks"] if nproc != NPROC else []
    return ", ".join([engine, *ranks, *(f"{k}={v}" for k, v in allocator.items())])


def goal_engine(by_engine: dict) -> str:
    """The run the goal reads: ZeRO-3 at 4 ranks where it ran, else at 2."""
    return "ZeRO-3@4" if "ZeRO-3@4" in by_engine else "ZeRO-3"


def workers(parent: int) -> dict[int, tuple[int, str]]:
    """{RANK: (pid, MASTER_PORT)} of the direct children of `parent` that torchrun started."""
    out = {}
    for pid, _, ppid in common.processes():
        if ppid != parent:
            continue
        try:
            env = dict(e.decode().split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                       if e.split(b"=", 1)[0] in (b"RANK", b"MASTER_PORT"))
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = (pid, env.get("MASTER_PORT", ""))
    return out


def proc_kib(path: str, key: str) -> int:
    try:
        m = re.search(rf"{key}:\s+(\d+) kB", Path(path).read_text())
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


def vm_hwm(pid: int) -> float:
    """Peak resident set size of `pid` in GiB (0 once it has exited)."""
    return proc_kib(f"/proc/{pid}/status", "VmHWM") / 2 ** 20


def alive(pid: int) -> bool:
    """Running or exiting (a zombie has given its memory back)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the run's process group: torchrun and its workers."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def failure(rc: int, output: str) -> str:
    """One line saying why a run failed."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (r"dtrain: error: .*", r"^\w*(Error|Exception): .*", r"Signal \d+ \(\w+\) received.*",
                    r"exitcode\s*:\s*-?\d+.*"):
        hits = [m.group(0) for ln in lines if (m := re.search(pattern, ln))]
        if hits:
            return hits[-1][:200].replace("|", "/")
    return f"exit status {rc}" + (f": {lines[-1][:160]}" if lines else "")


def run_one(model: str, label: str, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """One torchrun, killed as soon as rank 0 logs step `args.steps`: {"peak": [GiB per rank], ...} or
    {"failed": why, "at_least": GiB when it was stopped for memory}."""
    engine, nproc, allocator = parse_label(label)
    values = {"data": data, "run_dir": work / "run", "steps": args.steps + 1, "micro_batch": args.micro_batch}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m",
           "dtrain.pretrain", "--config", CONFIG, f"model.name_or_path={MODELS[model]}",
           *(o.format(**values) for o in COMMON), *ENGINES[engine]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           **allocator}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ranks: dict[int, tuple[int, str]] = {}
    result: dict = {}
    lines: list[str] = []
    step_at: dict[int, float] = {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if m := STEP_RE.match(line):
                step_at[int(m.group(1))] = time.perf_counter()
                if int(m.group(1)) == args.steps and len(ranks) == nproc and not result:
                    result["peak"] = [vm_hwm(ranks[r][0]) for r in range(nproc)]
                    kill(proc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        if len(ranks) < nproc:
            ranks.update(workers(proc.pid))
        if proc_kib("/proc/meminfo", "MemAvailable") < args.min_available * 2 ** 20 and not result:
            result["at_least"] = max((vm_hwm(pid) for pid, _ in list(ranks.values())), default=0)
            result["failed"] = f"stopped: the machine had < {args.min_available:g} GiB available"
        elif time.perf_counter() - t0 > args.timeout and not result:
            result["failed"] = f"timed out after {args.timeout:.0f} s"
        if "failed" in result:
            kill(proc)
        time.sleep(0.1)
    reader.join(10)
    deadline = time.perf_counter() + 60  # the killed workers may still be freeing their memory: the next run waits
    while time.perf_counter() < deadline and any(alive(pid) for pid, _ in ranks.values()):
        time.sleep(0.2)
    for port in {port for _, port in ranks.values()}:  # DeepSpeed's CPU all-reduce segments outlive a kill
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            f.unlink(missing_ok=True)
    result["wall"] = time.perf_counter() - t0
    if "peak" in result:
        result["s_per_step"] = step_at[args.steps] - step_at.get(args.steps - 1, t0)
    else:
        result.setdefault("failed", failure(proc.returncode, "".join(lines)))
        print(f"  {model} {engine}: failed: {result['failed']}\n    " + "    ".join(lines[-15:]), flush=True)
    return result


def prepare(work: Path) -> Path:
    """100 BBC articles (a few hundred 128-token samples: plenty for a few steps) as a pretraining dataset."""
    out = work / "bbc_pretrain"
    files = sorted(example_path("bbc_corpus").glob("*.txt"))[:100]
    subprocess.run([sys.executable, "-m", "dtrain", "prepare", "pretrain", *map(str, files), "--out", str(out),
                    "--tokenizer", "minilm", "--max-seq-len", str(SEQ)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def report(results: dict, args: argparse.Namespace, wall: float) -> str:
    head = f"- ≤ 0.6× DDP for bert-large, {shown(goal_engine(results.get('large', {})))}: "
    rows, ratios, goal = [], {}, head + "not measured in this run"
    for model, by_engine in results.items():
        ok = {e: rs for e, rs in by_engine.items() if rs and "failed" not in rs[-1]}
        ddp = common.median([max(r["peak"]) for r in ok["DDP"]]) if "DDP" in ok else float("nan")
        for engine, rs in by_engine.items():
            if engine not in ok:
                why, low = rs[-1]["failed"], rs[-1].get("at_least")
                bound = f" (at ≥ {low:.2f} GiB per rank) | ≥ {low / ddp:.2f}× | – |" if low else " | – | – |"
                rows.append(f"| {MODELS[model]} | {shown(engine)} | failed: {why}{bound}")
                if (model, engine) == ("large", goal_engine(by_engine)):
                    goal = head + (common.goal(False, f"≥ {low / ddp:.2f}× (a lower bound: {why})")
                                   if low and low / ddp > 0.6 else f"not measured (failed: {why})")
                continue
            peak = [max(r["peak"]) for r in rs]
            ranks = " / ".join(f"{common.median([r['peak'][k] for r in rs]):.2f}" for k in range(len(rs[0]["peak"])))
            ratios[model, engine] = common.median(peak) / ddp
            rows.append(f"| {MODELS[model]} | {shown(engine)} | "
                        f"{common.spread(peak, '{:.2f}') if len(rs) > 1 else f'{peak[0]:.2f}'} [{ranks}] | "
                        f"{ratios[model, engine]:.2f}× | {common.median([r['s_per_step'] for r in rs]):.0f} |")
    if (key := ("large", goal_engine(results.get("large", {})))) in ratios:
        goal = common.ratio_goal(f"DDP for bert-large, {shown(key[1])}", ratios[key], 0.6, higher_is_better=False)
    mmap = ("large", "ZeRO-3@4:mmap")
    if mmap in ratios and ("large", "ZeRO-3@4") in ratios:
        s_step = {e: common.median([r["s_per_step"] for r in results["large"][e]]) for e in (mmap[1], "ZeRO-3@4")}
        goal += (f"\n- the same with {shown(mmap[1]).split(', ', 2)[2]}: {ratios[mmap]:.2f}× DDP "
                 f"({'within' if ratios[mmap] <= 0.6 else 'above'} the goal), at "
                 f"{s_step[mmap[1]] / s_step['ZeRO-3@4']:.2f}× the s/step")
    offload_missing = "failed here (see the table)." if OFFLOAD in args.engines.split(",") else \
        "not in this run (`--engines`; the default runs it)."
    offload_ran = any(by.get(OFFLOAD) and "failed" not in by[OFFLOAD][-1] for by in results.values())
    return "\n".join([
        "## Memory per rank (`bench/memory.py`)",
        "",
        common.machine_line("deepspeed"),
        "",
        f"Settings: `torchrun --standalone --nproc_per_node={NPROC} -m dtrain.pretrain --config {CONFIG}` (4 ranks "
        f"where the engine says so) on CPU "
        f"(gloo, 1 thread per rank), random-init presets, fp32, AdamW, micro-batch {args.micro_batch} per rank, "
        f"seq {SEQ}, no accumulation, no evaluation; data: 100 BBC example articles prepared by `dtrain prepare "
        f"pretrain`. Each run is stopped (SIGKILL) when rank 0 logs step {args.steps} of {args.steps + 1}: "
        f"{args.steps} full optimizer steps, so a backward runs with the optimizer state allocated, and the "
        f"checkpoint dtrain writes at the end is not measured. {args.reps} rep(s), engines interleaved within a rep"
        f"{'; values are medians over reps (min–max)' if args.reps > 1 else ''}. Total wall time {wall / 60:.1f} min.",
        "",
        "Peak RSS = the kernel's VmHWM of each worker process (torchrun's children), read from /proc when rank 0 "
        "logs the last measured step (dtrain unchanged). It counts everything resident in that process: the Python "
        "interpreter, torch and DeepSpeed libraries (~0.5 GiB before any model exists), the model parameters, "
        "gradients, optimizer state, communication buffers and activations.",
        "",
        "DDP holds the whole model, its gradients and the optimizer state on every rank, so its memory per rank does "
        "not depend on the number of ranks: the 4-rank runs are compared with DDP at 2 ranks (DDP with bert-large at "
        "4 ranks would need ~30 GiB, more than this machine has). `MALLOC_MMAP_THRESHOLD_=131072`: the same run with "
        "glibc returning freed blocks of 128 KiB and more to the kernel.",
        "",
        "| model | engine | peak RSS per rank, GiB: max of ranks [rank 0 / rank 1 ...] | ratio to DDP (2 ranks) | "
        "s/step (last) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Goal:",
        "",
        goal,
        "",
        *NOTES,
        f"- {OFFLOAD}: " + ("DeepSpeed accepts `offload_optimizer`/`offload_param` (device cpu) on a CPU-only "
                            "machine and trains, but the accelerator already is the CPU, so nothing leaves the "
                            "process, and with `offload_optimizer` ZeRO-3 clones its fp32 partition instead of "
                            "sharing it with the parameters." if offload_ran else offload_missing),
        "",
        common.reproduce("bench/memory.py"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1, help="repetitions (a peak RSS repeats within ~2%% run to run)")
    ap.add_argument("--models", default="base,large", help="comma-separated: base, large")
    ap.add_argument("--engines", default=",".join([*ENGINES, "ZeRO-3@4", "ZeRO-3@4:mmap"]),
                    help="comma-separated ENGINE[@RANKS][:mmap], ENGINE one of: " + ", ".join(ENGINES))
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps measured per run (≥ 2)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed and marked failed")
    ap.add_argument("--min-available", type=float, default=1.5,
                    help="stop a run (marked failed) when the machine has less than this many GiB available")
    ap.add_argument("--out", default=str(common.BENCHMARKS))
    args = ap.parse_args()
    models, engines = args.models.split(","), args.engines.split(",")
    if args.steps < 2:
        ap.error("--steps must be ≥ 2 (the first step allocates the optimizer state)")
    if bad := [m for m in models if m not in MODELS]:
        ap.error(f"unknown model: {', '.join(bad)}")
    try:
        [parse_label(e) for e in engines]
    except ValueError as e:
        ap.error(str(e))
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {m: {e: [] for e in engines} for m in models}
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-mem-") as tmp:
        data = prepare(Path(tmp))
        for model in models:
            for rep in range(args.reps):
                for engine in engines:
                    if results[model][engine] and "failed" in results[model][engine][-1]:
                        continue  # a config that failed once is not retried
                    r = run_one(model, engine, data, Path(tmp), args)
                    results[model][engine].append(r)
                    if "failed" not in r:
                        print(f"rep {rep + 1}/{args.reps} {MODELS[model]} {engine}: peak RSS "
                              f"{' / '.join(f'{g:.2f}' for g in r['peak'])} GiB, {r['s_per_step']:.1f} s/step, "
                              f"{r['wall']:.0f} s", flush=True)
    body = report(results, args, time.perf_counter() - t0)
    print("\n" + body)
    common.write_section("memory", body, Path(args.out))


if __name__ == "__main__":
    main()
