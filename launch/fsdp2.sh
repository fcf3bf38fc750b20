#!/usr/bin/env bash
# PyTorch FSDP2 + APOLLO with torchrun on all local GPUs (2 CPU ranks without a GPU). Extra args go to train.py.
#   bash launch/fsdp2.sh --model 130m --optimizer apollo-mini --steps 20000
source "$(dirname "$0")/_common.sh"
exec torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" launch/train.py \
  --engine fsdp2 "${CPU_FLAGS[@]}" "$@"
