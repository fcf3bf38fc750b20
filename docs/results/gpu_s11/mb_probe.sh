#!/usr/bin/env bash
# Issue 31: the largest micro-batch under ZeRO-3 W=1 + offload_optimizer cpu (run from the repo root on one GPU),
# AdamW (DeepSpeedCPUAdam) vs APOLLO-Mini vs APOLLO. One launch/train.py per optimizer with
# --probe-micro-batches (start-up paid once; the ladder stops at the first size that runs out of GPU memory),
# STEPS steps per size; the same settings as docs/results/gpu_s6/offload.sh. Prints a line per size that fits
# (its last step's metrics), then the exit status and the "out of memory" count of the log.
set -u
OUT=${OUT:-/tmp/mb_probe}
M=${M:-7b}
SEQ=${SEQ:-1024}
BIG=$([ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)" -gt 100000 ] 2>/dev/null && echo 1 || echo 0)
STEPS=${STEPS:-$([ "$BIG" = 1 ] && echo 1 || echo 2)}  # 2: the second step at each size is a warm timing
RUN_S=${RUN_S:-180}
SIZES=${SIZES:-$([ "$BIG" = 1 ] && echo 4,12,20,28,36,44 || echo 4,8,12,16)}  # H200 (139 GiB) / H100 (80 GB)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc --all)}
mkdir -p "$OUT"
echo "issue 31 probe: ZeRO-3 W=1 + offload_optimizer cpu, $M, seq $SEQ, sizes $SIZES, $STEPS step(s) each"
echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1); host: $(nproc --all) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
timeout 100 python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > "$OUT/cpu_adam_build.log" 2>&1 \
  || { echo "DeepSpeedCPUAdam op did not build: AdamW is torch AdamW"; export APOLLO_DIST_TORCH_ADAMW_OFFLOAD=1; }
CFG=/tmp/probe_z3.json
python - "$CFG" <<'PY'
import json, sys
cfg = json.load(open("ds_configs/apollo_zero3.json"))
cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
first=${SIZES%%,*}
for opt in ${OPTS:-apollo-mini adamw apollo}; do
  t=$(date +%s)
  timeout "$RUN_S" deepspeed --num_gpus 1 launch/train.py --deepspeed "$CFG" --optimizer "$opt" --model "$M" \
    --seq-len "$SEQ" --global-batch-size "$first" --micro-batch-size "$first" --steps "$STEPS" --lr 1e-4 \
    --warmup-steps 1 --dtype bf16 --activation-checkpointing --time-optimizer --eval-every 0 --eval-samples 1 \
    --no-progress --probe-micro-batches "$SIZES" --metrics-file "$OUT/p_$opt.jsonl" > "$OUT/plog_$opt.txt" 2>&1
  rc=$?
  python - "$M $opt" "$OUT/p_$opt.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
except OSError:
    rows = []
for mb in sorted({r["micro_batch"] for r in rows}):
    last = [r for r in rows if r["micro_batch"] == mb][-1]
    print(f"{sys.argv[1]}: micro-batch {mb} fits | peak GPU {last['peak_mem_gib']:.2f} GiB | host peak RSS "
          f"{last['host_peak_rss_gib']:.2f} GiB | step {last['step']}: {last['tokens_per_s']:.0f} tokens/s, "
          f"optimizer {last['optimizer_s']:.3f} s, loss {last['loss']:.3f}")
PY
  oom=$(grep -ci "out of memory" "$OUT/plog_$opt.txt")
  echo "$M $opt: exit $rc after $(( $(date +%s) - t )) s; 'out of memory' in the log: $oom line(s)"
  [ "$oom" -gt 0 ] || [ $rc -eq 0 ] || tail -5 "$OUT/plog_$opt.txt"
done
