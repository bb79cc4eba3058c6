"""Data pipeline benchmark: dtrain beside the Hugging Face path, measured in the same run on the same machine.

  .venv/bin/python bench/data.py            # prints the table and writes it into BENCHMARKS.md

(a) preparation: `dtrain prepare pretrain` (sentence split + tokenize + chunk + write shards) vs `datasets.map(
    batched=True, num_proc=2)` doing the same sentence split + tokenization and `save_to_disk`, same tokenizer;
(b) loading: StreamingDataset + PretrainingCollator (NSP pairs + MLM masks) vs the same chunks as a `datasets`
    Dataset with set_format("torch") through transformers' DataCollatorForLanguageModeling (MLM only), batch 32;
(c) what training consumes: samples/s of MiniLM (BertForPreTraining, seq 128, batch 32, AdamW) forward+backward+step.
Corpus: the BBC example corpus; tokenizer and model: the MiniLM example (dtrain fetch-examples).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_line, reproduce, write_section  # noqa: E402
from dtrain.data.examples import example_path  # noqa: E402
from dtrain.data.prepare import iter_documents, prepare_pretrain, split_sentences  # noqa: E402
from dtrain.data.pretraining import PretrainingCollator  # noqa: E402
from dtrain.data.shards import ShardedDataset  # noqa: E402
from dtrain.data.stream import StreamingDataset, StreamLoader  # noqa: E402
from dtrain.model.tokenizer import load_tokenizer  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_prepare(corpus: Path, tok_dir: Path, work: Path, workers: int) -> dict:
    import datasets

    manifest, ours = timed(lambda: prepare_pretrain([str(corpus)], work / "ours", str(tok_dir), max_seq_len=128,
                                                    workers=workers, overwrite=True))
    tokens = manifest["total_tokens"]
    tok = load_tokenizer(tok_dir)

    def hf():
        ds = datasets.Dataset.from_dict({"text": list(iter_documents([str(corpus)]))})

        def tokenize(batch):
            return {"input_ids": [tok([s for s in split_sentences(t)], add_special_tokens=False)["input_ids"]
                                  for t in batch["text"]]}

        out = ds.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
        out.save_to_disk(str(work / "hf"))
        return sum(len(s) for doc in out["input_ids"] for s in doc)

    hf_tokens, theirs = timed(hf)
    return {"tokens": tokens, "hf_tokens": hf_tokens, "ours_s": ours, "hf_s": theirs,
            "ours_tps": tokens / ours, "hf_tps": hf_tokens / theirs}


def bench_loading(data_dir: Path, tok_dir: Path, batch: int, workers: int, max_batches: int) -> dict:
    import datasets
    from transformers import DataCollatorForLanguageModeling

    tok = load_tokenizer(tok_dir)
    data = ShardedDataset(data_dir)

    def rate(loader) -> float:
        """Samples/s after the first batch (which pays for worker start-up and first-touch costs on both sides)."""
        n, t0 = 0, None
        for i, b in enumerate(loader):
            if i == 0:
                t0 = time.perf_counter()
            else:
                n += b["input_ids"].shape[0]
            if i == max_batches:
                break
        return n / (time.perf_counter() - t0)

    def ours(num_workers):
        stream = StreamingDataset(data, batch, seed=1, rank=0, world_size=1)
        return rate(StreamLoader(stream, PretrainingCollator(data, tok, 128, seed=1), num_workers=num_workers))

    rows = [np.concatenate([[tok.cls_token_id], data[i]["input_ids"], [tok.sep_token_id]]).tolist()
            for i in range(len(data))]
    hf_ds = datasets.Dataset.from_dict({"input_ids": rows})
    hf_ds.set_format("torch")

    def hf(num_workers):
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, pad_to_multiple_of=8)
        return rate(torch.utils.data.DataLoader(hf_ds, batch_size=batch, shuffle=True, collate_fn=collator,
                                                num_workers=num_workers))

    return {"ours_0": ours(0), "hf_0": hf(0), "ours_w": ours(workers), "hf_w": hf(workers)}


def bench_training(model_dir: Path, data_dir: Path, tok_dir: Path, batch: int, steps: int) -> float:
    import logging

    from transformers import BertForPreTraining
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tok = load_tokenizer(tok_dir)
    data = ShardedDataset(data_dir)
    model = BertForPreTraining.from_pretrained(str(model_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = PretrainingCollator(data, tok, 128, seed=1)
    batches = list(StreamLoader(StreamingDataset(data, batch, seed=1, rank=0, world_size=1), collator))[: steps + 1]
    n, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 1:  # the first step warms up allocators and kernels
            t0, n = time.perf_counter(), 0
        labels = torch.full_like(b["input_ids"], -100)
        labels.scatter_(1, b["mlm_positions"], b["mlm_labels"])
        labels[:, 0] = -100  # padded positions point at [CLS] with label -100
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                    labels=labels, next_sentence_label=b["next_sentence_label"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        n += b["input_ids"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=250, help="batches per loading measurement (after the first)")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the table shows medians")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_OFFLINE"] = "1"
    corpus, model_dir = example_path("bbc_corpus"), example_path("minilm")
    work = Path(tempfile.mkdtemp(prefix="dtrain-bench-"))
    try:
        runs_p, runs_d = [], []
        for _ in range(args.repeat):  # interleaved, so drift on this shared machine hits both sides alike
            runs_p.append(bench_prepare(corpus, model_dir, work, args.workers))
            print(f"prepare: dtrain {runs_p[-1]['ours_tps']:,.0f} tok/s, HF datasets.map "
                  f"{runs_p[-1]['hf_tps']:,.0f} tok/s", flush=True)
            runs_d.append(bench_loading(work / "ours", model_dir, args.batch, args.workers, args.batches))
            print("loading, samples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in runs_d[-1].items()), flush=True)
        p = {k: float(np.median([r[k] for r in runs_p])) for k in runs_p[0]}
        d = {k: float(np.median([r[k] for r in runs_d])) for k in runs_d[0]}
        train = bench_training(model_dir, work / "ours", model_dir, args.batch, args.train_steps)
        print(f"training consumes {train:.1f} samples/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        "## Data pipeline (`bench/data.py`)",
        "",
        machine_line("transformers", "datasets", "pyarrow"),
        "",
        f"Corpus: BBC example corpus ({int(p['tokens']):,} tokens), MiniLM tokenizer, seq 128, "
        f"batch {args.batch}. Medians of {args.repeat} interleaved runs.",
        "",
        "| measurement | dtrain | peer | ratio | goal |",
        "|---|---|---|---|---|",
        f"| prepare, tokens/s ({args.workers} processes) | {p['ours_tps']:,.0f} | {p['hf_tps']:,.0f} "
        f"(datasets.map num_proc={args.workers}, same split+tokenize, save_to_disk) | "
        f"{p['ours_tps'] / p['hf_tps']:.2f}× | ≥ 1.0× |",
        f"| stream + collate, samples/s (0 workers) | {d['ours_0']:,.0f} | {d['hf_0']:,.0f} "
        f"(datasets torch format + DataCollatorForLanguageModeling) | {d['ours_0'] / d['hf_0']:.2f}× | ≥ 3× |",
        f"| stream + collate, samples/s ({args.workers} workers) | {d['ours_w']:,.0f} | {d['hf_w']:,.0f} | "
        f"{d['ours_w'] / d['hf_w']:.2f}× | ≥ 3× |",
        f"| stream + collate vs MiniLM training ({train:.1f} samples/s: fwd+bwd+AdamW, BertForPreTraining) | "
        f"{d['ours_w']:,.0f} | {train:.1f} | {d['ours_w'] / train:.0f}× | ≥ 20× |",
        "",
        "dtrain's collator does more work than the peer's: NSP pairs (with a random read of another document for "
        "half of them) as well as MLM masking.",
        "",
        reproduce("bench/data.py"),
    ])
    print("\n" + table)
    write_section("data", table, Path(args.out))

if __name__ == "__main__":
    main()
