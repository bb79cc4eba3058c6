"""Where a pretraining step's time goes: dtrain's step beside HF's, under torch.profiler, in one process.

  .venv/bin/python bench/step_profile.py                       # writes its section of BENCHMARKS.md
  .venv/bin/python bench/step_profile.py --steps 1 --out /tmp/bench-profile.md           # smoke run

The same work as bench/pretrain.py's 1-process sides, without the trainers around it: MiniLM BertForPreTraining, fp32,
batch 32, seq 128, BBC example corpus, AdamW + clipping at 1.0. dtrain's step: its own batches (runner.stream +
PretrainingCollator, as dtrain.pretrain builds them) through `pretraining_losses` (vocabulary head on the masked
positions only) and dtrain's optimizer (`build_optimizer`: fused AdamW). HF's step: DataCollatorForLanguageModeling
over bench/pretrain.py's NSP examples, `model(**batch)` (head on every position), torch AdamW as the HF Trainer builds
it. In each of --rounds alternating rounds, each side runs --warmup steps, then --steps profiled ones; the last round
is reported: milliseconds per step for forward, backward and optimizer (record_function ranges), and the self time of
the operators grouped by kind, with the FLOP rate the matrix multiplications reach (the profiler's FLOP counts)
against this machine's fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.pretrain import BATCH, EPS, LR, SEQ, WEIGHT_DECAY, dtrain_batches, nsp_examples  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402

# operator kinds, by the name of the aten op (self time: each op counted once, where it runs)
KINDS = [
    ("matrix multiply (linear layers, heads)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("fused attention kernels (SDPA's own; with a padding mask on a CPU it runs as bmm + softmax instead)",
     ("scaled_dot_product", "flash_attention")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("softmax (attention) / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer kernels (AdamW, grad norm, clipping)", ("adam", "_foreach", "norm", "clamp")),
    ("dropout", ("dropout", "bernoulli", "native_dropout")),
    ("embeddings", ("embedding",)),
]
MATMUL = KINDS[0][1]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if name in keys or any(k in name for k in keys if not k.startswith("aten::")):
            return kind
    return "everything else (copies, adds, reductions, autograd bookkeeping)"


def dtrain_side(shards: Path, model_dir: Path, n: int, seed: int) -> tuple[torch.nn.Module, Callable, list[dict],
                                                                             torch.optim.Optimizer]:
    from dtrain.model.bert import pretraining_counts, pretraining_losses, pretraining_model, set_encoder
    from dtrain.optim import build_optimizer

    cfg, batches = dtrain_batches(shards, model_dir, 1, 0, n, seed)
    model, _ = pretraining_model(str(model_dir), attn_implementation="sdpa")
    set_encoder(model, cfg.model.unpad, cfg.model.gradient_checkpointing, cfg.model.compile)  # as dtrain.runner

    def loss(batch: dict) -> torch.Tensor:  # per-target means, as the trainer normalises a 1-process step
        parts, counts = pretraining_losses(model, batch), pretraining_counts(batch)
        return parts["mlm"] / counts["mlm"] + parts["nsp"] / counts["nsp"]

    return model, loss, batches, build_optimizer(model, cfg.optim)


def hf_side(corpus: Path, model_dir: Path, n: int, seed: int) -> tuple[torch.nn.Module, Callable, list[dict],
                                                                         torch.optim.Optimizer]:
    import transformers as hf

    tok = hf.AutoTokenizer.from_pretrained(str(model_dir))
    examples = nsp_examples(corpus, tok, n * BATCH, seed)
    mlm = hf.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    batches = [mlm(examples[i:i + BATCH]) for i in range(0, len(examples), BATCH)]
    model = hf.BertForPreTraining.from_pretrained(str(model_dir), attn_implementation="sdpa")
    decay = [p for name, p in model.named_parameters() if "bias" not in name and "LayerNorm" not in name]
    rest = [p for name, p in model.named_parameters() if "bias" in name or "LayerNorm" in name]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest,
                                   "weight_decay": 0.0}], lr=LR, eps=EPS)  # as the HF Trainer builds it
    return model, lambda batch: model(**batch).loss, batches, optimizer


def profile_side(model: torch.nn.Module, loss_fn: Callable, batches: Iterator[dict],
                 optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> dict:
    """Batches were made before any step, so the data pipeline is not in the times."""
    model.train()

    def step() -> None:
        batch = next(batches)
        with record_function("forward"):
            loss = loss_fn(batch)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()  # the same number of steps again without the profiler (it slows every op)
    for _ in range(steps):
        step()
    plain = (time.perf_counter() - t0) / steps
    phases, kinds, flops, mm_us = {}, defaultdict(float), 0.0, 0.0
    for e in prof.key_averages():
        if e.key in ("forward", "backward", "optimizer"):
            phases[e.key] = e.cpu_time_total / 1e3 / steps
            continue
        kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e3 / steps
        if e.key in MATMUL:
            flops += e.flops
            mm_us += e.self_cpu_time_total
    return {"wall_ms": wall * 1e3, "plain_ms": plain * 1e3, "phases": phases, "kinds": dict(kinds),
            "matmul_flops_per_s": flops / (mm_us / 1e6) if mm_us else 0.0, "matmul_gflop": flops / steps / 1e9}


def attention_cost(reps: int = 7) -> dict[str, float]:
    """Milliseconds (median of `reps`) of one layer's SDPA forward + backward at MiniLM's pretraining shapes (batch 32,
    12 heads, seq 128, head size 32, 10% of the keys padding) with dropout off and at BERT's 0.1: what attention
    dropout costs on a CPU, where SDPA's fused kernel takes no dropout and the math path (scores, softmax, dropout
    mask, two matmuls) runs instead."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(BATCH, 12, SEQ, 32, requires_grad=True) for _ in range(3))
    keys = torch.ones(BATCH, 1, 1, SEQ, dtype=torch.bool)
    keys[..., int(0.9 * SEQ):] = False
    out = {}
    for p in (0.0, 0.1):
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=p).sum().backward()
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"p={p}"] = common.median(times[1:])
    x = torch.randn(BATCH * SEQ, 384)
    times = []
    for draw in (lambda: torch.empty_like(x).bernoulli_(0.9), lambda: torch.rand_like(x)) * (reps + 1):
        t0 = time.perf_counter()
        draw()
        times.append((time.perf_counter() - t0) * 1e3)
    out["bernoulli"], out["rand"] = common.median(times[2::2]), common.median(times[3::2])
    return out


