"""The CPU step's one-pass kernels (DESIGN.md §2.7): R and ||G_c||^2 of a gradient in one read of G, the
scaled update that zeroes the gradient store in the same pass, and the plain-Adam step of the other params
(embeddings, head, norms) in one pass instead of the eager ops' five.

On the CPU (ZeRO-Offload, CPU runs) the eager twin of ``kernels.MultiProjection`` reads G twice per weight: a
BLAS product for R (for rank 1 a matrix-vector product, which MKL runs on one core at about a third of the
memory bandwidth) and a norm pass. This C++ kernel computes both in one pass over G, rows split over the
intra-op threads (``at::parallel_for``); for r > 1 it computes the norms only (R stays a BLAS product, a real
GEMM). It is built on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja,
as DeepSpeedCPUAdam needs; cached under ~/.cache/torch_extensions); when it cannot be built the eager ops run
(one warning). ``APOLLO_DIST_CPU_KERNELS=0`` switches it off.

Arithmetic: fp32 sums in a fixed order (a row channel: vector lanes, then the row; a column channel: rows in blocks
of 256, then the blocks in order), so results do not depend on the thread count. They differ from the BLAS / norm
ops in the last bits (other summation order); NaN and inf propagate as in any sum (the non-finite check relies on it: no fast-math).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// G: rows x n fp32, unit column stride, row stride ld. tall: channel = row, R[i] = sum_j G[i,j] P[j] (P: n),
// g[i] = sum_j G[i,j]^2. wide: channel = column, R[c] = sum_i G[i,c] P[i] (P: rows), g[c] = sum_i G[i,c]^2.
// with_r false: g only (P unused).
void project_norm(torch::Tensor G, torch::Tensor P, torch::Tensor R, torch::Tensor g, bool tall, bool with_r) {
  const int64_t rows = G.size(0), n = G.size(1), ld = G.stride(0);
  const float* gp = G.data_ptr<float>();
  const float* pp = with_r ? P.data_ptr<float>() : nullptr;
  float* rp = with_r ? R.data_ptr<float>() : nullptr;
  float* op = g.data_ptr<float>();
  if (tall) {
    at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
      const float* __restrict__ pv = pp;
      for (int64_t i = lo; i < hi; ++i) {
        const float* __restrict__ row = gp + i * ld;
        float a = 0.f, b = 0.f;
        if (with_r) {
#pragma omp simd reduction(+ : a, b)
          for (int64_t j = 0; j < n; ++j) { a += row[j] * pv[j]; b += row[j] * row[j]; }
          rp[i] = a;
        } else {
#pragma omp simd reduction(+ : b)
          for (int64_t j = 0; j < n; ++j) b += row[j] * row[j];
        }
        op[i] = b;
      }
    });
  } else {
    // Tiles of RB rows x C columns, each a task: the accumulators stay in L1 while the rows stream by, and a weight
    // with few columns still gives every thread work. Each tile's sums go to its own slot of a partial buffer,
    // summed over the row blocks in order afterwards: the result does not depend on the thread count.
    constexpr int64_t C = 256, RB = 256;
    const int64_t ncb = (n + C - 1) / C, nrb = (rows + RB - 1) / RB;
    std::vector<float> part_g(nrb * n), part_r(with_r ? nrb * n : 0);
    at::parallel_for(0, nrb * ncb, 1, [&](int64_t lo, int64_t hi) {
      float ra[C], ga[C];
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t rb = t / ncb, c0 = (t % ncb) * C, w = std::min(C, n - c0);
        const int64_t r0 = rb * RB, r1 = std::min(rows, r0 + RB);
        for (int64_t c = 0; c < w; ++c) { ra[c] = 0.f; ga[c] = 0.f; }
        float* __restrict__ rv = ra;
        float* __restrict__ gv = ga;
        for (int64_t i = r0; i < r1; ++i) {
          const float* __restrict__ row = gp + i * ld + c0;
          const float s = with_r ? pp[i] : 0.f;
#pragma omp simd
          for (int64_t c = 0; c < w; ++c) { rv[c] += s * row[c]; gv[c] += row[c] * row[c]; }
        }
        for (int64_t c = 0; c < w; ++c) {
          part_g[rb * n + c0 + c] = ga[c];
          if (with_r) part_r[rb * n + c0 + c] = ra[c];
        }
      }
    });
    at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        float a = 0.f, b = 0.f;
        for (int64_t rb = 0; rb < nrb; ++rb) {
          b += part_g[rb * n + c];
          if (with_r) a += part_r[rb * n + c];
        }
        op[c] = b;
        if (with_r) rp[c] = a;
      }
    });
  }
}

// p -= g * c with c per row (per_row) or per column: p.addcmul_(g, c, value=-1)'s rounding on the CPU (one
// rounding: a fused multiply-add; nothing else is contracted, -ffp-contract=off); zero_g: g = 0 in the same pass (the engine's gradient
// store, which must be zero for the next step anyway: one pass instead of a second one zeroing it).
void scaled_update(torch::Tensor p, torch::Tensor g, torch::Tensor c, bool per_row, bool zero_g) {
  const int64_t rows = p.size(0), n = p.size(1), ldp = p.stride(0), ldg = g.stride(0);
  float* pp = p.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    const float* __restrict__ cv = cp;
    for (int64_t i = lo; i < hi; ++i) {
      float* __restrict__ pr = pp + i * ldp;
      float* __restrict__ gr = gp + i * ldg;
      if (per_row) {
        const float ci = cv[i];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pr[j] = std::fma(-gr[j], ci, pr[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pr[j] = std::fma(-gr[j], cv[j], pr[j]);
      }
      if (zero_g) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gr[j] = 0.f;
      }
    }
  });
}

// The reference's Adam on flat fp32 tensors, one pass (the eager step's five): m = b1 m + (1 - b1) g,
// v = b2 v + (1 - b2) g^2, p += -step m / (sqrt(v) + eps), then p += decay p. Each operation rounds as the
// eager CPU op does (torch's add / addcmul with a scalar: one fused multiply-add; addcdiv: (value m) / d), except
// the square root, correctly rounded here (torch's vectorized CPU sqrt can be an ulp or two off).
void adam(torch::Tensor p, torch::Tensor m, torch::Tensor v, torch::Tensor g, double b1, double b2, double eps,
          double step, double decay) {
  const int64_t n = p.numel();
  float* pp = p.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float fb1 = b1, fa1 = 1.0 - b1, fb2 = b2, fa2 = 1.0 - b2, fe = eps, fs = -step, fd = decay;
  at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
    float* __restrict__ pr = pp;
    float* __restrict__ mr = mp;
    float* __restrict__ vr = vp;
    const float* __restrict__ gr = gp;
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      const float gj = gr[j];
      const float mj = std::fma(gj, fa1, mr[j] * fb1);
      const float vj = std::fma(gj * fa2, gj, vr[j] * fb2);
      float pj = pr[j] + (fs * mj) / (std::sqrt(vj) + fe);
      if (fd != 0.f) pj = std::fma(pj, fd, pj);
      mr[j] = mj;
      vr[j] = vj;
      pr[j] = pj;
    }
  });
}
"""

