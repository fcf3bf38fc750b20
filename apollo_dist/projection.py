"""Random projections, regenerated from (initial seed, epoch) exactly as the reference draws them.

DESIGN.md §1.1: P = randn(shape) / sqrt(r) from a generator on the gradient's device seeded with the
epoch's seed; the seed of epoch k is ``next_seed`` applied k times to the parameter's initial seed.
Nothing here is stored in checkpoints: it is a pure function of (seed, epoch, shape, device type).
"""

from __future__ import annotations

import math

import torch

_INT64_MAX = torch.iinfo(torch.int64).max
_ADVANCE = 15  # the reference keeps the last of 15 int64 draws


def next_seed(seed: int) -> int:
    """The seed that follows ``seed`` (CPU generator, last of 15 int64 draws)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, _INT64_MAX, (_ADVANCE,), generator=gen)[-1])


class SeedChain:
    """Seeds of successive projection epochs for one parameter, computed once and cached."""

    def __init__(self, initial_seed: int):
        self.seeds = [int(initial_seed)]

    def __call__(self, epoch: int) -> int:
        while len(self.seeds) <= epoch:
            self.seeds.append(next_seed(self.seeds[-1]))
        return self.seeds[epoch]


def projection_shape(m: int, n: int, r: int) -> tuple[int, int]:
    """Shape of P for an m x n gradient: (r, n) when tall or square, (m, r) when wide."""
    return (r, n) if m >= n else (m, r)


def random_projection(shape: tuple[int, int], r: int, seed: int, device: torch.device) -> torch.Tensor:
    """P = randn(shape) / sqrt(r), fp32, drawn on ``device``'s generator (CPU and CUDA differ)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(r)
