#!/usr/bin/env bash
# Issue 27 on one GPU: launch -> first step after resuming a LLaMA-1b checkpoint written by the other engine,
# against the same engine's native load. Writes $OUT/resume_timing.txt.
set -u
M=${M:-1b}
common="--model $M --seq-len 256 --global-batch-size 4 --micro-batch-size 4 --optimizer apollo-mini --eval-every 0 --eval-samples 1 --no-progress --warmup-steps 1"
ds() { deepspeed --num_gpus 1 launch/train.py --deepspeed ds_configs/apollo.json $common "$@"; }
fs() { torchrun --standalone --nproc_per_node 1 launch/train.py --engine fsdp2 --dtype bf16 $common "$@"; }
first_step() {  # seconds from $1 (launch) to the first metrics row of $2
  python3 -c "import json,sys; r=[x for x in map(json.loads, filter(str.strip, open(sys.argv[2]))) if 'wall_time' in x]; print(round(r[0]['wall_time'] - float(sys.argv[1]), 1))" "$1" "$2"
}
run() {  # name, engine fn, args...
  local name=$1 fn=$2; shift 2
  local t0; t0=$(date +%s.%N)
  $fn "$@" --metrics-file /tmp/m_$name.jsonl > /tmp/log_$name.txt 2>&1 || { echo "$name FAILED"; tail -20 /tmp/log_$name.txt; return; }
  echo "$name: launch -> step $(first_step "$t0" /tmp/m_$name.jsonl) s (whole command $(python3 -c "import time;print(f'{time.time()-$t0:.1f}')") s)"
}
run save_ds ds --steps 2 --save-dir /tmp/ck_ds
run ds_from_ds ds --steps 3 --resume /tmp/ck_ds
run fs_from_ds fs --steps 3 --resume /tmp/ck_ds
if [ -z "${ONE_WAY:-}" ]; then  # ONE_WAY=1: only a ZeRO-2 checkpoint, resumed by ZeRO-2 and by FSDP2
  run save_fs fs --steps 2 --save-dir /tmp/ck_fs
  run fs_from_fs fs --steps 3 --resume /tmp/ck_fs
  run ds_from_fs ds --steps 3 --resume /tmp/ck_fs
fi
grep -h "resumed from" /tmp/log_*_from_*.txt