def explanation(d: dict, h: dict, p: float, attention: dict[str, float]) -> list[str]:
    """What the profile says about bench/pretrain.py's goals (3x HF, 60% MFU): the bounds the measured step sets."""
    mm, mm_rate = d["kinds"][KINDS[0][0]], d["matmul_flops_per_s"] / p
    rest = d["plain_ms"] - mm
    target = h["plain_ms"] / 3
    others = sum(v for k, v in d["kinds"].items() if k != KINDS[0][0]) or 1.0  # the profile's non-matmul self time
    share = {"softmax and dropout": (d["kinds"].get(KINDS[4][0], 0) + d["kinds"].get(KINDS[6][0], 0)) / others,
             "else": d["kinds"].get(kind_of("?"), 0) / others}
    return [
        "What this says about the pretraining goals (bench/pretrain.py; equal batches, so step time stands for "
        "throughput; step times without the profiler, operator times from the profiled steps, whose matmul kernels "
        "the profiler slows little; this script's steps run slower than bench/pretrain.py's, so read the ratios):",
        f"- 3× HF needs a dtrain step of ≤ {target:,.0f} ms (HF's {h['plain_ms']:,.0f} / 3). Its matrix multiplies "
        f"alone take {mm:,.0f} ms at {mm_rate:.0%} of the fp32 peak, which would leave {target - mm:,.0f} ms for all "
        f"the rest; the rest takes {rest:,.0f} ms now, of which (by the profile's self times) "
        f"{share['softmax and dropout']:.0%} is attention's softmax and the dropouts and {share['else']:.0%} copies, "
        f"adds and autograd bookkeeping.",
        f"- MFU ≥ 60% needs the matrix multiplies at ≥ 60% of the peak with almost nothing else in the step: at the "
        f"rate measured here, and with the step as long as now, they make {mm_rate * mm / d['plain_ms']:.0%} MFU "
        f"(the matmul rate × the matmul share of the step).",
        f"- Attention dropout: one layer's SDPA forward + backward (batch {BATCH}, 12 heads, seq {SEQ}) takes "
        f"{attention['p=0.0']:,.0f} ms without dropout and {attention['p=0.1']:,.0f} ms with BERT's 0.1 "
        f"({attention['p=0.1'] / attention['p=0.0']:.2f}×): on a CPU, SDPA's fused kernel takes no dropout, so the "
        f"math path materialises the [batch, heads, seq, seq] probabilities. Drawing a dropout mask with torch's "
        f"bernoulli_ takes {attention['bernoulli']:.1f} ms for a [{BATCH * SEQ}, 384] tensor, uniform draws "
        f"(torch.rand) {attention['rand']:.1f} ms: a cheaper mask of the same law exists, but the hidden dropouts "
        f"it would speed up are a small part of the dropout time above (most of it is attention's).",
    ]


