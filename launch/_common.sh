# Sourced by the launch/*.sh scripts: repo root, venv on PATH, CPU fallback.
# NPROC = number of local GPUs, or 2 CPU ranks (gloo, DS_ACCELERATOR=cpu, 1 thread each) without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x .venv/bin/python ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DS_ACCELERATOR:-}" = cpu ]; then GPUS=0  # asked for CPU ranks (the tests do), whatever is visible
else GPUS=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0); fi
if [ "$GPUS" -gt 0 ]; then
  NPROC=${NPROC:-$GPUS}
  if [ "$NPROC" -gt "$GPUS" ]; then
    echo "$(basename "$0"): error: NPROC=$NPROC ranks but $GPUS visible GPU(s): set NPROC<=$GPUS, or run on the CPU with CUDA_VISIBLE_DEVICES=\"\"" >&2
    exit 2
  fi
  CPU_FLAGS=()
else
  NPROC=${NPROC:-2}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  CPU_FLAGS=(--dtype fp32)  # bf16 buys nothing on CPU; fp32 keeps every engine's losses identical
fi
# A free port for the rendezvous (two jobs on one machine must not collide).
PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
