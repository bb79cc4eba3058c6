"""Long documents (issue 19): head-only vs head+tail truncation vs windows pooled per document, beside TF-IDF +
logistic regression on the full text.

  .venv/bin/python bench/long_docs.py                      # BENCHMARKS.md section long_docs (~80 min, 2 cores)
  .venv/bin/python bench/long_docs.py --sets bundles --seeds 1 --epochs 0.2 --out /tmp/b.md   # smoke run

Sets: `topic_en` (BBC articles, 5 topics, ~470 MiniLM tokens each: at 128 tokens most are cut to their headline and
first paragraph) and `bundles` (long reviews made from the movie-review sentences of `sentiment_en`: 7, 9 or 11
sentences of one split each, k of them positive, k drawn uniformly; the label is the majority's, so it needs the
whole text: at 128 tokens the head sees ~4 of the sentences). For each set, with `configs/finetune/topic_en.yaml`
(MiniLM, 128 tokens, 2 epochs, evaluation per epoch, the best dev checkpoint tested), torchrun with 2 processes,
seeds 42 and 7 (--seeds; with --work a finished run is reused):

- head: `prepare finetune` as usual (the first 126 tokens);
- head+tail: `--truncation head_tail` (a quarter of the kept tokens from the start, the rest from the end);
- windows: `--windows` (windows of 128 sharing 32 tokens, each weighed 1/windows in the loss), the test set
  evaluated per document with `task.window_pooling` mean (the run's report), max and mean_logits (`dtrain evaluate
  --window-pooling`);
- TF-IDF (1-2-grams, sublinear tf) + logistic regression (scikit-learn) on the whole text of every training row.

Per-document test accuracy and macro-F1; dtrain's training time ("trained N samples in S s": evaluations excluded);
`dtrain predict` time over the test texts (the command's function in this process, model loading included: median
of 3); the dev accuracy of the kept model.
"""

from __future__ import annotations

import argparse
import json
import random
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

CONFIG = "configs/finetune/topic_en.yaml"
MODES = {"head": [], "head+tail": ["--truncation", "head_tail"], "windows": ["--windows", "--doc-stride", "32"]}
POOLINGS = ("mean", "max", "mean_logits")  # of the windows' probabilities (mean, max) or logits


def bundles(out: Path, seed: int = 19) -> Path:
    """Long reviews of 7/9/11 movie-review sentences of one split each (every sentence used once), labelled by the
    majority of their sentences' labels; written as train/dev/test .jsonl under `out`."""
    source = example_path("sentiment_en")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        pools = {lab: [r["text"] for r in rows if r["label"] == lab] for lab in ("pos", "neg")}
        for pool in pools.values():
            rng.shuffle(pool)
        docs = []
        while True:
            n = rng.choice((7, 9, 11))
            k = rng.randint(0, n)
            if len(pools["pos"]) < k or len(pools["neg"]) < n - k:
                break
            sentences = [pools["pos"].pop() for _ in range(k)] + [pools["neg"].pop() for _ in range(n - k)]
            rng.shuffle(sentences)
            docs.append({"text": " ".join(sentences), "label": "pos" if 2 * k > n else "neg"})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return out


def raw_sets(work: Path, names: list[str]) -> dict[str, Path]:
    return {name: example_path("topic_en") if name == "topic_en" else bundles(work / "raw" / name) for name in names}


def prepare(raw: Path, out: Path, mode: list[str]) -> dict:
    model = example_path("minilm")
    for split in ("train", "dev", "test"):
        if (out / split / "manifest.json").is_file():  # (with --work: prepared by an earlier run of the script)
            continue
        cmd = [sys.executable, "-m", "dtrain", "prepare", "finetune", str(raw / f"{split}.jsonl"), "--out",
               str(out / split), "--tokenizer", str(model), "--max-seq-len", "128", *mode]
        if split != "train":
            cmd += ["--labels", str(out / "train")]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return json.loads((out / "train" / "manifest.json").read_text())


