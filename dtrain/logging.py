"""Rank-0 observability: TensorBoard scalars, a progress bar, one summary line per log interval, throughput, MFU."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak FLOP/s (bf16/fp16 tensor cores; fp32 uses TF32 where the GPU has it), by substring of the device name.
GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
            "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def training_flops_per_token(config: Any, seq_len: int, head_tokens_fraction: float = 1.0) -> float:
    """Forward + backward FLOPs per token (3 × forward, 2 FLOPs per multiply-add) of a BERT encoder: the dense
    matmuls of every layer, attention scores and values over seq_len, and the vocabulary head on the given
    fraction of tokens (the masked ones, for dtrain's pretraining head)."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    per_layer = 2 * (4 * h * h + 2 * h * inter) + 2 * 2 * seq_len * h
    head = 2 * (h * h + h * vocab) * head_tokens_fraction
    return 3.0 * (layers * per_layer + head)


_CPU_PEAK: float | None = None
IN_RUN_PEAK_S = 0.5  # the run's own measurement: one interval after a warm-up (the benchmarks take 5 × 2 s)


def cpu_matmul_peak(seconds: float = 2.0, n: int = 2048, reps: int = 5) -> list[float]:
    """fp32 matmul FLOP/s of this CPU with torch's threads: `reps` measurements of `seconds` each after a warm-up,
    n×n @ n×n. The one measurement of the CPU's peak: the run logger's MFU and bench/ (BENCHMARKS.md) both use it,
    so the in-run figure and the benchmark's agree. Operands from a generator of their own, not the global RNG
    (the run's dropout stream stays untouched)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm-up: thread pool, caches
    out = []
    for _ in range(reps):
        count, t0 = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        out.append(2 * n ** 3 * count / (time.perf_counter() - t0))
    return out


def measured_cpu_peak() -> float:
    """This process's CPU peak for the in-run MFU (cpu_matmul_peak over IN_RUN_PEAK_S, cached)."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        _CPU_PEAK = cpu_matmul_peak(IN_RUN_PEAK_S, reps=1)[0]
    return _CPU_PEAK


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK.items():
            if key in name:
                return value
        return 100e12
    return measured_cpu_peak()


class RunLogger:
    """Logs on rank 0 only; other ranks get an object whose methods do nothing."""

    def __init__(self, run_dir: str | Path, is_main: bool, total_steps: int, every: int = 10,
                 tensorboard: bool = True, progress_bar: bool = True, flops_per_token: float = 0.0,
                 peak: float = 0.0, world_size: int = 1, start_step: int = 0):
        self.is_main, self.every, self.total = is_main, every, total_steps
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.bar = None
        self._writer: Any = None
        self._tb_dir = Path(run_dir) / "tb" if is_main and tensorboard else None
        self._t = time.perf_counter()
        self._samples = self._tokens = 0
        if not is_main:
            return
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                            disable=None)

    @property
    def writer(self) -> Any:
        """The TensorBoard writer, created at first use: a run that fails its checks leaves no event file."""
        if self._writer is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self._tb_dir))
        return self._writer

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text)

    def info(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(message)

    def step(self, step: int, scalars: dict[str, float], samples: int, tokens: int) -> dict[str, float]:
        """Record one optimizer step (global samples/tokens it consumed); every `every` steps write the interval's
        throughput and MFU with the scalars. Returns what was written (empty between intervals)."""
        self._samples += samples
        self._tokens += tokens
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        if step % self.every and step != self.total:
            return {}
        dt = max(time.perf_counter() - self._t, 1e-9)
        out = dict(scalars)
        out["samples_per_s"] = self._samples / dt
        out["tokens_per_s"] = self._tokens / dt
        if self.flops_per_token and self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak * self.world_size)
        if torch.cuda.is_available():
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        self._t, self._samples, self._tokens = time.perf_counter(), 0, 0
        if self.is_main:
            if self.writer:
                for key, value in out.items():
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.info(f"step {step}/{self.total} " + " ".join(f"{k}={_fmt(v)}" for k, v in out.items()))
        return out

    def eval(self, step: int, metrics: dict[str, float], prefix: str = "eval") -> None:
        if not self.is_main:
            return
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.info(f"{prefix} at step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self._writer:
            self._writer.flush()
            self._writer.close()


def _fmt(value: float) -> str:
    return f"{value:.7g}" if isinstance(value, float) else str(value)
