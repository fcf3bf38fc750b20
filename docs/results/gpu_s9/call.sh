#!/usr/bin/env bash
# One device call for issues 28 and 31 (run from the repo root; under 9 minutes on an H100):
#  1. the DCT refresh against the random one at LLaMA-1b (no SVD rows: those were measured, BENCHMARKS §15), and the
#     DCT decision alone over 1b's 168 weight shapes (docs/results/cpu_step/dct_decide.py);
#  2. ZeRO-3 W=1 with optimizer offload at 1b: AdamW (DeepSpeedCPUAdam) vs APOLLO-Mini (docs/results/gpu_s6/offload.sh).
# Summaries go to stdout (the device returns 8 files).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OUT=$OUT OPTS=apollo,apollo-dct,apollo-mini,apollo-mini-dct bash docs/results/gpu_s6/projections.sh > /dev/null
grep '^{' "$OUT/projections.txt" | python3 -c "
import sys, json
for l in sys.stdin:
    try:
        r = json.loads(l)
    except ValueError:
        continue
    print(r.get('optimizer'), 'ordinary step ms', r.get('opt_step_ms'), 'refresh step ms', r.get('refresh_step_ms'))"
timeout 100 python docs/results/cpu_step/dct_decide.py --device cuda --hidden 2048 --inter 5461 --layers 24
OUT=$OUT RUN_S=${RUN_S:-80} OPTS="adamw apollo-mini" bash docs/results/gpu_s6/offload.sh > /dev/null
cat "$OUT/offload.txt"
