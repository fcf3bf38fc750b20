#!/usr/bin/env bash
# Issues 29 and 27 (see README.md here).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } | tee "$OUT/device.txt"
timeout 230 env OUT="$OUT" bash docs/results/gpu_s6/moe.sh
ONE_WAY=1 timeout 330 bash docs/results/gpu_s5/resume_timing.sh 2>&1 | tee "$OUT/resume_timing.txt"
