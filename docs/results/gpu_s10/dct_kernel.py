"""Issue 28 on a GPU: the fused DCT-score kernel (kernels.dct_scores_fused) against the eager float64 sums and a
float64 product with the basis, and the decision's time with either, over LLaMA-1b's 168 weight shapes.
Prints: per shape, max |score - float64| / max score for fused and eager, and how many of the top 256 picks each
shares with the float64 rule; batched (decide_all) vs one-at-a-time picks; decide_all time, fused vs eager
(median of 5, ms). Run from the repo root on a CUDA machine."""

import time

import torch

from apollo_dist import kernels
from apollo_dist.projection import DCTProjector, dct_basis, dct_pick, dct_scores


def eager(fn, *args):
    saved, kernels.triton = kernels.triton, None
    try:
        return fn(*args)
    finally:
        kernels.triton = saved


dev = torch.device("cuda")
torch.manual_seed(0)
for m, n in ((2048, 5461), (5461, 2048), (2048, 2048)):
    G = torch.randn(m, n, device=dev) * torch.linspace(0.1, 3, n, device=dev)  # uneven columns: no flat spectrum
    tall = m >= n
    N = n if tall else m
    C = dct_basis(N, dev).double()
    exact = ((G.double() @ C.T) if tall else (C @ G.double())).square().sum(0 if tall else 1)
    want = torch.sort(exact, descending=True, stable=True).indices[:256]
    for name, s in (("fused", dct_scores(G, tall)), ("eager", eager(dct_scores, G, tall))):
        err = float((s.double() - exact).abs().max() / exact.max())
        same = len(set(dct_pick(s, 256).tolist()) & set(want.tolist()))
        print(f"{m}x{n} {name}: max rel score error {err:.2e}, top-256 shared with float64 {same}/256")

h, f = 2048, 5461
shapes = ([(h, h)] * 4 + [(f, h), (f, h), (h, f)]) * 24
grads = [torch.randn(s, device=dev) for s in shapes]
proj = DCTProjector()
batched = proj.decide_all([lambda G=G: G for G in grads], shapes, 256)
single = [proj.decide(G, 256) for G in grads]
print("batched vs single picks equal:", sum(torch.equal(a, b) for a, b in zip(batched, single)), "of", len(grads))


def timed(fn) -> float:
    fn()
    out = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[2]


getters = [lambda G=G: G for G in grads]
print(
    f"decide_all 168 weights r=256: fused {timed(lambda: proj.decide_all(getters, shapes, 256)):.1f} ms, "
    f"eager {timed(lambda: eager(proj.decide_all, getters, shapes, 256)):.1f} ms"
)
