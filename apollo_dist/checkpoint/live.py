"""A live APOLLO and canonical checkpoints: loading one into it at any world size under any engine
(`load_canonical`, `resume_canonical` for training scripts), and saving a single-process one without a
native checkpoint in between (`LiveSource`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..core import AdamBucket, LowRankBucket, Slot
from ..experts import expert_name
from ..groups import LOW_RANK_KEYS, warn_run_changes
from ..optimizer import APOLLO
from ..projection import SeedChain
from ..quant import refuse_int8
from .canonical import CanonicalCheckpoint, SliceReader, SourceSlices
from .format import CheckpointError, ParamEntry, check_same_hyperparameters
from .state_dicts import RankState, assemble_param, meta_from_state_dicts


def _param_names(optimizer: torch.optim.Optimizer, model: Optional[torch.nn.Module]) -> dict[int, str]:
    """id(param) -> name: the model's names when given, else the groups' ``param_names``."""
    if model is not None:
        return {id(p): n for n, p in model.named_parameters()}
    names = {}
    for g in optimizer.param_groups:
        for p, n in zip(g["params"], g.get("param_names") or []):
            names[id(p)] = n
    return names


# -- loading into a live optimizer -----------------------------------------------------------------
def _verify_shared(ckpt: SliceReader, group: Optional[dist.ProcessGroup]) -> None:
    """SHA-256 of every file, the files split over the ranks; every rank raises the same error."""
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    error = None
    try:
        ckpt.verify(ckpt.files[rank::world])
    except CheckpointError as e:
        error = str(e)
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def _warn_run_changes(ckpt: SliceReader, optimizer: Any) -> None:
    """Warn when the checkpoint's run settings differ from this run's (CPU and CUDA draw different P; scale_front
    and disable_nl change the limiter)."""
    saved = {"generator_device": ckpt.index["generator_device"], **(ckpt.index.get("optimizer") or {})}
    warn_run_changes(str(ckpt.path), saved, optimizer.run_settings(), stacklevel=4)


def _check_groups(path: Path, saved_groups: list[dict[str, Any]], live_groups: list[dict[str, Any]]) -> None:
    """CheckpointError unless the checkpoint's groups match the optimizer's in number, kind and low-rank keys."""
    if len(saved_groups) != len(live_groups):
        raise CheckpointError(f"{path}: {len(saved_groups)} param groups, this optimizer has {len(live_groups)}")
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        if ("rank" in saved) != ("rank" in live):
            raise CheckpointError(
                f"{path}: param group {gi} is {'low-rank' if 'rank' in saved else 'plain Adam'} in the checkpoint, not in this optimizer"
            )
        check_same_hyperparameters(f"{path}: param group {gi}", saved, live)


def _param_record(ckpt: SliceReader, name: Optional[str], s: Slot, group_index: int) -> dict[str, Any]:
    """The index's record of the param of slot ``s``, checked against it (name, shape, group)."""
    if name is None:
        raise CheckpointError(
            f"optimizer param at position {s.index} has no name: pass the model (or groups with param_names)"
        )
    rec = ckpt.index["params"].get(name)
    if rec is None:
        raise CheckpointError(f"{ckpt.path}: no param {name!r} (a different model?)")
    if tuple(rec["shape"]) != tuple(s.shape):
        raise CheckpointError(
            f"{ckpt.path}: param {name} has shape {tuple(rec['shape'])}, the model's is {tuple(s.shape)}"
        )
    if rec["group"] != group_index:
        raise CheckpointError(
            f"{ckpt.path}: param {name} is in group {rec['group']}, in this optimizer in group {group_index}"
        )
    return rec


def _sync_model_param(slot: Slot, ckpt: SliceReader, name: str) -> None:
    """Make the model's own copy of the param match the master weights just loaded, where the engine keeps
    one apart from them: the slot's ``model_copy`` (ZeRO-3: the rank's partition), else the whole param on
    every rank (ZeRO-1/2 and DDP-like replicas). One process and FSDP2 update the param in place."""
    p = slot.param
    local = getattr(p, "_local_tensor", p)
    if slot.data.untyped_storage().data_ptr() == local.untyped_storage().data_ptr() and local.numel():
        return  # slot.data is a view of the param itself
    with torch.no_grad():
        if slot.model_copy is not None:
            slot.model_copy().copy_(slot.data)
        elif p.numel() == math.prod(slot.shape):
            p.data.view(-1).copy_(ckpt.read_flat(name, "weight", 0, p.numel()))
        elif slot.expert is not None and p.numel() == math.prod(slot.shape) * p.shape[0]:  # an expert's slice
            p.data[slot.expert].view(-1).copy_(ckpt.read_flat(name, "weight", 0, math.prod(slot.shape)))
        else:  # e.g. a ZeRO-3 placeholder bound without its partition: the model would keep stale weights
            raise CheckpointError(
                f"{name}: the model's tensor holds {p.numel()} of the param's {math.prod(slot.shape)} elements and "
                "its slot names no model_copy (the engine's own copy of the weights): cannot load into this layout"
            )


