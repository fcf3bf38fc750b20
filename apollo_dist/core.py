"""The sharded APOLLO step over "the elements of each parameter this rank holds" (DESIGN.md §1, §2).

A bucket is one param group. ``LowRankBucket`` runs APOLLO on the group's 2-D weights; ``AdamBucket``
runs the reference's plain Adam on everything else. Each works on `Slot`s (this rank's contiguous
flat element range of one parameter, or a rectangular block of it), so the same code serves one
process, FSDP2 (FSDP, HSDP, x tensor parallel), ZeRO-1/2/3 and layouts given through ``APOLLO.bind``.

Per step a low-rank bucket does, with the numbers of DESIGN.md §1:
  1. R = G P^T (tall) / P^T G (wide) for the channels this rank touches (kept channel-major, C x r);
  2. one reduce-scatter sends partial R of shared channels to their owner;
  3. the owner runs Adam on R and computes the scaling factor of each channel (3);
  4. one all-gather returns shared factors, one all-reduce gives per-param norms (3, 5);
  5. every rank scales its raw gradient elements, applies the limiter and the update (4-6).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from .kernels import MultiAdam, MultiProjection, MultiUpdate, channel_adam_, scaled_update_eager
from .layout import ParamLayout, build_comm_plan, matrix_dims, touched_channels
from .projection import SeedChain, projection_shape, random_projection

# torch 2.13 renames these collectives (*_single); the old names work on every version we support.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.\w+_single`")

NORM_EPS = 1e-8  # the reference's epsilon in the scaling factor and the limiter
LIMITER_GROWTH = 1.01  # the reference's norm-growth bound per step


@dataclass
class Slot:
    """What this rank holds of one parameter: flat row-major elements [start, end) of ``shape``, or,
    when ``block`` is set, the rectangle rows [r0, r1) x columns [c0, c1) of a 2-D parameter (tensor
    parallelism splits columns; ``start``/``end`` are then unused and 0). ``data`` and ``grad()`` are
    the held elements row-major (a block's rows of c1 - c0 elements each)."""

    param: torch.Tensor  # the user's parameter object (key of optimizer.state)
    index: int  # position among all params given to the optimizer (initial seed = index + 1)
    shape: tuple[int, ...]  # global shape
    start: int
    end: int
    data: torch.Tensor  # 1-D view of the held elements (fp32 master weights, updated in place)
    grad: Callable[[], Optional[torch.Tensor]]  # this step's 1-D gradient of the held elements
    block: Optional[tuple[int, int, int, int]] = None  # (r0, r1, c0, c1) instead of [start, end)
    owned: Optional[tuple[int, int]] = None  # channels whose moments this rank keeps, where the engine fixes
    # them (FSDP2: the moments' DTensor placements); None: the optimizer's rule

    @property
    def numel(self) -> int:
        if self.block is not None:
            r0, r1, c0, c1 = self.block
            return max(0, r1 - r0) * max(0, c1 - c0)
        return self.end - self.start

    @property
    def holding(self) -> tuple[int, ...]:
        """(start, end), or the block (r0, r1, c0, c1): what layout.touched_channels reads."""
        return self.block if self.block is not None else (self.start, self.end)


def bias_corrected_step_size(lr: float, betas: tuple[float, float], step: int, correct_bias: bool) -> float:
    """lr * sqrt(1 - b2^t) / (1 - b1^t), or lr without correction (DESIGN.md §1.2)."""
    if not correct_bias:
        return lr
    b1, b2 = betas
    return lr * math.sqrt(1.0 - b2**step) / (1.0 - b1**step)


def _padded_rows(lengths: list[int], width: int) -> torch.Tensor:
    """(len(lengths), width) positions of consecutive segments of a sum(lengths) vector, padded with sum(lengths)."""
    total = sum(lengths)
    index = torch.full((len(lengths), width), total, dtype=torch.int64)
    start = 0
    for i, k in enumerate(lengths):
        index[i, :k] = torch.arange(start, start + k)
        start += k
    return index


def segment_index(lengths: list[int], device: torch.device, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tables for `segment_sums` over consecutive segments of ``lengths``: segments cut into chunks
    of <= ``chunk`` elements, then segments as runs of chunks (memory ~ sum(lengths), not segments x longest)."""
    pieces = [[min(chunk, k - s) for s in range(0, k, chunk)] for k in lengths]
    flat = [p for ps in pieces for p in ps]
    width = min(chunk, max(lengths, default=0))
    return _padded_rows(flat, width).to(device), _padded_rows([len(ps) for ps in pieces], max((len(ps) for ps in pieces), default=0)).to(device)


def segment_sums(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-segment sums of the rows of x (k, C) -> (k, segments), segments given by `segment_index`.

    Two gathers and tree sums: deterministic and fast on GPUs (an index_add_ into a few hundred
    params serializes on atomics; a prefix sum over C is a slow scan)."""
    chunks, segments = index
    per_chunk = torch.nn.functional.pad(x, (0, 1))[:, chunks].sum(dim=-1)
    return torch.nn.functional.pad(per_chunk, (0, 1))[:, segments].sum(dim=-1)


class Geometry(NamedTuple):
    """Where one slot sits: its (m x n) matrix, the rows [row0, row0 + rows) its elements span, each
    held as ``width`` columns from ``col0`` (a flat range: whole rows, col0 = 0, width = n; ``off``: its
    first element inside them; ``aligned``: it starts and ends on row boundaries; a block: its
    rectangle, always aligned), the channels it touches [t0, t1) and the channels this rank owns [o0, o1)."""

    m: int
    n: int
    tall: bool
    row0: int
    rows: int
    off: int
    aligned: bool
    t0: int
    t1: int
    o0: int
    o1: int
    col0: int
    width: int


class Collectives:
    """The three collectives of a step, or nothing when W = 1."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    def reduce_scatter(self, send: torch.Tensor) -> torch.Tensor:
        out = send.new_empty((send.shape[0] // self.world,) + tuple(send.shape[1:]))
        dist.reduce_scatter_tensor(out, send, group=self.group)
        return out

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        out = mine.new_empty((mine.shape[0] * self.world,) + tuple(mine.shape[1:]))
        dist.all_gather_into_tensor(out, mine, group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class AdamBucket:
    """The reference's plain Adam (eps outside the sqrt, decoupled decay after the update) on held elements."""

    def __init__(self, group_index: int, slots: list[Slot]):
        self.group_index = group_index
        self.slots = slots
        numel = sum(s.numel for s in slots)
        device = slots[0].data.device if slots else torch.device("cpu")
        self.adam = MultiAdam([s.data for s in slots], torch.zeros(numel, device=device), torch.zeros(numel, device=device))
        self.exp_avg, self.exp_avg_sq = self.adam.m, self.adam.v  # per-slot views of the flat moments
        self.step_count = torch.zeros((), dtype=torch.float32)  # shared by the group's params

    def prepare(self, group: dict) -> None:
        """Fetch this step's gradients."""
        self.grads = [g if g is not None else torch.zeros_like(s.data) for s, g in ((s, s.grad()) for s in self.slots)]

    def nonfinite(self) -> torch.Tensor:
        """1.0 (a 0-dim tensor) if a gradient ``prepare`` fetched holds inf/NaN, else 0.0 (one extra read)."""
        if not self.grads:
            return torch.zeros(())
        return (~torch.isfinite(torch.stack(torch._foreach_norm(self.grads)).sum())).float()

    def finish(self, group: dict) -> None:
        """The update with the gradients ``prepare`` fetched."""
        grads, self.grads = self.grads, None
        if not self.slots:
            return
        b1, b2 = group["betas"]
        self.step_count += 1
        step_size = bias_corrected_step_size(group["lr"], group["betas"], int(self.step_count), group["correct_bias"])
        self.adam(grads, b1, b2, group["eps"], step_size, -group["lr"] * group["weight_decay"])


class LowRankBucket:
    """APOLLO on the 2-D weights of one param group, over this rank's slots (DESIGN.md §1, §2)."""

    def __init__(
        self,
        group_index: int,
        slots: list[Slot],
        layouts: list[ParamLayout],
        group: dict,
        comm: Collectives,
        device: torch.device,
    ):
        self.group_index = group_index
        self.slots = slots
        self.layouts = layouts
        self.comm = comm
        self.device = device
        self.rank_r = int(group["rank"])
        self.plan = build_comm_plan(layouts, comm.rank, comm.world, device)
        self.seeds = [SeedChain(s.index + 1) for s in slots]
        self.proj: list[Optional[torch.Tensor]] = [None] * len(slots)
        self.proj_epoch = -1

        # Per-slot geometry: touched channels (rows of T), owned channels (rows of O), padded rows of G.
        self.t_off, self.o_off, self.geom = [], [], []
        t_off = o_off = 0
        t_param = []
        for i, (s, lay) in enumerate(zip(slots, layouts)):
            m, n = lay.m, lay.n
            t0, t1 = touched_channels(m, n, *s.holding)
            o0, o1 = lay.owners[comm.rank]
            if s.block is not None:
                r0, r1, c0, c1 = s.block
                rows = r1 - r0 if s.numel else 0
                self.geom.append(Geometry(m, n, lay.tall, r0, rows, 0, True, t0, t1, o0, o1, c0, c1 - c0))
            else:
                row0 = s.start // n
                rows = (-(-s.end // n) - row0) if s.end > s.start else 0
                aligned = s.start % n == 0 and s.end % n == 0
                self.geom.append(Geometry(m, n, lay.tall, row0, rows, s.start - row0 * n, aligned, t0, t1, o0, o1, 0, n))
            self.t_off.append(t_off)
            self.o_off.append(o_off)
            t_param.append(torch.full((t1 - t0,), i, dtype=torch.int64))
            t_off += t1 - t0
            o_off += o1 - o0
        self.t_param = torch.cat(t_param).to(device) if slots else torch.zeros(0, dtype=torch.int64, device=device)
        # owned channels of each slot are consecutive: per-param sums are segment sums
        self.o_segments = segment_index([g.o1 - g.o0 for g in self.geom], device)
        r = self.rank_r
        self.T_R = torch.zeros(t_off, r, device=device)  # partial R of touched channels (scratch)
        self.T_g = torch.zeros(t_off, device=device)  # partial ||G_c||^2 of touched channels (scratch)
        self.exp_avg = torch.zeros(o_off, r, device=device)  # moments of owned channels (state)
        self.exp_avg_sq = torch.zeros(o_off, r, device=device)
        self.limiter_norm = torch.full((len(slots),), -1.0, device=device)  # q of §1.5; < 0: none yet
        self.step_count = torch.zeros((), dtype=torch.float32)  # t of §1, shared by the group's params
        # Slots holding any row: their R and ||G_c||^2 come from one multi-tensor projection.
        self.active = [i for i, g in enumerate(self.geom) if g.rows > 0]
        self.project = MultiProjection([(self.geom[i].rows, self.geom[i].width, self.geom[i].tall, self.t_off[i]) for i in self.active], r, device)
        # Row-aligned blocks (the usual case) are updated by one fused launch; the rest one by one.
        self.aligned = [i for i, g in enumerate(self.geom) if g.aligned and g.rows > 0]
        self.unaligned = [i for i, g in enumerate(self.geom) if not g.aligned and g.rows > 0]
        self.update = MultiUpdate(
            [slots[i].data.view(self.geom[i].rows, self.geom[i].width) for i in self.aligned],
            [self.geom[i].tall for i in self.aligned],
            [self.t_off[i] for i in self.aligned],
        )

    # -- projections --------------------------------------------------------------------------
    def _refresh_projections(self, epoch: int) -> None:
        """Regenerate every P for ``epoch`` and keep only the part this rank multiplies with."""
        for i, s in enumerate(self.slots):
            g = self.geom[i]
            if g.rows == 0:
                self.proj[i] = None
                continue
            P = random_projection(projection_shape(g.m, g.n, self.rank_r), self.rank_r, self.seeds[i](epoch), self.device)
            # tall: R = G P^T, keep P's held columns (r x width); wide: R^T = G^T P, keep P's held rows (rows x r)
            if g.tall:
                self.proj[i] = P if g.width == g.n else P[:, g.col0 : g.col0 + g.width].contiguous()
            else:
                self.proj[i] = P[g.row0 : g.row0 + g.rows].contiguous()
        self.proj_epoch = epoch

    def _grad_rows(self, i: int) -> Optional[torch.Tensor]:
        """This rank's gradient as rows (rows x width: whole rows of a flat range, zeros where it holds
        nothing; a block's rectangle)."""
        s = self.slots[i]
        m, n, tall, row0, rows, off, aligned, *_, width = self.geom[i]
        if rows == 0:
            return None
        g = s.grad()
        if g is None:
            g = torch.zeros_like(s.data)
        if g.dtype != torch.float32:
            g = g.float()
        if aligned:
            return g.view(rows, width)
        padded = torch.zeros(rows * n, device=g.device, dtype=g.dtype)
        padded[off : off + s.numel].copy_(g)
        return padded.view(rows, n)

    # -- the step -----------------------------------------------------------------------------
    def prepare(self, group: dict) -> None:
        """Step 1 (no communication): partial R and ||G_c||^2 of the touched channels."""
        t = int(self.step_count)  # 0 before the first update
        epoch = t // int(group["update_proj_gap"])
        if epoch != self.proj_epoch:
            self._refresh_projections(epoch)
        self.grads = grads = [self._grad_rows(i) for i in range(len(self.slots))]
        self.project([grads[i] for i in self.active], [self.proj[i] for i in self.active], self.T_R, self.T_g,
                     tf32=group.get("projection_tf32", False))

    def nonfinite(self) -> torch.Tensor:
        """1.0 (a 0-dim tensor) if this rank's gradient has an inf/NaN (then some ||G_c||^2 has), else 0.0."""
        return (~torch.isfinite(self.T_g.sum())).float()

    def finish(self, group: dict) -> None:
        """Steps 2-6 with what ``prepare`` computed."""
        r, plan, comm = self.rank_r, self.plan, self.comm
        grads, self.grads = self.grads, None
        t = int(self.step_count)

        # 2. R of owned channels: local ones copied, shared ones reduce-scattered from their touchers.
        if plan.identity:
            R, R_g = self.T_R, self.T_g
        else:
            R = self.T_R.new_zeros(self.exp_avg.shape)
            R_g = self.T_g.new_zeros(self.exp_avg.shape[0])
            R[plan.local_dst] = self.T_R[plan.local_src]
            R_g[plan.local_dst] = self.T_g[plan.local_src]
        if plan.seg > 0:  # some channel is shared somewhere: every rank joins
            send = self.T_R.new_zeros(comm.world * plan.seg, r + 1)
            send[plan.send_dst, :r] = self.T_R[plan.send_src]
            send[plan.send_dst, r] = self.T_g[plan.send_src]
            recv = comm.reduce_scatter(send)
            k = len(plan.recv_dst)
            R[plan.recv_dst] = recv[:k, :r]
            R_g[plan.recv_dst] = recv[:k, r]

        # 3. Adam on R (owned channels), normalized gradient N, scaling factor per channel.
        b1, b2 = group["betas"]
        self.step_count += 1
        t += 1
        n_sq, r_sq = channel_adam_(R, self.exp_avg, self.exp_avg_sq, b1, b2, group["eps"])
        channel = group["scale_type"] == "channel"
        if channel:
            s_own = n_sq.sqrt() / (r_sq.sqrt() + NORM_EPS)
        # per param: sum ||N_c||^2, sum ||R_c||^2, sum s_c^2 ||G_c||^2 (channel) or sum ||G_c||^2 (tensor)
        stats = segment_sums(torch.stack([n_sq, r_sq, s_own.square() * R_g if channel else R_g]), self.o_segments)

        # 4. Shared factors back to every toucher; per-param norms summed over ranks.
        if comm.world > 1:
            comm.all_reduce(stats)
            if channel and plan.seg > 0:
                mine = s_own.new_zeros(plan.seg)
                mine[: len(plan.recv_dst)] = s_own[plan.recv_dst]
                s_shared = comm.all_gather(mine)
        if channel:
            if plan.identity:
                s_touch = s_own
            else:
                s_touch = s_own.new_zeros(len(self.T_g))
                s_touch[plan.local_src] = s_own[plan.local_dst]
                if len(plan.send_src):
                    s_touch[plan.send_src] = s_shared[plan.send_dst]
            u_sq = stats[2]
        else:
            s_param = stats[0].sqrt() / (stats[1].sqrt() + NORM_EPS)
            u_sq = s_param.square() * stats[2]

        # 5. Norm-growth limiter, per parameter (vectorized over the bucket).
        sqrt_scale = math.sqrt(group["scale"])
        u_norm = u_sq.sqrt() * (sqrt_scale if group["scale_front"] else 1.0)
        if group["disable_nl"]:
            limiter = torch.ones_like(u_norm)
        else:
            q = self.limiter_norm
            limiter = torch.where(q >= 0, torch.clamp_min(u_norm / (q + NORM_EPS), LIMITER_GROWTH) / LIMITER_GROWTH, 1.0)
            self.limiter_norm.copy_(u_norm / limiter)
        step_size = bias_corrected_step_size(group["lr"], group["betas"], t, group["correct_bias"])
        coef_param = step_size * sqrt_scale / limiter
        coef = s_touch * coef_param[self.t_param] if channel else (s_param * coef_param)[self.t_param]

        # 6. p -= step_size * U; then decoupled weight decay (one fused pass on GPU).
        decay = -group["lr"] * group["weight_decay"]
        self.update([grads[i] for i in self.aligned], coef, decay)
        for i in self.unaligned:  # a piece cut mid-row: update its zero-padded rows, keep the held elements
            s, G = self.slots[i], grads[i]
            m, n, tall, row0, rows, off, aligned, t0, t1, *_ = self.geom[i]
            block = s.data.new_zeros(rows * n)
            block[off : off + s.numel] = s.data
            scaled_update_eager(block.view(rows, n), G, coef[self.t_off[i] : self.t_off[i] + t1 - t0], tall, decay)
            s.data.copy_(block[off : off + s.numel])