def report(results: dict[str, dict], peak: list[float], args: argparse.Namespace,
           attention: dict[str, float]) -> str:
    d, h = results["dtrain"], results["hf"]
    rows = ["| | dtrain | HF | dtrain / HF |", "|---|---|---|---|",
            f"| whole step (profiled, wall) | {d['wall_ms']:,.0f} ms | {h['wall_ms']:,.0f} ms | "
            f"{d['wall_ms'] / h['wall_ms']:.2f} |",
            f"| whole step (the next steps, no profiler) | {d['plain_ms']:,.0f} ms | {h['plain_ms']:,.0f} ms | "
            f"{d['plain_ms'] / h['plain_ms']:.2f} |"]
    for phase in ("forward", "backward", "optimizer"):
        a, b = d["phases"].get(phase, 0.0), h["phases"].get(phase, 0.0)
        rows.append(f"| {phase} | {a:,.0f} ms | {b:,.0f} ms | {a / b if b else float('nan'):.2f} |")
    names = [k for k, _ in KINDS] + [kind_of("?")]
    kinds = ["| operator kind (self time per step) | dtrain | HF |", "|---|---|---|"]
    total = {s: sum(results[s]["kinds"].values()) for s in results}
    for name in names:
        a, b = d["kinds"].get(name, 0.0), h["kinds"].get(name, 0.0)
        kinds.append(f"| {name} | {a:,.0f} ms ({a / total['dtrain']:.0%}) | {b:,.0f} ms ({b / total['hf']:.0%}) |")
    p = common.median(peak)
    mm = [f"- matrix multiplications: dtrain {d['matmul_gflop']:,.0f} GFLOP per step at "
          f"{d['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s ({d['matmul_flops_per_s'] / p:.0%} of the peak); HF "
          f"{h['matmul_gflop']:,.0f} GFLOP at {h['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s "
          f"({h['matmul_flops_per_s'] / p:.0%}). fp32 matmul peak of this machine (median of 5 measurements before "
          f"and 5 after the profile; above 100% means the machine ran faster during the profile than when measured): "
          f"{common.spread([x / 1e9 for x in peak])} GFLOP/s."]
    return "\n".join([
        "## Where a pretraining step's time goes (profile)", "",
        common.machine_line("transformers"), "",
        f"MiniLM BertForPreTraining, fp32, batch {BATCH}, seq {SEQ}, AdamW + clipping, 1 process with "
        f"{torch.get_num_threads()} threads; torch.profiler over {args.steps} steps after {args.warmup} warm-up, in "
        f"the last of {args.rounds} alternating rounds, then as many steps without it (the profiler slows every op). "
        "dtrain: its batches, masked-position MLM head, fused AdamW; HF: "
        "DataCollatorForLanguageModeling batches, full-vocabulary head on all 128 positions, AdamW as the Trainer "
        "builds it.", "", *rows, "", *kinds, "", *mm, "", *explanation(d, h, p, attention), "",
        common.reproduce("bench/step_profile.py")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first, not profiled, in each round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (dtrain, HF); the last one is reported")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(common.BENCHMARKS))
    args = ap.parse_args()
    if min(args.steps, args.warmup, args.rounds) < 1:
        ap.error("--steps, --warmup and --rounds must be >= 1")
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    from transformers.utils import logging as hf_logging

    from dtrain.data.prepare import prepare_pretrain

    hf_logging.set_verbosity_error()
    peak = common.cpu_matmul_peak()
    corpus, model_dir = example_path("bbc_corpus"), example_path("minilm")
    results = {}
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-prof-") as tmp:
        shards = Path(tmp) / "shards"
        prepare_pretrain([str(corpus)], shards, str(model_dir), max_seq_len=SEQ, overwrite=True)
        n = args.rounds * (args.warmup + 2 * args.steps)  # (profiled steps, then as many without the profiler)
        torch.manual_seed(args.seed)
        sides = {"dtrain": dtrain_side(shards, model_dir, n, args.seed)}
        torch.manual_seed(args.seed)
        sides["hf"] = hf_side(corpus, model_dir, n, args.seed)
        batches = {name: iter(side[2]) for name, side in sides.items()}
        for _ in range(args.rounds):  # alternated, so neither side alone pays for a cold allocator or cache
            for name, (model, loss, _, optimizer) in sides.items():
                results[name] = profile_side(model, loss, batches[name], optimizer, args.warmup, args.steps)
    peak += common.cpu_matmul_peak()  # before and after: this shared VM's speed drifts by up to ±20% over minutes
    body = report(results, peak, args, attention_cost())
    print(body)
    common.write_section("profile", body, Path(args.out))


if __name__ == "__main__":
    main()
