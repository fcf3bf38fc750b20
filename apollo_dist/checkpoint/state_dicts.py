"""Canonical tensors from APOLLO state dicts: every rank's piece of a param (its ``apollo_layout`` entry,
its state and its master weights) assembled into the whole param and its moments, offline. Shared by the
readers of DeepSpeed checkpoints (apollo_dist.native_checkpoints) and of a live optimizer (`LiveSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..experts import expert_name
from .format import CheckpointError, Meta, ParamEntry, group_hyperparameters


@dataclass
class RankState:
    """What one rank saved: its APOLLO state dict's layout and state, and a reader of its master weights."""

    where: str
    layout: dict[str, Any]
    state: dict[int, dict[str, Any]]
    master: Callable[[int, ParamEntry, int, int], torch.Tensor]  # (index, entry, start, end) -> held weights


def _local(t: Any) -> torch.Tensor:
    """A state value as a plain fp32 CPU tensor (a DTensor's local part)."""
    t = getattr(t, "_local_tensor", t)
    return torch.as_tensor(t).detach().float().cpu()


@dataclass(frozen=True)
class ExpertOf:
    """Where a checkpoint entry of expert slice ``e`` comes from: the fused weight ``fused`` at state-dict index
    ``idx`` (apollo_dist.experts: its layout lists each expert's held range and owned channels, its state the
    experts' owned rows one after another)."""

    idx: int
    e: int
    fused: ParamEntry


def _expert_rank(rs: RankState, ref: ExpertOf) -> RankState:
    """Rank ``rs`` as if expert slice ``ref.e`` were a param of its own: its layout entry, state and master weights."""
    lay = rs.layout["params"].get(ref.idx)
    if lay is None or "experts" not in lay:
        raise CheckpointError(f"{rs.where}: no fused-expert layout for param {ref.fused.name}")
    start, end, o0, o1 = lay["experts"][ref.e]
    row0 = sum(b - a for _, _, a, b in lay["experts"][: ref.e])  # its owned rows in the stacked state
    size = math.prod(ref.fused.shape[1:])
    st = rs.state.get(ref.idx, {})
    state = {}
    if st:
        state = {k: _local(st[k]).reshape(-1, ref.fused.r)[row0 : row0 + o1 - o0] for k in ("exp_avg", "exp_avg_sq")}
        state["limiter_norm"] = _local(st["limiter_norm"]).reshape(-1)[ref.e]
    held = lay["start"]

    def master(idx: int, entry: ParamEntry, a: int, b: int) -> torch.Tensor:
        a, b = ref.e * size + a, ref.e * size + b
        return rs.master(ref.idx, ref.fused, held, lay["end"])[a - held : b - held]

    layout = {"params": {ref.idx: {"start": start, "end": end, "owned": [o0, o1]}}}
    return RankState(rs.where, layout, {ref.idx: state}, master)


