"""Fused GPU kernels of the step (Triton). Each has an eager twin that CPU runs and tests compare with.

``scaled_update_``: p <- (p - G * c) * (1 - lr * wd) in one pass over p and G (12 B/element in fp32),
where c is one coefficient per row (tall G) or per column (wide G). Eager PyTorch needs two passes
(addcmul, then the decay): 20 B/element.
"""
from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of PyTorch; CPU runs use the eager path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def scaled_update_eager(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, per_row: bool, decay: float) -> None:
    """The reference's order: p -= step_size * U, then p += decay * p (decay = -lr * wd)."""
    p.addcmul_(g, coef[:, None] if per_row else coef[None, :], value=-1.0)
    if decay != 0.0:
        p.add_(p, alpha=decay)


if triton is not None:

    @triton.jit
    def _scaled_update_kernel(p_ptr, g_ptr, c_ptr, numel, n, decay, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        idx = offs // n if PER_ROW else offs % n
        c = tl.load(c_ptr + idx, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        p = p - g * c
        p = p + decay * p
        tl.store(p_ptr + offs, p, mask=mask)


def scaled_update_(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, per_row: bool, decay: float) -> None:
    """In place on the (rows x n) fp32 matrix ``p``: p <- (p - g * coef) + decay * (p - g * coef)."""
    if triton is None or not p.is_cuda or not (p.is_contiguous() and g.is_contiguous()) or p.dtype != torch.float32:
        return scaled_update_eager(p, g, coef, per_row, decay)
    numel = p.numel()
    block = 2048
    _scaled_update_kernel[(triton.cdiv(numel, block),)](p, g, coef.contiguous(), numel, p.shape[1], decay, PER_ROW=per_row, BLOCK=block)
