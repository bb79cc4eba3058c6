"""Parameter-efficient fine-tuning beside full fine-tuning, on the same steps: bottleneck adapters (Houlsby,
Pfeiffer), LoRA and full fine-tuning of MiniLM on the whole `sentiment_en` example set.

  .venv/bin/python bench/adapters.py [--nproc 2] [--reps 1]          # writes its section of BENCHMARKS.md
  .venv/bin/python bench/adapters.py --epochs 0.1 --out /tmp/b.md     # smoke run

Every side is `torchrun -m dtrain.finetune --config configs/finetune/sentiment_en.yaml` (its schedule: 1.5 epochs,
warm-up 0.1 then linear decay, dev evaluation every 50 steps with early stopping, the best dev checkpoint tested)
with only the method and its learning rate changed (full: the config's 1.5e-4 and frozen word embeddings; the
PEFT methods higher, as their shipped configs: LoRA 5e-4, adapters 3e-3). Reported: test accuracy of the kept
model, trainable parameters (dtrain's own count), training samples/s (its "trained N samples in T s" line), the
size of one checkpoint (weights + optimizer state: what resume needs) and of the export.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import goal, machine_line, median, reproduce, spread, torchrun_finetune, write_section  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402

CONFIG = "configs/finetune/sentiment_en.yaml"
SIDES = {  # name: (what the table calls it, overrides)
    "full": ("full fine-tuning", []),
    "lora": ("LoRA r=8 (query, value)", ["peft.method=lora", "optim.lr=5e-4", "peft.freeze_embeddings=false"]),
    "houlsby": ("adapters, Houlsby, reduction 16", ["peft.method=adapter", "peft.adapter_variant=houlsby",
                                                    "optim.lr=3e-3", "peft.freeze_embeddings=false"]),
    "pfeiffer": ("adapters, Pfeiffer, reduction 16", ["peft.method=adapter", "peft.adapter_variant=pfeiffer",
                                                      "optim.lr=3e-3", "peft.freeze_embeddings=false"]),
}
TRAINABLE_RE = re.compile(r"trainable parameters: ([\d,]+) of ([\d,]+)")


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def prepare(work: Path) -> Path:
    source, model = example_path("sentiment_en"), example_path("minilm")
    for split in ("train", "dev", "test"):
        cmd = [sys.executable, "-m", "dtrain", "prepare", "finetune", str(source / f"{split}.jsonl"), "--out",
               str(work / split), "--tokenizer", str(model), "--max-seq-len", "64"]
        if split != "train":
            cmd += ["--labels", str(work / "train")]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return work


def run_side(side: str, data: Path, work: Path, args: argparse.Namespace, rep: int) -> dict:
    run_dir = work / f"{side}-{rep}"
    done = torchrun_finetune(CONFIG, run_dir, data, args.nproc, f"schedule.epochs={args.epochs}",
                             f"seed={args.seed + rep}", *SIDES[side][1], *([f"optim.lr={args.lr}"] if args.lr else []))
    trainable = TRAINABLE_RE.search(done["log"])
    report = done["report"]
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    out = {"accuracy": report["test"]["accuracy"], "samples_per_s": done["samples"] / done["train_s"],
           "trainable": int(trainable.group(1).replace(",", "")), "total": int(trainable.group(2).replace(",", "")),
           "checkpoint_mb": size_mb(ckpt), "export_mb": size_mb(run_dir / "export"), "steps": report["steps"],
           "wall_s": done["wall_s"]}
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"rep {rep + 1} {side}: {json.dumps({k: round(v, 4) for k, v in out.items()})}", flush=True)
    return out


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    med = {s: {k: median([r[k] for r in rs]) for k in rs[0]} for s, rs in runs.items()}
    full = med.get("full", next(iter(med.values())))
    rows = [f"| {SIDES[s][0]} | {spread([r['accuracy'] * 100 for r in rs], '{:.1f}')} | {m['trainable']:,.0f} "
            f"({100 * m['trainable'] / m['total']:.2f}%) | {spread([r['samples_per_s'] for r in rs])} "
            f"({m['samples_per_s'] / full['samples_per_s']:.2f}×) | {m['checkpoint_mb']:.1f} | {m['export_mb']:.1f} |"
            for s, rs in runs.items() for m in [med[s]]]
    goals = []
    for s in [s for s in ("houlsby", "pfeiffer") if s in runs and "full" in runs]:
        share, gap = 100 * med[s]["trainable"] / med[s]["total"], 100 * (full["accuracy"] - med[s]["accuracy"])
        goals.append(f"- {SIDES[s][0]}: < 5% of the parameters trained: "
                     + goal(share < 5, f"{share:.2f}%") + "; test accuracy within 2 points of full fine-tuning: "
                     + goal(gap <= 2, f"{-gap:+.1f} points"))
    return "\n".join([
        "## Adapters, LoRA and full fine-tuning (`bench/adapters.py`)", "", machine_line("transformers", "peft"), "",
        f"MiniLM on the whole `sentiment_en` training set, `{CONFIG}` (its {args.epochs:g} epochs, dev evaluation "
        f"every 50 steps, early stopping, the best dev checkpoint tested), torchrun with {args.nproc} processes; "
        f"only the method and its learning rate change (full: 1.5e-4 with frozen word embeddings as the config has "
        f"it; LoRA 5e-4 and adapters 3e-3, as configs/finetune/sentiment_en_{{lora,adapter}}.yaml). {args.reps} "
        f"rep(s) (seed {args.seed} + rep); median (min–max). Samples/s: "
        f"training samples over training time (dtrain's own line; evaluations excluded). Checkpoint: one "
        f"checkpoint dir (model + optimizer state + stream position); export: the HF dir (adapters: base + head "
        f"+ the adapter file).", "",
        "| method | test accuracy % | trainable parameters | samples/s (vs full) | checkpoint MB | export MB |",
        "|---|---|---|---|---|---|", *rows, "", "Goals (issue 17):", "", *goals, "", reproduce("bench/adapters.py"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every side (a sweep)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-adapters-") as tmp:
        data = prepare(Path(tmp))
        runs: dict[str, list[dict]] = {s: [] for s in args.sides.split(",")}
        for rep in range(args.reps):
            for side in runs:
                runs[side].append(run_side(side, data, Path(tmp), args, rep))
    body = report(runs, args)
    print("\n" + body)
    write_section("adapters", body, Path(args.out))


if __name__ == "__main__":
    main()
