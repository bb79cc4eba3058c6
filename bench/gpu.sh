#!/bin/bash
# GPU pretraining benchmark (BERT-large, seq 128/512, fp16/bf16, DDP/ZeRO-2): sequences/s and MFU on this node's
# CUDA GPUs, written into BENCHMARKS.md. Without a GPU the table says "not measured". Options: see bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${DTRAIN_PYTHON:-.venv/bin/python}" bench/gpu.py "$@"
