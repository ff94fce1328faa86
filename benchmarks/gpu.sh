#!/usr/bin/env bash
# GPU training throughput (images/s) and MFU of the 2D U-Net at base 64 and 128 in bf16.
# Runs in at most 8 minutes; run it from the project root on a machine with a CUDA GPU:
#   bash benchmarks/gpu.sh
# NOTE: prepared without a GPU at hand; only its CPU smoke mode has been run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 "$PYTHON" benchmarks/gpu.py --bases 64 128 --size 192 --batch 64 --warmup 10 --steps 50