def assemble_param(entry: ParamEntry, idx: "int | ExpertOf", ranks: list[RankState]) -> dict[str, torch.Tensor]:
    """One param's canonical tensors from every rank's piece (each rank: its APOLLO state dict's
    layout and state, and its master weights): pieces must tile the param and its channels. ``idx``: the
    param's state-dict index, or an expert slice of a fused weight (`ExpertOf`)."""
    if isinstance(idx, ExpertOf):
        ranks, idx = [_expert_rank(rs, idx) for rs in ranks], idx.idx
    numel = math.prod(entry.shape)
    weight = torch.empty(numel)
    covered = 0
    moments = {k: torch.empty(numel if not entry.lowrank else 0) for k in ("exp_avg", "exp_avg_sq")}
    if entry.lowrank:
        m, n = entry.shape
        C = max(m, n)  # channels: rows when tall, columns when wide
        moments = {k: torch.empty(C, entry.r) for k in ("exp_avg", "exp_avg_sq")}
        owned = 0
    limiter = projection = None
    for rs in ranks:
        lay = rs.layout["params"].get(idx)
        if lay is None:
            raise CheckpointError(f"{rs.where}: no layout for param {entry.name}")
        if "block" in lay:  # DeepSpeed and one-process layouts hold flat ranges; blocks come with DCP (global tensors)
            raise CheckpointError(
                f"{rs.where}: param {entry.name} is held as a block {lay['block']}: not assembled offline"
            )
        a, b = lay["start"], lay["end"]
        state = rs.state.get(idx, {})
        if b > a:
            weight[a:b] = rs.master(idx, entry, a, b)
            covered += b - a
        if entry.lowrank:
            o0, o1 = lay["owned"]
            for k in moments:
                if o1 > o0:
                    moments[k][o0:o1] = _local(state[k]).reshape(o1 - o0, entry.r)
            owned += o1 - o0
            if "projection" in entry.tensor_shapes() and "projection" in state:  # the same on every rank
                projection = _same_on_ranks(entry, rs.where, projection, state["projection"])
            q = _local(state["limiter_norm"]).reshape(1).clone()
            if limiter is None:
                limiter = q
            elif not torch.equal(limiter, q):
                raise CheckpointError(
                    f"{rs.where}: param {entry.name}: limiter norm {q.item()} differs from rank 0's {limiter.item()}"
                )
        elif b > a:
            for k in moments:
                moments[k][a:b] = _local(state[k]).reshape(-1)
    if covered != numel:
        raise CheckpointError(
            f"param {entry.name}: the rank files hold {covered} of its {numel} elements (a rank file missing?)"
        )
    out = {"weight": weight.view(entry.shape)}
    if entry.lowrank:
        if owned != moments["exp_avg"].shape[0]:
            raise CheckpointError(
                f"param {entry.name}: the rank files own {owned} of its {moments['exp_avg'].shape[0]} channels"
            )
        tall = entry.shape[0] >= entry.shape[1]
        out.update({k: v if tall else v.t().contiguous() for k, v in moments.items()})
        out["limiter_norm"] = limiter
        if "projection" in entry.tensor_shapes():
            if projection is None:
                raise CheckpointError(f"param {entry.name}: proj={entry.proj!r} but no rank saved its projection")
            out["projection"] = projection.reshape(entry.tensor_shapes()["projection"])
    else:
        out.update({k: v.view(entry.shape) for k, v in moments.items()})
    return out


def _same_on_ranks(entry: ParamEntry, where: str, seen: Any, t: Any) -> torch.Tensor:
    """A state tensor every rank keeps whole (the projection): the first rank's, checked against the others'."""
    t = torch.as_tensor(getattr(t, "_local_tensor", t)).detach().cpu().to(entry.dtype("projection"))
    if seen is not None and not torch.equal(seen, t):
        raise CheckpointError(f"{where}: param {entry.name}: its projection differs from rank 0's")
    return t if seen is None else seen


def meta_from_state_dicts(
    optim_sd: dict[str, Any], names: list[str], trainer: dict[str, Any], source: dict[str, Any]
) -> tuple[Meta, dict[str, "int | ExpertOf"]]:
    """Meta of an APOLLO state dict (``names``: the param names in state-dict index order), and name -> index
    (a fused expert weight is one entry per expert slice, `experts.expert_name`, mapped to an `ExpertOf`)."""
    layout = optim_sd["apollo_layout"]
    params, groups, index_of = [], [], {}
    for gi, g in enumerate(optim_sd["param_groups"]):
        # per param: a param without gradient in a step is skipped, so a group's params may differ
        steps = {
            idx: _local(optim_sd["state"][idx]["step"]).reshape(-1) for idx in g["params"] if idx in optim_sd["state"]
        }
        groups.append({**group_hyperparameters(g), "step": max((int(s.max()) for s in steps.values()), default=0)})
        for idx in g["params"]:
            if idx not in layout["params"]:
                continue  # frozen: not optimized
            name = names[idx]
            lay = layout["params"][idx]
            st = optim_sd["state"][idx]
            step = steps.get(idx)
            proj = g.get("proj", "random") if "rank" in g else "random"
            if "experts" in lay:
                fused = ParamEntry(name, gi, tuple(lay["shape"]), int(st["seed"]), g.get("rank"))
                for e in range(len(lay["experts"])):
                    ename = expert_name(name, e)
                    params.append(
                        ParamEntry(ename, gi, fused.shape[1:], fused.seed + e, fused.r, int(step[e]), proj, (name, e))
                    )
                    index_of[ename] = ExpertOf(idx, e, fused)
                continue
            params.append(
                ParamEntry(
                    name,
                    gi,
                    tuple(lay["shape"]),
                    int(st["seed"]),
                    g.get("rank"),
                    None if step is None else int(step),
                    proj,
                )
            )
            index_of[name] = idx
    first = optim_sd["param_groups"][0] if optim_sd["param_groups"] else {}
    meta = Meta(
        params,
        groups,
        layout["generator_device"],
        {"scale_front": bool(first.get("scale_front", False)), "disable_nl": bool(first.get("disable_nl", False))},
        trainer,
        {**source, "world_size": layout["world_size"]},
    )
    return meta, index_of
