"""What an optimizer's param groups hold now, as `Slot`s (DESIGN.md §2.2).

Trainers re-point an optimizer's param lists after it is built: DeepSpeed ZeRO-1/2 (and its
BF16_Optimizer) leave one flat fp32 partition per group in them, ZeRO-3 puts a sub-group's flat fp32
partition into its group's list around each ``step``, accelerate's FSDP2 ``prepare`` swaps the model's
params for sharded DTensors. `detect` reads the groups as they are, with what the engine left on the
params the optimizer was built with (kept by position, weakly, so an orphaned param is freed), and
returns a `Binding`: this rank's slots per *unit* (one bucket: a param group, or one ZeRO-3 sub-group),
the process group, the channel-ownership rule, and which tensors in a group's list route to which unit.
Anything it cannot map is a ValueError / NotImplementedError that names the group, the tensor and the
way out: APOLLO never steps tensors it has not mapped.

Only attributes are read (``_hp_mapping``, ``_dp_group``, ``_z3_optimizer``, ``ds_shape``, ``ds_tensor``): nothing
here imports deepspeed. One exception, DeepSpeed's universal-checkpoint loader (`refuse_universal_loads`): the
DeepSpeed bindings replace the entry points it calls (each ZeRO-1/2 param's ``load_hp_checkpoint_state``, ZeRO-3's
``_load_universal_checkpoint``) with the error `UNIVERSAL_REFUSED`, and refuse to bind after such a load.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .core import Slot
from .experts import expert_count
from .quant import int8_module, int8_slot

SUPPORTED = (
    "plain tensors (one process, DDP), FSDP2 DTensors (FSDP, HSDP, FSDP2 x tensor parallel), DeepSpeed ZeRO-1/2/3 "
    "partitions (deepspeed.initialize or apollo_dist.deepspeed.initialize)"
)


UNIVERSAL_REFUSED = (
    'APOLLO with DeepSpeed: universal checkpoints ("checkpoint": {"load_universal": true}) are not supported: '
    "DeepSpeed's universal loader puts Adam-shaped state per ZeRO partition into the optimizer, not APOLLO's "
    "moments, projections and steps (and ds_to_universal cannot convert an APOLLO checkpoint). Resume the native "
    "checkpoint (the directory engine.save_checkpoint wrote) at any world size or ZeRO stage instead, with "
    "load_universal off: apollo_dist.deepspeed.load_checkpoint(engine, load_dir) for an engine from "
    "deepspeed.initialize, engine.load_checkpoint(load_dir) for one from apollo_dist.deepspeed.initialize"
)


def _universal_refused(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(UNIVERSAL_REFUSED)


def refuse_universal_loads(binding: "Binding", zero3: Any = None) -> None:
    """DeepSpeed's universal loader fails with `UNIVERSAL_REFUSED` where it would write into APOLLO's params and
    state: each ZeRO-1/2 / BF16_Optimizer param's ``load_hp_checkpoint_state`` (the universal loader calls it for
    every param this rank holds a fragment of), ZeRO-3's ``_load_universal_checkpoint``. Refused now if such a
    load already ran (before the first binding, when nothing of APOLLO's was in the way): ZeRO-1/2 leave the
    loaded moments in the params' ``_hp_mapping.optim_fragment``, ZeRO-3 in ``optimizer.state[flat partition]``."""
    if zero3 is not None:
        state = getattr(getattr(zero3, "optimizer", None), "state", None) or {}
        for flat in zero3.fp32_partitioned_groups_flat:
            if any(torch.is_tensor(v) and v.dim() > 0 for v in (state.get(flat) or {}).values()):
                raise NotImplementedError(UNIVERSAL_REFUSED)
        zero3._load_universal_checkpoint = _universal_refused
        return
    for unit in binding.units:
        for s in unit.slots:
            mapping = getattr(s.param, "_hp_mapping", None)
            if mapping is not None and getattr(mapping, "optim_fragment", None):
                raise NotImplementedError(UNIVERSAL_REFUSED)
            s.param.load_hp_checkpoint_state = _universal_refused


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape: DeepSpeed ZeRO-3 params (under zero.Init) keep it in ``ds_shape``."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor"


@dataclass
class Received:
    """One param as the optimizer received it: its position, shape, whether it trains, and a weak reference
    (DeepSpeed's links live on it; FSDP2 may orphan it); its initial seed (the reference's position + 1, where
    each expert slice of a fused expert weight counts as one param, apollo_dist.experts; of expert 0 for one)
    and its number of experts (0: not a fused expert weight)."""

    position: int
    shape: tuple[int, ...]
    trainable: bool
    ref: Any  # weakref.ref to the tensor
    seed: int = 0
    experts: int = 0

    @staticmethod
    def of(groups: list[dict]) -> list[list["Received"]]:
        out, position, seed = [], 0, 1
        for g in groups:
            row = []
            for p in g["params"]:
                shape = global_shape(p)
                experts = expert_count(shape, "rank" in g)
                row.append(Received(position, shape, bool(p.requires_grad), weakref.ref(p), seed, experts))
                position += 1
                seed += max(experts, 1)
            out.append(row)
        return out


@dataclass
class Unit:
    """One bucket's worth of slots: a whole param group, or one ZeRO-3 sub-group of it."""

    group: int
    slots: list[Slot]
    handle: Optional[torch.Tensor] = None  # the flat partition the engine puts in the group's list for it
    clear_grads: Optional[Callable[..., None]] = None  # after a step: zero the engine's gradient store of the
    # unit where it would otherwise hand a param that got no gradient its last one again (ZeRO-3);
    # takes the (address, numel) ranges the update already zeroed (zero_except)
    prepare_grads: Optional[Callable[[], tuple[list[Slot], bool]]] = None  # before a step reads the store: the
    # same, for a store that learns which params got a gradient (ZeRO-Offload: `OffloadedGrads.prepare`)


@dataclass
class Binding:
    """This rank's slots and how the engine hands them to ``step``.

    ``kind``: "params" (the groups hold the params themselves: plain tensors or DTensors),
    "flat" (DeepSpeed: the groups hold flat partitions, each routed to the unit whose ``handle`` it is)
    or "explicit" (an adapter called ``APOLLO.bind``: every non-empty group steps its unit)."""

    kind: str
    units: list[Unit]
    process_group: Optional[dist.ProcessGroup] = None
    owners: str = "position"
    mesh: Any = None
    signature: list[tuple[int, ...]] = field(default_factory=list)  # "params": ids in each group's list
    held: list[torch.Tensor] = field(default_factory=list)  # strong refs: ids stay unique while bound
    # Where projections are drawn (CPU and CUDA generators draw different P) and collectives run, when that is
    # not where the slots live: DeepSpeed's compute device, also when ZeRO-Offload keeps masters on the CPU.
    # None: the slots' device.
    generator_device: Optional[torch.device] = None

    def __post_init__(self) -> None:
        self.by_handle = {id(u.handle): u for u in self.units if u.handle is not None}
        self.by_group: dict[int, list[Unit]] = {}
        for u in self.units:
            self.by_group.setdefault(u.group, []).append(u)

    def accepts(self, lists: list[list[torch.Tensor]]) -> bool:
        """True when the groups' lists are still what this binding maps (checked at every step)."""
        if self.kind == "explicit":
            return True
        if self.kind == "params":
            return [tuple(map(id, ts)) for ts in lists] == self.signature
        return all(
            id(t) in self.by_handle and self.by_handle[id(t)].group == gi for gi, ts in enumerate(lists) for t in ts
        )

    def active(self, gi: int, tensors: list[torch.Tensor]) -> list[Unit]:
        """The units that a ``step`` with ``tensors`` in group ``gi``'s list updates."""
        if not tensors:
            return []
        if self.kind == "flat":
            return [self.by_handle[id(t)] for t in tensors]
        return self.by_group.get(gi, [])


# -- detectors ------------------------------------------------------------------------------------
def detect(
    lists: list[list[torch.Tensor]], received: list[list[Received]], lowrank: Optional[list[bool]] = None
) -> Binding:
    """The binding for what ``lists`` (each param group's ``params``, in group order) hold now;
    ``lowrank``: per group, whether it runs APOLLO (picks the process group of FSDP2 DTensors)."""
    alive = [p for row in received for r in row if (p := r.ref()) is not None]
    zero3 = {id(w): w for p in alive if (w := getattr(p, "_z3_optimizer", None)) is not None}
    if zero3:
        if len(zero3) > 1:
            raise NotImplementedError(
                "APOLLO's params belong to several DeepSpeed ZeRO-3 engines: build one optimizer per engine"
            )
        return zero3_binding(next(iter(zero3.values())), received)
    current = [t for ts in lists for t in ts]
    if any(hasattr(p, "_hp_mapping") for p in alive) and {id(t) for t in current} != {id(p) for p in alive}:
        return zero_flat_binding(lists, received)
    dtensors = [is_dtensor(t) for t in current]
    if any(dtensors) and not all(dtensors):
        raise NotImplementedError(
            "APOLLO got a mix of DTensor and plain parameters: shard the whole model with fully_shard"
        )
    _check_same_params(lists, received)
    return params_binding(lists, received, dtensors=any(dtensors), lowrank=lowrank)


def _check_same_params(lists: list[list[torch.Tensor]], received: list[list[Received]]) -> None:
    """The groups must hold as many tensors as were given at construction, of the same global shapes
    (seeds are positional, and a flattened or reshaped copy would be stepped as the wrong matrix)."""
    for gi, (ts, row) in enumerate(zip(lists, received)):
        if len(ts) != len(row):
            raise ValueError(
                f"param group {gi} holds {len(ts)} tensors, APOLLO was built with {len(row)} params: something replaced "
                f"the group's params with tensors APOLLO cannot map. Supported: {SUPPORTED}"
            )
        for j, (t, r) in enumerate(zip(ts, row)):
            original = r.ref()
            if (
                original is not None
                and original is not t
                and original.dtype != t.dtype
                and original.dtype in (torch.float16, torch.bfloat16)
            ):
                raise NotImplementedError(
                    f"param group {gi}, param {j}: the group holds a {t.dtype} copy of a {original.dtype} parameter that is "
                    "still in use: a mixed-precision wrapper APOLLO does not support (e.g. DeepSpeed fp16/bf16 without ZeRO, "
                    "whose FP16_UnfusedOptimizer also steps once with zero gradients at initialize). Use ZeRO stage 1, 2 or 3"
                )
            if global_shape(t) != r.shape:
                raise ValueError(
                    f"param group {gi}, param {j}: holds a tensor of shape {global_shape(t)} where APOLLO was built with "
                    f"shape {r.shape} (an engine flattened or replaced it; e.g. DeepSpeed fp16/bf16 without ZeRO). "
                    f"Supported: {SUPPORTED}"
                )


def _whole_param_slot(p: torch.Tensor, position: int) -> Slot:
    """Every element is held here (one process, or DDP's replicas)."""
    if int8_module(p) is not None:  # an int8 weight's gradient proxy: its data is a scratch (apollo_dist.quant)
        return int8_slot(p, position)
    if not p.is_contiguous():
        raise ValueError(f"APOLLO needs contiguous parameters; param {position} with shape {tuple(p.shape)} is not")
    grad = lambda p=p: None if p.grad is None else p.grad.reshape(-1)
    return Slot(p, position, tuple(p.shape), 0, p.numel(), p.data.view(-1), grad)


def dtensor_split_dims(p: torch.Tensor, position: int) -> tuple[int, ...]:
    """The mesh dims that split DTensor ``p`` (the others replicate it). Accepted placements: Replicate(),
    Shard(0), Shard(1) of a 2-D param (tensor parallel, row-wise), and _StridedShard(0) followed on later
    mesh dims by Shard(0)s whose sizes multiply to its split factor (FSDP2 over a column-wise TP weight:
    each rank still holds one contiguous row block). So FSDP (Shard(0),), HSDP (Replicate(), Shard(0)),
    FSDP2 x TP ((Shard(0), Shard(1)), (_StridedShard(0), Shard(0))) and HSDP x TP. Anything else
    (Partial, Shard(2), other strided shards) is a NotImplementedError naming the param, its placements
    and its mesh: APOLLO never steps a layout it has not mapped."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, placements = p.device_mesh, tuple(p.placements)
    split = []
    for i, pl in enumerate(placements):
        # exact types: _StridedShard must not pass for a Shard, nor the reverse
        if type(pl) is Replicate:
            continue
        if type(pl) is Shard and (pl.dim == 0 or (pl.dim == 1 and p.dim() == 2)):
            split.append(i)
            continue
        later = [j for j in range(i + 1, len(placements)) if type(placements[j]) is Shard and placements[j].dim == 0]
        if (
            type(pl) is _StridedShard
            and pl.dim == 0
            and later
            and math.prod(mesh.shape[j] for j in later) == pl.split_factor
        ):
            split.append(i)
            continue
        names = f" {mesh.mesh_dim_names}" if mesh.mesh_dim_names else ""
        raise NotImplementedError(
            f"param {position} (shape {tuple(p.shape)}): APOLLO supports DTensor placements Replicate(), Shard(0), "
            f"Shard(1) of a 2-D param and FSDP2-over-TP's _StridedShard(0) before Shard(0); got {placements} on a "
            f"{mesh.ndim}-D mesh of shape {tuple(mesh.shape)}{names}"
        )
    return tuple(split)


def moment_placements(p: torch.Tensor) -> tuple:
    """Placements of a 2-D DTensor param's channel-major (C x r) moments, on the param's mesh.

    The mesh dims that split the param's channel dim (rows when tall, columns when wide) split the moments
    the same way, so those channels stay with the ranks that hold them; a dim that splits the other dim
    (its ranks share the channels they touch) splits each of those channel blocks further — after the
    channel splits, hence a _StridedShard when it comes first on the mesh. Replicated dims replicate.
    Owned channels are read from these placements, so DCP reshards the moments like any DTensor."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    m, n = p.shape
    cd = 0 if m >= n else 1
    placements, sizes = tuple(p.placements), tuple(p.device_mesh.shape)

    def splits(pl: Any, d: int) -> bool:
        return type(pl) in (Shard, _StridedShard) and pl.dim == d

    out = []
    for i, pl in enumerate(placements):
        if type(pl) is Replicate:
            out.append(Replicate())
        elif splits(pl, cd):
            out.append(Shard(0) if type(pl) is Shard else _StridedShard(0, split_factor=pl.split_factor))
        else:
            later = math.prod(sizes[j] for j in range(i + 1, len(placements)) if splits(placements[j], cd))
            out.append(Shard(0) if later == 1 else _StridedShard(0, split_factor=later))
    return tuple(out)


def _dtensor_slot(p: torch.Tensor, position: int) -> Slot:
    """An FSDP2 DTensor (`dtensor_split_dims`): a block of whole rows (FSDP, HSDP, column-wise TP: a flat
    range), or a rectangle when columns are split (row-wise TP); the replicas of a piece hold the same.
    2-D params carry the channels whose moments this rank keeps (`moment_placements`)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtensor_split_dims(p, position)
    local = p._local_tensor
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    grad = lambda p=p: None if p.grad is None else p.grad._local_tensor.reshape(-1)
    owned, block = None, None
    if p.dim() == 2:
        C = max(p.shape)
        oshape, ooff = compute_local_shape_and_global_offset((C, 1), p.device_mesh, moment_placements(p))
        owned = (ooff[0], ooff[0] + oshape[0]) if oshape[0] else (0, 0)
        if shape[1] < p.shape[1]:  # columns split (row-wise tensor parallel): a rectangle, not a flat range
            block = (offset[0], offset[0] + shape[0], offset[1], offset[1] + shape[1])
    if block is not None:
        return Slot(p, position, tuple(p.shape), 0, 0, local.view(-1), grad, block=block, owned=owned)
    start = offset[0] * math.prod(p.shape[1:]) if local.numel() else 0
    return Slot(p, position, tuple(p.shape), start, start + local.numel(), local.view(-1), grad, owned=owned)


def _dtensor_group(slots: list[Slot], lowrank: list[bool]) -> tuple[Any, Optional[dist.ProcessGroup]]:
    """(mesh, process group) of APOLLO's collectives over DTensor ``slots``: the ranks that split the
    low-rank params (the mesh dims every one of them is split over, flattened: FSDP's dim, HSDP's shard
    dim, FSDP2 x TP's dp and tp dims); replicate dims need none (their gradients were all-reduced, the
    step is deterministic). Without low-rank params, the dims splitting any param of the largest mesh."""
    picked = [s for s, low in zip(slots, lowrank) if low and len(s.shape) in (2, 3)] or slots
    if not picked:
        return None, None
    mesh = max((s.param.device_mesh for s in picked), key=lambda m: m.ndim)
    if any(low for low in lowrank) and any(s.param.device_mesh != mesh for s in picked):
        raise NotImplementedError("APOLLO needs every low-rank (2-D, 'rank' group) parameter on the same device mesh")
    dims_of = {s.index: dtensor_split_dims(s.param, s.index) for s in picked if s.param.device_mesh == mesh}
    dims = sorted(set().union(*dims_of.values()))
    if picked is not slots:
        for index, ds in dims_of.items():
            if list(ds) != dims:  # a copy per rank of a replicated dim would be summed as partial R, twice
                raise NotImplementedError(
                    f"param {index}: split over mesh dims {list(ds)} of {mesh.mesh_dim_names or tuple(mesh.shape)}, other "
                    f"low-rank params over {dims}: APOLLO needs every low-rank param split over the same mesh dims"
                )
    if not dims:
        return mesh, None
    if len(dims) == 1:
        return mesh, mesh.get_group(dims[0])
    # one group for several mesh dims: DeviceMesh's flattening (rank order: row-major over the dims)
    if len(dims) == mesh.ndim:
        return mesh, mesh._flatten().get_group()
    if not mesh.mesh_dim_names:
        raise NotImplementedError(
            f"APOLLO needs mesh_dim_names on a {mesh.ndim}-D mesh that splits params over dims {dims}"
        )
    return mesh, mesh[tuple(mesh.mesh_dim_names[d] for d in dims)]._flatten().get_group()


def params_binding(
    lists: list[list[torch.Tensor]],
    received: list[list[Received]],
    dtensors: bool = False,
    lowrank: Optional[list[bool]] = None,
) -> Binding:
    """The groups hold the params themselves: plain tensors, or FSDP2 DTensors. ``lowrank``: which
    groups run APOLLO (they choose the DTensors' process group, `_dtensor_group`)."""
    slot_of = _dtensor_slot if dtensors else _whole_param_slot
    units = [
        Unit(gi, [slot_of(p, r.position) for p, r in zip(ts, row) if p.requires_grad])
        for gi, (ts, row) in enumerate(zip(lists, received))
    ]
    mesh, group = None, None
    if dtensors:
        flags = lowrank or [False] * len(units)
        mesh, group = _dtensor_group(
            [s for u in units for s in u.slots], [flags[u.group] for u in units for _ in u.slots]
        )
    return Binding(
        "params",
        units,
        group,
        "chunk" if dtensors else "position",
        mesh,
        signature=[tuple(map(id, ts)) for ts in lists],
        held=[t for ts in lists for t in ts],
    )


def _deepspeed_param(r: Received, gi: int) -> torch.Tensor:
    p = r.ref()
    if p is None:
        raise ValueError(
            f"param group {gi}, position {r.position}: the parameter APOLLO was built with is gone, and the group holds "
            "a DeepSpeed partition that APOLLO maps through it: keep the model alive"
        )
    return p


def zero_flat_binding(lists: list[list[torch.Tensor]], received: list[list[Received]]) -> Binding:
    """ZeRO-1/2 and BF16_Optimizer: each group's list is one flat fp32 partition; each param's piece of
    it is in ``p._hp_mapping`` (lp: elements of the param, hp: where they sit in the flat), cut anywhere."""
    units, group, offload = [], None, False
    for gi, (ts, row) in enumerate(zip(lists, received)):
        if len(ts) != 1 or ts[0].dim() != 1:
            raise ValueError(
                f"param group {gi}: DeepSpeed ZeRO-1/2 should leave one flat partition in it, found {len(ts)} tensors "
                f"of shapes {[tuple(t.shape) for t in ts][:4]}"
            )
        flat = ts[0]
        if flat.dtype != torch.float32:
            raise NotImplementedError(
                f"APOLLO with DeepSpeed needs fp32 master weights, DeepSpeed keeps param group {gi}'s in {flat.dtype}"
            )
        slots = []
        for r in row:
            if not r.trainable:
                continue
            p = _deepspeed_param(r, gi)
            if not hasattr(p, "_hp_mapping"):
                raise ValueError(
                    f"param group {gi}, position {r.position}: not in DeepSpeed's ZeRO partitions (no _hp_mapping)"
                )
            group = getattr(p, "_dp_group", group)
            mapping = p._hp_mapping
            if mapping is None:  # none of this param's elements are in this rank's partition
                slots.append(Slot(p, r.position, r.shape, 0, 0, flat.narrow(0, 0, 0), lambda: None))
                continue
            offload = offload or bool(mapping.use_offload)
            if mapping.hp_fragment.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                raise ValueError(
                    f"param group {gi}, position {r.position}: its DeepSpeed fragment is not in the group's flat partition"
                )
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            # DeepSpeed assigns flat.grad afresh at every step: look it up at step time.
            grad = lambda flat=flat, a=hp.start, n=hp.numel: None if flat.grad is None else flat.grad.narrow(0, a, n)
            slots.append(
                Slot(p, r.position, r.shape, lp.start, lp.start + lp.numel, flat.narrow(0, hp.start, hp.numel), grad)
            )
        units.append(Unit(gi, slots, flat))
    if offload:  # ZeRO-Offload copies each reduced gradient into flat.grad (CPU) and never clears it
        zero = next((z for u in units for s in u.slots if (z := getattr(s.param, "_zero_optimizer", None))), None)
        OffloadedGrads(units, zero)  # sets each unit's prepare_grads
    binding = Binding(
        "flat",
        units,
        group or dist.group.WORLD,
        held=[u.handle for u in units],
        generator_device=_compute_device(received),
    )
    refuse_universal_loads(binding)
    return binding


def _compute_device(received: list[list[Received]]) -> Optional[torch.device]:
    """DeepSpeed's compute device: where the model's params are (ZeRO-3's placeholders too), whether or not the
    masters are offloaded. Projections are drawn there, so an offloaded run draws the non-offloaded run's P."""
    for row in received:
        for r in row:
            p = r.ref()
            if p is not None:
                return p.device
    return None


def zero_except(buf: torch.Tensor, done: Sequence[tuple[int, int]]) -> None:
    """Zero the contiguous 1-D ``buf`` except the element ranges ``done`` (address, numel) already zeroed (the CPU
    update zeroes the gradients it reads, DESIGN §2.7); ranges outside ``buf`` are ignored."""
    base, size, end = buf.data_ptr(), buf.element_size(), buf.numel()
    spans = sorted(((p - base) // size, n) for p, n in done if base <= p < base + end * size)
    pos = 0
    for a, n in spans:
        if a > pos:
            buf.narrow(0, pos, a - pos).zero_()
        pos = max(pos, min(a + n, end))
    if pos < end:
        buf.narrow(0, pos, end - pos).zero_()


class _Deliveries:
    """What the gradient hooks of `OffloadedGrads` record (the hooks hold this only, not the binding): per param,
    the micro-steps (DeepSpeed's ``micro_step_id``) whose backward gave it a gradient in this step."""

    def __init__(self, micro_step: Callable[[], Any]) -> None:
        self.micro_step = micro_step
        self.fired: dict[int, set] = {}  # id(param) -> this step's micro-steps that gave it a gradient
        self.seen: set = set()  # this step's micro-steps that gave any param a gradient
        self.earlier: set[int] = set()  # ids of params delivered in steps DeepSpeed skipped (no prepare since)
        self.last: Any = None  # the micro-step of the last gradient
        self.new_step = False  # a prepare ran: the next gradient starts the next step

    def hook(self, p: torch.Tensor) -> None:
        m = self.micro_step()
        # a new step: after a prepare, or when the counter went back without one (a step DeepSpeed skipped itself,
        # fp16 overflow or a non-finite norm: what it delivered may still be in the store)
        if self.new_step or (m is not None and self.last is not None and m < self.last):
            if not self.new_step:
                self.earlier |= self.fired.keys()
            self.fired.clear()
            self.seen.clear()
            self.new_step = False
        self.last = m
        self.fired.setdefault(id(p), set()).add(m)
        self.seen.add(m)


class OffloadedGrads:
    """ZeRO-Offload's gradient store (each unit's CPU ``flat.grad``) holding zeros for the params that got no
    gradient, without a pass over it per step. DeepSpeed copies a param's reduced gradient into its slice of that
    persistent buffer at the accumulation boundary, for the params whose gradient hook fired in some micro-step
    (ZeRO-1/2 and ZeRO-3 alike), and never clears it: a param without gradient would get its last one again. A
    post-accumulate-grad hook on every trainable param (held here or not, so every rank sees the same micro-steps)
    records which params DeepSpeed delivered, and in which micro-steps; `prepare`, before a unit's step reads the
    store, zeroes the slices of its params not delivered in this step that may hold an earlier gradient (usually
    none), so such a param steps as a zero gradient, the rule of ZeRO-1/2 without offload (DESIGN §2.1).

    The binding (and so the hooks) is made at the first step, after its backward: at a unit's first `prepare` the
    store holds that backward's gradients and zeros, taken as they are (that step is not checked for partial
    micro-steps); every slice counts as holding a gradient from then on until a step shows it was not delivered."""

    def __init__(self, units: Sequence[Unit], zero: Any) -> None:
        # DeepSpeed's micro-step counter: constant within one micro-batch's backward and different between the
        # micro-batches of a step (ZeRO-2 and ZeRO-3, 0.19; ZeRO-1 keeps it at 0: it reduces torch's own
        # accumulated gradients once, at the boundary, so nothing is checked there)
        self.record = record = _Deliveries(lambda: getattr(zero, "micro_step_id", None))
        # whether a step has several micro-steps: DeepSpeed's setting, the same on every rank (so is the all-reduce
        # of the check); unknown: from the micro-steps seen
        self.accumulation = getattr(zero, "gradient_accumulation_steps", None)
        self.all = [s for u in units for s in u.slots]
        self.slots = {id(u): [s for s in u.slots if s.numel] for u in units}
        self.stale: set[int] = set()  # ids of params whose slice may hold an earlier step's gradient
        self.started: set[int] = set()  # ids of the units prepared once
        params = {id(s.param): s.param for s in self.all if s.param.requires_grad}
        # DeepSpeed ZeRO-3 "leaf modules" (MoE blocks, set_z3_leaf_modules) give an unused param a zero gradient
        # itself, every micro-step, without its hook: always delivered in full
        self.leaf = {k for k, p in params.items() if hasattr(p, "ds_z3_leaf_module")}
        handles = [p.register_post_accumulate_grad_hook(record.hook) for p in params.values()]
        weakref.finalize(self, lambda: [h.remove() for h in handles])
        for u in units:
            u.prepare_grads = lambda u=u: self.prepare(u)

    def partial(self) -> tuple[list[Slot], bool]:
        """(the slots, of every unit, whose param got a gradient in some micro-steps of this step but not all;
        whether the step had more than one). DeepSpeed's offloaded accumulation gets those wrong (0.19.8: the
        previous step's gradient is added where the first micro-steps gave none, and the earlier micro-steps'
        gradient is lost where the last one gave none; measured with torch AdamW too)."""
        rec = self.record
        micro = len(rec.seen)
        several = self.accumulation > 1 if isinstance(self.accumulation, int) else micro > 1
        if not self.started:  # the hooks missed the first step's backward
            return [], several
        out = [s for s in self.all if id(s.param) not in self.leaf and 0 < len(rec.fired.get(id(s.param), ())) < micro]
        return out, several

    def prepare(self, unit: Unit) -> tuple[list[Slot], bool]:
        """Zero what must be zero in ``unit``'s store; returns `partial` at the step's first unit (of the whole
        binding: DeepSpeed steps the units one call at a time, and the first must find it before any unit is
        updated; the same on every rank), ([], False) at the others (their deliveries are the same)."""
        rec, slots = self.record, self.slots[id(unit)]
        found = ([], False) if rec.new_step else self.partial()
        if id(unit) not in self.started:
            self.started.add(id(unit))
            self.stale |= {id(s.param) for s in slots}
        else:
            for s in slots:
                key = id(s.param)
                if key in rec.fired:
                    self.stale.add(key)  # holds this step's gradient: stale at the next step unless delivered again
                elif key in self.stale or key in rec.earlier:
                    g = s.grad()
                    if g is not None:
                        g.zero_()
                    self.stale.discard(key)
        rec.earlier -= {id(s.param) for s in slots}
        rec.new_step = True
        return found


def zero3_binding(zero: Any, received: list[list[Received]]) -> Binding:
    """ZeRO-3: each sub-group's flat fp32 partition lays its params' chunks end to end (padding
    included); a param's chunk is [rank * c, (rank + 1) * c) ∩ [0, numel), c = ceil(numel / W)."""
    name = type(zero).__name__
    if name != "DeepSpeedZeroOptimizer_Stage3":
        raise NotImplementedError(f"APOLLO with DeepSpeed: {name} (e.g. MiCS) is not supported; use plain ZeRO stage 3")
    refuse_nvme(zero)
    position = {id(p): r for row in received for r in row if (p := r.ref()) is not None}
    group = zero.dp_process_group
    rank = dist.get_rank(group)
    units = []
    offload = getattr(zero, "offload_optimizer", False)
    clearers = [None] * len(zero.fp16_groups) if offload else _zero3_grad_clearers(zero)
    for i, (params, flat) in enumerate(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat)):
        if flat is None or flat.dtype != torch.float32:
            raise NotImplementedError(
                f"APOLLO with DeepSpeed ZeRO-3 needs fp32 master weights in memory (sub-group {i})"
            )
        gi = zero.sub_group_to_group_id[i]
        slots, offset = [], 0
        for p in params:
            r = position.get(id(p))
            if r is None:
                raise ValueError(
                    f"DeepSpeed ZeRO-3 sub-group {i} holds a parameter of shape {tuple(p.ds_shape)} that APOLLO was not built with"
                )
            chunk, numel = p.partition_numel(), p.ds_numel
            start, end = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
            start = min(start, end)
            n = end - start
            grad = lambda flat=flat, a=offset, n=n: None if flat.grad is None else flat.grad.narrow(0, a, n)
            model_copy = lambda p=p, n=n: p.ds_tensor.view(-1)[:n]  # the model's own partition of the param
            slots.append(
                Slot(
                    p, r.position, tuple(p.ds_shape), start, end, flat.narrow(0, offset, n), grad, model_copy=model_copy
                )
            )
            offset += chunk
        units.append(Unit(gi, slots, flat, clearers[i]))
    if offload:
        OffloadedGrads(units, zero)  # sets each unit's prepare_grads
    binding = Binding("flat", units, group, held=[u.handle for u in units], generator_device=_compute_device(received))
    refuse_universal_loads(binding, zero3=zero)
    return binding


NVME_REFUSED = (
    "APOLLO with DeepSpeed: ZeRO-Infinity NVMe offload ({what}: device nvme) is not supported; offload to the CPU "
    '(device "cpu") instead: APOLLO\'s optimizer state is small enough to stay in host memory'
)


def refuse_nvme(zero: Any) -> None:
    """NotImplementedError for what ZeRO-3 offload does that APOLLO's binding does not map: NVMe swapping of the
    optimizer state or params (the fp32 partitions are not in memory between steps) and partial offload
    (``ratio`` < 1: sub-groups DeepSpeed steps with another optimizer on the GPU). SuperOffload is another class,
    refused by name above. Plain ``deepspeed.initialize`` reaches here; the adapter refuses these up front."""
    if getattr(zero, "swap_optimizer", False):
        raise NotImplementedError(NVME_REFUSED.format(what="zero_optimization.offload_optimizer"))
    if getattr(zero, "params_in_nvme_and_cpu", False):
        raise NotImplementedError(NVME_REFUSED.format(what="zero_optimization.offload_param"))
    devices = set((getattr(zero, "subgroup_to_device", None) or {}).values())
    if getattr(zero, "offload_optimizer", False) and devices - {"cpu"}:
        raise NotImplementedError(
            "APOLLO with DeepSpeed ZeRO-3: partial optimizer offload (offload_optimizer.ratio < 1) steps some "
            "sub-groups with another optimizer on the GPU; remove ratio (offload everything) or the offload"
        )


def _zero3_grad_clearers(zero: Any) -> list[Callable[[], None]]:
    """Per sub-group, a function zeroing its slice of ZeRO-3's reduced-gradient store.

    ZeRO-3 keeps each param's reduced gradient in its slice of ``grad_partitions_flat_buffer`` (sub-groups end
    to end), copies into it only for params whose gradient hook fired, and hands the optimizer every slice each
    step: a param without gradient gets its last gradient again (measured: bit for bit; torch AdamW under ZeRO-3
    the same), never zeroed. Zeroed after each step, the store gives such a param a zero gradient, as ZeRO-1/2
    do (``set_none_gradients_to_zero``). Params with a gradient are overwritten at the next first micro-step."""
    flats = zero.fp32_partitioned_groups_flat
    buf = getattr(zero, "grad_partitions_flat_buffer", None)
    sizes = [f.numel() for f in flats]
    if buf is None or buf.numel() != sum(sizes):
        raise NotImplementedError(
            "APOLLO with DeepSpeed ZeRO-3: this DeepSpeed keeps reduced gradients in another layout than 0.19's "
            "grad_partitions_flat_buffer (sub-groups end to end), so a parameter without gradient could be handed its "
            "last gradient again; use a DeepSpeed version with that layout (0.19.x)"
        )
    out, off = [], 0
    for n in sizes:
        out.append(lambda done=(), buf=buf, a=off, n=n: zero_except(buf.narrow(0, a, n), done))
        off += n
    return out
