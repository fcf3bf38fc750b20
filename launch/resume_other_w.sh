#!/usr/bin/env bash
# Resume a checkpoint on a different number of GPUs / ranks, or under the other engine, with no conversion:
# launch/train.py --resume takes a native checkpoint (DeepSpeed ZeRO-1/2/3 or FSDP2 DCP, any W) or a canonical
# one, and each rank reads only what it holds. The same as NPROC=N bash launch/{fsdp2,zero2}.sh --resume CKPT.
#   bash launch/resume_other_w.sh CHECKPOINT NEW_NPROC [train.py args...]   (ENGINE=fsdp2|deepspeed)
# The run's settings come from the checkpoint (flags given win where they can).
source "$(dirname "$0")/_common.sh"
if [ $# -lt 2 ]; then echo "usage: bash launch/resume_other_w.sh CHECKPOINT NEW_NPROC [train.py args]" >&2; exit 2; fi
CKPT=${1%/} NPROC=$2; shift 2
case "${ENGINE:-fsdp2}" in
  fsdp2) exec torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" launch/train.py \
           --engine fsdp2 "${CPU_FLAGS[@]}" --resume "$CKPT" "$@" ;;
  deepspeed) exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py \
           --deepspeed "${DS_CONFIG:-ds_configs/apollo.json}" "${CPU_FLAGS[@]}" --resume "$CKPT" "$@" ;;
  *) echo "resume_other_w.sh: ENGINE must be fsdp2 or deepspeed" >&2; exit 2 ;;
esac
