#!/usr/bin/env bash
# Issue 29 on one GPU (run from the repo root): optimizer state bytes, step time and kernel launches per step on
# Mixtral-8x7B's fused expert weights (one layer: gate_up_proj [8, 28672, 4096], down_proj [8, 4096, 14336], fp32,
# 1.41 B params, ~30 GB), APOLLO rank 256, APOLLO-Mini and torch's fused AdamW on the same tensors; then APOLLO on
# the same expert slices as 16 separate 2-D weights (what a per-expert nn.Linear model gives). About 3 minutes.
# Writes $OUT/moe.txt. (The state of the whole 8x7B model by arithmetic: python tools/moe_state.py, CPU.)
set -u
OUT=${OUT:-/tmp}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  echo "fused:";   python tools/bench_moe.py --steps 20 2>&1 | tail -5
  echo "unfused:"; python tools/bench_moe.py --steps 20 --unfused --optimizers apollo-mini,apollo 2>&1 | tail -5
  echo "CUDA equivalence (fused experts vs apollo-torch on the unfused model):"
  python -m pytest -q tests/test_experts.py -k cuda 2>&1 | tail -3
} > "$OUT/moe.txt" 2>&1
cat "$OUT/moe.txt"
