"""Fused multi-tensor GPU kernels of the step (Triton), each with the eager twin that CPU runs.

A bucket's step touches every low-rank weight three times; each of these is ONE launch for all of
its weights (a table of pointers, multi-tensor-apply style), so the step's CPU cost no longer grows
with the number of weights:

- ``MultiProjection``: R = G P^T (tall) / G^T P (wide) and ||G_c||^2 of every channel, one read of G
  (r = 1 in exact fp32; r > 1 when TF32 is asked for, else cuBLAS per weight).
- ``channel_adam_``: Adam on the rows of R, and ||N_c||^2, ||R_c||^2 per channel, one pass.
- ``MultiUpdate``: p <- (p - G * c) * (1 - lr * wd), c one coefficient per channel, one pass (12 B/elem).
- ``MultiAdam``: the reference's plain Adam on the other parameters, one pass (28 B/elem).
- ``dct_scores_fused``: the DCT projection's scores at a refresh from the FFT of a batch of gradients, one pass.

The eager twins run the same arithmetic in PyTorch ops (CPU, or tensors the kernels do not take);
with ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors, which is how the CPU tests check them.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from . import cpu_kernels

try:  # Triton comes with CUDA builds of PyTorch; CPU runs use the eager path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
BLOCK = 2048  # elements per program of the elementwise kernels


def fused(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors: fp32, contiguous, on CUDA (or CPU when interpreting)."""
    return triton is not None and all(
        (t.is_cuda or INTERPRET) and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _i64(xs: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int64, device=device)


def _blocks(sizes: Sequence[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut tensors of ``sizes`` elements into blocks: (tensor index, first element) of every block."""
    counts = [-(-k // block) for k in sizes]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(counts, dtype=torch.int64))
    first = torch.cumsum(torch.tensor([0] + counts[:-1], dtype=torch.int64), 0)
    start = (torch.arange(sum(counts)) - first[owner]) * block
    return owner.to(device), start.to(device)


class _Pointers:
    """The data pointers of a list of tensors, on the device; uploaded again only when one moves, into the
    same table (a captured step reads the table, so new gradient addresses need no new capture)."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.table = device, None, None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        key = [t.data_ptr() for t in tensors]
        if key != self.key:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a copy captured into a graph would rewrite the table with these addresses at every replay
                raise RuntimeError("a pointer table changed while a CUDA graph was being captured")
            self.key = key
            host = torch.tensor(key, dtype=torch.int64)
            if self.table is None or len(self.table) != len(key):
                self.table = torch.empty(len(key), dtype=torch.int64, device=self.device)
            if self.device.type == "cuda":  # stream-ordered: after the launches that read the old table
                self.table.copy_(host.pin_memory(), non_blocking=True)
            else:
                self.table.copy_(host)
        return self.table


class StepScalars:
    """A bucket's per-step numbers: per slot, ``step_sizes`` (the bias-corrected lr of that param's own step
    count; for APOLLO times sqrt(scale)) and ``live`` (whether the param has a gradient this step: a param
    without one is skipped, as the reference skips ``p.grad is None``), and ``decay`` (-lr * weight_decay).
    Floats for the eager ops and one fp32 device tensor ``[decay, step_sizes (k), live (k)]`` that the fused
    kernels read, so that a captured CUDA graph replays with this step's values. ``gate_on_device``: the eager
    twins gate their writes on a skip flag on the device too (a copy of each weight and ``torch.where``) instead
    of reading it on the host (a host sync); layer-wise updates, which must not wait for the GPU, set it."""

    def __init__(self, device: torch.device, k: int = 1):
        self.k = k
        self.gate_on_device = False
        self.decay = 0.0
        self.step_sizes = [0.0] * k
        self.tensor = torch.zeros(1 + 2 * k, device=device)
        self.step_sizes_t = self.tensor[1 : 1 + k]
        self.live_t = self.tensor[1 + k :]
        self._live: Optional[list[bool]] = [True] * k  # None: decided on the device (`live_from`), unread

    def set(self, step_sizes: "float | Sequence[float]", decay: float, live: Optional[Sequence[bool]] = None) -> None:
        """This step's numbers: ``step_sizes`` one per slot (a float: the same for all), ``decay``, and
        ``live`` (None: every slot has a gradient)."""
        sizes = [float(step_sizes)] * self.k if isinstance(step_sizes, (int, float)) else [float(x) for x in step_sizes]
        self.step_sizes, self.decay = sizes, decay
        self._live = [True] * self.k if live is None else [bool(x) for x in live]
        # rounded as a kernel's float argument is
        host = torch.tensor([decay, *sizes, *(float(x) for x in self._live)], dtype=torch.float32)
        if self.tensor.is_cuda:  # no host sync: the pinned allocator keeps the buffer until the copy ran
            self.tensor.copy_(host.pin_memory(), non_blocking=True)
        else:
            self.tensor.copy_(host)

    def live_from(self, counts: torch.Tensor) -> None:
        """``live`` decided on the device: a slot is live where ``counts`` (ranks with a gradient) > 0."""
        self.live_t.copy_(counts > 0)
        self._live = None

    def live(self) -> list[bool]:
        """``live`` on the host (a host sync when it was decided on the device; eager paths only)."""
        if self._live is None:
            self._live = [bool(x) for x in (self.live_t > 0).tolist()]
        return self._live


def skipped(skip: Optional[torch.Tensor]) -> bool:
    """The eager paths' reading of a device-side skip flag (a host sync; the fused kernels read it on the
    device instead, see `APOLLO.step`, and so do the eager twins with `StepScalars.gate_on_device`)."""
    return skip is not None and bool(skip.item() > 0)


EAGER_CHUNK = 1 << 23  # elements per piece of a gated eager Adam (its temporaries stay ~ 5 x 32 MB)


def _go(skip: torch.Tensor, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-dim bool on the device: a gated write goes ahead (``skip`` == 0 and, if given, ``live`` != 0)."""
    return (skip == 0) if live is None else (skip == 0) & (live != 0)


_ZEROS: dict[torch.device, torch.Tensor] = {}


def _flag(skip: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``skip``, or a 0 on ``device`` for the kernels' pointer argument."""
    if skip is not None:
        return skip
    if device not in _ZEROS:
        _ZEROS[device] = torch.zeros((), device=device)
    return _ZEROS[device]


_ONES: dict[torch.device, torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """n ones on ``device`` (every slot live), from one cached buffer grown as needed."""
    if device not in _ONES or len(_ONES[device]) < n:
        _ONES[device] = torch.ones(max(n, 1024), device=device)
    return _ONES[device][:n]


# --- 1. projection and channel norms ----------------------------------------------------------


class _matmul_precision:
    """TF32 for the eager projection matmuls when asked."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def project_eager(G: torch.Tensor, P: torch.Tensor, tall: bool, R_out: torch.Tensor, g_out: torch.Tensor) -> None:
    """One (rows x n) gradient: R_out = G P^T (tall, P: r x n) or G^T P (wide, P: rows x r); g_out = ||G_c||^2
    (in fp32 whatever G's dtype)."""
    G = G.float()  # a no-op for fp32 G; a bf16 G is read as fp32 one weight at a time
    # also a batch (k x rows x n) of them with P stacked (k x ...), R_out and g_out their rows one after another
    if G.device.type == "cpu" and _project_cpu(G, P, tall, R_out, g_out):
        return
    if tall:
        torch.matmul(G, P.transpose(-1, -2), out=R_out.view(*G.shape[:-1], -1))
    else:
        torch.matmul(G.transpose(-1, -2), P, out=R_out.view(*G.shape[:-2], G.shape[-1], -1))
    torch.linalg.vector_norm(G, dim=-1 if tall else -2, out=g_out.view(*G.shape[:-2], -1))
    g_out.square_()


def _project_cpu(G: torch.Tensor, P: torch.Tensor, tall: bool, R_out: torch.Tensor, g_out: torch.Tensor) -> bool:
    """project_eager on the CPU with the one-pass C++ kernel (cpu_kernels): R and the norms in one read of G for
    rank 1; for r > 1 the norms, R by BLAS. False when the kernel does not take these tensors."""
    Gs = G if G.dim() == 3 else G[None]
    Ps = P if P.dim() == 3 else P[None]
    c = Gs.shape[1] if tall else Gs.shape[2]  # channels per matrix
    r = Ps.shape[1] if tall else Ps.shape[2]
    for j, (Gj, Pj) in enumerate(zip(Gs, Ps)):
        R_j, g_j = R_out[j * c : (j + 1) * c], g_out[j * c : (j + 1) * c]
        if not cpu_kernels.project_norm(Gj, Pj if r == 1 else None, tall, R_j.view(-1) if r == 1 else None, g_j):
            if j == 0:
                return False
            raise RuntimeError("apollo_dist: the CPU projection kernel took one slice of a batch but not the next")
        if r > 1:
            torch.matmul(Gj, Pj.t(), out=R_j) if tall else torch.matmul(Gj.t(), Pj, out=R_j)
    return True


if triton is not None:

    @triton.jit
    def _project_kernel(
        g_ptrs,
        p_ptrs,
        rows_t,
        n_t,
        tall_t,
        out_t,
        job_slot,
        job_c0,
        T_R,
        T_g,
        r,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        R_PAD: tl.constexpr,
        INTERPRETED: tl.constexpr,
        K_MAX: tl.constexpr,
        WITH_R: tl.constexpr = True,  # False: only ||G_c||^2 (R comes from cuBLAS)
    ):
        job = tl.program_id(0)
        i = tl.load(job_slot + job)
        c = tl.load(job_c0 + job) + tl.arange(0, BLOCK_C)
        rows = tl.load(rows_t + i)
        n = tl.load(n_t + i)
        g = tl.load(g_ptrs + i).to(tl.pointer_type(tl.float32))
        p = tl.load(p_ptrs + i).to(tl.pointer_type(tl.float32))
        j = tl.arange(0, R_PAD)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_C, R_PAD), tl.float32)
        sq = tl.zeros((BLOCK_C,), tl.float32)
        if tl.load(tall_t + i) != 0:  # channels = rows of G; P is r x n
            n_ch = rows
            # Compiled: loop to this slot's n. Triton 3.6's interpreter (with NumPy 2) takes no tensor as a
            # loop bound: it loops to the launch's largest k (a constexpr there, 0 when compiled); masks cut the rest.
            for k0 in range(0, K_MAX if INTERPRETED else n, BLOCK_K):
                k = k0 + kk
                gt = tl.load(g + c[:, None] * n + k[None, :], mask=(c[:, None] < rows) & (k[None, :] < n), other=0.0)
                if WITH_R:
                    pt = tl.load(p + j[None, :] * n + k[:, None], mask=(k[:, None] < n) & (j[None, :] < r), other=0.0)
                    if R_PAD == 1:
                        acc += tl.sum(gt * tl.reshape(pt, (1, BLOCK_K)), axis=1)[:, None]
                    else:
                        acc = tl.dot(gt, pt, acc, input_precision="tf32")
                sq += tl.sum(gt * gt, axis=1)
        else:  # channels = columns of G; P holds this slot's rows, rows x r
            n_ch = n
            for k0 in range(0, K_MAX if INTERPRETED else rows, BLOCK_K):
                k = k0 + kk
                gt = tl.load(g + k[:, None] * n + c[None, :], mask=(k[:, None] < rows) & (c[None, :] < n), other=0.0)
                if WITH_R:
                    pt = tl.load(
                        p + k[:, None] * r + j[None, :], mask=(k[:, None] < rows) & (j[None, :] < r), other=0.0
                    )
                    if R_PAD == 1:
                        acc += tl.sum(gt * pt, axis=0)[:, None]
                    else:
                        acc = tl.dot(tl.trans(gt), pt, acc, input_precision="tf32")
                sq += tl.sum(gt * gt, axis=0)
        out = tl.load(out_t + i) + c
        if WITH_R:
            tl.store(T_R + out[:, None] * r + j[None, :], acc, mask=(c[:, None] < n_ch) & (j[None, :] < r))
        tl.store(T_g + out, sq, mask=c < n_ch)


def _same_shape_runs(slots: Sequence[tuple[int, int, bool, int]], keys: Sequence[Any]) -> list[tuple[int, int]]:
    """(first, count) of each run of >= 2 consecutive slots (rows, n, tall, out) of one shape and one non-None key
    (the expert slices of one fused weight) writing consecutive rows of T_R: what a batched product may compute at
    once (if their gradients are back to back). Only within a fused weight, so whether a product is batched never
    depends on where the allocator put independent gradients (a batched product may round differently)."""
    runs, k0 = [], 0
    for k in range(1, len(slots) + 1):
        rows, n, tall, out = slots[k - 1]
        nxt = slots[k] if k < len(slots) else None
        if (
            nxt is None
            or keys[k - 1] is None
            or keys[k] != keys[k - 1]
            or nxt[:3] != (rows, n, tall)
            or nxt[3] != out + (rows if tall else n)
            or rows == 0
        ):
            if k - k0 >= 2:
                runs.append((k0, k - k0))
            k0 = k
    return runs


class MultiProjection:
    """R and ||G_c||^2 of every slot of a bucket into the bucket's touched-channel buffers, one launch.

    ``slots``: per slot (rows, n, tall, out), the held whole rows of G (rows x n), its orientation and the
    first row of T_R / T_g it writes (tall: ``rows`` channels; wide: ``n``). ``batch_keys``: per slot, the fused
    weight it is an expert slice of (None: none); the slices of one fused weight may be one batched product.
    """

    NORM_BLOCK_C = 64  # channels per program when the launch computes only ||G_c||^2

    def __init__(
        self,
        slots: Sequence[tuple[int, int, bool, int]],
        r: int,
        device: torch.device,
        batch_keys: Optional[Sequence[Any]] = None,
    ):
        self.slots, self.r = list(slots), r
        self.r_pad = 1 if r == 1 else max(16, _pow2(r))
        # Tiles measured best on an H100 for LLaMA-1b's gradients (BENCHMARKS.md §1): r = 1, 64 x 32, 1.8 ms;
        # r = 256 TF32, 128 x 32, 5.1 ms (cuBLAS per weight, TF32: 10.0 ms)
        self.block_c = 64 if self.r_pad == 1 else max(16, min(128, 32768 // self.r_pad))
        self.block_k = 32
        channels = [rows if tall else n for rows, n, tall, _ in self.slots]
        self.jobs = _blocks(channels, self.block_c, device)
        self.norm_jobs = _blocks(channels, self.NORM_BLOCK_C, device)  # exact r > 1: norms only, R from cuBLAS
        self.rows_t, self.n_t, self.tall_t, self.out_t = (
            (_i64(col, device) for col in zip(*self.slots)) if self.slots else (None,) * 4
        )
        self.g_ptrs, self.p_ptrs = _Pointers(device), _Pointers(device)
        self.k_max = max(
            (n if tall else rows for rows, n, tall, _ in self.slots), default=0
        )  # interpreter's loop bound
        self.runs = _same_shape_runs(self.slots, batch_keys or [None] * len(self.slots))

    def __call__(
        self,
        grads: list[torch.Tensor],
        projs: list[torch.Tensor],
        T_R: torch.Tensor,
        T_g: torch.Tensor,
        tf32: bool = False,
    ) -> None:
        """``grads[i]``: (rows x n) fp32; ``projs[i]``: P (r x n, tall) or P's held rows (rows x r, wide).
        ``tf32``: TF32 tensor-core products (faster on GPUs, ~1e-3 relative error in R) instead of fp32."""
        if not self.slots:
            return
        if not fused(T_R, T_g, *grads, *projs):
            with _matmul_precision(tf32):
                for (rows, n, tall, out), G, P in self._batched(grads, projs):
                    k = (G.shape[0] if G.dim() == 3 else 1) * (rows if tall else n)
                    project_eager(G, P, tall, T_R[out : out + k], T_g[out : out + k])
            return
        if self.r_pad > 1 and not tf32:
            # Exact fp32 products with r > 1 on cuBLAS: Triton's fp32 FMA dot is 2x slower than SGEMM, and its
            # 3xTF32 dot ("tf32x3") 3x slower (H200, LLaMA-1b: 42.6 ms against ~14 ms). The norms: one launch.
            # Expert slices of a fused weight (consecutive in memory, same shape): one batched product.
            with _matmul_precision(False):
                for (rows, n, tall, out), G, P in self._batched(grads, projs):
                    k = (G.shape[0] if G.dim() == 3 else 1) * (rows if tall else n)
                    if tall:
                        torch.matmul(G, P.transpose(-1, -2), out=T_R[out : out + k].view(*G.shape[:-1], -1))
                    else:
                        torch.matmul(G.transpose(-1, -2), P, out=T_R[out : out + k].view(*P.shape[:-2], n, -1))
            self._launch(grads, None, T_R, T_g, self.norm_jobs, self.NORM_BLOCK_C, r_pad=1, with_r=False)
            return
        self._launch(grads, projs, T_R, T_g, self.jobs, self.block_c, r_pad=self.r_pad, with_r=True)

    def _batched(self, grads: list[torch.Tensor], projs: list[torch.Tensor]) -> list:
        """(slot, G, P) per product: a run of same-shape slots whose fp32 gradients lie back to back in memory (the
        expert slices of a fused weight, whole) as one (k x rows x n) G with its k projections stacked; else one
        slot's G and P. ``project_eager`` and the cuBLAS path take either."""
        out, done = [], 0
        for k0, k in self.runs:
            out.extend((self.slots[i], grads[i], projs[i]) for i in range(done, k0))
            G = grads[k0]
            step = G.numel() * G.element_size()
            if G.dtype == torch.float32 and all(
                g.dtype == G.dtype and g.is_contiguous() and g.data_ptr() == G.data_ptr() + j * step
                for j, g in enumerate(grads[k0 : k0 + k])
            ):
                G3 = G.as_strided((k, *G.shape), (G.numel(), *G.stride()))
                out.append((self.slots[k0], G3, torch.stack(projs[k0 : k0 + k])))
            else:
                out.extend((self.slots[i], grads[i], projs[i]) for i in range(k0, k0 + k))
            done = k0 + k
        out.extend((self.slots[i], grads[i], projs[i]) for i in range(done, len(self.slots)))
        return out

    def reads_grads_directly(self, tf32: bool) -> bool:
        """Whether a step bakes the gradients' addresses in (cuBLAS per weight) rather than reading them
        through the pointer table."""
        return bool(self.slots) and self.r_pad > 1 and not tf32

    def _launch(self, grads, projs, T_R, T_g, jobs, block_c: int, r_pad: int, with_r: bool) -> None:
        job_slot, job_c0 = jobs
        _project_kernel[(len(job_slot),)](
            self.g_ptrs(grads),
            self.p_ptrs(projs) if with_r else self.g_ptrs(grads),  # norms only: P is not read
            self.rows_t,
            self.n_t,
            self.tall_t,
            self.out_t,
            job_slot,
            job_c0,
            T_R,
            T_g,
            self.r,
            BLOCK_C=block_c,
            BLOCK_K=self.block_k,
            R_PAD=r_pad,
            INTERPRETED=INTERPRET,
            K_MAX=self.k_max if INTERPRET else 0,
            WITH_R=with_r,
            num_warps=8 if r_pad >= 128 or r_pad == 1 else 4,
            num_stages=3,
        )


# --- 2. Adam on the projected gradient ----------------------------------------------------------


if triton is not None:

    @triton.jit
    def _channel_adam_kernel(
        R, M, V, n_sq, r_sq, keep, C, r, b1, a1, b2, a2, eps, skip, BLOCK_C: tl.constexpr, R_PAD: tl.constexpr
    ):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        j = tl.arange(0, R_PAD)
        mask = (c[:, None] < C) & (j[None, :] < r)
        off = c[:, None] * r + j[None, :]
        x = tl.load(R + off, mask=mask, other=0.0)
        # PyTorch's rounding: m.mul_(b1) then add_(x, alpha=a1) = one fma; the same for v with addcmul_.
        # a = 1 - b comes from the host (double, then fp32), as the eager ops' alpha does.
        m = tl.fma(a1, x, tl.load(M + off, mask=mask, other=0.0) * b1)
        v = tl.fma(a2 * x, x, tl.load(V + off, mask=mask, other=0.0) * b2)
        # a skipped step (non-finite gradient) leaves the moments as they are, and so does a param without gradient
        kept = mask & (tl.load(keep + c, mask=c < C, other=0.0) != 0)[:, None]
        if tl.load(skip) == 0:
            tl.store(M + off, m, mask=kept)
            tl.store(V + off, v, mask=kept)
        N = tl.div_rn(m, tl.sqrt_rn(v) + eps)  # IEEE-rounded, as PyTorch's ops (not the fast approximations)
        tl.store(n_sq + c, tl.sum(N * N, axis=1), mask=c < C)
        tl.store(r_sq + c, tl.sum(x * x, axis=1), mask=c < C)


def channel_adam_(
    R: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    skip: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments of the channel rows of R (C x r, in place) -> (||N_c||^2, ||R_c||^2), each (C,),
    with N = exp_avg / (sqrt(exp_avg_sq) + eps) (DESIGN.md §1.3). ``skip`` (0-dim, > 0: skip): moments kept.
    ``keep`` (C,): rows where it is 0 keep their moments (a param without gradient); None: all updated."""
    C, r = exp_avg.shape
    if not fused(R, exp_avg, exp_avg_sq) or C == 0:
        if skip is not None:  # gated on the device (no host sync): a skipped step keeps every row
            go = _go(skip).to(exp_avg.dtype)
            keep = go.expand(C) if keep is None else keep * go
        if keep is None:
            exp_avg.mul_(b1).add_(R, alpha=1.0 - b1)
            exp_avg_sq.mul_(b2).addcmul_(R, R, value=1.0 - b2)
        else:  # the same rounding out of place, then only the kept rows written
            kept = keep[:, None] != 0
            exp_avg.copy_(torch.where(kept, exp_avg.mul(b1).add_(R, alpha=1.0 - b1), exp_avg))
            exp_avg_sq.copy_(torch.where(kept, exp_avg_sq.mul(b2).addcmul_(R, R, value=1.0 - b2), exp_avg_sq))
        N = exp_avg / exp_avg_sq.sqrt().add_(eps)
        return N.square().sum(dim=1), R.square().sum(dim=1)
    n_sq, r_sq = R.new_empty(C), R.new_empty(C)
    r_pad = _pow2(r)
    block_c = max(1, 4096 // r_pad)
    _channel_adam_kernel[(-(-C // block_c),)](
        R,
        exp_avg,
        exp_avg_sq,
        n_sq,
        r_sq,
        keep if keep is not None else _ones(C, R.device),
        C,
        r,
        b1,
        1.0 - b1,
        b2,
        1.0 - b2,
        eps,
        _flag(skip, R.device),
        BLOCK_C=block_c,
        R_PAD=r_pad,
    )
    return n_sq, r_sq


# --- 3. the scaled update -------------------------------------------------------------------------


def scaled_update_eager(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, per_row: bool, decay: float) -> None:
    """The reference's order on one (rows x n) matrix: p -= U, then p += decay * p (decay = -lr * wd)."""
    p.addcmul_(g, coef[:, None] if per_row else coef[None, :], value=-1.0)
    if decay != 0.0:
        p.add_(p, alpha=decay)


if triton is not None:

    @triton.jit
    def _multi_update_kernel(
        p_ptrs,
        g_ptrs,
        c_offs,
        numels,
        ns,
        per_row,
        blk_param,
        blk_start,
        coef,
        scalars,
        live,
        skip,
        BLOCK: tl.constexpr,
        I32: tl.constexpr,  # every block < 2^31 elements: the row index by an int32 division (int64's is slow)
    ):
        b = tl.program_id(0)
        decay = tl.load(scalars)  # StepScalars: (decay, ...)
        i = tl.load(blk_param + b)
        numel = tl.load(numels + i)
        n = tl.load(ns + i)
        row = tl.load(per_row + i)
        p_ptr = tl.load(p_ptrs + i).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(g_ptrs + i).to(tl.pointer_type(tl.float32))
        offs = tl.load(blk_start + b) + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        if I32:
            o, nn = offs.to(tl.int32), n.to(tl.int32)
        else:
            o, nn = offs, n
        q = o // nn  # the row; its column is o - q * n (one division)
        idx = tl.where(row != 0, q, o - q * nn)
        c = tl.load(coef + tl.load(c_offs + i) + idx, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask)
        p = tl.fma(-g, c, p)  # addcmul_'s rounding, then the decay's
        p = tl.fma(decay, p, p)
        # a skipped step writes nothing; a param without gradient is left as it is (no decay either)
        if (tl.load(skip) == 0) & (tl.load(live + i) != 0):
            tl.store(p_ptr + offs, p, mask=mask)


class MultiUpdate:
    """The fused update of a fixed list of (rows x n) fp32 parameter blocks; grads may move between steps."""

    def __init__(self, params: list[torch.Tensor], per_row: list[bool], coef_offsets: list[int]):
        self.params = params
        self.per_row = per_row
        self.coef_offsets = coef_offsets
        self.on_gpu = bool(params) and fused(*params)  # the params never move: checked once
        if not self.on_gpu:
            return
        dev = params[0].device
        self.p_ptrs = _i64([p.data_ptr() for p in params], dev)
        self.c_offs = _i64(coef_offsets, dev)
        self.numels = _i64([p.numel() for p in params], dev)
        self.ns = _i64([p.shape[1] for p in params], dev)
        self.rows = _i64([int(r) for r in per_row], dev)
        self.blk_param, self.blk_start = _blocks([p.numel() for p in params], BLOCK, dev)
        self.i32 = max(p.numel() for p in params) + BLOCK < 2**31
        self.g_ptrs = _Pointers(dev)

    def __call__(
        self,
        grads: list[torch.Tensor],
        coef: torch.Tensor,
        scalars: StepScalars,
        skip: Optional[torch.Tensor] = None,
        live: Optional[tuple[torch.Tensor, list[bool]]] = None,
        zero_grads: bool = False,
    ) -> list[tuple[int, int]]:
        """p <- (p - G * coef) (1 + scalars.decay); nothing when ``skip`` (0-dim) is > 0. ``live``: per param,
        on the device (the kernel reads it) and a reader of it on the host (the eager path), where the params
        without gradient are left untouched; None: all live. ``zero_grads``: the caller's gradient store is to be
        zeroed after the step; on the CPU the update zeroes each gradient it reads in the same pass
        (cpu_kernels.scaled_update_). Returns the (address, numel) of the contiguous gradients it zeroed."""
        zeroed: list[tuple[int, int]] = []
        if not self.params:
            return zeroed
        if not (self.on_gpu and fused(*grads)):
            if skip is not None and scalars.gate_on_device:  # no host sync: each result written where it goes ahead
                for j, (p, g, row, off) in enumerate(zip(self.params, grads, self.per_row, self.coef_offsets)):
                    new = p.clone()  # the in-place ops' rounding, in the param's dtype
                    scaled_update_eager(
                        new, g, coef[off : off + (p.shape[0] if row else p.shape[1])], row, scalars.decay
                    )
                    torch.where(_go(skip, live[0][j] if live is not None else None), new, p, out=p)
                return zeroed
            if skipped(skip):
                return zeroed
            on = live[1]() if live is not None else [True] * len(self.params)
            for p, g, row, off, here in zip(self.params, grads, self.per_row, self.coef_offsets, on):
                if not here:
                    continue
                c = coef[off : off + (p.shape[0] if row else p.shape[1])]
                if zero_grads and g.is_contiguous() and cpu_kernels.scaled_update_(p, g, c, row, zero_g=True):
                    if scalars.decay != 0.0:
                        p.add_(p, alpha=scalars.decay)
                    zeroed.append((g.data_ptr(), g.numel()))
                else:
                    scaled_update_eager(p, g, c, row, scalars.decay)
            return zeroed
        _multi_update_kernel[(len(self.blk_param),)](
            self.p_ptrs,
            self.g_ptrs(grads),
            self.c_offs,
            self.numels,
            self.ns,
            self.rows,
            self.blk_param,
            self.blk_start,
            coef.contiguous(),
            scalars.tensor,
            live[0] if live is not None else _ones(len(self.params), coef.device),
            _flag(skip, coef.device),
            BLOCK=BLOCK,
            I32=self.i32,
        )
        return zeroed


# --- 4. plain Adam on the other parameters --------------------------------------------------------


if triton is not None:

    @triton.jit
    def _multi_adam_kernel(
        p_ptrs,
        g_ptrs,
        state_off,
        numels,
        blk_param,
        blk_start,
        M,
        V,
        b1,
        a1,
        b2,
        a2,
        eps,
        scalars,
        step_sizes,
        step_stride,
        live,
        skip,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        i = tl.load(blk_param + b)
        step_size, decay = tl.load(step_sizes + i * step_stride), tl.load(scalars)  # StepScalars
        offs = tl.load(blk_start + b) + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < tl.load(numels + i)
        p_ptr = tl.load(p_ptrs + i).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(g_ptrs + i).to(tl.pointer_type(tl.float32))
        s = tl.load(state_off + i) + offs
        g = tl.load(g_ptr + offs, mask=mask)
        m = tl.fma(a1, g, tl.load(M + s, mask=mask) * b1)  # the eager ops' rounding, as above
        v = tl.fma(a2 * g, g, tl.load(V + s, mask=mask) * b2)
        p = tl.load(p_ptr + offs, mask=mask)
        p = tl.fma(-step_size, tl.div_rn(m, tl.sqrt_rn(v) + eps), p)
        p = tl.fma(decay, p, p)
        # a skipped step writes nothing; a param without gradient keeps its weight and moments
        if (tl.load(skip) == 0) & (tl.load(live + i) != 0):
            tl.store(M + s, m, mask=mask)
            tl.store(V + s, v, mask=mask)
            tl.store(p_ptr + offs, p, mask=mask)


if triton is not None:

    @triton.jit
    def _multi_sum_sq_kernel(g_ptrs, numels, blk_param, blk_start, out, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        i = tl.load(blk_param + b)
        offs = tl.load(blk_start + b) + tl.arange(0, BLOCK).to(tl.int64)
        g = tl.load(
            tl.load(g_ptrs + i).to(tl.pointer_type(tl.float32)) + offs, mask=offs < tl.load(numels + i), other=0.0
        )
        tl.store(out + b, tl.sum(g * g, axis=0))


class MultiAdam:
    """The reference's Adam (eps outside the sqrt, decay after the update) on a fixed list of 1-D fp32
    params whose moments are slices [off, off + numel) of two flat buffers."""

    def __init__(self, params: list[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor):
        self.params, self.exp_avg, self.exp_avg_sq = params, exp_avg, exp_avg_sq
        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.m = [exp_avg[o : o + k] for o, k in zip(offsets, sizes)]
        self.v = [exp_avg_sq[o : o + k] for o, k in zip(offsets, sizes)]
        self.on_gpu = bool(params) and fused(*params, exp_avg, exp_avg_sq)  # these never move: checked once
        if not self.on_gpu:
            return
        dev = exp_avg.device
        self.p_ptrs = _i64([p.data_ptr() for p in params], dev)
        self.state_off = _i64(offsets, dev)
        self.numels = _i64(sizes, dev)
        self.blk_param, self.blk_start = _blocks(sizes, BLOCK, dev)
        self.g_ptrs = _Pointers(dev)
        self.block_sums = torch.empty(len(self.blk_param), device=dev)

    def sum_sq(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """sum over all grads of g^2 (0-dim; inf/NaN if any element is), one read of the gradients."""
        if not (self.on_gpu and fused(*grads)):
            return torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros(())
        _multi_sum_sq_kernel[(len(self.blk_param),)](
            self.g_ptrs(grads), self.numels, self.blk_param, self.blk_start, self.block_sums, BLOCK=BLOCK
        )
        return self.block_sums.sum()

    def __call__(
        self,
        grads: list[torch.Tensor],
        b1: float,
        b2: float,
        eps: float,
        scalars: StepScalars,
        skip: Optional[torch.Tensor] = None,
    ) -> None:
        """One step: ``scalars.step_sizes`` = each param's bias-corrected lr (one per param, or one for all),
        ``scalars.decay`` = -lr * weight_decay (0: none), ``scalars.live``: params without gradient are left
        untouched (weight and moments); nothing when ``skip`` (0-dim) is > 0."""
        if not self.params:
            return
        per_param = scalars.k == len(self.params)
        if not (self.on_gpu and fused(*grads)):
            if skip is not None and scalars.gate_on_device:
                self._gated_eager(grads, b1, b2, eps, scalars, skip, per_param)
                return
            if skipped(skip):
                return
            on = scalars.live() if per_param else [True] * len(self.params)
            sizes = scalars.step_sizes if per_param else scalars.step_sizes[:1] * len(self.params)
            pick = [i for i, here in enumerate(on) if here]
            if not self.on_gpu:  # the CPU (ZeRO-Offload, CPU runs): one pass per param where the kernel runs
                pick = [
                    i
                    for i in pick
                    if not cpu_kernels.adam_(
                        self.params[i], self.m[i], self.v[i], grads[i], b1, b2, eps, sizes[i], scalars.decay
                    )
                ]
            ps, ms, vs, gs = ([xs[i] for i in pick] for xs in (self.params, self.m, self.v, grads))
            if not ps:
                return
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps)
            step = {sizes[i] for i in pick}
            if len(step) == 1:
                torch._foreach_addcdiv_(ps, ms, denom, value=-step.pop())
            else:  # params at different step counts (some had no gradient in earlier steps)
                torch._foreach_addcdiv_(ps, ms, denom, [-sizes[i] for i in pick])
            if scalars.decay != 0.0:
                torch._foreach_add_(ps, ps, alpha=scalars.decay)
            return
        _multi_adam_kernel[(len(self.blk_param),)](
            self.p_ptrs,
            self.g_ptrs(grads),
            self.state_off,
            self.numels,
            self.blk_param,
            self.blk_start,
            self.exp_avg,
            self.exp_avg_sq,
            b1,
            1.0 - b1,
            b2,
            1.0 - b2,
            eps,
            scalars.tensor,
            scalars.step_sizes_t,
            1 if per_param else 0,
            scalars.live_t if per_param else _ones(len(self.params), self.exp_avg.device),
            _flag(skip, self.exp_avg.device),
            BLOCK=BLOCK,
        )

    def _gated_eager(
        self,
        grads: list[torch.Tensor],
        b1: float,
        b2: float,
        eps: float,
        scalars: StepScalars,
        skip: torch.Tensor,
        per_param: bool,
    ) -> None:
        """The eager step gated on the device (no host sync): each param's new moments and weight computed out
        of place (the in-place ops' rounding) and written where the step goes ahead and the param is live, in
        pieces of `EAGER_CHUNK` elements so the temporaries stay small (an embedding's moments are large)."""
        sizes = scalars.step_sizes if per_param else scalars.step_sizes[:1] * len(self.params)
        for i, (p, m, v, g) in enumerate(zip(self.params, self.m, self.v, grads)):
            go = _go(skip, scalars.live_t[i] if per_param else None)
            for a in range(0, p.numel(), EAGER_CHUNK):
                pc, mc, vc, gc = (x[a : a + EAGER_CHUNK] for x in (p, m, v, g))
                m_new = mc.mul(b1).add_(gc, alpha=1.0 - b1)
                v_new = vc.mul(b2).addcmul_(gc, gc, value=1.0 - b2)
                p_new = pc.clone().addcdiv_(m_new, v_new.sqrt().add_(eps), value=-sizes[i])
                if scalars.decay != 0.0:
                    p_new.add_(p_new, alpha=scalars.decay)
                for dst, new in ((mc, m_new), (vc, v_new), (pc, p_new)):
                    torch.where(go, new, dst, out=dst)


# --- 5. DCT scores -----------------------------------------------------------------------------------

DCT_SPLIT_ROWS = 256  # rows per program of the DCT scores (fixed: a weight's scores round the same in any batch)

if triton is not None:

    @triton.jit
    def _dct_scores_kernel(
        V, W, part, rows, h, N, S, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr
    ):
        b, s = tl.program_id(0).to(tl.int64), tl.program_id(2).to(tl.int64)  # offsets in int64
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jm = j < h
        c_lo = tl.load(W + j, mask=jm, other=0.0)[None, :]
        d_lo = tl.load(W + h + j, mask=jm, other=0.0)[None, :]
        c_hi = tl.load(W + 2 * h + j, mask=jm, other=0.0)[None, :]
        d_hi = tl.load(W + 3 * h + j, mask=jm, other=0.0)[None, :]
        acc_lo = tl.zeros([BLOCK_J], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_J], dtype=tl.float32)
        first = s * SPLIT
        for r0 in range(0, SPLIT, BLOCK_R):
            r = (first + r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r[:, None] < rows) & jm[None, :]
            off = ((b * rows + r[:, None]) * h + j[None, :]) * 2  # (Re, Im) pairs of the complex spectrum
            re = tl.load(V + off, mask=mask, other=0.0)
            im = tl.load(V + off + 1, mask=mask, other=0.0)
            lo = re * c_lo - im * d_lo  # DCT_k = Re(V_k w_k), k = j
            hi = re * c_hi + im * d_hi  # k = N - j: V_(N-j) = conj(V_j) (zero weights where j has no mirror)
            acc_lo += tl.sum(lo * lo, axis=0)
            acc_hi += tl.sum(hi * hi, axis=0)
        base = (b * S + s) * N
        tl.store(part + base + j, acc_lo, mask=jm)
        tl.store(part + base + N - j, acc_hi, mask=jm & (j >= 1) & (j <= N - h))


def dct_scores_fused(V: torch.Tensor, twiddles: torch.Tensor, N: int) -> torch.Tensor:
    """sum over rows of DCT_k^2 for each k < N, from the real FFT of rows in Makhoul's order: ``V`` (B, rows, h)
    complex64, h = N // 2 + 1; ``twiddles`` (4, h) fp32: the twiddle's cos and sin parts at k = j, then at
    k = N - j (zero where j has no mirror). -> (B, N) fp32. One pass over V: each coefficient is formed and
    squared in registers, so a small score is as accurate as its own coefficients (not a difference of its
    mirror's large sums). Row blocks of `DCT_SPLIT_ROWS` give partial sums, added in a fixed order."""
    B, rows, h = V.shape
    V = V.contiguous()  # (B, rows, h) dense: the kernel's offsets
    S = max(1, -(-rows // DCT_SPLIT_ROWS))
    part = torch.empty(B, S, N, device=V.device, dtype=torch.float32)  # k < h from j = k, the rest from j = N - k
    block_j = 64
    _dct_scores_kernel[(B, -(-h // block_j), S)](
        torch.view_as_real(V), twiddles, part, rows, h, N, S, SPLIT=DCT_SPLIT_ROWS, BLOCK_R=16, BLOCK_J=block_j
    )
    return part.sum(dim=1)
