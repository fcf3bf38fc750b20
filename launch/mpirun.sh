#!/usr/bin/env bash
# mpirun (pip's mpich) + APOLLO: ranks found through mpi4py. ENGINE=fsdp2 (default) or deepspeed.
#   ENGINE=deepspeed bash launch/mpirun.sh --steps 1000
source "$(dirname "$0")/_common.sh"
ENGINE=${ENGINE:-fsdp2}
ENGINE_FLAGS=(--engine "$ENGINE")
if [ "$ENGINE" = deepspeed ]; then ENGINE_FLAGS+=(--deepspeed "${DS_CONFIG:-ds_configs/apollo.json}"); fi
export MASTER_PORT=$PORT
# A system Open MPI (GPU images) refuses root without these; pip's mpich ignores them. Containers run as root.
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
exec mpirun -np "$NPROC" python launch/train.py "${ENGINE_FLAGS[@]}" "${CPU_FLAGS[@]}" "$@"
