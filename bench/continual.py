"""Re-fine-tuning on drifting data without forgetting, and distillation into a smaller student (issue 18).

  .venv/bin/python bench/continual.py                      # both sections of BENCHMARKS.md (~45 min on 2 cores)
  .venv/bin/python bench/continual.py --parts continual    # or: distill
  .venv/bin/python bench/continual.py --epochs 0.05 --student-epochs 0.05 --out /tmp/b.md   # smoke

Continual: MiniLM fine-tuned on movie reviews (`sentiment_en`, configs/finetune/sentiment_en.yaml: the demo), then
re-fine-tuned from that run (model.init_from) on Amazon product reviews (`sentiment_en_amazon`), then from that one
on NYT editorials (`sentiment_en_nyt`), each stage with the same config (its learning rate, 1.5 epochs, dev
evaluation, early stopping on the new domain's dev set, the best dev checkpoint kept), for four settings: naive
init_from, replay (continual.replay_fraction), distillation from the previous model (continual.distill_weight, LwF)
and both. After each stage: test accuracy on every domain seen so far (data.eval_extra) and on the new one.

Distill: the movie model of stage 1 (6 layers) as teacher; a 3-layer student made of its layers 0, 2, 4
(distill.student_layers) trained on the movie training set with distillation (distill.alpha, T) and the same student
on labels only (distill.alpha=1: the teacher's term weighs 0); test accuracy of all three, and prediction throughput
of teacher vs student (dtrain.predict.predict_rows, the code of `dtrain predict`, over the movie test texts: median
of 5 passes after a warm-up, batch 32, on this process's threads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    goal,
    machine_line,
    median,
    output_args,
    reproduce,
    torchrun_finetune,
    work_dir,
    write_section,
)
from dtrain.data.examples import example_path  # noqa: E402

CONFIG = "configs/finetune/sentiment_en.yaml"
DOMAINS = {"movies": "sentiment_en", "amazon": "sentiment_en_amazon", "nyt": "sentiment_en_nyt"}


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    replay = [f"continual.replay_fraction={args.replay}"]
    distill = [f"continual.distill_weight={args.distill_weight}", f"continual.temperature={args.temperature}"]
    return {"naive": [], "replay": replay, "distill": distill, "replay+distill": replay + distill}


def prepare(work: Path) -> dict[str, Path]:
    """Every domain's train/dev/test prepared with MiniLM's tokenizer at 64 tokens and movies' label map."""
    model, out = example_path("minilm"), {}
    for domain, name in DOMAINS.items():
        source = example_path(name)
        for split in ("train", "dev", "test"):
            cmd = [sys.executable, "-m", "dtrain", "prepare", "finetune", str(source / f"{split}.jsonl"), "--out",
                   str(work / domain / split), "--tokenizer", str(model), "--max-seq-len", "64"]
            if (domain, split) != ("movies", "train"):
                cmd += ["--labels", str(work / "movies" / "train")]
            subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        out[domain] = work / domain
    return out


def finetune(run_dir: Path, data: Path, args: argparse.Namespace, *extra: str, seen: dict[str, Path] | None = None
             ) -> dict:
    extras = "{" + ", ".join(f"{k}: {v / 'test'}" for k, v in (seen or {}).items()) + "}"
    done = torchrun_finetune(CONFIG, run_dir, data, args.nproc, f"schedule.epochs={args.epochs}", f"seed={args.seed}",
                             f"eval.every_steps={args.eval_every}",
                             *([f"data.eval_extra={extras}"] if seen else []), *extra)
    report = done["report"]
    out = {"test": report["test"]["accuracy"], "steps": report["steps"], "wall_s": done["wall_s"],
           "train_s": done["train_s"], "extra": {k: v["accuracy"] for k, v in (report.get("extra") or {}).items()}}
    print(f"{run_dir.name}: {json.dumps(out)}", flush=True)
    return out


