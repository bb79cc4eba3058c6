"""Cloze prompts on `sentiment_en` (the whole test set): zero-shot with 2–3 templates against the majority class,
how much MLM pretraining the zero-shot prompt needs, and few-shot prompt fine-tuning against a plain classification
head trained on the same k examples per class (k = 16 / 32 / 64, 3 seeds each; mean ± standard deviation).

  .venv/bin/python bench/prompts.py --model runs/minilm-bbc-mlm            # writes its section of BENCHMARKS.md
  .venv/bin/python bench/prompts.py --model M --shots 16 --seeds 1 --out /tmp/b.md   # smoke run

--model: a model with a trained MLM head (the run dir or export of `configs/pretrain/minilm_bbc_mlm.yaml`); its
checkpoints (when it is a run dir) give the "how long" table. Zero-shot is `dtrain evaluate --prompt`; few-shot runs
are `python -m dtrain.finetune --config configs/finetune/sentiment_en_prompt.yaml` (1 process, a fixed number of
steps, no dev set: the final model is tested) and the same with task.type=classification for the head, both from
the same MLM model (the head side: its encoder, a fresh classifier).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_line, reproduce, write_section  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402

CONFIG = "configs/finetune/sentiment_en_prompt.yaml"
TEMPLATES = [  # (template, verbalizer): the first is the shipped config's (few-shot uses it)
    ("{text} It was [MASK].", {"pos": ["great"], "neg": ["terrible"]}),
    ("{text} All in all, the film was [MASK].", {"pos": ["good"], "neg": ["bad"]}),
    ("Review: {text} Sentiment: [MASK].", {"pos": ["positive"], "neg": ["negative"]}),
]


def dtrain(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dtrain", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dtrain {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def prepare(source: Path, out: Path, tokenizer: str, labels: Path | None) -> Path:
    dtrain("prepare", "finetune", str(source), "--out", str(out), "--tokenizer", tokenizer, "--max-seq-len", "64",
           *(["--labels", str(labels)] if labels else []))
    return out


def write_prompt(path: Path, template: str, verbalizer: dict) -> Path:
    path.write_text(json.dumps({"template": template, "verbalizer": verbalizer}))  # JSON is YAML
    return path


def zero_shot(model: Path, test: Path, prompt: Path, work: Path) -> float:
    out = work / f"zero-{prompt.stem}-{abs(hash(str(model))) % 10 ** 8}.json"
    dtrain("evaluate", "--model", str(model), "--data", str(test), "--prompt", str(prompt), "--output", str(out),
           "--overwrite")
    return json.loads(out.read_text())["accuracy"]


def few_shot_set(rows: list[dict], k: int, seed: int, path: Path) -> Path:
    """k examples per class, drawn with `seed` (the same set for the prompt and the head side)."""
    rng = random.Random(seed)
    chosen = []
    for label in sorted({r["label"] for r in rows}):
        chosen += rng.sample([r for r in rows if r["label"] == label], k)
    rng.shuffle(chosen)
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


def finetune(side: str, model: Path, train: Path, test: Path, run_dir: Path, args: argparse.Namespace,
             seed: int) -> float:
    extra = ["task.type=prompt"] if side == "prompt" else ["task.type=classification", "task.template=null",
                                                           "task.verbalizer=null", f"optim.lr={args.head_lr}"]
    cmd = [sys.executable, "-m", "dtrain.finetune", "--config", CONFIG, f"model.name_or_path={model}",
           f"data.train={train}", "data.eval=null", f"data.test={test}", f"run_dir={run_dir}",
           f"schedule.max_steps={args.steps}", f"seed={seed}", "logging.progress_bar=false", "checkpoint.keep_last=1",
           "checkpoint.export=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "report.json").read_text())["test"]["accuracy"]


def checkpoints_table(run_dir: Path, test: Path, prompt: Path, work: Path) -> list[str]:
    """Zero-shot accuracy (the first template), held-out MLM loss and training time at each kept pretraining
    checkpoint (its trainer.json: the evaluation history and the seconds trained)."""
    rows = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        state = json.loads((ckpt / "trainer.json").read_text())
        mlm = {e["step"]: e.get("mlm_loss") for e in state.get("history", [])}.get(state["step"])
        export = work / f"export-{state['step']}"
        dtrain("export", str(ckpt), str(export), "--overwrite")
        acc = zero_shot(export, test, prompt, work)
        loss = f"{mlm:.3f}" if mlm is not None else "–"
        rows.append(f"| {state['step']} | {state['train_seconds'] / 60:.0f} | {loss} | {100 * acc:.1f} |")
        print(f"checkpoint {state['step']}: zero-shot {acc:.4f} (held-out MLM loss {loss})", flush=True)
    return rows


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an MLM model: a pretraining run dir or its export")
    ap.add_argument("--shots", default="16,32,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each few-shot run (batch 8)")
    ap.add_argument("--head-lr", type=float, default=1e-4, help="the classification head side's learning rate")
    ap.add_argument("--skip-checkpoints", action="store_true")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    model = Path(args.model)
    export = model / "export" if (model / "export" / "config.json").is_file() else model
    source, tokenizer = example_path("sentiment_en"), str(example_path("minilm"))
    rows = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-prompts-") as tmp:
        work = Path(tmp)
        train = prepare(source / "train.jsonl", work / "train", tokenizer, None)
        test = prepare(source / "test.jsonl", work / "test", tokenizer, train)
        counts = json.loads((test / "labels.json").read_text())["counts"]
        majority = max(counts.values()) / sum(counts.values())
        prompts = [write_prompt(work / f"prompt{i}.json", t, v) for i, (t, v) in enumerate(TEMPLATES)]
        zero = []
        for (template, verbalizer), prompt in zip(TEMPLATES, prompts, strict=True):
            acc = zero_shot(export, test, prompt, work)
            print(f"zero-shot {template!r}: {acc:.4f}", flush=True)
            zero.append(f"| `{template}` | {', '.join(f'{k} → {v[0]}' for k, v in verbalizer.items())} | "
                        f"{100 * acc:.1f} | {100 * (acc - majority):+.1f} |")
        steps = [] if args.skip_checkpoints or not (model / "checkpoints").is_dir() else \
            checkpoints_table(model, test, prompts[0], work)
        few = []
        for k in [int(x) for x in args.shots.split(",")]:
            accs: dict[str, list[float]] = {"prompt": [], "head": []}
            for seed in range(1, args.seeds + 1):
                subset = few_shot_set(rows, k, seed, work / f"few-{k}-{seed}.jsonl")
                data = prepare(subset, work / f"few-{k}-{seed}", tokenizer, train)
                for side in accs:
                    acc = finetune(side, export, data, test, work / f"{side}-{k}-{seed}", args, seed)
                    accs[side].append(acc)
                    print(f"k={k} seed={seed} {side}: {acc:.4f}", flush=True)
            diff = [p - h for p, h in zip(accs["prompt"], accs["head"], strict=True)]
            few.append(f"| {k} | {mean_sd(accs['prompt'])} | {mean_sd(accs['head'])} | {mean_sd(diff)} | "
                       f"{sum(d > 0 for d in diff)} of {len(diff)} |")
    body = "\n".join([
        "## Cloze prompts: zero-shot and few-shot (`bench/prompts.py`)", "", machine_line("transformers"), "",
        f"Model: `{args.model}` (MiniLM after MLM+NSP continued pretraining on BBC: "
        f"`configs/pretrain/minilm_bbc_mlm.yaml`). Test set: the whole `sentiment_en` test split "
        f"({sum(counts.values())} sentences; majority class {100 * majority:.1f}%). Label score: the mean "
        f"log-probability of the label's words at the mask.", "",
        "Zero-shot (`dtrain evaluate --prompt`, no training):", "",
        "| template | verbalizer | test accuracy % | vs majority class (points) |", "|---|---|---|---|", *zero, "",
        *(["How much pretraining: zero-shot accuracy (first template) at each checkpoint of the MLM run (training "
           "minutes on this machine, torchrun 2 processes; held-out BBC MLM loss from the run's evaluations):", "",
           "| pretraining step | minutes | held-out MLM loss | zero-shot accuracy % |", "|---|---|---|---|",
           *steps, ""] if steps else []),
        f"Few-shot: k training examples per class drawn from the training split (seeds 1–{args.seeds}: the same "
        f"examples for both sides), {args.steps} steps of batch 8 (1 process), no dev set (the final model is "
        f"tested). Prompt: `{CONFIG}` (template `{TEMPLATES[0][0]}`, full fine-tuning with frozen word "
        f"embeddings, its learning rate); head: the same config with task.type=classification (a fresh classifier "
        f"on the same MLM model's encoder), lr {args.head_lr:g}. Accuracy %: mean ± standard deviation over "
        f"seeds.", "",
        "| k per class | prompt fine-tuning | classification head | prompt − head (points) | prompt better |",
        "|---|---|---|---|---|", *few, "", reproduce("bench/prompts.py"),
    ])
    print("\n" + body)
    write_section("prompts", body, Path(args.out))


if __name__ == "__main__":
    main()
