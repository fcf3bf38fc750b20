#!/usr/bin/env bash
# mpirun (pip's mpich) + APOLLO: ranks found through mpi4py. ENGINE=fsdp2 (default) or deepspeed.
#   ENGINE=deepspeed bash launch/mpirun.sh --steps 1000
source "$(dirname "$0")/_common.sh"
ENGINE=${ENGINE:-fsdp2}
ENGINE_FLAGS=(--engine "$ENGINE")
if [ "$ENGINE" = deepspeed ]; then ENGINE_FLAGS+=(--deepspeed "${DS_CONFIG:-ds_configs/apollo.json}"); fi
export MASTER_PORT=$PORT
exec mpirun -np "$NPROC" python launch/train.py "${ENGINE_FLAGS[@]}" "${CPU_FLAGS[@]}" "$@"