def continual(data: dict[str, Path], work: Path, args: argparse.Namespace) -> tuple[str, Path]:
    first = finetune(work / "movies", data["movies"], args)
    results = {}
    for name, extra in settings(args).items():
        previous, seen, stages = work / "movies", {"movies": data["movies"]}, []
        for domain in ("amazon", "nyt")[:args.stages - 1]:
            run_dir = work / f"{name}-{domain}"
            stages.append(finetune(run_dir, data[domain], args, f"model.init_from={previous}", *extra, seen=seen))
            previous, seen = run_dir, {**seen, domain: data[domain]}
        results[name] = stages
    return report_continual(first, results, args), work / "movies"


def report_continual(first: dict, results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    domains = ["movies", "amazon", "nyt"][:args.stages]
    head = "| setting | stage | " + " | ".join(f"{d} test %" for d in domains) + " | steps | train s | wall s |"
    rows = [f"| (stage 1) | movies | {100 * first['test']:.1f} | " + " | ".join("" for _ in domains[1:])
            + f" | {first['steps']} | {first['train_s']:.0f} | {first['wall_s']:.0f} |"]
    for name, stages in results.items():
        for i, s in enumerate(stages):
            new = domains[i + 1]
            acc = {**s["extra"], new: s["test"]}
            rows.append(f"| {name} | → {new} | " + " | ".join(f"{100 * acc[d]:.1f}" if d in acc else ""
                                                                for d in domains)
                        + f" | {s['steps']} | {s['train_s']:.0f} | {s['wall_s']:.0f} |")
    goals = []
    naive = results.get("naive")
    for name in [n for n in results if n != "naive" and naive]:
        kept = results[name][0]["extra"]["movies"] / first["test"]
        gap = 100 * (naive[0]["test"] - results[name][0]["test"])
        goals.append(f"- {name}, movies → amazon: movie-test accuracy ≥ 98% of stage 1's: "
                     + goal(kept >= 0.98, f"{100 * kept:.1f}%") + "; amazon-test accuracy within 1 point of naive: "
                     + goal(gap <= 1, f"{-gap:+.1f} points"))
    if naive:
        goals.insert(0, f"- (naive re-fine-tuning keeps {100 * naive[0]['extra']['movies'] / first['test']:.1f}% "
                        f"of the movie-test accuracy)")
    return "\n".join([
        "## Continual fine-tuning on drifting data (`bench/continual.py --parts continual`)", "",
        machine_line("transformers"), "",
        f"MiniLM, `{CONFIG}` at every stage ({args.epochs:g} epochs, dev evaluation every {args.eval_every} steps, "
        f"early stopping, the best dev checkpoint of the new domain tested), torchrun with {args.nproc} processes, "
        f"seed {args.seed}, 1 rep. Stage 1: movies (`sentiment_en`); then each setting re-fine-tunes from the "
        f"previous stage's run (model.init_from) on amazon (`sentiment_en_amazon`), then on nyt "
        f"(`sentiment_en_nyt`). Settings: naive init_from; replay = continual.replay_fraction={args.replay} (old "
        f"training rows per new one, mixed into every epoch; the nyt stage replays movies and amazon); distill = "
        f"continual.distill_weight={args.distill_weight}, continual.temperature={args.temperature} (LwF: "
        f"T²·KL to the frozen previous model on the new batches). Accuracies of the model each stage kept, on the "
        f"test sets of every domain so far (data.eval_extra). Train s: dtrain's training time (evaluations "
        f"excluded); wall s: the whole command.", "",
        head, "|" + "---|" * (len(domains) + 5), *rows, "", "Goals (issue 18):", "", *goals, "",
        reproduce("bench/continual.py"),
    ])


def throughput(model_dir: Path, rows: list[dict], reps: int = 5) -> float:
    import torch

    from dtrain.predict import load_finetuned, predict_rows

    model, tok, kind, labels, _ = load_finetuned(model_dir)
    model.eval()
    fields = {"text": "text", "text_pair": None}
    with torch.inference_mode():
        predict_rows(model, tok, kind, labels, rows[:64], fields, max_seq_len=64)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            predict_rows(model, tok, kind, labels, rows, fields, max_seq_len=64)
            times.append(time.perf_counter() - t0)
    return len(rows) / median(times)


def distill(data: dict[str, Path], teacher: Path, work: Path, args: argparse.Namespace) -> str:
    common = [f"distill.teacher={teacher}", f"distill.student_layers={args.student_layers}",
              f"distill.temperature={args.temperature}", f"schedule.epochs={args.student_epochs}",
              f"optim.lr={args.student_lr}"]
    distilled = finetune(work / "student-distilled", data["movies"], args, *common, f"distill.alpha={args.alpha}")
    labels_only = finetune(work / "student-labels", data["movies"], args, *common, "distill.alpha=1.0")
    taught = json.loads((teacher / "report.json").read_text())["test"]["accuracy"]
    rows = [json.loads(line) for line in
            (example_path("sentiment_en") / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    speed = {"teacher": throughput(teacher / "export", rows),
             "student": throughput(work / "student-distilled" / "export", rows)}
    gap = 100 * (taught - distilled["test"])
    ratio = speed["student"] / speed["teacher"]
    table = [
        "| model | layers | test accuracy % | predict rows/s | train s |", "|---|---|---|---|---|",
        f"| teacher (stage 1 movies model) | 6 | {100 * taught:.1f} | {speed['teacher']:.0f} | |",
        f"| student, distilled (alpha {args.alpha}, T {args.temperature}) | 3 | {100 * distilled['test']:.1f} | "
        f"{speed['student']:.0f} | {distilled['train_s']:.0f} |",
        f"| student, labels only | 3 | {100 * labels_only['test']:.1f} | | {labels_only['train_s']:.0f} |"]
    goals = ["- distilled student within 2 points of its teacher: " + goal(gap <= 2, f"{-gap:+.1f} points"),
             "- distilled student beats the same student on labels only: "
             + goal(distilled["test"] > labels_only["test"],
                    f"{100 * (distilled['test'] - labels_only['test']):+.1f} points"),
             "- student predict throughput ≥ 1.7× the teacher's: " + goal(ratio >= 1.7, f"{ratio:.2f}×")]
    return "\n".join([
        "## Distillation into a 3-layer student (`bench/continual.py --parts distill`)", "",
        machine_line("transformers"), "",
        f"Teacher: the stage-1 movie model of the continual section (MiniLM, 6 layers). Student: the teacher's "
        f"layers {args.student_layers} with its embeddings and head (distill.student_layers), trained on the "
        f"movie training set with `{CONFIG}` ({args.student_epochs:g} epochs, lr {args.student_lr}, the best dev "
        f"checkpoint tested), torchrun with {args.nproc} processes, seed {args.seed}, 1 rep; loss = alpha·CE + "
        f"(1 − alpha)·T²·KL(teacher ‖ student). Labels only: the same student and run with alpha = 1. Predict "
        f"rows/s: dtrain.predict.predict_rows (what `dtrain predict` runs) over the {len(rows)} movie test "
        f"sentences, batch 32, max 64 tokens, one process; median of 5 passes after a warm-up.", "",
        *table, "", "Goals (issue 18):", "", *goals, "", reproduce("bench/continual.py"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="continual,distill")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--stages", type=int, default=3, choices=(2, 3))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--replay", type=float, default=0.5)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--student-layers", default="[0,2,4]")
    ap.add_argument("--student-lr", type=float, default=3e-4, help="a shallower student: twice the teacher's rate")
    ap.add_argument("--student-epochs", type=float, default=3.0,
                    help="1.5 epochs (the teacher's) gave no gain over labels only (README)")
    ap.add_argument("--teacher", help="a finished movies run dir (skips stage 1 for --parts distill)")
    output_args(ap)
    args = ap.parse_args()
    parts = args.parts.split(",")
    with work_dir(args.work, "dtrain-bench-continual-") as work:
        data = prepare(work / "data")
        teacher = Path(args.teacher) if args.teacher else None
        if "continual" in parts:
            body, teacher = continual(data, work, args)
            print("\n" + body)
            write_section("continual", body, Path(args.out))
        if "distill" in parts:
            teacher = teacher or (finetune(work / "movies", data["movies"], args) and work / "movies")
            body = distill(data, teacher, work, args)
            print("\n" + body)
            write_section("distill", body, Path(args.out))


if __name__ == "__main__":
    main()
