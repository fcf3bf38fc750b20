#!/usr/bin/env bash
# Issue 31 (see README.md here).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } | tee "$OUT/device.txt"
timeout 570 env OUT="$OUT" bash docs/results/gpu_s6/offload.sh
