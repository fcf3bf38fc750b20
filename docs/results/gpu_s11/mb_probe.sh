#!/usr/bin/env bash
# Issue 31: the largest micro-batch under ZeRO-3 W=1 + offload_optimizer cpu (run from the repo root on one GPU),
# AdamW (DeepSpeedCPUAdam) vs APOLLO-Mini vs APOLLO. One launch/train.py per optimizer with
# --probe-micro-batches (start-up paid once; the ladder stops at the first size that runs out of GPU memory),
# STEPS steps per size; the same settings as docs/results/gpu_s6/offload.sh. Prints one line per size tried.
set -u
OUT=${OUT:-/tmp/mb_probe}
M=${M:-7b}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-1}
RUN_S=${RUN_S:-180}
GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
SIZES=${SIZES:-$([ "${GIB:-0}" -gt 100000 ] && echo 12,16,20,24,28,32,40 || echo 8,10,12,14,16,20)}
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
for opt in ${OPTS:-adamw apollo-mini apollo}; do
  t=$(date +%s)
  timeout "$RUN_S" deepspeed --num_gpus 1 launch/train.py --deepspeed "$CFG" --optimizer "$opt" --model "$M" \
    --seq-len "$SEQ" --global-batch-size "$first" --micro-batch-size "$first" --steps "$STEPS" --lr 1e-4 \
    --warmup-steps 1 --dtype bf16 --activation-checkpointing --time-optimizer --eval-every 0 --eval-samples 1 \
    --no-progress --probe-micro-batches "$SIZES" --metrics-file "$OUT/p_$opt.jsonl" > "$OUT/plog_$opt.txt" 2>&1
  rc=$?
  grep -h "^micro-batch .*fits" "$OUT/plog_$opt.txt" | sed "s/^/$M $opt: /"
  oom=$(grep -ci "out of memory" "$OUT/plog_$opt.txt")
  echo "$M $opt: exit $rc after $(( $(date +%s) - t )) s; 'out of memory' in the log: $oom line(s)"
  [ "$oom" -gt 0 ] || [ $rc -eq 0 ] || tail -5 "$OUT/plog_$opt.txt"
done
