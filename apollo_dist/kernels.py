"""Fused GPU kernel of the step's last phase (Triton), with the eager twin that CPU runs.

``scaled_update_``: for every low-rank parameter of a bucket, p <- (p - G * c) * (1 - lr * wd), where
c holds one coefficient per row (tall G) or per column (wide G). On CUDA this is ONE launch for all
parameters (a table of pointers, multi-tensor-apply style) and one pass over p and G: 12 B/element in
fp32. Eager PyTorch needs a launch per parameter and two passes (addcmul, then the decay): 20 B/element.
"""
from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of PyTorch; CPU runs use the eager path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048


def scaled_update_eager(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, per_row: bool, decay: float) -> None:
    """The reference's order on one (rows x n) matrix: p -= U, then p += decay * p (decay = -lr * wd)."""
    p.addcmul_(g, coef[:, None] if per_row else coef[None, :], value=-1.0)
    if decay != 0.0:
        p.add_(p, alpha=decay)


if triton is not None:

    @triton.jit
    def _multi_update_kernel(p_ptrs, g_ptrs, c_offs, numels, ns, per_row, blk_param, blk_start, coef, decay, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        i = tl.load(blk_param + b)
        numel = tl.load(numels + i)
        n = tl.load(ns + i)
        row = tl.load(per_row + i)
        p_ptr = tl.load(p_ptrs + i).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(g_ptrs + i).to(tl.pointer_type(tl.float32))
        offs = tl.load(blk_start + b) + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        idx = tl.where(row != 0, offs // n, offs % n)
        c = tl.load(coef + tl.load(c_offs + i) + idx, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask)
        p = p - g * c
        p = p + decay * p
        tl.store(p_ptr + offs, p, mask=mask)


class MultiUpdate:
    """The fused update of a fixed list of (rows x n) fp32 parameter blocks; grads may move between steps."""

    def __init__(self, params: list[torch.Tensor], per_row: list[bool], coef_offsets: list[int]):
        self.params = params
        self.per_row = per_row
        self.coef_offsets = coef_offsets
        self.fused = triton is not None and bool(params) and params[0].is_cuda
        if not self.fused:
            return
        dev = params[0].device
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)
        numels = [p.numel() for p in params]
        self.p_ptrs = i64([p.data_ptr() for p in params])
        self.c_offs = i64(coef_offsets)
        self.numels = i64(numels)
        self.ns = i64([p.shape[1] for p in params])
        self.rows = i64([int(r) for r in per_row])
        blocks = [-(-k // BLOCK) for k in numels]
        self.blk_param = torch.repeat_interleave(torch.arange(len(params), device=dev), torch.tensor(blocks, device=dev))
        first = torch.cumsum(torch.tensor([0] + blocks[:-1], device=dev), 0)
        self.blk_start = (torch.arange(sum(blocks), device=dev) - first[self.blk_param]) * BLOCK
        self.g_key, self.g_ptrs = None, None

    def __call__(self, grads: list[torch.Tensor], coef: torch.Tensor, decay: float) -> None:
        if not self.fused or any(not g.is_contiguous() or g.dtype != torch.float32 for g in grads):
            for p, g, row, off in zip(self.params, grads, self.per_row, self.coef_offsets):
                scaled_update_eager(p, g, coef[off : off + (p.shape[0] if row else p.shape[1])], row, decay)
            return
        key = [g.data_ptr() for g in grads]
        if key != self.g_key:  # grads usually come back at the same addresses: upload only on change
            self.g_key = key
            self.g_ptrs = torch.tensor(key, dtype=torch.int64).pin_memory().to(self.p_ptrs.device, non_blocking=True)
        _multi_update_kernel[(len(self.blk_param),)](
            self.p_ptrs, self.g_ptrs, self.c_offs, self.numels, self.ns, self.rows, self.blk_param, self.blk_start,
            coef.contiguous(), decay, BLOCK=BLOCK,
        )
