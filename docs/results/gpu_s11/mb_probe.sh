#!/usr/bin/env bash
# Issue 31: the largest micro-batch under ZeRO-3 W=1 + offload_optimizer cpu (run from the repo root on one GPU).
# For each optimizer in OPTS, tries each micro-batch in MBS (ascending) for STEPS steps with
# docs/results/gpu_s6/offload.sh and stops at the first that fails; prints one line per try
# (ok with its peak GPU memory, or the failure: "out of memory" when the log says so).
set -u
OUT=${OUT:-/tmp/mb_probe}
M=${M:-7b}
MBS=${MBS:-"8 16"}
STEPS=${STEPS:-2}
RUN_S=${RUN_S:-150}
mkdir -p "$OUT"
for opt in ${OPTS:-adamw apollo-mini apollo}; do
  for mb in $MBS; do
    d="$OUT/${opt}_mb$mb"
    OUT=$d M=$M MB=$mb STEPS=$STEPS RUN_S=$RUN_S OPTS=$opt bash docs/results/gpu_s6/offload.sh > "$d.txt" 2>&1
    if grep -q "steps $STEPS," "$d/offload.txt" 2>/dev/null; then
      echo "$M mb $mb $opt: ok | $(grep -o 'peak GPU *[0-9.]* GiB' "$d/offload.txt") | $(grep -o 'host peak RSS *[0-9.]* GiB' "$d/offload.txt")"
    else
      why=$(grep -hoi -m1 "CUDA out of memory[^.]*" "$d"/log_*.txt | head -1)
      echo "$M mb $mb $opt: FAILED (${why:-see $d/log_$opt.txt}) | $(grep -h 'exit' "$d/offload.txt" | head -1)"
      break
    fi
  done
done
