"""CPU micro-benchmark of the DCT decision (issue 28): `DCTProjector.decide` + `matrix` on LLaMA-60M's 56 weight
shapes (random gradients), against the random projection's `matrix`; median of 5 (ms). Run from the repo root:
python docs/results/cpu_step/dct_decide.py"""

import time

import torch

from apollo_dist.projection import DCTProjector, Projector

torch.manual_seed(0)
shapes = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]
grads = [torch.randn(s) for s in shapes for _ in range(8)]


def run(proj: Projector, r: int) -> float:
    t = time.perf_counter()
    for i, G in enumerate(grads):
        state = proj.decide(G, r) if proj.stateful else None
        proj.matrix(G.shape[0], G.shape[1], r, G.device, i + 1, state)
    return (time.perf_counter() - t) * 1e3


for r in (128, 1):
    for proj in (Projector(), DCTProjector()):
        run(proj, r)
        print(f"r={r} {proj.kind:7s} {sorted(run(proj, r) for _ in range(5))[2]:.1f} ms")
