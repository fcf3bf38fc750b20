"""The optimizer step as one CUDA graph: the host issues a replay instead of every launch.

On small models the step is bound by the host (BENCHMARKS.md §8: a few hundred launches and Python per
weight, each microseconds, against kernels of microseconds). The device part of a step (projection,
non-finite check, Adam on R, scaling, limiter, update, plain Adam) reads tensors that stay where they are
between steps (projections, redrawn in place; moments; `StepScalars`, this step's lr, bias correction and
decay, written before each replay), and the gradients. So it is captured once and replayed.

Gradients freed by ``zero_grad(set_to_none=True)`` come back at other addresses from step to step (the
allocator hands out whichever free block fits), so the fused kernels read them through pointer tables in
device memory, which are rewritten in place before each replay (``before_replay``); only what a graph bakes
in keys it: the hyperparameters read as constants (everything but lr and weight decay), and the few
gradients read directly (cuBLAS's exact rank > 1 projection). A key seen for the first time runs eagerly;
seen again, it is captured (the eager call compiled the kernels and filled the tables, so the capture
records launches only). Up to ``MAX_GRAPHS`` graphs are kept; after ``MAX_CAPTURES`` captures the step
stays eager (directly read gradients that move every step gain nothing from a graph).
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable, Optional

import torch


class StepGraph:
    """Captured steps by key, replayed while a key holds."""

    MAX_GRAPHS = 4
    MAX_CAPTURES = 8

    def __init__(self) -> None:
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.seen: dict[Hashable, None] = {}  # the last few keys run eagerly once (insertion-ordered)
        self.captures = 0
        self.replays = 0
        self.disabled = False

    def run(self, key: Hashable, body: Callable[[], None], before_replay: Callable[[], None]) -> bool:
        """Run the step for ``key`` as a graph: replay the captured one (after ``before_replay``), or capture
        ``body`` and replay it. Returns False when the caller must run ``body`` eagerly (nothing ran then)."""
        if self.disabled:
            return False
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # a new key runs eagerly once first
                self.seen[key] = None
                if len(self.seen) > self.MAX_GRAPHS:
                    self.seen.pop(next(iter(self.seen)))  # the oldest
                return False
            if self.captures >= self.MAX_CAPTURES:
                self.disabled, self.graphs = True, {}
                return False
            before_replay()  # the tables must hold this step's addresses before capture: no copy is captured
            graph = self._capture(body)
            if graph is None:
                return False
            if len(self.graphs) >= self.MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))  # the oldest
            self.graphs[key] = graph
        before_replay()
        graph.replay()
        self.replays += 1
        return True

    def _capture(self, body: Callable[[], None]) -> Optional[torch.cuda.CUDAGraph]:
        self.captures += 1
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                body()
        except Exception as e:  # nothing ran on the device; the caller runs the step eagerly
            warnings.warn(f"APOLLO: capturing the step as a CUDA graph failed ({e!r}); the step runs eagerly")
            self.disabled, self.graphs = True, {}
            return None
        return graph

    def reset(self) -> None:
        """Forget the captured steps (what they read was replaced)."""
        self.graphs, self.seen = {}, {}
