#!/usr/bin/env bash
# DeepSpeed ZeRO-2 + APOLLO on all local GPUs (2 CPU ranks without a GPU). Extra args go to train.py.
#   bash launch/zero2.sh --model 60m --steps 10000 --global-batch-size 512 --micro-batch-size 64
source "$(dirname "$0")/_common.sh"
exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py \
  --deepspeed "${DS_CONFIG:-ds_configs/apollo.json}" "${CPU_FLAGS[@]}" "$@"