def finetune(run_dir: Path, data: Path, args: argparse.Namespace, seed: int) -> dict:
    """A run's test report, dev accuracy of the kept model, steps and training time (kept in run_dir/bench.json:
    with --work, a finished run is reused)."""
    saved = run_dir / "bench.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    done = torchrun_finetune(CONFIG, run_dir, data, args.nproc, f"schedule.epochs={args.epochs}", f"seed={seed}")
    report = done["report"]
    out = {"test": report["test"], "dev": report["best"], "steps": report["steps"], "train_s": done["train_s"],
           "samples": done["samples"]}
    saved.write_text(json.dumps(out))
    print(f"{run_dir.name}: {json.dumps({k: v for k, v in out.items() if k != 'test'})} "
          f"accuracy {out['test']['accuracy']:.4f}", flush=True)
    return out


def evaluate(run_dir: Path, data: Path, pooling: str, split: str = "test") -> dict:
    from dtrain.predict import evaluate as dtrain_evaluate

    return dtrain_evaluate(str(run_dir / "export"), str(data / split), window_pooling=pooling)


def predict_seconds(run_dir: Path, raw: Path, work: Path, reps: int) -> float:
    from dtrain.predict import predict

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        predict(str(run_dir / "export"), str(raw / "test.jsonl"), str(work / "predictions.jsonl"), max_seq_len=128,
                overwrite=True)
        times.append(time.perf_counter() - t0)
    return median(times)


