"""The sharded APOLLO step over "the elements of each parameter this rank holds" (DESIGN.md §1, §2).

A bucket is one param group. ``LowRankBucket`` runs APOLLO on the group's 2-D weights; ``AdamBucket``
runs the reference's plain Adam on everything else. Each works on `Slot`s (this rank's contiguous
flat element range of one parameter, or a rectangular block of it), so the same code serves one
process, FSDP2 (FSDP, HSDP, x tensor parallel), ZeRO-1/2/3 and layouts given through ``APOLLO.bind``.

A step is ``begin`` (on the host: this step's scalars, the projections of a new epoch, the gradients),
``prepare`` (step 1), then ``finish`` (steps 2-6), each step one method of LowRankBucket (DESIGN.md §1's
numbers in brackets). ``prepare`` and ``finish`` only launch device work (no host sync, no host-side
value that changes between steps), so the optimizer may capture them in a CUDA graph (apollo_dist.step_graph);
the step counter ``t`` is advanced by the optimizer once the step is known to have been taken.
  1. ``prepare``: R = G P^T (tall) / P^T G (wide) for the channels this rank touches (kept channel-major, C x r) [1];
  2. ``_owned_R``: one reduce-scatter sends partial R of shared channels to their owner;
  3. ``_adam``: the owner runs Adam on R and computes the scaling factor of each channel [2, 3];
  4. ``_scaling_factors``: one all-gather returns shared factors, one all-reduce gives per-param norms [3, 5];
  5. ``_limiter``: the norm-growth limiter, per param [5];
  6. ``_update``: every rank scales its raw gradient elements and applies the update and the decay [4, 6].

Glossary (one low-rank bucket; "rank" alone always means a process):
  r            the projection rank (the param-group key "rank", as in the reference's API)
  m x n, tall  a weight's gradient G; tall when m >= n (wide otherwise)
  C, channel   the rows of G (tall) or its columns (wide); R, N and the moments are kept C x r
  touched      channels of which this rank holds gradient elements; owned: channels whose moments it keeps
  T_R, T_g     partial R and partial ||G_c||^2 of the touched channels (scratch, touched x r / touched)
  R, R_g       full R and ||G_c||^2 of the owned channels (after the reduce-scatter)
  n_sq, r_sq   ||N_c||^2, ||R_c||^2 of the owned channels
  s_own        scaling factor of each owned channel; s_touch: of each touched channel (after the all-gather)
  q            ``limiter_norm``: the limiter's previous ||U|| per param (< 0: none yet)
  t            ``step_count``: per param, the optimizer steps that updated it (0 before its first update); a
               param without gradient in a step is skipped, as the reference skips it (``live`` in `StepScalars`)
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .kernels import (
    MultiAdam,
    MultiProjection,
    MultiUpdate,
    StepScalars,
    channel_adam_,
    fused,
    scaled_update_eager,
    skipped,
)
from .layout import ParamLayout, build_comm_plan, touched_channels
from .projection import RefreshItem, SeedChain, make_projector, refresh_states

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
    model_copy: Optional[Callable[[], torch.Tensor]] = None  # where the engine keeps the model's own copy
    # of the held elements apart from ``data`` (ZeRO-3: the param's partition), flat; None: it keeps none,
    # or the whole param on every rank (ZeRO-1/2) — what a checkpoint load must update besides ``data``
    seed: Optional[int] = None  # initial seed; None: index + 1 (positions count fused experts, apollo_dist.experts)
    expert: Optional[int] = None  # which expert slice of a fused 3-D weight this is (``shape`` is the slice's)

    @property
    def initial_seed(self) -> int:
        return self.seed if self.seed is not None else self.index + 1

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


def param_step_sizes(group: dict, steps: list[float], factor: float) -> list[float]:
    """Each param's step size at its step t + 1 (``steps``: the steps that updated each so far), times
    ``factor``; computed once per distinct t (params share their count unless some lacked a gradient)."""
    size = {
        t: bias_corrected_step_size(group["lr"], group["betas"], int(t) + 1, group["correct_bias"]) * factor
        for t in set(steps)
    }
    return [size[t] for t in steps]


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
    return _padded_rows(flat, width).to(device), _padded_rows(
        [len(ps) for ps in pieces], max((len(ps) for ps in pieces), default=0)
    ).to(device)


def segment_sums(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-segment sums of the rows of x (k, C) -> (k, segments), segments given by `segment_index`.

    Two gathers and tree sums: deterministic and fast on GPUs (an index_add_ into a few hundred
    params serializes on atomics; a prefix sum over C is a slow scan)."""
    chunks, segments = index
    per_chunk = torch.nn.functional.pad(x, (0, 1))[:, chunks].sum(dim=-1)
    return torch.nn.functional.pad(per_chunk, (0, 1))[:, segments].sum(dim=-1)


