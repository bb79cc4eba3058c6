"""Fine-tuning benchmark: dtrain beside the Hugging Face Trainer, measured in the same run on the same machine.

  .venv/bin/python bench/finetune.py [--epochs 1] [--reps 3] [--nproc 1|2]   # writes its section of BENCHMARKS.md
  .venv/bin/python bench/finetune.py --max-samples 256 --reps 1 --out /tmp/b.md  # smoke run

Same MiniLM weights, same movie-review sentiment data (example set sentiment_en), same schedule on every side:
batch 32, lr 5e-5, max_len 128, warmup 0.1 then linear decay, weight decay 0.01, seed. Sides, interleaved per rep:
  (a) HF Trainer, defaults (dynamic padding with DataCollatorWithPadding, random sampling);
  (b) HF Trainer with train_sampling_strategy="group_by_length";
  (c) dtrain (`python -m dtrain.finetune`, or torchrun with --nproc 2) from shards made by `dtrain prepare finetune`.
Throughput: training samples / training wall time (no model load, no evaluation): HF's train_runtime; dtrain's
own "trained N samples in T s" line (subprocess wall time, with a warning, if the line is missing).
Accuracy: on the test split, the mean over reps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import goal, machine_line, ratio_goal, reproduce, write_section  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402

BATCH, LR, MAX_LEN, WARMUP, WEIGHT_DECAY = 32, 5e-5, 128, 0.1, 0.01
# Every dtrain override in one place; key names as `dtrain config keys` lists them (they may be renamed, e.g.
# early_stopping.patience, eval.every_steps: change them here).
DTRAIN_OVERRIDES = [
    # no dev evaluation: both sides test their final model (HF: eval_strategy no); full fine-tuning as HF does
    "data.train={data}/train", "data.eval=null", "data.test={data}/test", "run_dir={run_dir}",
    "peft.freeze_embeddings=false",
    "schedule.epochs={epochs}", "data.micro_batch_size={micro_batch}", f"data.max_seq_len={MAX_LEN}",
    f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"schedule.warmup={WARMUP}", "schedule.decay=linear",
    "early_stopping.patience=null", "checkpoint.export=false", "logging.progress_bar=false", "seed={seed}",
]
DTRAIN_CONFIG = "configs/finetune/sentiment_en.yaml"
TRAINED_RE = re.compile(r"trained (\d+) samples in ([\d.]+) s")
SIDES = {"hf": "HF Trainer, defaults", "hf_group": "HF Trainer, group_by_length", "dtrain": "dtrain"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(work: Path, max_samples: int | None, seed: int) -> tuple[dict[str, list[dict]], Path]:
    """The splits as rows (train subset if asked) and as dtrain shards under work/shards/{train,dev,test}."""
    src = example_path("sentiment_en")
    splits = {s: read_jsonl(src / f"{s}.jsonl") for s in ("train", "dev", "test")}
    if max_samples and max_samples < len(splits["train"]):
        splits["train"] = random.Random(seed).sample(splits["train"], max_samples)
    shards = work / "shards"
    for split, rows in splits.items():
        jsonl = work / f"{split}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "dtrain", "prepare", "finetune", str(jsonl), "--out", str(shards / split),
               "--tokenizer", "minilm", "--max-seq-len", str(MAX_LEN), "--overwrite"]
        subprocess.run(cmd + ([] if split == "train" else ["--labels", str(shards / "train")]), cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return splits, shards


def hf_datasets(splits: dict[str, list[dict]], tok) -> tuple:  # noqa: ANN001
    import datasets

    names = sorted({r["label"] for r in splits["train"]})

    def build(rows: list[dict]):
        ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows],
                                         "labels": [names.index(r["label"]) for r in rows]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=MAX_LEN), batched=True,
                      remove_columns=["text"])

    return build(splits["train"]), build(splits["test"]), len(names)


def run_hf(model_dir: Path, tok, train, test, num_labels: int, args, group: bool, work: Path) -> dict:  # noqa: ANN001
    from transformers import BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    torch.manual_seed(args.seed)  # the classifier head starts the same on every rep and both HF sides
    model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
    targs = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=BATCH, learning_rate=LR,
        num_train_epochs=args.epochs, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear",
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=args.seed, per_device_eval_batch_size=64,  # eval batch: untimed, accuracy unaffected
        train_sampling_strategy="group_by_length" if group else "random")
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok)
    runtime = trainer.train().metrics["train_runtime"]
    pred = trainer.predict(test)
    return {"samples_per_s": len(train) * args.epochs / runtime,
            "accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def test_accuracy(run_dir: Path) -> float:
    """report.json's test accuracy (dtrain writes {"test": {"accuracy": ...}})."""
    report = run_dir / "report.json"
    if not report.is_file():
        raise SystemExit(f"no report.json in {run_dir}: found files {sorted(p.name for p in run_dir.iterdir())}")
    return float(json.loads(report.read_text())["test"]["accuracy"])


