#!/bin/bash
# Session 3, GPU call 3 (one H200): issue 15's "before" profile at 1b on the H200; issue 14's LLaMA-1b
# save (FSDP2) -> --export-hf -> --init-from (ZeRO-3) round trip; then issue 14's largest micro-batch at
# sequence 1024 (7B, ZeRO-3 then FSDP2, APOLLO-Mini and AdamW) as far as the call's time allows.
R=${R:-$OUT/r}; W=/tmp/w; mkdir -p "$R" "$W"
python3 tools/bench.py --models 1b --optimizers adamw,apollo,apollo-mini --steps 20 --skip-full --profile \
  --json "$R/bench1b_profile.json" > "$R/bench1b_profile.log" 2>&1; echo "bench rc=$? $(date +%T)" >> "$R/done.txt"
T="--seq-len 256 --global-batch-size 8 --micro-batch-size 8 --dtype fp32 --eval-samples 16 --no-progress"
torchrun --standalone --nproc_per_node 1 launch/train.py --engine fsdp2 --model 1b $T --steps 5 --eval-every 5 \
  --save-dir $W/ck --metrics-file "$R/rt_fsdp2_1b.jsonl" > "$R/rt_fsdp2_1b.log" 2>&1; echo "rt save rc=$? $(date +%T)" >> "$R/done.txt"
python3 tools/convert_checkpoint.py $W/ck/step_0000005 $W/canon --export-hf $W/hf > "$R/rt_export.log" 2>&1; echo "rt export rc=$? $(date +%T)" >> "$R/done.txt"
deepspeed --num_gpus 1 launch/train.py --deepspeed ds_configs/apollo_zero3.json --init-from $W/hf $T --steps 1 --eval-every 1 \
  --metrics-file "$R/rt_zero3_1b.jsonl" > "$R/rt_zero3_1b.log" 2>&1; echo "rt init-from rc=$? $(date +%T)" >> "$R/done.txt"
for e in zero3 fsdp2; do
  python3 tools/bench_dist.py --world 1 --model 7b --seq-len 1024 --max-batch --max-batch-limit 64 --search-steps 2 --warmup 1 \
    --activation-checkpointing --engines $e --optimizers apollo-mini,adamw --json "$R/maxb1024_$e.json" > "$R/maxb1024_$e.log" 2>&1
  echo "maxb $e rc=$? $(date +%T)" >> "$R/done.txt"
done
