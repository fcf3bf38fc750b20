"""Projections: random ones regenerated from (initial seed, epoch) exactly as the reference draws them, and
the data-dependent ones (the reference's SVD, the SVD-free DCT) behind one small interface, `Projector`.

DESIGN.md §1.1: P = randn(shape) / sqrt(r) from a generator on the gradient's device seeded with the
epoch's seed; the seed of epoch k is ``next_seed`` applied k times to the parameter's initial seed.
Nothing of a random projection is stored in checkpoints: it is a pure function of (seed, epoch, shape,
device type). SVD and DCT projections are computed from the gradient at each refresh (`refresh_states`,
sharded: DESIGN.md §2.8) and keep state (the SVD's P, the DCT's r indices) that checkpoints carry.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import kernels

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


# -- projections beyond random: the reference's SVD and the SVD-free DCT (DESIGN.md §2.8) -------------
PROJECTIONS = ("random", "svd", "dct")


def _pad_rows(top: torch.Tensor, r: int) -> torch.Tensor:
    """``top`` (k x d, k <= r) as r rows (zero rows below): a rank above min(m, n) projects on zeros, which
    leave the moments at zero and add nothing to any norm, as the reference's narrower moments do."""
    if top.shape[0] == r:
        return top.contiguous()
    out = top.new_zeros(r, top.shape[1])
    out[: top.shape[0]] = top
    return out


def dct_basis(size: int, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix (size x size, fp32): row k is the basis vector of frequency k,
    c_k[i] = sqrt((1 if k == 0 else 2) / size) cos(pi k (2i + 1) / (2 size)). Built in float64 on the CPU
    (the same bits on every device and rank), cached per (size, device)."""
    return _dct_basis_and_zero(size, device)[:size]


@functools.cache
def _dct_basis_and_zero(size: int, device: torch.device) -> torch.Tensor:
    """`dct_basis` with a row of zeros below it (size + 1 x size): indexing with -1 gives zeros."""
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * k * (2 * i + 1) / (2 * size)) * math.sqrt(2.0 / size)
    basis[0] /= math.sqrt(2.0)
    zero = torch.zeros(1, size, dtype=torch.float64)
    return torch.cat([basis, zero]).to(device=device, dtype=torch.float32)


def _twiddle64(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The twiddle exp(-i pi k / 2N) times the orthonormal scale, k < N, as (cos part, sin part), float64 on the
    CPU."""
    k = torch.arange(N, dtype=torch.float64)
    scale = torch.full((N,), math.sqrt(2.0 / N), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / N)
    angle = -math.pi * k / (2 * N)
    return torch.cos(angle) * scale, torch.sin(angle) * scale


@functools.cache
def _makhoul_order(N: int, device: torch.device) -> torch.Tensor:
    """Makhoul's reordering of N samples: the even ones, then the odd ones reversed (int64, on ``device``)."""
    return torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2).flip(0)]).to(device)


@functools.cache
def _half_twiddles(N: int, device: torch.device) -> torch.Tensor:
    """The twiddle per half-spectrum bin j < h = N // 2 + 1, fp32 (4, h): its cos and sin parts at k = j, then at
    the mirror k = N - j (j = 1 .. N - h; zero where j has none). `dct_rows` and `kernels.dct_scores_fused`."""
    c, d = _twiddle64(N)
    h = N // 2 + 1
    tw = torch.zeros(4, h, dtype=torch.float64)
    tw[0], tw[1] = c[:h], d[:h]
    j = torch.arange(1, N - h + 1)
    tw[2, j], tw[3, j] = c[N - j], d[N - j]
    return tw.to(device, torch.float32)


