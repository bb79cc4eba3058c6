"""Pretraining throughput: dtrain beside the Hugging Face Trainer, measured in the same run on the same machine.

  .venv/bin/python bench/pretrain.py                                         # writes its section of BENCHMARKS.md
  .venv/bin/python bench/pretrain.py --reps 1 --steps 1 --hf-steps 1 --out /tmp/bench-pretrain.md      # smoke run

MiniLM weights, BertForPreTraining (MLM + NSP), BBC example corpus, fp32, global batch 32, seq 128, the same optimizer
and schedule everywhere. Sides, interleaved per rep: (a) HF Trainer, 1 process, with DataCollatorForLanguageModeling
over NSP pairs built as the old TextDatasetForNextSentencePrediction did, padded to 128; (b) dtrain, 1 process
(micro-batch 32); (c) dtrain, `torchrun --standalone --nproc_per_node=2` (DDP, micro-batch 16 each); (d) as (b)
with model.unpad=false (HF's padded encoder); (e) as (b) with model.compile=true (its compile in the warm-up), all
from shards made once by prepare_pretrain (= `dtrain prepare pretrain`). Each side runs --warmup steps, then measured
ones (--hf-steps for HF, the slow side; --steps for dtrain); only the measured steps count: HF timed by step-end
callbacks, dtrain by its per-step log lines. Tokens: HF's from the batches its collator built; dtrain's non-padding
ones from its log, its padded ones by rebuilding the same micro-batches here with its own stream and collator.
MFU: achieved FLOP/s over the machine's fp32 matmul peak (common.cpu_matmul_peak, median).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402
from dtrain.logging import training_flops_per_token  # noqa: E402

BATCH, SEQ, LR, WARMUP, WEIGHT_DECAY, EPS = 32, 128, 2e-4, 0.1, 0.01, 1e-6
CONFIG = "configs/pretrain/minilm_bbc.yaml"
# Every dtrain override in one place; key names as `dtrain config keys` lists them.
OVERRIDES = [
    "data.train={data}", "data.eval=null", "model.name_or_path={model}", "model.tokenizer={model}",
    "model.attn_implementation=sdpa", "run_dir={run_dir}", f"data.max_seq_len={SEQ}", "data.micro_batch_size={micro}",
    "schedule.grad_accum_steps=1", "schedule.max_steps={steps}", f"schedule.warmup={WARMUP}", "schedule.decay=linear",
    "optim.name=adamw", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.eps={EPS}",
    "optim.max_grad_norm=1.0", "precision.dtype=fp32", "parallel.engine=ddp", "checkpoint.resume=none",
    "checkpoint.every_steps=null", "checkpoint.export=false", "logging.every_steps=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "seed={seed}"]
STEP_RE = re.compile(r"^step (\d+)/\d+ (.*)$", re.M)
SIDES = {"hf": "HF Trainer (1 process)", "dtrain1": "dtrain, 1 process", "dtrain2": "dtrain, 2 processes (DDP)",
         "padded1": "dtrain, 1 process, model.unpad=false", "compiled1": "dtrain, 1 process, model.compile=true"}
SIDE_OVERRIDES = {"padded1": ("model.unpad=false",), "compiled1": ("model.compile=true",)}
DTRAIN_SIDES = ("dtrain1", "dtrain2")  # the shipped defaults: the goals are theirs


def overrides(data: Path, model: Path, run_dir: Path, nproc: int, steps: int, seed: int) -> list[str]:
    values = {"data": data, "model": model, "run_dir": run_dir, "micro": BATCH // nproc, "steps": steps, "seed": seed}
    return [o.format(**values) for o in OVERRIDES]


def nsp_examples(corpus: Path, tok, n: int, seed: int) -> list[dict]:  # noqa: ANN001
    """`n` sentence-pair examples (a seeded sample of all), made as TextDatasetForNextSentencePrediction (removed
    from transformers) made them: per document a target length (max, or 10%: random), segments of consecutive
    sentences up to it cut at a random sentence, 50% a random next segment from another document; padded to SEQ."""
    from dtrain.data.prepare import iter_documents, split_sentences

    assert tok.pad_token_id == 0
    rng = random.Random(seed)
    docs = [[s for s in tok(split_sentences(text), add_special_tokens=False)["input_ids"] if s]
            for text in iter_documents([str(corpus)])]
    docs = [d for d in docs if d]
    max_tokens = SEQ - tok.num_special_tokens_to_add(pair=True)
    examples = []
    for d_i, doc in enumerate(docs):
        target = max_tokens if rng.random() >= 0.1 else rng.randint(2, max_tokens)
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if len(chunk) == 1 or rng.random() < 0.5:
                    label, b = 1, []
                    for _ in range(10):
                        other = rng.randint(0, len(docs) - 1)
                        if other != d_i:
                            break
                    for s in docs[other][rng.randint(0, len(docs[other]) - 1):]:
                        b += s
                        if len(b) >= target - len(a):
                            break
                    i -= len(chunk) - a_end  # the unused segments go back to the document
                else:
                    label, b = 0, [t for s in chunk[a_end:] for t in s]
                while len(a) + len(b) > max_tokens:  # truncate_seq_pair: the longer one, front or back at random
                    longer = a if len(a) > len(b) else b
                    del longer[0 if rng.random() < 0.5 else -1]
                ids = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
                pad = [0] * (SEQ - len(ids))  # [PAD] is id 0 in the BERT vocabularies; asserted above
                examples.append({"input_ids": ids + pad, "attention_mask": [1] * len(ids) + pad,
                                 "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1) + pad,
                                 "next_sentence_label": label})
                chunk, length = [], 0
            i += 1
    return rng.sample(examples, n)


def run_hf(model_dir: Path, tok, examples: list[dict], args, work: Path) -> dict:  # noqa: ANN001
    import transformers as hf

    mlm = hf.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    tokens: list[tuple[int, int]] = []  # (non-padding, padded) per batch, in the order the Trainer asks for them

    def collate(batch: list[dict]) -> dict:
        out = mlm(batch)
        tokens.append((int(out["attention_mask"].sum()), out["attention_mask"].numel()))
        return out

    step_ends: list[float] = []

    class StepTimes(hf.TrainerCallback):
        def on_step_end(self, *_, **__) -> None:  # after the optimizer step
            step_ends.append(time.perf_counter())

    torch.manual_seed(args.seed)  # the fresh heads start the same on every rep
    model = hf.BertForPreTraining.from_pretrained(str(model_dir), attn_implementation="sdpa")
    targs = hf.TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=BATCH, max_steps=args.warmup + args.hf_steps,
        learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear", weight_decay=WEIGHT_DECAY,
        adam_epsilon=EPS, max_grad_norm=1.0, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=args.seed)
    trainer = hf.Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate,
                         callbacks=[StepTimes()])
    trainer.remove_callback(hf.PrinterCallback)  # its final metrics print (train_runtime etc.): not used here
    trainer.train()
    done = tokens[args.warmup:args.warmup + args.hf_steps]
    seconds = step_ends[-1] - step_ends[args.warmup - 1]  # from the end of the last warm-up step
    return rates(args.hf_steps * BATCH, sum(t for t, _ in done), sum(p for _, p in done), seconds)


def dtrain_batches(shards: Path, model_dir: Path, nproc: int, rank: int, steps: int,
                   seed: int) -> tuple[Any, list[dict]]:
    """(config, the first `steps` micro-batches of `rank`) of the dtrain run with these settings, rebuilt here with
    runner.stream and the collator as dtrain/pretrain.py makes them (without worker processes: the same batches)."""
    from dtrain import runner
    from dtrain.config import load_config
    from dtrain.data.pretraining import PretrainingCollator
    from dtrain.data.shards import ShardedDataset
    from dtrain.model.tokenizer import load_tokenizer

    cfg = load_config(REPO / CONFIG, overrides(shards, model_dir, Path("unused"), nproc, steps, seed))
    d, data = cfg.data, ShardedDataset(shards)
    collate = PretrainingCollator(data, load_tokenizer(model_dir), d.max_seq_len, cfg.seed, d.mlm_probability,
                                  d.max_predictions_per_seq, d.whole_word_masking, d.nsp_probability,
                                  pad_to_multiple_of=1)  # as dtrain.pretrain on a CPU
    env = SimpleNamespace(rank=rank, world_size=nproc, device=torch.device("cpu"))
    loader = runner.stream(cfg, data, collate, env, train=True)
    loader.num_workers = 0
    return cfg, list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps))


def dtrain_tokens(shards: Path, model_dir: Path, nproc: int, steps: int, seed: int) -> list[tuple[int, int]]:
    """(non-padding, padded) tokens of each optimizer step of the dtrain run, summed over ranks."""
    out = [[0, 0] for _ in range(steps)]
    for rank in range(nproc):
        for step, batch in enumerate(dtrain_batches(shards, model_dir, nproc, rank, steps, seed)[1]):
            out[step][0] += int(batch["attention_mask"].sum())
            out[step][1] += batch["attention_mask"].numel()
    return [tuple(t) for t in out]


def run_dtrain(shards: Path, model_dir: Path, nproc: int, args, work: Path, rep: int,
               tokens: list[tuple[int, int]], extra: tuple[str, ...] = ()) -> dict:  # noqa: ANN001
    run_dir = work / f"dtrain-{nproc}-{rep}"
    launch = ([sys.executable, "-m", "dtrain.pretrain"] if nproc == 1 else
              [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dtrain.pretrain"])
    total = args.warmup + args.steps
    cmd = launch + ["--config", CONFIG] + overrides(shards, model_dir, run_dir, nproc, total, args.seed) + list(extra)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"dtrain failed ({proc.returncode}): {shlex.join(cmd)}\n{log[-4000:]}")
    lines = {int(m.group(1)): dict(kv.split("=", 1) for kv in m.group(2).split()) for m in STEP_RE.finditer(log)}
    if sorted(lines) != list(range(1, total + 1)):
        sys.exit(f"dtrain logged steps {sorted(lines)}, expected 1..{total} (logging.every_steps=1):\n{log[-4000:]}")
    after = [lines[s] for s in range(args.warmup + 1, total + 1)]
    seconds = sum(BATCH / float(v["samples_per_s"]) for v in after)
    logged = sum(float(v["tokens_per_s"]) * BATCH / float(v["samples_per_s"]) for v in after)
    real, padded = (sum(t[i] for t in tokens[args.warmup:total]) for i in (0, 1))
    if abs(logged / real - 1) > 0.002:
        print(f"WARNING: dtrain logged {logged:,.0f} non-padding tokens after the warm-up, the rebuilt batches hold "
              f"{real:,}: the padded count may be off", flush=True)
    out = rates(args.steps * BATCH, logged, padded, seconds)
    # the run's own MFU (its log lines: the logger's peak from the same cpu_matmul_peak, per process × world size)
    out["run_mfu"] = sum(float(v["mfu"]) * BATCH / float(v["samples_per_s"]) for v in after) / seconds
    return out


def rates(samples: int, tokens: float, padded: float, seconds: float) -> dict:
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "padded_per_s": padded / seconds,
            "padding": max(0.0, 1 - tokens / padded)}  # (the logged tokens are rounded: never below 0)


def epoch_padding(shards: Path, model_dir: Path, nproc: int, seed: int) -> float:
    """The padded share of all positions of a whole epoch's micro-batches (the measured steps are a few of them)."""
    from dtrain.data.shards import ShardedDataset

    tokens = dtrain_tokens(shards, model_dir, nproc, len(ShardedDataset(shards)) // BATCH, seed)
    return 1 - sum(t for t, _ in tokens) / sum(p for _, p in tokens)


def report(runs: dict[str, list[dict]], peak: list[float], flops: dict[str, float], workers: int, bucket: int,
           epoch_pad: dict[int, float], load: float, args) -> str:  # noqa: ANN001
    med = {s: {k: common.median([r[k] for r in rs]) for k in rs[0]} for s, rs in runs.items()}
    hf_tok = med["hf"]["tokens_per_s"]
    rows, agree = [], []
    for side, rs in runs.items():
        if "run_mfu" in rs[0]:
            agree.append(f"{SIDES[side]} {med[side]['run_mfu']:.1%} in-run vs {med[side]['mfu']:.1%} here "
                         f"({med[side]['run_mfu'] / med[side]['mfu']:.2f}×)")
        mfu = [r["mfu"] * 100 for r in rs]
        rows.append(f"| {SIDES[side]} | {common.spread([r['samples_per_s'] for r in rs], '{:.2f}')} | "
                    f"{common.spread([r['tokens_per_s'] for r in rs], '{:,.0f}')} | "
                    f"{common.spread([r['padded_per_s'] for r in rs], '{:,.0f}')} | {med[side]['padding']:.0%} | "
                    f"{med[side]['tokens_per_s'] / hf_tok:.2f}× | {common.spread(mfu, '{:.1f}%')} |")
    best = max(DTRAIN_SIDES, key=lambda s: med[s]["tokens_per_s"])
    best_mfu = max(DTRAIN_SIDES, key=lambda s: med[s]["mfu"])
    mfu = med[best_mfu]["mfu"] * 100
    within = all(abs(med[s]["run_mfu"] / med[s]["mfu"] - 1) <= 0.1 for s in DTRAIN_SIDES)
    unpadded = med["dtrain1"]["tokens_per_s"] / med["padded1"]["tokens_per_s"]
    threads = os.environ.get("OMP_NUM_THREADS", "1, torchrun's default")
    end_load = common.busy_elsewhere()
    return "\n".join([
        "## Pretraining throughput (`bench/pretrain.py`)", "",
        common.machine_line("transformers", "deepspeed") + f" Other runnable processes on the machine: {load:.1f} "
        f"at the start, {end_load:.1f} at the end" + (" (other work shared these cores: every side ran slower than "
                                                      "this machine runs it alone, and MFU is against a peak measured "
                                                      "under another load)." if max(load, end_load) >= 0.5
                                                      else " (a quiet machine)."), "",
        f"Settings: MiniLM weights (BertForPreTraining: MLM 15% + NSP) on the BBC example corpus, fp32, global batch "
        f"{BATCH}, seq {SEQ}, AdamW lr {LR:g}, warmup {WARMUP:g} + linear decay, weight decay {WEIGHT_DECAY:g}, sdpa "
        f"attention, seed {args.seed}. Each side runs {args.warmup} warm-up step(s), then measured ones: "
        f"{args.hf_steps} for HF (the slow side), {args.steps} for dtrain (throughput is per second). HF Trainer: 1 "
        f"process, {torch.get_num_threads()} threads, use_cpu, no evaluation or saving; sentence pairs built as the "
        f"old TextDatasetForNextSentencePrediction did, padded to {SEQ} (the conventional setup), "
        f"DataCollatorForLanguageModeling; timed by step-end callbacks. dtrain: `{CONFIG}` with the same settings, "
        f"1 process with micro-batch {BATCH}, or torchrun with 2 (DDP over gloo, micro-batch {BATCH // 2} each, "
        f"OMP_NUM_THREADS={threads}); data.num_workers={workers} per process; each micro-batch padded to its "
        f"longest sequence (no rounding to 8 on a CPU); NSP pairs filled to their target length at read time"
        f"{f' and sorted by length in windows of {bucket} samples (data.bucket_window)' if bucket else ''}; "
        f"unpadded encoder (model.unpad, the default: embeddings, projections, feed-forward and LayerNorms on the "
        f"real tokens only, attention re-padded; the \"padding\" column is the micro-batches' share, which only "
        f"attention computes on), and once more with model.unpad=false; vocabulary head on the masked positions "
        f"only; timed by its "
        f"per-step log lines (start-up, the final checkpoint and teardown excluded). {args.reps} rep(s), sides "
        f"interleaved per rep; median (min–max) of reps; \"vs HF\" is the ratio of the medians.", "",
        f"MFU: achieved FLOP/s over this machine's fp32 matmul peak, {common.spread([p / 1e9 for p in peak])} "
        f"GFLOP/s (`common.cpu_matmul_peak`, torch's default threads = all cores; the 2-process side is held to the "
        f"same whole-machine peak). dtrain: non-padding tokens/s × {flops['dtrain'] / 1e6:.1f} MFLOP/token "
        f"(`training_flops_per_token` as dtrain/pretrain.py calls it: vocabulary head on the masked 15%). HF: padded "
        f"tokens/s × {flops['hf'] / 1e6:.1f} MFLOP/token (vocabulary head on every position, as BertForPreTraining "
        f"computes it): each side is credited with the work it does. The MFU dtrain's own log lines report (the "
        f"run logger: its peak measured in 0.5 s by each process with its threads, times the world size): "
        f"{'; '.join(agree)}; within ±10% of this benchmark's: {'yes' if within else 'NO'}.", "",
        "| side | samples/s | non-padding tokens/s | padded tokens/s | padding | vs HF (non-padding tokens/s) | MFU |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        "Goals:", "",
        common.ratio_goal(f"HF Trainer in non-padding tokens/s ({SIDES[best]}, the faster dtrain side)",
                          med[best]["tokens_per_s"] / hf_tok, 3.0),
        "- CPU MFU ≥ 60%: " + common.goal(mfu >= 60, f"{mfu:.1f}% ({SIDES[best_mfu]}"
                                            + (")" if mfu >= 60 else f"; {60 - mfu:.1f} points below the goal)")),
        "- padded-token share ≤ 3%: " + common.goal(epoch_pad[int(best[-1])] <= 0.03, (
            f"{epoch_pad[int(best[-1])]:.1%} of the positions of a whole epoch's micro-batches ({SIDES[best]}; "
            f"{med[best]['padding']:.1%} in the measured steps); the dense layers compute on none of them "
            f"(unpadded), only attention does")),
        f"- unpadding (model.unpad, 1 process): {unpadded:.2f}× the padded encoder's non-padding tokens/s "
        f"({med['padded1']['padding']:.1%} padding in both's measured steps; a micro-batch without padding skips "
        f"the unpadded path's gathers)",
        f"- compile (model.compile=true, 1 process, after its warm-up): "
        f"{med['compiled1']['tokens_per_s'] / med['dtrain1']['tokens_per_s']:.2f}× the eager encoder's tokens/s",
        "", common.reproduce("bench/pretrain.py"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved reps; the table shows their medians")
    ap.add_argument("--steps", type=int, default=8, help="measured optimizer steps (of 32 samples), dtrain sides")
    ap.add_argument("--hf-steps", type=int, default=2, help="measured optimizer steps, HF side")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not measured (>= 1)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(common.BENCHMARKS))
    args = ap.parse_args()
    if min(args.warmup, args.steps, args.hf_steps) < 1:
        ap.error("--warmup, --steps and --hf-steps must be >= 1")
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")  # the dtrain subprocesses inherit them
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dtrain.config import load_config
    from dtrain.data.prepare import prepare_pretrain

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started, load = time.perf_counter(), common.busy_elsewhere()
    peak = common.cpu_matmul_peak()
    print(f"fp32 matmul peak: {common.spread([p / 1e9 for p in peak])} GFLOP/s", flush=True)
    corpus, model_dir = example_path("bbc_corpus"), example_path("minilm")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-pt-") as tmp:
        work = Path(tmp)
        shards = work / "shards"
        prepare_pretrain([str(corpus)], shards, str(model_dir), max_seq_len=SEQ, overwrite=True)
        d = load_config(REPO / CONFIG, overrides(shards, model_dir, work, 1, 1, args.seed)).data
        masked = min(d.max_predictions_per_seq, d.mlm_probability * d.max_seq_len) / d.max_seq_len
        flops = {"dtrain": training_flops_per_token(config, d.max_seq_len, masked),
                 "hf": training_flops_per_token(config, SEQ, 1.0)}
        total = args.warmup + args.steps
        examples = nsp_examples(corpus, tok, (args.warmup + args.hf_steps) * BATCH, args.seed)
        tokens = {n: dtrain_tokens(shards, model_dir, n, total, args.seed) for n in (1, 2)}
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for rep in range(args.reps):  # interleaved, so drift on this shared machine hits every side alike
            for side in SIDES:
                t0 = time.perf_counter()
                if side == "hf":
                    r = run_hf(model_dir, tok, examples, args, work)
                    r["mfu"] = r["padded_per_s"] * flops["hf"] / common.median(peak)
                else:
                    n = int(side[-1])
                    r = run_dtrain(shards, model_dir, n, args, work, rep, tokens[n], SIDE_OVERRIDES.get(side, ()))
                    r["mfu"] = r["tokens_per_s"] * flops["dtrain"] / common.median(peak)
                runs[side].append(r)
                print(f"rep {rep + 1}/{args.reps} {SIDES[side]}: {r['samples_per_s']:.2f} samples/s, "
                      f"{r['tokens_per_s']:,.0f} non-padding / {r['padded_per_s']:,.0f} padded tokens/s, MFU "
                      f"{r['mfu']:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)
        epoch_pad = {n: epoch_padding(shards, model_dir, n, args.seed) for n in (1, 2)}
    body = report(runs, peak, flops, d.num_workers, d.bucket_window, epoch_pad, load, args)
    print("\n" + body + f"\n\n(whole benchmark: {time.perf_counter() - started:.0f} s)")
    common.write_section("pretrain", body, Path(args.out))


if __name__ == "__main__":
    main()
