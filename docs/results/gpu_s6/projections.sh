#!/usr/bin/env bash
# Issue 28 on one GPU: the projections' step costs at LLaMA-1b (M=1b, override with M=350m etc.), one process.
# For apollo_dist random / dct / svd and apollo-torch's svd (the reference), in one run on the same GPU:
#   opt_step_ms     an ordinary step (median of 5, fixed gradients, CUDA events)
#   refresh_step_ms the step that refreshes every projection (update_proj_gap set so that it is the step
#                   right after the timed ones: tools/bench.py --refresh --refresh-after)
#   first_step_ms   step 0 (also a refresh, plus one-time set-up)
# Writes $OUT/projections.txt (the log, one JSON row per optimizer as it finishes, then a table) and
# $OUT/projections.json. Run from the repo root: OUT=/some/dir bash docs/results/gpu_s6/projections.sh
# Expected under 5 minutes on an H100 (an SVD refresh at 1b costs seconds; the whole run is capped at 290 s:
# rows finished by then are in the log).
set -u
OUT=${OUT:-/tmp/out}
M=${M:-1b}
# OPTS: the optimizers (tools/bench.py names), default all six above; e.g. OPTS=apollo,apollo-dct (no SVD: ~1 minute)
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  git rev-parse --short HEAD
  timeout 290 python tools/bench.py --models "$M" \
    --optimizers "${OPTS:-apollo,apollo-dct,apollo-svd,apollo-torch-svd,apollo-mini,apollo-mini-dct}" \
    --steps 5 --skip-full --refresh --refresh-after --json "$OUT/projections.json"
  echo "exit $?"
} > "$OUT/projections.txt" 2>&1
tail -12 "$OUT/projections.txt"
