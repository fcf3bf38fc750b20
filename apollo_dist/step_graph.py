"""The optimizer step as one CUDA graph: the host issues a replay instead of every launch.

On small models the step is bound by the host (BENCHMARKS.md §8: a few hundred launches and Python per
weight, each microseconds, against kernels of microseconds). The device part of a step (projection,
non-finite check, Adam on R, scaling, limiter, update, plain Adam) reads only tensors that stay where they
are between steps: gradients (the caching allocator gives them back at the same addresses), projections
(redrawn in place), moments, and `StepScalars` (this step's lr, bias correction and decay, written before
each replay). So it is captured once and replayed.

A graph is only valid while what it reads has not moved: it is keyed by the addresses of the gradients and
projections and by the hyperparameters baked into it (everything but lr and weight decay). A call with
another key runs eagerly; a key seen on two calls in a row is captured (the eager call before compiled the
kernels and uploaded the pointer tables, so the capture records launches only). After ``MAX_CAPTURES``
captures the step stays eager (gradients that move every step gain nothing from a graph).
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable, Optional

import torch


class StepGraph:
    """A captured step, replayed while its key holds."""

    MAX_CAPTURES = 4

    def __init__(self) -> None:
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.key: Optional[Hashable] = None
        self.seen: Optional[Hashable] = None  # the key of the previous eager call
        self.captures = 0
        self.disabled = False

    def run(self, key: Hashable, body: Callable[[], None]) -> bool:
        """Run the step for ``key`` as a graph: replay the captured one, or capture ``body`` and replay it.
        Returns False when the caller must run ``body`` eagerly (nothing ran then)."""
        if self.disabled:
            return False
        if self.graph is not None and key == self.key:
            self.graph.replay()
            return True
        if key != self.seen:  # a new key runs eagerly once first
            self.seen = key
            return False
        if self.captures >= self.MAX_CAPTURES:
            self.disabled, self.graph = True, None
            return False
        self.captures += 1
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                body()
        except Exception as e:  # nothing ran on the device; the caller re-runs the step eagerly
            warnings.warn(f"APOLLO: capturing the step as a CUDA graph failed ({e!r}); the step runs eagerly")
            self.disabled, self.graph = True, None
            return False
        self.graph, self.key = graph, key
        graph.replay()
        return True

    def reset(self) -> None:
        """Forget the captured step (what it read was replaced)."""
        self.graph, self.key, self.seen = None, None, None
