"""GPU pretraining benchmark: BERT-large at seq 128 and 512, fp16 and bf16, DeepSpeed ZeRO-2 and DDP — sequences/s
and MFU on the card named (dtrain's own per-step MFU: FLOPs per token from the model shape over the card's dense
bf16/fp16 peak). Run through bench/gpu.sh. Without a CUDA GPU it writes "not measured" and exits 0.

  bench/gpu.sh [--steps 60] [--warmup 20] [--reps 3] [--out FILE] [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import BENCHMARKS, goal, machine_line, median, reproduce, write_section  # noqa: E402

HEADING = "## GPU pretraining (`bench/gpu.sh`)"
# (seq, micro-batch per GPU): BERT-large batch sizes of NVIDIA's DeepLearningExamples phase 1 / phase 2 (A100 80GB)
SHAPES = [(128, 64), (512, 16)]
ENGINES = [("DDP", ["parallel.engine=ddp"]), ("ZeRO-2", ["parallel.engine=deepspeed", "parallel.zero_stage=2"])]
LINE = re.compile(r"^step (\d+)/\d+ .*samples_per_s=([\d.e+-]+).*mfu=([\d.e+-]+)")


def not_measured(out: Path) -> None:
    write_section("gpu", "\n".join([HEADING, "", machine_line(), "", "Not measured: this machine has no CUDA GPU. "
                                    "Run `bench/gpu.sh` on a GPU node to fill this table (BERT-large, seq 128 and "
                                    "512, fp16 and bf16, DDP and DeepSpeed ZeRO-2: sequences/s and MFU).", "",
                                    "- ≥ 50% MFU at seq 128: not measured"]), out)


def run(data: Path, seq: int, micro: int, dtype: str, engine: list[str], gpus: int, steps: int, warmup: int,
        dry: bool) -> tuple[float, float] | None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
           "dtrain.pretrain", "--config", "configs/pretrain/bert_base_phase1.yaml",
           "model.name_or_path=preset:bert-large-uncased",
           f"data.train={data}", "data.eval=null", f"data.max_seq_len={seq}", f"data.micro_batch_size={micro}",
           f"precision.dtype={dtype}", *engine, f"schedule.max_steps={warmup + steps}", "schedule.grad_accum_steps=1",
           f"logging.every_steps={warmup}",
           "checkpoint.every_steps=null", "checkpoint.export=false", "checkpoint.resume=none",
           "logging.progress_bar=false", "logging.tensorboard=false", f"run_dir={data.parent / 'run'}"]
    print(" ".join(cmd), flush=True)
    if dry:
        return None
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    rows = [m for m in (LINE.match(x.strip()) for x in proc.stdout.splitlines()) if m and int(m.group(1)) > warmup]
    if proc.returncode or not rows:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
        return None
    # intervals of `warmup` steps after the warm-up: their mean (the last one may be shorter: it ends the run)
    return median([float(m.group(2)) for m in rows]), median([float(m.group(3)) for m in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="measured steps per configuration (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(BENCHMARKS))
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA GPU: the GPU table says 'not measured'")
        not_measured(out)
        return
    gpus = torch.cuda.device_count() or 1
    work = Path(tempfile.mkdtemp(prefix="dtrain-gpu-bench-"))
    rows, best128 = [], 0.0
    try:
        from dtrain.data.examples import example_path

        for seq, micro in SHAPES:
            data = work / f"bbc{seq}"
            prep = [sys.executable, "-m", "dtrain", "prepare", "pretrain", str(example_path("bbc_corpus")), "--out",
                    str(data), "--tokenizer", "minilm", "--max-seq-len", str(seq)]
            print(" ".join(prep), flush=True)
            if not args.dry_run:
                subprocess.run(prep, cwd=REPO, check=True)
            for dtype in ("fp16", "bf16"):
                for name, engine in ENGINES:
                    got = [run(data, seq, micro, dtype, engine, gpus, args.steps, args.warmup, args.dry_run)
                           for _ in range(args.reps)]
                    ok = [g for g in got if g]
                    if args.dry_run:
                        continue
                    if not ok:
                        rows.append(f"| {seq} | {dtype} | {name} | failed | failed |")
                        continue
                    sps, mfu = median([g[0] for g in ok]), median([g[1] for g in ok])
                    best128 = max(best128, mfu) if seq == 128 else best128
                    rows.append(f"| {seq} | {dtype} | {name} | {sps:,.1f} | {mfu:.1%} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.dry_run:
        return
    write_section("gpu", "\n".join([
        HEADING, "", machine_line("deepspeed"), "",
        f"Settings: BERT-large (random init, 336M parameters), MLM+NSP on the BBC example corpus, {gpus} GPU(s) under "
        f"torchrun, micro-batch per GPU {SHAPES[0][1]} at seq {SHAPES[0][0]} and {SHAPES[1][1]} at seq "
        f"{SHAPES[1][0]}, no accumulation, {args.warmup} warm-up steps then {args.steps} measured; sequences/s and "
        f"MFU from dtrain's log lines over the measured steps (median of its {args.warmup}-step intervals; FLOPs "
        f"per token from the model shape, masked-only vocabulary head, over the card's dense fp16/bf16 peak); "
        f"medians of {args.reps} runs.", "",
        "| seq | precision | engine | sequences/s | MFU |", "|---|---|---|---|---|", *rows, "",
        f"- ≥ 50% MFU at seq 128 (best configuration): {goal(best128 >= 0.5, f'{best128:.1%}')} (NVIDIA's "
        f"DeepLearningExamples BERT-large on A100 is about 44%)", "", reproduce("bench/gpu.sh")]), out)


if __name__ == "__main__":
    main()