@dataclass(frozen=True)
class Geometry:
    """Where one slot sits in its (m x n) matrix."""

    m: int
    n: int
    tall: bool
    row0: int  # the rows [row0, row0 + rows) its elements span,
    rows: int
    col0: int  # each held as ``width`` columns from col0 (a flat range: whole rows, col0 = 0, width = n)
    width: int
    off: int  # a flat range: its first element inside those rows
    aligned: bool  # it starts and ends on row boundaries (a block: always)
    t0: int  # the channels it touches [t0, t1)
    t1: int
    o0: int  # the channels this rank owns [o0, o1)
    o1: int


def slot_geometry(s: Slot, lay: ParamLayout, rank: int) -> Geometry:
    """The `Geometry` of slot ``s`` of a low-rank param laid out as ``lay``, on process ``rank``."""
    m, n = lay.m, lay.n
    t0, t1 = touched_channels(m, n, *s.holding)
    o0, o1 = lay.owners[rank]
    if s.block is not None:
        r0, r1, c0, c1 = s.block
        rows = r1 - r0 if s.numel else 0
        return Geometry(
            m, n, lay.tall, row0=r0, rows=rows, col0=c0, width=c1 - c0, off=0, aligned=True, t0=t0, t1=t1, o0=o0, o1=o1
        )
    row0 = s.start // n
    rows = (-(-s.end // n) - row0) if s.end > s.start else 0
    aligned = s.start % n == 0 and s.end % n == 0
    return Geometry(
        m,
        n,
        lay.tall,
        row0=row0,
        rows=rows,
        col0=0,
        width=n,
        off=s.start - row0 * n,
        aligned=aligned,
        t0=t0,
        t1=t1,
        o0=o0,
        o1=o1,
    )


class Collectives:
    """The three collectives of a step, or nothing when W = 1. ``stage``: the device they run on when the
    tensors live elsewhere (ZeRO-Offload: state on the CPU, an NCCL group), copied there and back."""

    def __init__(self, group: Optional[dist.ProcessGroup], stage: Optional[torch.device] = None):
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.stage = stage

    def _on_stage(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stage is None or x.device == self.stage else x.to(self.stage)

    def reduce_scatter(self, send: torch.Tensor) -> torch.Tensor:
        src = self._on_stage(send)
        out = src.new_empty((send.shape[0] // self.world,) + tuple(send.shape[1:]))
        dist.reduce_scatter_tensor(out, src, group=self.group)
        return out.to(send.device)

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        src = self._on_stage(mine)
        out = src.new_empty((mine.shape[0] * self.world,) + tuple(mine.shape[1:]))
        dist.all_gather_into_tensor(out, src, group=self.group)
        return out.to(mine.device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        y = self._on_stage(x)
        dist.all_reduce(y, group=self.group)
        if y is not x:
            x.copy_(y)
        return x


class AdamBucket:
    """The reference's plain Adam (eps outside the sqrt, decoupled decay after the update) on held elements."""

    def __init__(self, group_index: int, slots: list[Slot]):
        self.group_index = group_index
        self.slots = slots
        numel = sum(s.numel for s in slots)
        device = slots[0].data.device if slots else torch.device("cpu")
        self.adam = MultiAdam(
            [s.data for s in slots], torch.zeros(numel, device=device), torch.zeros(numel, device=device)
        )
        self.exp_avg, self.exp_avg_sq = self.adam.m, self.adam.v  # per-slot views of the flat moments
        self.step_count = torch.zeros(len(slots), dtype=torch.float32)  # t per param (host)
        self.scalars = StepScalars(device, len(slots))
        self.fetched: list[Optional[torch.Tensor]] = []  # this step's gradients as the slots return them
        self._grads: Optional[list[torch.Tensor]] = None

    def begin(self, group: dict) -> None:
        """On the host: fetch the gradients; this step's bias-corrected lr per param, the decay, which params
        have a gradient here."""
        self.fetched = [s.grad() for s in self.slots]
        sizes = param_step_sizes(group, self.step_count.tolist(), 1.0)
        self.scalars.set(sizes, -group["lr"] * group["weight_decay"], [g is not None for g in self.fetched])

    def fused(self) -> bool:
        """Whether every write of ``finish`` runs in a fused kernel (a device-side skip flag gates them all)."""
        return not self.slots or (self.adam.on_gpu and fused(*(g for g in self.fetched if g is not None)))

    def direct_grads(self, group: dict) -> list[torch.Tensor]:
        """The gradients a captured step reads at fixed addresses: none (the kernels read them through
        their pointer table)."""
        return []

    def complete(self) -> bool:
        """Whether every slot has a gradient this step (a captured step needs real addresses)."""
        return all(g is not None for g in self.fetched)

    def point_at_grads(self) -> None:
        """Before a replay: the kernels' pointer tables at this step's gradients."""
        if self.adam.on_gpu:
            self.adam.g_ptrs(self.fetched)

    def prepare(self, group: dict) -> None:
        """The gradients as the kernels read them (a missing one counts as zero)."""
        self._grads = [g if g is not None else torch.zeros_like(s.data) for s, g in zip(self.slots, self.fetched)]

    def nonfinite(self) -> torch.Tensor:
        """1.0 (a 0-dim tensor) if a gradient ``begin`` fetched holds inf/NaN, else 0.0 (one extra read)."""
        if not self._grads:
            return torch.zeros((), device=self.scalars.tensor.device)
        return (~torch.isfinite(self.adam.sum_sq(self._grads))).float()

    def discard(self) -> None:
        """Drop the gradients ``begin`` fetched, after the step or instead of it (no reference to them
        outlives the step: zero_grad frees them)."""
        self.fetched, self._grads = [], None

    def finish(self, group: dict, skip: Optional[torch.Tensor] = None) -> None:
        """The update with the gradients ``begin`` fetched; none where ``skip`` (0-dim, on the device) > 0."""
        if not self.slots:
            return
        b1, b2 = group["betas"]
        self.adam(self._grads, b1, b2, group["eps"], self.scalars, skip)


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
        self.generator_device = device  # where P is drawn (build_buckets pins it: ZeRO-Offload draws on the GPU)
        self.r = r = int(group["rank"])
        self.plan = build_comm_plan(layouts, comm.rank, comm.world, device)
        self.seeds = [SeedChain(s.initial_seed) for s in slots]
        self.proj: list[Optional[torch.Tensor]] = [None] * len(slots)
        self.proj_epoch = [-1] * len(slots)  # per param: its own step count sets its projection's epoch
        # random / svd / dct (projection.Projector); svd and dct keep state per param (saved as "projection")
        self.projector = make_projector(group.get("proj", "random"))
        self.proj_state = [self.projector.state_like(lay.m, lay.n, r, device) for lay in layouts]
        self._refreshed: list[int] = []  # params whose data-dependent projection the last ``begin`` refreshed
        self._before: list[torch.Tensor] = []  # their states before it (a step not taken restores them)
        self._restore = False  # the next ``begin`` rebuilds P from loaded projection state
        self.fetched: list[Optional[torch.Tensor]] = []  # this step's gradients as the slots return them (flat)
        self._grads: Optional[list[Optional[torch.Tensor]]] = None

        # Per slot: its geometry, its first row of T (touched channels) and of O (owned channels).
        self.geom = [slot_geometry(s, lay, comm.rank) for s, lay in zip(slots, layouts)]
        touched = [g.t1 - g.t0 for g in self.geom]
        owned = [g.o1 - g.o0 for g in self.geom]
        self.t_off = list(itertools.accumulate(touched, initial=0))[:-1]
        self.o_off = list(itertools.accumulate(owned, initial=0))[:-1]
        # the slot of each touched channel: per-param coefficients expand to per-channel ones
        self.t_param = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(touched, dtype=torch.int64)).to(
            device
        )
        # ... and of each owned channel: a param without gradient keeps its channels' moments
        self.o_param = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(owned, dtype=torch.int64)).to(
            device
        )
        self.keep = torch.ones(sum(owned), device=device)  # per owned channel: its param is live (scratch)
        # owned channels of each slot are consecutive: per-param sums are segment sums
        self.o_segments = segment_index(owned, device)
        # expert slices of fused weights: an all-zero slice got no token, it is a param without gradient (§2.9)
        expert = [s.expert is not None for s in slots]
        self.expert_sums = segment_index(touched, device) if any(expert) else None
        self.is_expert = torch.tensor(expert, dtype=torch.bool).to(device)
        self.T_R = torch.zeros(sum(touched), r, device=device)  # partial R of touched channels (scratch)
        self.T_g = torch.zeros(sum(touched), device=device)  # partial ||G_c||^2 of touched channels (scratch)
        self.exp_avg = torch.zeros(sum(owned), r, device=device)  # moments of owned channels (state)
        self.exp_avg_sq = torch.zeros(sum(owned), r, device=device)
        self.limiter_norm = torch.full((len(slots),), -1.0, device=device)  # q of §1.5; < 0: none yet
        self.step_count = torch.zeros(len(slots), dtype=torch.float32)  # t of §1 per param (host)
        # this step's lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) per param, decay, which params are live
        self.scalars = StepScalars(device, len(slots))
        # Slots holding any row: their R and ||G_c||^2 come from one multi-tensor projection.
        self.active = [i for i, g in enumerate(self.geom) if g.rows > 0]
        self.project = MultiProjection(
            [(self.geom[i].rows, self.geom[i].width, self.geom[i].tall, self.t_off[i]) for i in self.active],
            r,
            device,
            [
                id(slots[i].param) if slots[i].expert is not None else None for i in self.active
            ],  # batched per fused weight
        )
        # Row-aligned blocks (the usual case) are updated by one fused launch; the rest one by one.
        self.aligned = [i for i, g in enumerate(self.geom) if g.aligned and g.rows > 0]
        self.unaligned = [i for i, g in enumerate(self.geom) if not g.aligned and g.rows > 0]
        self.update = MultiUpdate(
            [slots[i].data.view(self.geom[i].rows, self.geom[i].width) for i in self.aligned],
            [self.geom[i].tall for i in self.aligned],
            [self.t_off[i] for i in self.aligned],
        )
        self.aligned_t = torch.tensor(self.aligned, dtype=torch.int64).to(device)
        # Set by the optimizer where the engine's gradient store is zeroed after each step (ZeRO-3 without offload):
        # the CPU update zeroes the gradients it reads, and ``zeroed`` (address, numel) tells the clearer what is done.
        self.zero_grads = False
        self.zeroed: list[tuple[int, int]] = []
        self.aligned_live = torch.ones(len(self.aligned), device=device)  # scratch: live of the aligned slots

    # -- state --------------------------------------------------------------------------------
    def owned_rows(self, i: int) -> slice:
        """The rows of ``exp_avg`` / ``exp_avg_sq`` holding slot ``i``'s owned channels."""
        g = self.geom[i]
        return slice(self.o_off[i], self.o_off[i] + g.o1 - g.o0)

    def reset_projections(self) -> None:
        """Regenerate every P at the next step (from the seeds, which a checkpoint load may have replaced);
        svd / dct: rebuild P from the loaded projection state, refreshing only where the step count says so."""
        self.proj_epoch = [-1] * len(self.slots)
        self._restore = self.projector.stateful

    def undo_refresh(self) -> None:
        """The last ``begin``'s step was not taken (non-finite gradient): its data-dependent refreshes happen
        again at the next step (same step count), from that step's gradient."""
        for i, old in zip(self._refreshed, self._before):  # the state a checkpoint saves stays the last taken one
            self.proj_state[i].copy_(old)
            self.proj_epoch[i] = -1
        self._refreshed = []

    # -- projections --------------------------------------------------------------------------
    def _refresh_projections(self, epochs: list[int], gap: int) -> None:
        """Make P for each param whose epoch changed (random: from the seed chain; svd / dct: from this step's
        gradient, `projection.refresh_states`, a collective at W > 1) and keep only the part this rank
        multiplies with (written into the previous epoch's buffers: a captured step keeps reading the same
        addresses)."""
        if self._restore:  # after a load: the saved state is the projection of the epoch of the last step taken
            self._restore = False
            for i, t in enumerate(self.step_count.tolist()):
                if t > 0:
                    self._set_projection(i, (int(t) - 1) // gap)
        due = [i for i, epoch in enumerate(epochs) if epoch != self.proj_epoch[i]]
        self._refreshed = []
        if due and self.projector.stateful:
            # a param without gradient (on every rank) is skipped by the step, so it refreshes when it next has one
            live = torch.tensor([float(self.fetched[i] is not None) for i in due], device=self.device)
            if self.comm.world > 1:
                self.comm.all_reduce(live)
            for i, has in zip(due, live.tolist()):
                if not has:
                    self._set_projection(i, self.proj_epoch[i])  # the state it has (P of zeros before any)
            due = [i for i, has in zip(due, live.tolist()) if has]
            self._refreshed, self._before = due, [self.proj_state[i].clone() for i in due]
            items = [self._refresh_item(i) for i in due]
            refresh_states(self.projector, items, self.r, self.comm, compute=self.generator_device)
        for i in due:
            self._set_projection(i, epochs[i])

    def _refresh_item(self, i: int) -> RefreshItem:
        """Param ``i`` as `refresh_states` reads it: this rank's gradient rows and where they sit."""
        g, lay = self.geom[i], self.layouts[i]
        whole_rows = all(
            (len(h) == 4 and h[2] == 0 and h[3] == g.n) or (len(h) == 2 and h[0] % g.n == 0 and h[1] % g.n == 0)
            for h in lay.ranges
        )
        return RefreshItem(
            self.slots[i].index, g.m, g.n, self._grad_rows(i), g.row0, g.col0, whole_rows, self.proj_state[i]
        )

    def _set_projection(self, i: int, epoch: int) -> None:
        """P of param ``i`` for ``epoch`` (from its seed chain or its projection state), this rank's part."""
        g = self.geom[i]
        self.proj_epoch[i] = epoch
        if g.rows == 0:
            self.proj[i] = None
            return
        # drawn on the pinned generator device (ZeRO-Offload: the GPU, as without offload), used on the state's
        seed, state = self.seeds[i](epoch), self.proj_state[i]
        P = self.projector.matrix(g.m, g.n, self.r, self.generator_device, seed, state).to(self.device)
        # tall: R = G P^T, keep P's held columns (r x width); wide: R^T = G^T P, keep P's held rows (rows x r)
        if g.tall:
            P = P if g.width == g.n else P[:, g.col0 : g.col0 + g.width]
        else:
            P = P[g.row0 : g.row0 + g.rows]
        if self.proj[i] is None:
            self.proj[i] = P.contiguous()
        else:
            self.proj[i].copy_(P)

    def _grad_rows(self, i: int) -> Optional[torch.Tensor]:
        """This rank's gradient as rows (rows x width: whole rows of a flat range, zeros where it holds
        nothing; a block's rectangle)."""
        s, g = self.slots[i], self.geom[i]
        if g.rows == 0:
            return None
        G = self.fetched[i]
        if G is None:
            G = torch.zeros_like(s.data)
        # Kept in its own dtype: a bf16 gradient is read as fp32 weight by weight where the step computes
        # (no fp32 copy of the whole bucket's gradients, 4 B per element, lives through the step).
        if g.aligned:
            return G.view(g.rows, g.width)
        padded = torch.zeros(g.rows * g.n, device=G.device, dtype=G.dtype)
        padded[g.off : g.off + s.numel].copy_(G)
        return padded.view(g.rows, g.n)

    # -- the step -----------------------------------------------------------------------------
    def begin(self, group: dict) -> None:
        """On the host: the projections of a new epoch, this step's scalars, the gradients (which params have
        one here: a rank holding none of a param's elements says no, and the optimizer's all-reduce decides)."""
        t = self.step_count.tolist()  # per param, 0 before its first update
        self.fetched = [s.grad() if g.rows else None for s, g in zip(self.slots, self.geom)]
        self.zeroed = []
        gap = int(group["update_proj_gap"])
        self._refresh_projections([int(x) // gap for x in t], gap)
        sizes = param_step_sizes(group, t, math.sqrt(group["scale"]))
        self.scalars.set(sizes, -group["lr"] * group["weight_decay"], [g is not None for g in self.fetched])

    def fused(self) -> bool:
        """Whether every write of ``finish`` runs in a fused kernel (a device-side skip flag gates them all)."""
        if not self.slots:
            return True
        if self.unaligned or not self.update.on_gpu or not fused(self.T_R, self.exp_avg, self.exp_avg_sq):
            return False
        return fused(*(self.fetched[i] for i in self.aligned if self.fetched[i] is not None))

    def direct_grads(self, group: dict) -> list[torch.Tensor]:
        """The gradients a captured step reads at fixed addresses: those cuBLAS multiplies (exact rank > 1);
        the kernels read them through pointer tables otherwise."""
        if self.project.reads_grads_directly(group.get("projection_tf32", False)):
            return [self.fetched[i] for i in self.active]
        return []

    def complete(self) -> bool:
        """Whether every slot holding rows has a gradient this step (a captured step needs real addresses)."""
        return all(self.fetched[i] is not None for i in self.active)

    def point_at_grads(self) -> None:
        """Before a replay: the kernels' pointer tables at this step's gradients (a flat gradient and its rows
        view share their address)."""
        self.project.g_ptrs([self.fetched[i] for i in self.active])
        if self.update.on_gpu:
            self.update.g_ptrs([self.fetched[i] for i in self.aligned])

    def prepare(self, group: dict) -> None:
        """Step 1 (no communication): partial R and ||G_c||^2 of the touched channels."""
        self._grads = grads = [self._grad_rows(i) for i in range(len(self.slots))]
        self.project(
            [grads[i] for i in self.active],
            [self.proj[i] for i in self.active],
            self.T_R,
            self.T_g,
            tf32=group.get("projection_tf32", False),
        )
        if self.expert_sums is not None:  # this rank's ||G||^2 of each slice; the optimizer's flags sum over ranks
            g_sq = segment_sums(self.T_g.unsqueeze(0), self.expert_sums)[0]
            self.scalars.live_t.mul_(torch.where(self.is_expert, (g_sq > 0).float(), 1.0))

    def nonfinite(self) -> torch.Tensor:
        """1.0 (a 0-dim tensor) if this rank's gradient has an inf/NaN (then some ||G_c||^2 has), else 0.0."""
        return (~torch.isfinite(self.T_g.sum())).float()

    def discard(self) -> None:
        """Drop the gradients ``begin`` fetched, after the step or instead of it (no reference to them
        outlives the step: zero_grad frees them)."""
        self.fetched, self._grads = [], None

    def finish(self, group: dict, skip: Optional[torch.Tensor] = None) -> None:
        """Steps 2-6 with what ``prepare`` computed; no write where ``skip`` (0-dim, on the device) > 0
        (the collectives still run: every rank takes part)."""
        grads = self._grads
        R, R_g = self._owned_R()  # 2
        channel = group["scale_type"] == "channel"
        s_own, norms = self._adam(R, R_g, group, channel, skip)  # 3
        s, u_sq = self._scaling_factors(s_own, norms, channel)  # 4
        limiter = self._limiter(u_sq, group, skip)  # 5
        # step_size * sqrt(scale) / limiter per param (the host's float times 1 / limiter, as a float / tensor is)
        coef_param = self.scalars.step_sizes_t * limiter.reciprocal()
        coef = s * coef_param[self.t_param] if channel else (s * coef_param)[self.t_param]  # per touched channel
        self._update(grads, coef, skip)  # 6

    def _owned_R(self) -> tuple[torch.Tensor, torch.Tensor]:
        """2. R and ||G_c||^2 of the owned channels: local ones copied, shared ones reduce-scattered from
        their touchers."""
        r, plan, comm = self.r, self.plan, self.comm
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
        return R, R_g

    def _adam(
        self, R: torch.Tensor, R_g: torch.Tensor, group: dict, channel: bool, skip: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """3. Adam on R (owned channels), the normalized gradient N, the scaling factor per owned channel.

        Returns (s_own, or None for scale_type "tensor"; this rank's per-param sums over its owned channels
        of ||N_c||^2, ||R_c||^2 and s_c^2 ||G_c||^2 (channel) or ||G_c||^2 (tensor), a 3 x params tensor)."""
        b1, b2 = group["betas"]
        torch.index_select(self.scalars.live_t, 0, self.o_param, out=self.keep)
        n_sq, r_sq = channel_adam_(R, self.exp_avg, self.exp_avg_sq, b1, b2, group["eps"], skip, self.keep)
        s_own = n_sq.sqrt() / (r_sq.sqrt() + NORM_EPS) if channel else None
        norms = segment_sums(torch.stack([n_sq, r_sq, s_own.square() * R_g if channel else R_g]), self.o_segments)
        return s_own, norms

    def _scaling_factors(
        self, s_own: Optional[torch.Tensor], norms: torch.Tensor, channel: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """4. Shared factors back to every toucher; per-param norms summed over ranks.

        Returns (s: per touched channel (channel) or per param (tensor); ||U||^2 per param, before the
        scale and the limiter)."""
        plan, comm = self.plan, self.comm
        if comm.world > 1:
            comm.all_reduce(norms)
            if channel and plan.seg > 0:
                mine = s_own.new_zeros(plan.seg)
                mine[: len(plan.recv_dst)] = s_own[plan.recv_dst]
                s_shared = comm.all_gather(mine)
        n_sq, r_sq, u_or_g_sq = norms
        if not channel:  # one factor per param: ||N|| / ||R||
            s_param = n_sq.sqrt() / (r_sq.sqrt() + NORM_EPS)
            return s_param, s_param.square() * u_or_g_sq
        if plan.identity:
            s_touch = s_own
        else:
            s_touch = s_own.new_zeros(len(self.T_g))
            s_touch[plan.local_src] = s_own[plan.local_dst]
            if len(plan.send_src):
                s_touch[plan.send_src] = s_shared[plan.send_dst]
        return s_touch, u_or_g_sq

    def _limiter(self, u_sq: torch.Tensor, group: dict, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """5. The norm-growth limiter per parameter (vectorized over the bucket); updates q (unless ``skip``)."""
        u_norm = u_sq.sqrt() * (math.sqrt(group["scale"]) if group["scale_front"] else 1.0)
        if group["disable_nl"]:
            return torch.ones_like(u_norm)
        q = self.limiter_norm
        limiter = torch.where(q >= 0, torch.clamp_min(u_norm / (q + NORM_EPS), LIMITER_GROWTH) / LIMITER_GROWTH, 1.0)
        q_new = torch.where(self.scalars.live_t > 0, u_norm / limiter, q)  # a param without gradient keeps its q
        self.limiter_norm.copy_(q_new if skip is None else torch.where(skip > 0, q, q_new))
        return limiter

    def _update(self, grads: list[Optional[torch.Tensor]], coef: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
        """6. p -= G * coef (coef = step_size * s * sqrt(scale) / limiter per touched channel); then the
        decoupled weight decay p *= 1 + decay (one fused pass on GPU)."""
        if self.aligned:
            torch.index_select(self.scalars.live_t, 0, self.aligned_t, out=self.aligned_live)
            on_host = lambda: [self.scalars.live()[i] for i in self.aligned]  # noqa: E731 (read only by the eager path)
            self.zeroed = self.update(
                [grads[i] for i in self.aligned],
                coef,
                self.scalars,
                skip,
                (self.aligned_live, on_host),
                zero_grads=self.zero_grads,
            )
        if self.unaligned and skipped(skip):
            return
        decay = self.scalars.decay
        for i in self.unaligned:  # a piece cut mid-row: update its zero-padded rows, keep the held elements
            if not self.scalars.live()[i]:
                continue
            s, G, g = self.slots[i], grads[i], self.geom[i]
            block = s.data.new_zeros(g.rows * g.n)
            block[g.off : g.off + s.numel] = s.data
            scaled_update_eager(
                block.view(g.rows, g.n), G, coef[self.t_off[i] : self.t_off[i] + g.t1 - g.t0], g.tall, decay
            )
            s.data.copy_(block[g.off : g.off + s.numel])