def tfidf(raw: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    def rows(split: str) -> tuple[list[str], list[str]]:
        data = [json.loads(line) for line in (raw / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        return [d["text"] for d in data], [d["label"] for d in data]

    (x, y), (tx, ty) = rows("train"), rows("test")
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(x), y)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = clf.predict(vec.transform(tx))
    return {"accuracy": accuracy_score(ty, pred), "macro_f1": f1_score(ty, pred, average="macro"),
            "train_s": train_s, "predict_s": time.perf_counter() - t0}


def _cell(values: list[float], digits: int = 1) -> str:
    """The mean over seeds, and each seed's value when there are several."""
    mean = f"{100 * sum(values) / len(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({' / '.join(f'{100 * v:.{digits}f}' for v in values)})"


def run_set(name: str, raw: Path, work: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """Every input mode (and pooling) of one set over the seeds: table rows, and {label: {"test": [accuracy per
    seed], "train_s": ..., "predict_s": ...}}."""
    rows, results = [], {}
    for mode in args.modes:
        flags = MODES[mode]
        data = work / name / mode.replace("+", "_")
        manifest = prepare(raw, data, flags)
        runs = {seed: work / name / f"run-{mode.replace('+', '_')}-s{seed}" for seed in args.seeds}
        done = {seed: finetune(run, data, args, seed) for seed, run in runs.items()}
        predict_s = median([predict_seconds(run, raw, work, args.predict_reps) for run in runs.values()])
        cut = (f"{manifest['rows']} windows of {manifest['documents']} documents" if mode == "windows"
               else f"{manifest['truncated']} of {manifest['rows']} cut")
        poolings = POOLINGS if mode == "windows" else (None,)
        for pooling in poolings:
            if pooling in (None, "mean"):
                tests = [d["test"] for d in done.values()]
                devs = [d["dev"] for d in done.values()]
            else:
                tests = [evaluate(run, data, pooling) for run in runs.values()]
                devs = [evaluate(run, data, pooling, "dev")["accuracy"] for run in runs.values()]
            label = f"windows, {pooling} pooling" if pooling else mode
            first = next(iter(done.values()))
            train_s = median([d["train_s"] for d in done.values()])
            results[label] = {"test": [t["accuracy"] for t in tests], "train_s": train_s, "predict_s": predict_s}
            rows.append(f"| {name} | {label} | {cut} | {_cell(devs)} | {_cell([t['accuracy'] for t in tests])} | "
                        f"{_cell([t['macro_f1'] for t in tests])} | {first['steps']} | {train_s:.0f} | "
                        f"{predict_s:.1f} |")
    base = tfidf(raw)
    results["tfidf"] = base
    rows.append(f"| {name} | TF-IDF + logistic regression (whole text) | | | {100 * base['accuracy']:.1f} | "
                f"{100 * base['macro_f1']:.1f} | | {base['train_s']:.1f} | {base['predict_s']:.2f} |")
    return rows, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="topic_en,bundles")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[42, 7],
                    help="comma-separated; each mode is trained once per seed (default 42,7)")
    ap.add_argument("--modes", type=lambda text: text.split(","), default=list(MODES),
                    help=f"comma-separated, of {', '.join(MODES)} (default: all; head and windows are needed)")
    ap.add_argument("--predict-reps", type=int, default=3, help="`dtrain predict` timings per run (the median)")
    ap.add_argument("--section", default="long_docs", help="the BENCHMARKS.md section written")
    output_args(ap)
    args = ap.parse_args()
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not {"head", "windows"} <= set(args.modes):
        ap.error(f"--modes: {','.join(unknown) or args.modes} — give head, windows and optionally head+tail")
    names = args.sets.split(",")
    with work_dir(args.work, "dtrain-bench-long-") as work:
        table, goals = [], []
        for name, raw in raw_sets(work, names).items():
            rows, results = run_set(name, raw, work, args)
            table += rows
            head, win = results["head"], results["windows, mean pooling"]
            gain = 100 * (sum(win["test"]) / len(win["test"]) - sum(head["test"]) / len(head["test"]))
            cost = win["train_s"] / head["train_s"]
            goals.append(f"- {name}: windowed (mean) per-document test accuracy ≥ head-only's (mean over the seeds): "
                         + goal(gain >= 0, f"{gain:+.1f} points, at {cost:.1f}× the training time and "
                                           f"{win['predict_s'] / head['predict_s']:.1f}× the predict time"))
    body = "\n".join([
        "## Long documents: truncation and windows (`bench/long_docs.py`"
        + ("" if args.section == "long_docs" else f", seeds {', '.join(map(str, args.seeds))}") + ")", "",
        machine_line("transformers", "sklearn"), "",
        f"MiniLM at 128 tokens, `{CONFIG}` ({args.epochs:g} epochs, evaluation per epoch, early stopping, the best "
        f"dev checkpoint tested), torchrun with {args.nproc} processes, seeds {', '.join(map(str, args.seeds))} "
        "(each cell: the mean, then each seed's value). topic_en: BBC "
        "articles (5 topics); bundles: 7/9/11 movie-review sentences of `sentiment_en` per document, labelled by "
        "their majority (built by the script from the example set, each sentence used once). head: the first 126 "
        "tokens; head+tail: `--truncation head_tail` (32 from the start, 94 from the end); windows: `--windows "
        "--doc-stride 32` (each window weighed 1/windows in the loss), evaluated per document with mean (the "
        "run's report) or max (`dtrain evaluate --window-pooling max`) of the windows' probabilities, or the mean of "
        "their logits (mean_logits). Dev: the kept model's accuracy on the dev set (the one that chose it); "
        "accuracy and macro-F1 per document on the test set. Train s: dtrain's training time (evaluations "
        "excluded); predict s: `dtrain predict` over the test texts (the command's function: model loading "
        f"included, median of {args.predict_reps} per seed, median over the seeds); train s: the median over the "
        "seeds.",
        "",
        "| set | input | prepared (train) | dev % | test accuracy % | test macro-F1 % | steps | train s | predict s |",
        "|---|---|---|---|---|---|---|---|---|", *table, "", "Goals (issue 19):", "", *goals, "",
        reproduce("bench/long_docs.py"),
    ])
    print("\n" + body)
    write_section(args.section, body, Path(args.out))


if __name__ == "__main__":
    main()
