#!/usr/bin/env bash
# Issue 28 on one GPU: LLaMA-60M quality on the bundled corpus with BENCHMARKS §3's settings (seq 256, global
# batch 32, 1,000 steps, warm-up 100 then cosine, grad clip 1.0, bf16 autocast, fp32 parameters, seed 0, one
# process), APOLLO r128 lr 1e-2 with proj random / svd / dct, apollo-torch's svd, and AdamW lr 1e-3 (§3's best),
# the five runs side by side on the one GPU (quality is the figure here; their tokens/s share the card).
# Writes $OUT/q60_<name>.jsonl, $OUT/quality60m.txt (compare_runs table). Run from the repo root; ~4 minutes.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LIMIT=${LIMIT:-330}
C="--engine single --model 60m --steps ${STEPS:-1000} --global-batch-size 32 --micro-batch-size 32 --seq-len 256 --eval-every 100 --warmup-steps 100 --seed 0 --no-progress"
A="--optimizer apollo --rank 128 --lr 1e-2"
go() { local name=$1 prog=$2; shift 2
  timeout "$LIMIT" python3 "$prog" $C "$@" --metrics-file "$OUT/q60_$name.jsonl" > "$OUT/q60_$name.log" 2>&1 \
    || echo "$name: exit $? $(tail -2 "$OUT/q60_$name.log" | tr '\n' ' ')" >> "$OUT/quality60m.txt"; }
: > "$OUT/quality60m.txt"
go adamw launch/train.py --optimizer adamw --lr 1e-3 &
go random launch/train.py $A --proj random &
go svd launch/train.py $A --proj svd &
go dct launch/train.py $A --proj dct &
go torch_svd tools/train_reference.py $A --proj svd &
wait
python3 tools/compare_runs.py "$OUT"/q60_{adamw,random,svd,dct,torch_svd}.jsonl \
  --labels "AdamW lr 1e-3,apollo_dist random,apollo_dist svd,apollo_dist dct,apollo-torch svd" \
  --out "$OUT/quality60m.png" >> "$OUT/quality60m.txt" 2>&1
cat "$OUT/quality60m.txt"
