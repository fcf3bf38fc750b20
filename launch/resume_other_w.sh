#!/usr/bin/env bash
# Resume a checkpoint on a different number of GPUs / ranks, or under another engine: convert it
# (DeepSpeed ZeRO-1/2/3 or FSDP2 DCP, any W) to the world-size-independent canonical form with
# tools/convert_checkpoint.py, then start the new world from it (each rank reads only its slices).
#   bash launch/resume_other_w.sh CHECKPOINT NEW_NPROC [train.py args...]   (ENGINE=fsdp2|deepspeed)
# The run's settings come from the checkpoint (flags given win where they can). Same-W resume needs no
# conversion: pass --resume CHECKPOINT to any launch script.
source "$(dirname "$0")/_common.sh"
if [ $# -lt 2 ]; then echo "usage: bash launch/resume_other_w.sh CHECKPOINT NEW_NPROC [train.py args]" >&2; exit 2; fi
CKPT=${1%/} NPROC=$2; shift 2
CANONICAL="$CKPT.canonical"
python tools/convert_checkpoint.py "$CKPT" "$CANONICAL" --overwrite
case "${ENGINE:-fsdp2}" in
  fsdp2) exec torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" launch/train.py \
           --engine fsdp2 "${CPU_FLAGS[@]}" --resume "$CANONICAL" "$@" ;;
  deepspeed) exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py \
           --deepspeed "${DS_CONFIG:-ds_configs/apollo.json}" "${CPU_FLAGS[@]}" --resume "$CANONICAL" "$@" ;;
  *) echo "resume_other_w.sh: ENGINE must be fsdp2 or deepspeed" >&2; exit 2 ;;
esac