def _load_slot(ckpt: SliceReader, b: Any, i: int, name: str, seed: int) -> None:
    """Slot ``i`` of bucket ``b``: its master weights (and the model's copy), moments, limiter norm, seed."""
    s = b.slots[i]
    with torch.no_grad():
        s.data.copy_(ckpt.read_held(name, "weight", s))
        _sync_model_param(s, ckpt, name)
        if isinstance(b, AdamBucket):
            b.exp_avg[i].copy_(ckpt.read_held(name, "exp_avg", s))
            b.exp_avg_sq[i].copy_(ckpt.read_held(name, "exp_avg_sq", s))
        else:
            g, rows = b.geom[i], b.owned_rows(i)
            b.exp_avg[rows].copy_(ckpt.read_channels(name, "exp_avg", g.o0, g.o1, g.tall))
            b.exp_avg_sq[rows].copy_(ckpt.read_channels(name, "exp_avg_sq", g.o0, g.o1, g.tall))
            b.limiter_norm[i : i + 1].copy_(ckpt.read_flat(name, "limiter_norm", 0, 1))
            b.seeds[i] = SeedChain(seed)
            state = b.proj_state[i]
            if state is not None:  # svd / dct: the whole P or the indices, on every rank
                state.copy_(ckpt.read_flat(name, "projection", 0, state.numel()).view(state.shape))


def open_checkpoint(path: Path, tag: Optional[str] = None) -> SliceReader:
    """Any checkpoint the converter reads, as the live loader reads it: a canonical directory as it is; a
    DeepSpeed save or step directory (ZeRO-1/2/3, any W; ``tag`` or ``latest``), an FSDP2 DCP directory or a
    launch/train.py save directory of either, through `SourceSlices` (one param at a time)."""
    from ..native_checkpoints import open_source  # native readers import this package

    source = open_source(Path(path), tag)
    return source if isinstance(source, CanonicalCheckpoint) else SourceSlices(source, Path(path))


def load_checkpoint(
    path: Path,
    optimizer: Any,
    model: Optional[torch.nn.Module] = None,
    verify: bool = True,
    tag: Optional[str] = None,
) -> dict[str, Any]:
    """Load any checkpoint (canonical; DeepSpeed ZeRO-1/2/3 native at any W; FSDP2 DCP; launch/train.py's
    step directories: `open_checkpoint`) into ``optimizer`` (an APOLLO, bound or bindable, or what holds one:
    DeepSpeed's ZeRO optimizer or engine, accelerate's or Lightning's wrapper; `APOLLO.of`) and its model.

    Works at any world size and under any engine: each rank takes only the elements it holds (master
    weights, plain-Adam moments) and the channels it owns (low-rank moments); a canonical checkpoint is read
    only there, a native one one param at a time (each rank holds at most one param's canonical tensors
    beyond its own state). Every trainable param must be in the checkpoint with the same shape and the same
    group structure (rank, gap, scale_type, scale); the group's lr, betas, eps, weight decay come from the
    checkpoint. Seeds, limiter norms and per-param step counts are restored, so the projections continue
    where they were; fp32 master weights come from the checkpoint (also in bf16/fp16 runs).

    ``model``: names the params (default: the groups' ``param_names``). ``verify``: check every canonical
    file's SHA-256 first (split over the ranks). Returns the trainer state (``step``: the data position,
    ``scheduler``: the lr scheduler's state dict, ``run``, ...).
    Raises CheckpointError naming the file, param or value that does not fit.
    """
    try:
        optimizer = APOLLO.of(optimizer)
    except TypeError as e:
        raise CheckpointError(f"{path}: a checkpoint loads into APOLLO: {e}") from None
    ckpt = open_checkpoint(path, tag)
    optimizer.ensure_bound()
    refuse_int8(optimizer.slots(), "checkpoints loaded at another world size or engine (load_checkpoint)")
    if verify:
        _verify_shared(ckpt, optimizer.process_group)
    index = ckpt.index
    _warn_run_changes(ckpt, optimizer)
    names = _param_names(optimizer, model)
    saved_groups = index["param_groups"]
    _check_groups(ckpt.path, saved_groups, optimizer.param_groups)

    live_names = set()
    for b in optimizer.buckets:
        group = optimizer.param_groups[b.group_index]
        saved = saved_groups[b.group_index]
        for i, s in enumerate(b.slots):
            name = names.get(id(s.param))
            if name is not None and s.expert is not None:  # a fused weight's expert slice: an entry of its own
                name = expert_name(name, s.expert)
            rec = _param_record(ckpt, name, s, b.group_index)
            live_names.add(name)
            b.step_count[i] = float(rec.get("step", saved["step"]))  # per param (older checkpoints: the group's)
            _load_slot(ckpt, b, i, name, int(rec["seed"]))
            if s.expert in (None, 0):
                optimizer.state[s.param]["seed"] = int(rec["seed"])
        if isinstance(b, LowRankBucket):
            b.reset_projections()  # regenerate P from the loaded seeds at the next step
        for k, v in saved.items():  # lr, betas, ... as they were (the scheduler's state comes with them)
            if k not in ("params", "step") + LOW_RANK_KEYS:
                group[k] = tuple(v) if k == "betas" else v
    extra = sorted(set(index["params"]) - live_names)
    if extra:
        raise CheckpointError(f"{ckpt.path}: params {extra[:4]} are not in this optimizer (a different model?)")
    ckpt.close()
    trainer = dict(index.get("trainer") or {})
    if trainer.get("step") is None:  # no data position recorded: one optimizer step per training step
        trainer["step"] = max((int(g["step"]) for g in saved_groups), default=0)
    return trainer


