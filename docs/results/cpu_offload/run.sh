#!/usr/bin/env bash
# Issue 31, the CPU side on a CPU-only machine: ZeRO-3 W=1 with offload_optimizer cpu, DS_ACCELERATOR=cpu, bf16,
# LLaMA-$M, seq 128, micro-batch 2, $STEPS steps; the optimizer's own step time (train.py --time-optimizer, median of
# the steps after the first two) for AdamW (DeepSpeedCPUAdam), APOLLO-Mini and APOLLO, and APOLLO-Mini with the
# PyTorch ops instead of the C++ projection kernel (APOLLO_DIST_CPU_KERNELS=0). Writes $OUT/cpu_offload.txt.
set -u
OUT=${OUT:-/tmp/cpu_offload}; M=${M:-350m}; STEPS=${STEPS:-6}
mkdir -p "$OUT"
export DS_ACCELERATOR=cpu
python - "$OUT/z3.json" <<'PY'
import json, sys
cfg = json.load(open("ds_configs/apollo_zero3.json"))
cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
echo "$(date -u +%F) $(nproc) CPUs, torch $(python -c 'import torch; print(torch.__version__)'), LLaMA-$M" > "$OUT/cpu_offload.txt"
for run in ${RUNS:-adamw apollo-mini apollo-mini-torch-ops apollo}; do
  opt=${run%-torch-ops}; env=(); [ "$run" = apollo-mini-torch-ops ] && env=(APOLLO_DIST_CPU_KERNELS=0)
  env "${env[@]}" deepspeed --num_gpus 1 launch/train.py --deepspeed "$OUT/z3.json" --optimizer "$opt" --model "$M" \
    --seq-len 128 --global-batch-size 2 --micro-batch-size 2 --steps "$STEPS" --lr 1e-4 --warmup-steps 1 --dtype bf16 \
    --time-optimizer --eval-every 0 --eval-samples 1 --no-progress --metrics-file "$OUT/m_$run.jsonl" > "$OUT/log_$run.txt" 2>&1 \
    || { echo "$run FAILED: $(tail -3 "$OUT/log_$run.txt")" >> "$OUT/cpu_offload.txt"; continue; }
  python - "$run" "$OUT/m_$run.jsonl" >> "$OUT/cpu_offload.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[2]) if "optimizer_s" in l]
n = sum(next((r for r in map(json.loads, open(sys.argv[2])) if "optimizer_state_bytes_per_rank" in r), {}).get("optimizer_state_bytes_per_rank", [0]))
ms = [f"{r['optimizer_s'] * 1e3:.0f}" for r in rows]
med = statistics.median(r["optimizer_s"] for r in rows[2:]) * 1e3
rss = max(r["host_peak_rss_gib"] for r in rows)
print(f"{sys.argv[1]:24s} optimizer step {med:8.1f} ms (median of steps 3-{len(rows)}; all: {' '.join(ms)}) | host peak RSS {rss:.2f} GiB | state {n / 2**20:.1f} MiB")
PY
done
cat "$OUT/cpu_offload.txt"
