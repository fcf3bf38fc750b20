"""Issue 31, item 2 on the CPU: APOLLO-Mini's whole CPU step against DeepSpeedCPUAdam's on the same params (LLaMA
model of argv[1], vocabulary argv[2], default 350m and launch/train.py's byte tokenizer, 259), random gradients,
both in this process, alternating; median ms and ns per element. Run from the repo root with
DS_ACCELERATOR=cpu: python docs/results/cpu_step/vs_cpu_adam.py 350m 259"""

import statistics
import sys
import time

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

import apollo_dist
from launch.model import llama_config, meta_model

name = sys.argv[1] if len(sys.argv) > 1 else "350m"
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 259


def model_with_grads() -> torch.nn.Module:
    model = meta_model(llama_config(name, vocab, 256)).to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
        p.grad = torch.randn_like(p) * 1e-3
    return model


apollo_model, adam_model = model_with_grads(), model_with_grads()
mini = apollo_dist.APOLLO(apollo_dist.param_groups(apollo_model, preset="apollo-mini"), lr=1e-3)
adam = DeepSpeedCPUAdam(list(adam_model.parameters()), lr=1e-3, adamw_mode=True)
n = sum(p.numel() for p in apollo_model.parameters())
times: dict[str, list[float]] = {"APOLLO-Mini": [], "DeepSpeedCPUAdam": []}
for rep in range(6):
    for label, opt in (("APOLLO-Mini", mini), ("DeepSpeedCPUAdam", adam)):
        t0 = time.perf_counter()
        opt.step()
        if rep >= 1:  # the first: state allocation, kernel builds
            times[label].append(time.perf_counter() - t0)
print(f"{name}, vocab {vocab}: {n / 1e6:.0f}M params, {torch.get_num_threads()} threads")
for label, ts in times.items():
    med = statistics.median(ts)
    print(
        f"{label:18s} {med * 1e3:8.1f} ms  {med / n * 1e9:.3f} ns/element  (all: {' '.join(f'{t * 1e3:.0f}' for t in ts)})"
    )
