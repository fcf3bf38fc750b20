"""Micro-benchmark of the DCT decision (issue 28): `DCTProjector.decide` + `matrix` over a LLaMA's weight shapes
(random gradients), against the random projection's `matrix`; median of 5 (ms, synchronized on CUDA).
Run from the repo root: python docs/results/cpu_step/dct_decide.py  (LLaMA-60M's 56 shapes on the CPU);
on a GPU at 1b: python docs/results/cpu_step/dct_decide.py --device cuda --hidden 2048 --inter 5461 --layers 24"""

import argparse
import time

import torch

from apollo_dist.projection import DCTProjector, Projector

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cpu")
ap.add_argument("--hidden", type=int, default=512)
ap.add_argument("--inter", type=int, default=1376)
ap.add_argument("--layers", type=int, default=8)
args = ap.parse_args()
dev = torch.device(args.device)
torch.manual_seed(0)
h, f = args.hidden, args.inter
shapes = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]
grads = [torch.randn(s, device=dev) for s in shapes for _ in range(args.layers)]


def run(proj: Projector, r: int) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i, G in enumerate(grads):
        state = proj.decide(G, r) if proj.stateful else None
        proj.matrix(G.shape[0], G.shape[1], r, G.device, i + 1, state)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


for r in (h // 8, 1):
    for proj in (Projector(), DCTProjector()):
        run(proj, r)
        print(f"{len(grads)} weights {h}x{f} r={r} {proj.kind:7s} {sorted(run(proj, r) for _ in range(5))[2]:.1f} ms")