def run_dtrain(shards: Path, args, work: Path, rep: int) -> dict:  # noqa: ANN001
    run_dir = work / f"dtrain-run-{rep}"
    values = {"data": shards, "run_dir": run_dir, "epochs": args.epochs, "micro_batch": BATCH // args.nproc,
              "seed": args.seed}
    launch = ([sys.executable, "-m", "dtrain.finetune"] if args.nproc == 1 else
              [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "dtrain.finetune"])
    cmd = launch + ["--config", DTRAIN_CONFIG] + [o.format(**values) for o in DTRAIN_OVERRIDES]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"dtrain failed ({proc.returncode}): {shlex.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    m = TRAINED_RE.search(proc.stdout + proc.stderr)
    if m:
        sps = int(m.group(1)) / float(m.group(2))
    else:
        trained = int(np.ceil(args.epochs * (len(read_jsonl(work / "train.jsonl")) // BATCH)) * BATCH)
        print(f"WARNING: no 'trained N samples in T s' line from dtrain: using the subprocess wall time ({wall:.1f} s,"
              f" which includes start-up, model load, evaluations and the test pass) for {trained} samples",
              flush=True)
        sps = trained / wall
    return {"samples_per_s": sps, "accuracy": test_accuracy(run_dir), "wall_clock": not m}


def report(runs: dict[str, list[dict]], args, n_train: int) -> str:  # noqa: ANN001

    sps = {s: [r["samples_per_s"] for r in rs] for s, rs in runs.items()}
    med = {s: float(np.median(v)) for s, v in sps.items()}
    acc = {s: float(np.mean([r["accuracy"] for r in rs])) * 100 for s, rs in runs.items()}
    rows = [f"| {SIDES[s]} | {med[s]:.1f} ({min(v):.1f}–{max(v):.1f}) | {acc[s]:.2f}% | {med[s] / med['hf']:.2f}× | "
            f"{med[s] / med['hf_group']:.2f}× |" for s, v in sps.items()]
    r_def, r_grp, d_acc = med["dtrain"] / med["hf"], med["dtrain"] / med["hf_group"], acc["dtrain"] - acc["hf"]
    launch = "python -m dtrain.finetune (1 process)" if args.nproc == 1 else \
        f"torchrun --nproc_per_node={args.nproc} (micro-batch {BATCH // args.nproc} per process)"
    wall = any(r.get("wall_clock") for r in runs["dtrain"])
    return "\n".join([
        "## Fine-tuning (`bench/finetune.py`)",
        "",
        machine_line("transformers") + f" torch threads: {torch.get_num_threads()}.",
        "",
        f"Settings: MiniLM (all-MiniLM-L6-v2) → 2-class movie-review sentiment (`sentiment_en`), {n_train:,} training "
        f"samples{' (random subset)' if args.max_samples else ''}, {args.epochs:g} epoch(s), global batch {BATCH}, "
        f"AdamW lr {LR:g}, warmup {WARMUP:g} + linear decay, weight decay {WEIGHT_DECAY:g}, max length {MAX_LEN}, "
        f"fp32, seed {args.seed}. HF: use_cpu, dynamic padding (DataCollatorWithPadding), no evaluation, no saving, "
        f"dataloader defaults. dtrain: {launch}, `{DTRAIN_CONFIG}` with the same settings. {args.reps} rep(s), sides "
        f"interleaved per rep. Samples/s: training samples / training wall time (model load and evaluation "
        f"excluded; HF: `train_runtime`), median of reps (min–max). Test accuracy: the 1,056-review test split, mean "
        f"of reps.",
        "",
        "| side | samples/s | test accuracy | vs HF defaults | vs HF group_by_length |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Goals:",
        "",
        ratio_goal("HF Trainer defaults", r_def, 2.0),
        ratio_goal("HF Trainer group_by_length", r_grp, 1.25),
        f"- test accuracy within ±1 point of the Trainer's (defaults): "
        f"{goal(abs(d_acc) <= 1.0, f'{d_acc:+.2f} points')}",
        *(["", "Warning: dtrain printed no throughput line; its samples/s is from the subprocess wall time, which "
           "includes start-up, model load, evaluations and the test pass."] if wall else []),
        "",
        reproduce("bench/finetune.py"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3, help="interleaved reps; samples/s is their median")
    ap.add_argument("--max-samples", type=int, default=None, help="random subset of train (smoke runs)")
    ap.add_argument("--nproc", type=int, choices=(1, 2), default=1, help="dtrain processes (2: torchrun)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model_dir = example_path("minilm")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-ft-") as tmp:
        work = Path(tmp)
        splits, shards = prepare(work, args.max_samples, args.seed)
        train, test, num_labels = hf_datasets(splits, tok)
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for rep in range(args.reps):  # interleaved, so drift on this shared machine hits every side alike
            for side in SIDES:
                r = (run_dtrain(shards, args, work, rep) if side == "dtrain" else
                     run_hf(model_dir, tok, train, test, num_labels, args, side == "hf_group", work))
                runs[side].append(r)
                print(f"rep {rep + 1}/{args.reps} {SIDES[side]}: {r['samples_per_s']:.1f} samples/s, "
                      f"test accuracy {r['accuracy'] * 100:.2f}%", flush=True)
    body = report(runs, args, len(splits["train"]))
    print("\n" + body)
    write_section("finetune", body, Path(args.out))


if __name__ == "__main__":
    main()
