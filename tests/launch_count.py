"""Count the launches of apollo_dist.kernels' Triton kernels, so that a test which claims to run a fused
kernel asserts that it did (an eager twin gives the same numbers and launches nothing).

    with Launches() as launches:
        before = launches.snapshot()
        ...
        assert launches.since(before) == {"_multi_update_kernel": 1}

A kernel is launched as ``kernel[grid](...)``; each kernel of the module is wrapped so that the
subscript counts. Works compiled (CUDA) and in Triton's interpreter.
"""

from __future__ import annotations

KERNELS = (
    "_project_kernel",
    "_channel_adam_kernel",
    "_multi_update_kernel",
    "_multi_adam_kernel",
    "_multi_sum_sq_kernel",
    "_dct_scores_kernel",
)


class _Counted:
    def __init__(self, launches: "Launches", name: str, kernel):
        self.launches, self.name, self.kernel = launches, name, kernel

    def __getitem__(self, grid):
        self.launches.counts[self.name] += 1
        return self.kernel[grid]


class Launches:
    """While entered, ``counts[name]``: launches of each kernel of apollo_dist.kernels (none without triton)."""

    def __init__(self):
        self.counts = dict.fromkeys(KERNELS, 0)
        self.saved: dict = {}

    def __enter__(self) -> "Launches":
        from apollo_dist import kernels

        for name in KERNELS:
            kernel = getattr(kernels, name, None)
            if kernel is not None:
                self.saved[name] = kernel
                setattr(kernels, name, _Counted(self, name, kernel))
        return self

    def __exit__(self, *exc) -> None:
        from apollo_dist import kernels

        for name, kernel in self.saved.items():
            setattr(kernels, name, kernel)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The kernels launched since ``before`` (a `snapshot`), with their counts; {} when none."""
        return {k: n - before[k] for k, n in self.counts.items() if n != before[k]}
