#!/usr/bin/env bash
# Issue 28 (see README.md here): the projections' step costs at 1b, then the LLaMA-60M quality runs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } | tee "$OUT/device.txt"
OUT="$OUT" bash docs/results/gpu_s6/projections.sh
LIMIT=$((580 - SECONDS)) OUT="$OUT" bash docs/results/gpu_s7/quality60m.sh
