"""CPU micro-benchmark of APOLLO-Mini's whole step on a LLaMA model's params (issue 31): random gradients, CPU
tensors, median of 3 steps, then the top ops under torch.profiler. Run from the repo root:
python docs/results/cpu_step/step.py 130m [VOCAB]   (APOLLO_DIST_CPU_KERNELS=0: PyTorch's ops instead of the C++ kernels)"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import apollo_dist
from launch.model import llama_config, meta_model

name = sys.argv[1] if len(sys.argv) > 1 else "130m"
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 32000  # launch/train.py's byte tokenizer: 259
model = meta_model(llama_config(name, vocab, 256)).to_empty(device="cpu")


def fresh_grads() -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3


for p in model.parameters():
    p.data.normal_(0, 0.02)
fresh_grads()
opt = apollo_dist.APOLLO(apollo_dist.param_groups(model, preset="apollo-mini"), lr=1e-3)
times = []
for t in range(5):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
    fresh_grads()
n = sum(p.numel() for p in model.parameters())
low = sum(p.numel() for g in opt.param_groups if g.get("rank") for p in g["params"])
step = sorted(times[2:])[1]
print(
    f"{name}: {n / 1e6:.0f}M params ({low / 1e6:.0f}M low-rank), step {step * 1e3:.1f} ms, "
    f"{step / n * 1e9:.2f} ns/element, {torch.get_num_threads()} threads"
)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    opt.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
