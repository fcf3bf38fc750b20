"""From a `Binding` to the core's buckets, and from the buckets to ``optimizer.state``.

`build_buckets` makes one bucket per unit of a binding (plain Adam, or APOLLO with every param's global
layout: one all-gather of every rank's holding at bind time). `exposed_state` shows the buckets' buffers
as torch's per-param state (under FSDP2 as DTensors, so DCP reshards them).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Union

import torch

from .binding import Binding, global_shape, moment_placements
from .core import AdamBucket, Collectives, LowRankBucket, Slot
from .experts import stacked_state
from .layout import ParamLayout, chunk_owners, matrix_dims, position_owners

Bucket = Union[AdamBucket, LowRankBucket]


def all_ranges(slots: list[Slot], comm: Collectives, device: torch.device) -> tuple[list[list[tuple[int, ...]]], list]:
    """Every rank's holding of every param ((start, end), or a block (r0, r1, c0, c1)) and, where every
    rank's slot gives them, owned channels (else None): one all-gather at bind time, of rows
    [is block, 4 numbers, owned from, owned to (-1: not given)]."""
    rows = []
    for s in slots:
        holding = [1, *s.block] if s.block is not None else [0, s.start, s.end, 0, 0]
        rows.append(holding + (list(s.owned) if s.owned is not None else [-1, -1]))
    mine = torch.tensor(rows, dtype=torch.int64).reshape(-1, 7)
    every = (
        mine.view(1, -1, 7)
        if comm.world == 1
        else comm.all_gather(mine.to(device)).view(comm.world, len(slots), 7).cpu()
    )
    every = every.tolist()
    holdings = [[tuple(e[k][1:5]) if e[k][0] else tuple(e[k][1:3]) for e in every] for k in range(len(slots))]
    owned = [None if any(e[k][5] < 0 for e in every) else [tuple(e[k][5:7]) for e in every] for k in range(len(slots))]
    return holdings, owned


def build_buckets(binding: Binding, groups: list[dict]) -> tuple[list[Bucket], Collectives, torch.device]:
    """The buckets of ``binding`` (one per unit; ``groups``: the param group dicts, by index), their
    collectives and device. Collective: every rank of the binding's process group calls it."""
    slots = [s for u in binding.units for s in u.slots]
    device = slots[0].data.device if slots else torch.device("cpu")
    gen = binding.generator_device or device
    comm = Collectives(binding.process_group, _stage(binding.process_group, device, gen))
    ranges, owned = all_ranges(slots, comm, device)
    buckets: list[Bucket] = []
    k = 0
    for u in binding.units:
        group, n = groups[u.group], len(u.slots)
        if "rank" not in group:
            buckets.append(AdamBucket(u.group, u.slots))
        else:
            layouts = []
            for s, rs, given in zip(u.slots, ranges[k : k + n], owned[k : k + n]):
                m, c = matrix_dims(s.shape)
                if given is not None:  # the engine's layout fixes them (FSDP2: the moments' placements)
                    own = given
                else:
                    own = chunk_owners(m, c, comm.world) if binding.owners == "chunk" else position_owners(m, c, rs)
                layouts.append(ParamLayout(m, c, rs, own))
            buckets.append(LowRankBucket(u.group, u.slots, layouts, group, comm, device))
            buckets[-1].generator_device = gen
        k += n
    return buckets, comm, device


def _stage(group: Any, device: torch.device, gen: torch.device) -> Optional[torch.device]:
    """Where collectives run when the state is on the CPU but the process group is not gloo's (ZeRO-Offload over
    NCCL): the compute device ``gen``; else None (where the tensors are)."""
    if group is None or device.type != "cpu" or gen.type == "cpu":
        return None
    import torch.distributed as dist

    return None if dist.get_backend(group) == "gloo" else gen


def as_global(local: torch.Tensor, s: Slot, mesh: Any, channel_shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """This rank's piece of a moment as state exposes it: as is (``mesh`` None), or under FSDP2 a DTensor
    with the global shape (the param's, or (C, r) channel-major for low-rank moments) so DCP reshards it.

    Plain-Adam state: the param's placements. Low-rank moments: `binding.moment_placements` (FSDP: (Shard(0),),
    HSDP: (Replicate(), Shard(0)): torch.chunk's blocks over the shard dim, identical on the replicas),
    from which the binding took the owned channels."""
    if mesh is None:
        return local
    from torch.distributed.tensor import DTensor

    p = s.param
    if channel_shape is None:  # plain-Adam state shaped and sharded like the param
        return DTensor.from_local(
            local.view(p._local_tensor.shape),
            p.device_mesh,
            p.placements,
            run_check=False,
            shape=p.shape,
            stride=p.stride(),
        )
    C, r = channel_shape
    return DTensor.from_local(local, p.device_mesh, moment_placements(p), run_check=False, shape=(C, r), stride=(r, 1))


def exposed_state(buckets: list[Bucket], mesh: Any) -> defaultdict:
    """``optimizer.state`` over the buckets' buffers: per param, ``seed``, ``step`` and its moments
    (low-rank: the owned channels, C x r channel-major, and ``limiter_norm``)."""
    state: defaultdict = defaultdict(dict)
    for b in buckets:
        for i, s in enumerate(b.slots):
            if s.expert is not None:  # a fused expert weight: its experts' state stacked (apollo_dist.experts)
                if s.expert == 0:
                    state[s.param] = stacked_state(b, i, global_shape(s.param)[0], mesh)
                continue
            st = state[s.param]
            st["seed"] = b.seeds[i].seeds[0] if isinstance(b, LowRankBucket) else s.initial_seed
            st["step"] = b.step_count[i]  # a 0-dim view: loads write into the bucket's counts
            if isinstance(b, LowRankBucket):
                rows = b.owned_rows(i)
                st["exp_avg"] = as_global(b.exp_avg[rows], s, mesh, (b.layouts[i].channels, b.r))
                st["exp_avg_sq"] = as_global(b.exp_avg_sq[rows], s, mesh, (b.layouts[i].channels, b.r))
                st["limiter_norm"] = b.limiter_norm[i : i + 1]
                if b.proj_state[i] is not None:  # svd / dct: the same whole tensor on every rank
                    st["projection"] = b.proj_state[i]
            else:
                st["exp_avg"] = as_global(b.exp_avg[i], s, mesh)
                st["exp_avg_sq"] = as_global(b.exp_avg_sq[i], s, mesh)
    return state