_lib: Optional[Any] = None
_tried = False


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: the build uses -march=native, and a home directory
    (torch's extension cache) shared by nodes of different CPUs must not hand one a binary built for another."""
    import hashlib
    import platform

    flags = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _load() -> Optional[Any]:
    """The compiled module, built once per process (None: switched off or not buildable here)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("APOLLO_DIST_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _lib = load_inline(
            f"apollo_dist_cpu_{_cpu_tag()}",
            cpp_sources=_SOURCE,
            functions=["project_norm", "scaled_update", "adam"],
            # no contraction (the eager ops' roundings); no errno to set, so the square root vectorizes
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler / ninja: the eager ops are exact too, only slower
        warnings.warn(
            f"apollo_dist: the CPU projection kernel could not be built ({type(e).__name__}: {str(e)[:200]}); "
            "the CPU step uses PyTorch ops (correct, about 2x slower on the CPU; APOLLO_DIST_CPU_KERNELS=0 "
            "silences this)",
            stacklevel=3,
        )
        _lib = None
    return _lib


def project_norm(
    G: torch.Tensor, P: Optional[torch.Tensor], tall: bool, R_out: Optional[torch.Tensor], g_out: torch.Tensor
) -> bool:
    """g_out = ||G_c||^2 of each channel of G (rows x n, fp32 on the CPU, unit column stride; channels: rows
    when ``tall``, else columns) and, when P is given (rank 1: 1 x n tall, rows x 1 wide), R_out = G P^T (tall) or
    G^T P (wide), in one pass over G. False, nothing written, when the kernel is unavailable or the tensors are
    not of that kind: the caller runs the eager ops."""
    if not (
        G.device.type == "cpu"
        and G.dtype == torch.float32
        and G.dim() == 2
        and G.stride(1) == 1
        and G.numel() > 0
        and g_out.is_contiguous()
        and g_out.dtype == torch.float32
        and g_out.numel() == (G.shape[0] if tall else G.shape[1])
        and (
            P is None
            or (
                P.device.type == "cpu"
                and P.numel() == (G.shape[1] if tall else G.shape[0])
                and R_out is not None
                and R_out.is_contiguous()
                and R_out.dtype == torch.float32
                and R_out.numel() == g_out.numel()
            )
        )
    ):
        return False
    lib = _load()
    if lib is None:
        return False
    with_r = P is not None
    p = P.reshape(-1).contiguous().float() if with_r else g_out  # (unused without R)
    lib.project_norm(G, p, R_out if with_r else g_out, g_out, tall, with_r)
    return True


def scaled_update_(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, per_row: bool, zero_g: bool) -> bool:
    """p -= g * coef (coef: one value per row when ``per_row``, else per column; the rounding of
    ``p.addcmul_(g, coef, value=-1)``) and, when ``zero_g``, g = 0 in the same pass. p, g: rows x n fp32 on the CPU
    with unit column stride. False, nothing written, when the kernel is unavailable or the tensors are not of
    that kind."""
    if not (
        p.device.type == "cpu"
        and p.dtype == g.dtype == coef.dtype == torch.float32
        and p.dim() == g.dim() == 2
        and p.shape == g.shape
        and p.stride(1) == g.stride(1) == 1
        and coef.is_contiguous()
        and coef.device.type == "cpu"
        and coef.numel() == (p.shape[0] if per_row else p.shape[1])
    ):
        return False
    lib = _load()
    if lib is None:
        return False
    lib.scaled_update(p, g, coef, per_row, zero_g)
    return True


def adam_(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    step_size: float,
    decay: float,
) -> bool:
    """The reference's Adam step on one param in one pass: m, v updated, p -= step_size m / (sqrt(v) + eps), then
    p += decay p (``decay`` = -lr * weight_decay; 0: none). p, m, v, g: contiguous fp32 on the CPU, same numel.
    The eager ops' rounding but for the square root (correctly rounded here). False, nothing written, when the
    kernel is unavailable or the tensors are not of that kind."""
    if not (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (p, m, v, g))
        and p.numel() == m.numel() == v.numel() == g.numel()
    ):
        return False
    lib = _load()
    if lib is None:
        return False
    lib.adam(p, m, v, g, b1, b2, eps, step_size, decay)
    return True
