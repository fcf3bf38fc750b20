"""Gradients that test the accuracy of the DCT scores (shared by the eager test and the interpreted kernel's)."""

from __future__ import annotations

import torch

from apollo_dist.projection import dct_basis, dct_pick, dct_scores


def mirror_misses(cases: int = 10) -> int:
    """How many of ``cases`` gradients along c_j with a tiny component along c_(N-j) (the mirror frequency, which
    shares the FFT's half-spectrum bin with c_j) do not pick c_j, then c_(N-j), as the float64 rule does."""
    N, rows = 64, 128
    C = dct_basis(N, torch.device("cpu")).double()
    misses = 0
    for t in range(cases):
        g = torch.Generator().manual_seed(t)
        j = 1 + t % (N // 2 - 2)
        G = torch.randn(rows, 1, generator=g, dtype=torch.float64) * C[j]
        G += 3e-5 * torch.randn(rows, 1, generator=g, dtype=torch.float64) * C[N - j]
        G += 3e-6 * torch.randn(rows, N, generator=g, dtype=torch.float64)
        want = torch.sort((G @ C.T).square().sum(0), descending=True, stable=True).indices[:2]
        misses += not torch.equal(dct_pick(dct_scores(G.float(), True), 2), want)
    return misses
