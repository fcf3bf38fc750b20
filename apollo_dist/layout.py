"""Who holds what: element ranges, channel ownership and the communication plan (DESIGN.md §2).

Every engine gives a rank one contiguous row-major element range [start, end) of each parameter.
For a low-rank parameter with gradient G (m x n), the *channels* are the rows of G when it is tall
(m >= n) and the columns when it is wide; each channel has one row of R (channel-major: R is kept
as C x r, the transpose of the reference's r x n for wide G).

Every rank owns a contiguous range of channels of every parameter (it keeps their Adam moments and
computes their scaling factors). A channel is *local* when its only toucher is its owner: it needs no
communication. All other channels are *shared*: their partial R goes to the owner through one
reduce-scatter, and their factor comes back through one all-gather.

Everything here is a pure function of the global layout, so all ranks build the same plan without
talking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n) of a 2-D parameter."""
    m, n = shape
    return int(m), int(n)


def num_channels(m: int, n: int) -> int:
    """Rows when tall or square, columns when wide."""
    return m if m >= n else n


def touched_channels(m: int, n: int, start: int, end: int) -> tuple[int, int]:
    """The channel range [c0, c1) that elements [start, end) contribute to.

    Tall: the rows the range meets. Wide: every column once the rank holds any element (a column
    sums over all rows, so the partial contributions are dense; zeros where nothing is held).
    """
    if end <= start:
        return (0, 0)
    if m >= n:
        return (start // n, -(-end // n))
    return (0, n)


def position_owners(m: int, n: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Owned channel ranges: channel c belongs to whoever holds flat element floor((c + 1/2) numel / C).

    For tall G this is the row's middle element (so a row held whole is owned by its holder); for
    wide G it splits the columns in proportion to the elements each rank holds. Ranges must tile
    [0, numel) in rank order.
    """
    numel, C = m * n, num_channels(m, n)

    def first_channel_at_or_after(pos: int) -> int:
        # smallest c with (2c + 1) * numel >= 2 * C * pos
        return min(C, max(0, -((numel - 2 * C * pos) // (2 * numel))))

    owners = []
    for start, end in ranges:
        if end <= start:
            owners.append((0, 0))
        else:
            owners.append((first_channel_at_or_after(start), first_channel_at_or_after(end)))
    return owners


def chunk_owners(m: int, n: int, world: int) -> list[tuple[int, int]]:
    """Owned channel ranges by torch.chunk's rule (ceil(C / W) each): FSDP2's Shard(0) layout."""
    C = num_channels(m, n)
    size = -(-C // world)
    return [(min(C, w * size), min(C, (w + 1) * size)) for w in range(world)]


@dataclass
class ParamLayout:
    """The global layout of one low-rank parameter: every rank's element range and owned channels."""

    m: int
    n: int
    ranges: list[tuple[int, int]]
    owners: list[tuple[int, int]]

    @property
    def tall(self) -> bool:
        return self.m >= self.n

    @property
    def channels(self) -> int:
        return num_channels(self.m, self.n)

    def shared_mask(self) -> torch.Tensor:
        """Bool (C,): channels that need communication (not exactly one toucher that also owns them)."""
        C = self.channels
        count = torch.zeros(C + 1, dtype=torch.int64)
        toucher = torch.full((C,), -1, dtype=torch.int64)
        for w, (start, end) in enumerate(self.ranges):
            c0, c1 = touched_channels(self.m, self.n, start, end)
            count[c0] += 1
            count[c1] -= 1
            toucher[c0:c1] = w
        count = count.cumsum(0)[:C]
        owner = torch.empty(C, dtype=torch.int64)
        for w, (o0, o1) in enumerate(self.owners):
            owner[o0:o1] = w
        return (count != 1) | (toucher != owner)


@dataclass
class CommPlan:
    """Index maps of one low-rank bucket for this rank (all int64 tensors on the bucket's device).

    T: the rows of partial R this rank computes (touched channels, params in bucket order).
    O: the rows of R this rank owns (owned channels, params in bucket order).
    """

    local_src: torch.Tensor  # T rows of local channels
    local_dst: torch.Tensor  # ... and their O rows
    send_src: torch.Tensor   # T rows of touched shared channels
    send_dst: torch.Tensor   # ... and their rows in the (W * seg) send buffer
    recv_dst: torch.Tensor   # O rows of owned shared channels, in receive order
    seg: int                 # rows per rank in the reduce-scatter / all-gather buffers
    identity: bool           # T == O row for row (nothing shared): skip all copies


def build_comm_plan(layouts: list[ParamLayout], rank: int, world: int, device: torch.device) -> CommPlan:
    """The plan of one bucket, identical in its global parts on every rank."""
    shared = [lay.shared_mask() for lay in layouts]
    # Shared channels are grouped by owner: segment d lists, param by param, the shared channels d owns.
    seg_len = [0] * world
    for lay, sh in zip(layouts, shared):
        for d, (d0, d1) in enumerate(lay.owners):
            seg_len[d] += int(sh[d0:d1].sum())
    seg = max(seg_len) if world > 1 else 0

    local_src, local_dst, send_src, send_dst, recv_dst = [], [], [], [], []
    seg_pos = [d * seg for d in range(world)]
    t_off = o_off = 0
    for lay, sh in zip(layouts, shared):
        t0, t1 = touched_channels(lay.m, lay.n, *lay.ranges[rank])
        o0, o1 = lay.owners[rank]
        mine = torch.arange(t0, t1)
        loc = mine[~sh[t0:t1]]
        local_src.append(loc - t0 + t_off)
        local_dst.append(loc - o0 + o_off)
        for d, (d0, d1) in enumerate(lay.owners):
            sh_d = torch.nonzero(sh[d0:d1]).flatten() + d0  # shared channels owned by d
            pos = torch.arange(len(sh_d)) + seg_pos[d]
            hit = (sh_d >= t0) & (sh_d < t1)
            send_src.append(sh_d[hit] - t0 + t_off)
            send_dst.append(pos[hit])
            if d == rank:
                recv_dst.append(sh_d - o0 + o_off)
            seg_pos[d] += len(sh_d)
        t_off += t1 - t0
        o_off += o1 - o0

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs).to(device=device, dtype=torch.int64) if xs else torch.zeros(0, dtype=torch.int64, device=device)

    plan = CommPlan(cat(local_src), cat(local_dst), cat(send_src), cat(send_dst), cat(recv_dst), seg, False)
    plan.identity = (
        len(plan.send_src) == 0 and len(plan.recv_dst) == 0 and t_off == o_off == len(plan.local_src)
        and torch.equal(plan.local_src, plan.local_dst)
    )
    return plan
