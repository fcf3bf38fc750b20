"""Fused mixture-of-experts weights (DESIGN.md §2.9): each expert slice of a 3-D weight is an APOLLO weight.

transformers 5.x keeps a MoE layer's experts as one 3-D parameter per projection, ``[E, out, in]``
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, Granite-MoE: ``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]); expert e computes ``F.linear(x, W[e])``, so slice e is the weight of an ``nn.Linear`` as is.
A 3-D parameter in a low-rank group is therefore E logical 2-D weights, the rows [e A, (e + 1) A) of
the [E A, B] matrix. What a rank holds of the fused tensor is one flat range; cut at expert boundaries
it is one flat range per expert, relative to the slice: exactly the `Slot` of a 2-D weight. So the
bindings' slots of a fused weight are expanded into E expert slots (`expand_experts`) before the buckets
are built, and the core runs unchanged, every expert in the same multi-tensor launches as every other
weight of the bucket.

Positions (and seeds, position + 1) count each expert slice of a low-rank 3-D weight as one param, in
expert order, where the fused weight sits: the positions the same model gets with one ``nn.Linear`` per
expert and projection, listed expert by expert in place of each fused weight (`Received.of`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .core import Slot


def expert_count(shape: tuple[int, ...], lowrank: bool) -> int:
    """E for a fused expert weight (3-D, in a low-rank group), else 0."""
    return int(shape[0]) if lowrank and len(shape) == 3 else 0


def expert_slots(s: Slot, seed: int, whole: bool) -> list[Slot]:
    """The E expert slots of a fused weight's slot ``s`` (flat range [start, end) of [E, A, B]).
    ``whole``: the engine's layout gives whole experts only (FSDP2's Shard(0) over E); each expert slot
    then owns all its channels where held (the moments are a Shard(0) DTensor over E like the param)."""
    if s.block is not None:
        raise NotImplementedError(f"param {s.index} (fused experts {s.shape}): held as a block {s.block}")
    E, A, B = s.shape
    size, C = A * B, max(A, B)
    out = []
    for e in range(E):
        a, b = max(s.start, e * size), min(s.end, (e + 1) * size)
        n = max(0, b - a)
        lo = a - s.start if n else 0
        if not n:
            a = e * size
        owned = None
        if whole:
            if n not in (0, size):
                raise NotImplementedError(
                    f"param {s.index} (fused experts {s.shape}): this rank holds part of expert {e} ({n} of {size} "
                    "elements); a DTensor layout must shard the expert dimension (Shard(0)) only"
                )
            owned = (0, C) if n else (0, 0)
        grad = lambda g=s.grad, lo=lo, n=n: None if (x := g()) is None else x.narrow(0, lo, n)
        copy = None if s.model_copy is None else (lambda mc=s.model_copy, lo=lo, n=n: mc().narrow(0, lo, n))
        out.append(
            Slot(
                s.param,
                s.index,
                (A, B),
                a - e * size,
                a - e * size + n,
                s.data.narrow(0, lo, n),
                grad,
                owned=owned,
                model_copy=copy,
                seed=seed + e,
                expert=e,
            )
        )
    return out


def expand_experts(binding: Any, received: list[list[Any]]) -> Any:
    """``binding`` with each fused expert weight's slot replaced by its E expert slots, and every slot's
    initial seed set from the positions that count expert slices (`Received.seed`)."""
    info = {r.position: r for row in received for r in row}
    for u in binding.units:
        slots = []
        for s in u.slots:
            r = info[s.index]
            if r.experts and s.expert is None:
                slots.extend(expert_slots(s, r.seed, binding.mesh is not None))
            else:
                s.seed = r.seed
                slots.append(s)
        u.slots = slots
    return binding


def stacked_state(b: Any, i: int, E: int, mesh: Any) -> dict[str, Any]:
    """``optimizer.state`` of a fused weight whose expert slots are ``b.slots[i : i + E]``: the seed of expert 0,
    per expert ``step`` and ``limiter_norm`` (E,), and the moments of the channels this rank owns, expert after
    expert (rows of ``b.exp_avg``); under FSDP2 a DTensor (E, C, r) placed like the param (whole experts)."""
    rows = slice(b.owned_rows(i).start, b.owned_rows(i + E - 1).stop)
    C, r = b.layouts[i].channels, b.r
    st: dict[str, Any] = {"seed": b.seeds[i].seeds[0], "step": b.step_count[i : i + E]}
    for k in ("exp_avg", "exp_avg_sq"):
        local = getattr(b, k)[rows]
        if mesh is not None:
            from torch.distributed.tensor import DTensor

            p = b.slots[i].param
            local = DTensor.from_local(
                local.view(-1, C, r),
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=(E, C, r),
                stride=(C * r, r, 1),
            )
        st[k] = local
    st["limiter_norm"] = b.limiter_norm[i : i + E]
    return st


def fused_layout(b: Any, i: int, E: int, rank: int) -> dict[str, Any]:
    """`APOLLO.layout`'s entry of a fused weight (expert slots ``b.slots[i : i + E]``): the fused shape and held
    flat range, and per expert [start, end, o0, o1] (held elements of the slice, owned channels)."""
    slots = b.slots[i : i + E]
    A, B = slots[0].shape
    held = [(e * A * B + s.start, e * A * B + s.end) for e, s in enumerate(slots) if s.end > s.start]
    start, end = (held[0][0], held[-1][1]) if held else (0, 0)
    experts = [[s.start, s.end, *b.layouts[i + e].owners[rank]] for e, s in enumerate(slots)]
    return {"group": b.group_index, "shape": [E, A, B], "start": start, "end": end, "experts": experts}


def expert_name(name: str, e: int) -> str:
    """The canonical checkpoint name of expert slice ``e`` of fused weight ``name``."""
    return f"{name}.{e}"


def refuse_transposed(name: str, module: Optional[torch.nn.Module], shape: tuple[int, ...], how: str) -> None:
    """ValueError when transformers stores ``module``'s experts as [E, in, out] (``is_transposed``, ``x @ W[e]``:
    GPT-OSS, Llama4): their Linear is the slice's transpose, which the per-slice rule does not cover (the other
    orientation and the other projection draws). ``how``: the way to leave them out."""
    if getattr(module, "is_transposed", False):
        raise ValueError(
            f"{name} {shape}: fused experts stored [E, in, out] (x @ W[e]) are not supported; leave their module "
            f"out of {how} (plain Adam)"
        )
