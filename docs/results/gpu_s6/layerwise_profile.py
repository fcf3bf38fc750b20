"""Host time per step of a launch/train.py run under torch.profiler (issue 30): run from the repo root as
``python3 docs/results/gpu_s6/layerwise_profile.py OUT_FILE TRAIN_FLAGS...``. Steps 4 and 5 are profiled
(CPU and CUDA activity); for each, appended to OUT_FILE: the step's wall time, kernel launches (runtime and
driver API: Triton launches through cuLaunchKernel), host syncs (cudaStreamSynchronize, cudaDeviceSynchronize,
cudaEventSynchronize, aten::_local_scalar_dense = .item()/.tolist()/int(tensor)), memcpys, and the top host
ops by self CPU time. Uses only launch/train.py's module functions (timed_step), so it runs against any
version of the repository that has them."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from launch import train  # noqa: E402

OUT, FLAGS = sys.argv[1], sys.argv[2:]
PROFILED = (4, 5)
COUNTED = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchKernelExC",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
    "cudaMemcpyAsync",
    "cudaMemcpy",
    "cudaHostAlloc",
)
original = train.timed_step


def timed_step(engine, split, run, d, step, *args, **kwargs):
    if step not in PROFILED:
        return original(engine, split, run, d, step, *args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        row = original(engine, split, run, d, step, *args, **kwargs)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    gpu_kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines = [f"step {step}: wall {wall * 1e3:.1f} ms under the profiler ({row['tokens_per_s']:.0f} tokens/s)"]
    lines.append(f"  GPU kernels/memcpys executed: {gpu_kernels}")
    for name in COUNTED:
        e = by_name.get(name)
        if e is not None:
            lines.append(f"  {name}: {e.count} calls, {e.cpu_time_total / 1e3:.1f} ms host")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=15))
    with open(OUT, "a") as f:
        f.write("\n".join(lines) + "\n")
    return row


train.timed_step = timed_step
sys.exit(train.main(FLAGS))
