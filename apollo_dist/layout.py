"""Who holds what: element ranges, channel ownership and the communication plan (DESIGN.md §2).

Every engine gives a rank one contiguous row-major element range [start, end) of each parameter (or,
where columns are split as tensor parallelism does, a rectangular block rows x columns).
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


def touched_channels(m: int, n: int, *holding: int) -> tuple[int, int]:
    """The channel range [c0, c1) that a holding contributes to: flat elements [start, end), or the
    block rows [r0, r1) x columns [c0, c1) (four numbers).

    Flat, tall: the rows the range meets. Flat, wide: every column once the rank holds any element (a
    column sums over all rows, so the partial contributions are dense; zeros where nothing is held).
    Block: its rows (tall) or its columns (wide).
    """
    if len(holding) == 4:
        r0, r1, c0, c1 = holding
        if r1 <= r0 or c1 <= c0:
            return (0, 0)
        return (r0, r1) if m >= n else (c0, c1)
    start, end = holding
    if end <= start:
        return (0, 0)
    if m >= n:
        return (start // n, -(-end // n))
    return (0, n)


def block_owners(m: int, n: int, blocks: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    """Owned channel ranges of a param held as rectangular blocks: the ranks touching the same channel
    range (tall: the same rows, split by columns; wide: the same columns, split by rows) split it by
    torch.chunk's rule in rank order, so each owner touches what it owns. The touched ranges must tile
    [0, C) (a grid of blocks; anything else is a NotImplementedError)."""
    C = num_channels(m, n)
    touched = [touched_channels(m, n, *b) for b in blocks]
    sharing: dict[tuple[int, int], list[int]] = {}
    for w, t in enumerate(touched):
        if t[1] > t[0]:
            sharing.setdefault(t, []).append(w)
    edges = sorted(sharing)
    if not edges or [a for a, _ in edges] != [0] + [b for _, b in edges[:-1]] or edges[-1][1] != C:
        raise NotImplementedError(
            f"a {m} x {n} param held as blocks {blocks}: the blocks do not form a grid (touched channels {edges})"
        )
    owners = [(0, 0)] * len(blocks)
    for (t0, t1), ranks in sharing.items():
        size = -(-(t1 - t0) // len(ranks))
        for k, w in enumerate(ranks):
            owners[w] = (min(t1, t0 + k * size), min(t1, t0 + (k + 1) * size))
    return owners


def position_owners(m: int, n: int, ranges: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Owned channel ranges: channel c belongs to whoever holds flat element floor((c + 1/2) numel / C).

    For tall G this is the row's middle element (so a row held whole is owned by its holder); for
    wide G it splits the columns in proportion to the elements each rank holds. Ranges must tile
    [0, numel) in rank order. Blocks (four numbers each, every rank): `block_owners`.
    """
    if any(len(r) == 4 for r in ranges):
        if not all(len(r) == 4 for r in ranges):
            raise NotImplementedError(
                f"a {m} x {n} param held as flat ranges on some ranks and blocks on others: {ranges}"
            )
        return block_owners(m, n, ranges)
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
    ranges: list[tuple[int, ...]]  # per rank: flat [start, end), or a block (r0, r1, c0, c1)
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
        for w, holding in enumerate(self.ranges):
            c0, c1 = touched_channels(self.m, self.n, *holding)
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
    send_src: torch.Tensor  # T rows of touched shared channels
    send_dst: torch.Tensor  # ... and their rows in the (W * seg) send buffer
    recv_dst: torch.Tensor  # O rows of owned shared channels, in receive order
    seg: int  # rows per rank in the reduce-scatter / all-gather buffers
    identity: bool  # T == O row for row (nothing shared): skip all copies


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
        return (
            torch.cat(xs).to(device=device, dtype=torch.int64)
            if xs
            else torch.zeros(0, dtype=torch.int64, device=device)
        )

    plan = CommPlan(cat(local_src), cat(local_dst), cat(send_src), cat(send_dst), cat(recv_dst), seg, False)
    plan.identity = (
        len(plan.send_src) == 0
        and len(plan.recv_dst) == 0
        and t_off == o_off == len(plan.local_src)
        and torch.equal(plan.local_src, plan.local_dst)
    )
    return plan
