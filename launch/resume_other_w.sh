#!/usr/bin/env bash
# Resume a checkpoint on a different number of GPUs (or under another engine): convert it to the
# world-size-independent layout with tools/convert_checkpoint.py, then start the new world from it.
#   bash launch/resume_other_w.sh CHECKPOINT_DIR NEW_NPROC [train.py args...]
# Same-W resume needs no conversion: pass --resume CHECKPOINT_DIR to any launch script.
source "$(dirname "$0")/_common.sh"
if [ $# -lt 2 ]; then echo "usage: bash launch/resume_other_w.sh CHECKPOINT_DIR NEW_NPROC [train.py args]" >&2; exit 2; fi
CKPT=$1 NPROC=$2; shift 2
if [ ! -f tools/convert_checkpoint.py ]; then
  echo "resume_other_w.sh: tools/convert_checkpoint.py is not in this checkout yet" >&2; exit 3
fi
UNIVERSAL="${CKPT%/}.universal"
python tools/convert_checkpoint.py "$CKPT" "$UNIVERSAL"
exec torchrun --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" launch/train.py \
  --engine fsdp2 "${CPU_FLAGS[@]}" --resume "$UNIVERSAL" "$@"