def dct_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal DCT-II of each row of X (rows x N, fp32), X @ dct_basis(N).T, as its two halves
    (coefficients 0 .. N // 2, then the rest: concatenated, the whole), computed with one real FFT of length N
    per row (Makhoul: DCT_k = Re(V_k w_k), V the FFT of the reordered row, w the twiddle; V_k for k > N / 2 is
    conj(V_(N-k)), so `torch.fft.rfft`'s half spectrum is enough): O(N log N) per row instead of the product's
    O(N^2), and no complex array of the full size."""
    N = X.shape[-1]
    h = N // 2 + 1
    tw = _half_twiddles(N, X.device)
    R = torch.fft.rfft(X.index_select(-1, _makhoul_order(N, X.device)), dim=-1)  # rows x h
    a, b = R.real, R.imag
    low = a * tw[0] - b * tw[1]
    # k = N - j for j = 1 .. N - h: Re(conj(R_j) w_k), reversed into k = h .. N - 1
    high = (a[..., 1 : N - h + 1] * tw[2, 1 : N - h + 1] + b[..., 1 : N - h + 1] * tw[3, 1 : N - h + 1]).flip(-1)
    return low, high


@functools.cache
def _score_weights(N: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the eager scores: per coefficient k, its half-spectrum index (k, then N - k: the conjugate) and the
    weights of (sum Re^2, sum Im^2, sum Re Im) in sum_rows Re(V_k w_k)^2 (the cross term's sign flips with the
    conjugate), float64."""
    wr, wi = _twiddle64(N)
    k = torch.arange(N)
    h = N // 2 + 1
    sign = torch.where(k < h, 1.0, -1.0).double()
    weights = torch.stack([wr * wr, wi * wi, -2.0 * sign * wr * wi], dim=1)  # (N, 3)
    return torch.where(k < h, k, N - k).to(device), weights.to(device)


def dct_scores(G: torch.Tensor, tall: bool) -> torch.Tensor:
    """Each DCT basis vector's alignment with the gradient rows ``G`` (some rows of an m x n gradient, fp32):
    tall: ||G c_k||^2 for the n vectors of the n-point basis (a sum over rows: partial sums of row shards add
    up); wide: ||c_k^T G||^2 for the m vectors of the m-point basis (G must be whole). From one real FFT per row
    (`dct_rows`' route: DCT_k = Re(V_k w_k)), `_reordered_scores`."""
    X = G if tall else G.T
    return _reordered_scores(X.index_select(-1, _makhoul_order(X.shape[-1], X.device)).unsqueeze(0))[0]


def _reordered_scores(X: torch.Tensor) -> torch.Tensor:
    """`dct_scores` of a batch of row blocks already in Makhoul's order: (B, rows, N) -> (B, N). A GPU: one fused
    pass over the half spectrum, each coefficient formed and squared in registers (`kernels.dct_scores_fused`).
    Else without forming the coefficients: sum_rows Re(V_k w_k)^2 = a^2 sum Re^2 + b^2 sum Im^2 - 2ab sum Re Im
    (w_k = a + ib, conjugated beyond the half spectrum), three column sums of the half spectrum for all N scores."""
    N = X.shape[-1]
    if kernels.fused(X):  # (the eager sums below are memory-bound on a GPU)
        return kernels.dct_scores_fused(torch.fft.rfft(X, dim=-1), _half_twiddles(N, X.device), N)
    src, weights = _score_weights(N, X.device)
    # the sums in float64: a small score is a difference of large ones (its mirror's, N - k, comes from the same
    # three sums), so fp32 sums would cost it ~1e-7 of the largest score in absolute error; in float64 it is as
    # accurate as squaring fp32 coefficients (picks among scores ~1e-8 of the largest differed otherwise)
    V = torch.view_as_real(torch.fft.rfft(X, dim=-1)).double()  # B x rows x h x 2
    sums = torch.cat([V.square().sum(dim=1), (V[..., 0] * V[..., 1]).sum(dim=1).unsqueeze(-1)], dim=-1)  # B x h x 3
    return (sums[:, src] * weights).sum(dim=-1).float()


# gradients scored together at a refresh: up to 2^26 elements (256 MB of fp32; with the FFT and the float64 sums of
# its half spectrum about 4x that at the peak)
_DCT_BATCH_ELEMENTS = 1 << 26
_DCT_BATCH_ON_CPU = False  # (tests set it: the GPU's batched path, run on the CPU)


def dct_pick(scores: torch.Tensor, r: int) -> torch.Tensor:
    """The r best-aligned basis vectors: int64 (r,), by decreasing score, ties to the lower index (a stable
    sort), -1 where r exceeds the basis size."""
    order = torch.sort(scores, descending=True, stable=True).indices  # along the last dim (a batch: rows)
    n = order.shape[-1]
    if r <= n:
        return order[..., :r]
    return torch.cat([order, order.new_full(order.shape[:-1] + (r - n,), -1)], dim=-1)


class Projector:
    """How one low-rank group's projections are made at a refresh (every ``update_proj_gap`` steps of a
    param). The core calls `matrix` for the full P of a param (r x n tall, m x r wide, fp32), from the
    seed chain and epoch, or from the state a data-dependent projection keeps (`state_like`), which
    `refresh_states` computes from the gradient at the refresh step."""

    kind = "random"
    stateful = False  # keeps state beyond the seed (saved in checkpoints as "projection")

    def state_like(self, m: int, n: int, r: int, device: torch.device) -> Optional[torch.Tensor]:
        """A fresh state buffer of one param (None: the projection keeps none)."""
        return None

    def matrix(self, m: int, n: int, r: int, device: torch.device, seed: int, state: Optional[torch.Tensor]):
        """The full P of an m x n param (fp32)."""
        return random_projection(projection_shape(m, n, r), r, seed, device)

    def decide(self, G: torch.Tensor, r: int) -> torch.Tensor:
        """The state of a param from its whole fp32 gradient G (m x n)."""
        raise NotImplementedError

    def decide_all(self, grads: list[Callable[[], torch.Tensor]], shapes: list[tuple[int, int]], r: int) -> list:
        """The states of several params at once (one process): ``grads`` give each whole fp32 gradient when
        called (so no more than a batch of them need exist at a time, e.g. copied to the GPU under offload)."""
        return [self.decide(g(), r) for g in grads]

    def scores_rows(self, m: int, n: int) -> bool:
        """Whether partial results of row shards add up (then `local_scores` + one all-reduce replace the
        whole gradient)."""
        return False


class SVDProjector(Projector):
    """The reference's SVD projection (apollo-torch's ``proj="svd"``, GaLore's, ``proj_type="std"``):
    torch.linalg.svd(G, full_matrices=False) of the whole fp32 gradient; tall: P = Vh[:r] (r x n),
    wide: P = U[:, :r] (m x r). The same LAPACK / cuSOLVER call on the same matrix: the same signs."""

    kind = "svd"
    stateful = True

    def state_like(self, m, n, r, device):
        return torch.zeros(projection_shape(m, n, r), device=device)

    def matrix(self, m, n, r, device, seed, state):
        return state

    def decide(self, G, r):
        m, n = G.shape
        if not bool(torch.isfinite(G).all()):  # the step is skipped or raises; LAPACK would fail on it first
            return torch.full(projection_shape(m, n, r), float("nan"), device=G.device)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        return _pad_rows(Vh[:r], r) if m >= n else _pad_rows(U[:, :r].T, r).T.contiguous()


class DCTProjector(Projector):
    """SVD-free projection (arXiv 2505.17967): the r vectors of the orthonormal DCT-II basis (n-point for tall
    G, projecting rows; m-point for wide, projecting columns) best aligned with the gradient at the refresh
    (`dct_scores`, `dct_pick`); only the r indices are kept (int64, -1 beyond the basis size)."""

    kind = "dct"
    stateful = True

    def state_like(self, m, n, r, device):
        return torch.full((r,), -1, dtype=torch.int64, device=device)

    def matrix(self, m, n, r, device, seed, state):
        tall = m >= n
        basis = _dct_basis_and_zero(n if tall else m, device)
        # -1 (r beyond the basis size; any negative, as before) selects the zero row below the basis: no host
        # sync. The state may live elsewhere than the basis (ZeRO-Offload: state on the CPU, basis on the GPU)
        rows = basis[state.to(basis.device).clamp(min=-1)]
        return rows if tall else rows.T  # (the caller copies it into its P)

    def decide(self, G, r):
        return dct_pick(dct_scores(G, G.shape[0] >= G.shape[1]), r)

    def decide_all(self, grads, shapes, r):
        # The gradients of one shape scored in batches (one FFT, one sort per batch): a refresh of a LLaMA's
        # hundreds of weights is otherwise a dozen small kernels each, and the GPU waits on their launches.
        out: list = [None] * len(grads)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (m, n) in enumerate(shapes):
            groups.setdefault((max(m, n), min(m, n)), []).append(i)  # (rows, N) of the side scored
        for (rows, N), members in groups.items():
            G = grads[members[0]]()  # (fetched once: it is the first batch's first gradient)
            device, dtype = G.device, G.dtype
            # on the CPU one at a time: a gradient stays in cache through its passes, a batch would not
            per = 1 if device.type == "cpu" and not _DCT_BATCH_ON_CPU else max(1, _DCT_BATCH_ELEMENTS // (rows * N))
            order = _makhoul_order(N, device)
            for k in range(0, len(members), per):
                chunk = members[k : k + per]
                buf = torch.empty(len(chunk), rows, N, device=device, dtype=dtype)
                for b, i in enumerate(chunk):
                    G = grads[i]() if G is None else G
                    torch.index_select(G if G.shape[0] >= G.shape[1] else G.T, -1, order, out=buf[b])
                    G = None  # only the batch's buffer holds gradients (under offload: GPU copies)
                picks = dct_pick(_reordered_scores(buf), r)
                del buf
                for b, i in enumerate(chunk):
                    out[i] = picks[b]
        return out

    def scores_rows(self, m, n):
        return m >= n


def make_projector(kind: str) -> Projector:
    """The `Projector` of ``proj`` (one of `PROJECTIONS`)."""
    table = {"random": Projector, "svd": SVDProjector, "dct": DCTProjector}
    if kind not in table:
        raise ValueError(f"unknown proj={kind!r}: expected one of {PROJECTIONS}")
    return table[kind]()


@dataclass
class RefreshItem:
    """One param whose data-dependent projection refreshes now, as this rank sees it."""

    index: int  # its position (which rank decides it, where no other rule does)
    m: int
    n: int
    rows: Optional[torch.Tensor]  # this rank's gradient rows (zeros where it holds nothing), None: none held
    row0: int  # where they sit in G: rows [row0, row0 + rows) x columns [col0, col0 + width)
    col0: int
    whole_rows: bool  # every rank holds whole rows of it (so row-shard partial scores add up)
    out: torch.Tensor  # its state buffer, written on every rank


def _whole(it: RefreshItem) -> torch.Tensor:
    """The whole fp32 gradient from one rank's rows (one process: they are the whole)."""
    if it.rows is not None and tuple(it.rows.shape) == (it.m, it.n):
        return it.rows.float()
    G = torch.zeros(it.m, it.n, device=it.out.device)
    if it.rows is not None:
        G[it.row0 : it.row0 + it.rows.shape[0], it.col0 : it.col0 + it.rows.shape[1]] = it.rows
    return G


def _on(t: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return t if device is None else t.to(device)


def decision_ranks(items: list[RefreshItem], world: int) -> list[int]:
    """Which rank decides each item: largest first (cost m n min(m, n)) to the least loaded rank, ties to the
    rank nearest after the item's position (a bucket of one param, layer-wise, goes to position % W). The
    same on every rank (a function of shapes and positions only)."""
    load = [0] * world
    out = [0] * len(items)
    for k in sorted(range(len(items)), key=lambda k: (-items[k].m * items[k].n * min(items[k].m, items[k].n), k)):
        it = items[k]
        d = min(range(world), key=lambda w: (load[w], (w - it.index) % world))
        out[k] = d
        load[d] += it.m * it.n * min(it.m, it.n)
    return out


def refresh_states(
    proj: Projector, items: list[RefreshItem], r: int, comm: Any, compute: Optional[torch.device] = None
) -> None:
    """Compute the projection state of every item into its ``out`` on every rank of ``comm`` (a collective:
    every rank calls it with the same items, in the same order). ``compute``: where the scores and SVDs run
    (the generator device: under ZeRO-Offload the GPU, as without offload, so both decide alike), else where
    the gradient is.

    W = 1: from the gradient directly. W > 1: where row-shard partial scores add up (DCT, tall, whole rows
    on every rank), each rank scores its rows and one all-reduce of the concatenated score vectors gives
    every rank the same selection; the others are divided among the ranks (`decision_ranks`): per round,
    one reduce-scatter assembles each decider's whole gradient (every rank sends its held elements,
    zeros elsewhere: the sum is exact), each decides its own, one all-gather hands the results to all."""
    if comm.world == 1:
        grads = [lambda it=it: _on(_whole(it), compute) for it in items]
        for it, state in zip(items, proj.decide_all(grads, [(it.m, it.n) for it in items], r)):
            it.out.copy_(state)
        return
    local = [it for it in items if it.whole_rows and proj.scores_rows(it.m, it.n)]
    if local:
        parts = [
            dct_scores(_on(it.rows.float(), compute), True)
            if it.rows is not None
            else torch.zeros(it.n, device=compute or it.out.device)
            for it in local
        ]
        scores = comm.all_reduce(torch.cat(parts))
        k = 0
        for it in local:
            it.out.copy_(dct_pick(scores[k : k + it.n], r))
            k += it.n
    rest = [it for it in items if not (it.whole_rows and proj.scores_rows(it.m, it.n))]
    if not rest:
        return
    world, me = comm.world, comm.rank
    deciders = decision_ranks(rest, world)
    queues = [[it for it, d in zip(rest, deciders) if d == w] for w in range(world)]
    device = rest[0].out.device
    for j in range(max(len(q) for q in queues)):
        pick = [q[j] if j < len(q) else None for q in queues]
        seg = max(it.m * it.n for it in pick if it is not None)
        send = torch.zeros(world, seg, device=device)
        for w, it in enumerate(pick):
            if it is not None and it.rows is not None:
                block = send[w, : it.m * it.n].view(it.m, it.n)
                block[it.row0 : it.row0 + it.rows.shape[0], it.col0 : it.col0 + it.rows.shape[1]] = it.rows
        G = comm.reduce_scatter(send.view(-1))
        mine = pick[me]
        size = max(it.out.numel() for it in pick if it is not None)
        result = torch.zeros(size, dtype=rest[0].out.dtype, device=device)
        if mine is not None:
            decided = proj.decide(_on(G[: mine.m * mine.n].view(mine.m, mine.n), compute), r)
            result[: decided.numel()] = decided.reshape(-1)
        every = comm.all_gather(result).view(world, size)
        for w, it in enumerate(pick):
            if it is not None:
                it.out.copy_(every[w, : it.out.numel()].view(it.out.shape))