load_canonical = load_checkpoint  # the name from before any checkpoint loaded here (canonical only then)


def resume_checkpoint(
    path: Path,
    optimizer: Any,
    model: torch.nn.Module,
    scheduler: Any = None,
    verify: bool = True,
    tag: Optional[str] = None,
) -> dict[str, Any]:
    """`load_checkpoint` for a training script, whatever the engine: finds the APOLLO inside optimizer
    wrappers (``.optimizer``: DeepSpeed's ZeRO optimizer, accelerate's), restores the lr scheduler's
    state too. ``model``: the module whose parameter names the checkpoint uses (where an engine wraps
    the model, the wrapped module: DeepSpeed's ``engine.module``).
    Returns the trainer state (``step`` = the data position to continue after)."""
    trainer = load_checkpoint(path, optimizer, model, verify=verify, tag=tag)
    sched = trainer.get("scheduler")
    if scheduler is not None and sched is not None:
        sched = dict(sched)
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR's state carries (picklable) lambdas' state, or None
            sched.setdefault("lr_lambdas", [None] * len(scheduler.lr_lambdas))
        scheduler.load_state_dict(sched)
    return trainer


resume_canonical = resume_checkpoint  # the name from before any checkpoint loaded here


# -- a live single-process optimizer as a source ---------------------------------------------------
def _held(slots: list) -> torch.Tensor:
    """The elements the optimizer updates (the engine's fp32 master where it keeps one, not the model's copy):
    a fused expert weight's are its expert slots' back to back."""
    if len(slots) == 1:
        return slots[0].data
    return torch.cat([s.data.reshape(-1) for s in sorted(slots, key=lambda s: s.expert)])


class LiveSource:
    """A single-process APOLLO (world size 1) as a `Source`: save it canonically without a native
    checkpoint in between. Sharded runs save natively and convert (tools/convert_checkpoint.py)."""

    def __init__(
        self, optimizer: APOLLO, model: Optional[torch.nn.Module] = None, trainer: Optional[dict[str, Any]] = None
    ):
        refuse_int8(optimizer.slots(), "canonical checkpoints (LiveSource)")
        sd = optimizer.state_dict()
        if sd["apollo_layout"]["world_size"] != 1:
            raise CheckpointError(
                "LiveSource needs a single-process optimizer: save sharded runs natively and convert them"
            )
        by_id = _param_names(optimizer, model)
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        names = [by_id.get(id(p), f"param{i}") for i, p in enumerate(ordered)]
        slots: dict[int, list] = {}  # by param index: its slots (a fused expert weight: one per expert, in order)
        for s in optimizer.slots():
            slots.setdefault(s.index, []).append(s)
        self.meta, self._index = meta_from_state_dicts(sd, names, dict(trainer or {}), {"engine": "live"})
        master = lambda idx, entry, a, b: _held(slots[idx]).detach().float().cpu()[: b - a]  # noqa: E731
        self._rank = RankState("live optimizer", sd["apollo_layout"], sd["state"], master)

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``entry`` (the `Source` protocol)."""
        return assemble_param(entry, self._index[entry.name], [self._rank])
