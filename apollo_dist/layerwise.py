"""Layer-wise APOLLO: each parameter is updated inside backward, as soon as its gradient is complete.

``APOLLO(..., layerwise=True)`` registers ``Tensor.register_post_accumulate_grad_hook`` on every
trainable parameter it is bound to (the params themselves in one process; under FSDP2 the sharded
DTensors, whose hooks FSDP2 calls itself right after the reduce-scatter writes their sharded gradient,
see torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py ``foreach_reduce``). The hook runs the
ordinary step of that one parameter (the same core functions: seeds, projection refreshes, limiter,
bias correction, decay) and drops its gradient (``p.grad = None``), so at most a layer's gradients are
alive at any time instead of the whole model's. ``optimizer.step()`` then only checks that some
parameter was updated since the previous step (a parameter without gradient is skipped, as in the ordinary step)
and reads the non-finite decisions.

Nothing in a hook waits for the GPU: the update is launched (`APOLLO.update_now`) and backward goes on.
Non-finite gradients are decided per bucket on the device: a bucket (a param, or a layer's) with a gradient
holding inf/NaN (on any rank: at W > 1 one all-reduce per bucket, the one that already tells every rank which
params have a gradient) is not written (weights, moments, limiter norms, int8 storage), and its step counts do
not advance; the other buckets are updated. The host reads the flags once per step, in ``step()``: "raise" (the layer-wise default)
raises FloatingPointError there naming the params not updated; "skip" reads them at the following call and
warns naming them (``skipped_steps`` counts such steps; a step whose every param was non-finite, e.g. a
non-finite loss, changes nothing, as the ordinary "skip" does); "ignore" checks nothing.

Each parameter is its own unit (bucket): a param's update needs nothing but its own gradient, and its
hook is the first moment that gradient is complete. Where the param groups carry ``param_names``, the
params of one layer (`layer_of`: the name up to its first number) that are consecutive in a group are one
bucket instead, updated at the hook of the last of them (the gradients of a decoder layer complete together;
one launch per kernel for the layer instead of one per weight; at most a layer's gradients alive). int8
weights stay one per bucket. These buckets compute what the group-wide buckets compute (all of APOLLO's
reductions are per parameter), so the weights match the ordinary step. Under FSDP2 a low-rank param's shared channels cost its own collectives inside backward; every
rank runs the hooks in the same order (FSDP2's per-group reduce order), so the collectives match.

What cannot hold in this mode, and is refused:
- gradient accumulation over several backwards (the update already ran at the first one): a second
  gradient for a param before ``step()`` is a RuntimeError;
- clipping (global-norm clipping needs every gradient before any update; by the time a clipper runs the
  gradients were applied and freed, so it would clip nothing): ``torch.nn.utils.clip_grad_norm_`` /
  ``clip_grad_value_`` on a layer-wise param raise (`guard_clipping`: what accelerate, Lightning's
  ``gradient_clip_val`` and the Trainer call); launch/train.py refuses ``--grad-clip`` > 0 with ``--layerwise``;
- DeepSpeed ZeRO (ZeRO owns and partitions the gradients; no per-parameter hook after its reduction):
  an error at ``apollo_dist.deepspeed.initialize``, or at the first hook under plain ``deepspeed.initialize``.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, Optional, Protocol

import torch

from .binding import Binding, Unit
from .quant import int8_module


class Updater(Protocol):
    """What the hooks need of their optimizer (APOLLO's public methods; this module never imports it)."""

    @property
    def buckets(self) -> list: ...

    def ensure_bound(self) -> None: ...

    def update_now(self, buckets: list) -> Optional[torch.Tensor]: ...


DEEPSPEED_REFUSED = (
    "layer-wise APOLLO (layerwise=True) does not run under DeepSpeed ZeRO: ZeRO reduces and partitions the "
    "gradients itself and offers no per-parameter hook after its reduction; use layerwise=False, or FSDP2 "
    "(fully_shard) / one process for layer-wise updates"
)


CLIPPING_REFUSED = (
    "torch.nn.utils.{name} on {n} parameter(s) that layer-wise APOLLO (layerwise=True) updates inside backward: "
    "their gradients were applied and freed before any clipper can see them, so nothing would be clipped. "
    "Layer-wise updates cannot clip (no update may wait for every gradient): turn clipping off (Lightning: "
    "gradient_clip_val=None; accelerate: no clip_grad_norm_; launch/train.py: --grad-clip 0) or use layerwise=False"
)
# params some layer-wise APOLLO hooks, by id (a WeakSet would compare tensors with ==)
_LAYERWISE_PARAMS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def guard_clipping() -> None:
    """Make ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` raise on params a layer-wise APOLLO
    updates (installed once; other params clip as before). accelerate, Lightning's ``gradient_clip_val`` and
    the HF Trainer call them through the ``torch.nn.utils`` attribute, so they meet the check; code that
    imported the function before this ran does not (documented)."""
    for name in ("clip_grad_norm_", "clip_grad_value_"):
        original = getattr(torch.nn.utils, name)
        if getattr(original, "_apollo_guarded", False):
            continue

        @functools.wraps(original)
        def guarded(parameters, *args, _original=original, _name=name, **kwargs):
            params = [parameters] if torch.is_tensor(parameters) else list(parameters)
            hit = sum(1 for p in params if _LAYERWISE_PARAMS.get(id(p)) is p)
            if hit:
                raise RuntimeError(CLIPPING_REFUSED.format(name=_name, n=hit))
            return _original(params, *args, **kwargs)

        guarded._apollo_guarded = True
        setattr(torch.nn.utils, name, guarded)


def layer_of(name: Optional[str]) -> Optional[str]:
    """The layer a parameter's name places it in: its path through the first number ('model.layers.3.mlp.up_proj
    .weight' -> 'model.layers.3'); None for a name without one (embeddings, the head, the final norm) or no name."""
    parts = name.split(".") if name else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def per_param_binding(binding: Binding, layer: Optional[Callable[[Any], Optional[str]]] = None) -> Binding:
    """The same binding with one unit per parameter (so one bucket per parameter), for layer-wise updates; with
    ``layer`` (slot -> its layer, or None), one unit per run of consecutive slots of a unit in the same layer
    (a decoder layer's weights, whose gradients complete together: one bucket, one launch per kernel for them),
    and consecutive layers' runs merged while the merged unit holds no more elements than the binding's largest
    parameter (small models: fewer, larger launches; the gradients alive at once stay within what the largest
    parameter's gradient alone needs, so the peak does not grow). Sizes are global shapes, the same on every rank.

    Only bindings on the params themselves (plain tensors, FSDP2 DTensors) have a hook that fires when a
    parameter's gradient is complete; DeepSpeed's flat partitions ("flat") and adapters' ``bind`` layouts
    ("explicit") are refused with a ValueError naming the binding."""
    if binding.kind == "flat":
        raise ValueError(DEEPSPEED_REFUSED)
    if binding.kind != "params":
        raise ValueError(
            f"layer-wise APOLLO needs the param groups to hold the parameters themselves (one process, DDP, FSDP2); "
            f"got a {binding.kind!r} binding (APOLLO.bind): its gradients have no per-parameter hook"
        )

    def size(slots: list) -> int:  # elements of the whole params (global shapes: every rank merges alike)
        return sum(math.prod(s.shape) for s in slots)

    cap = max((size([s]) for u in binding.units for s in u.slots), default=0)
    units = []
    for u in binding.units:
        runs: list[tuple[Optional[str], list]] = []  # (layer or None, its consecutive slots)
        for s in u.slots:
            k = layer(s) if layer is not None else None
            if runs and k is not None and k == runs[-1][0]:
                runs[-1][1].append(s)
            else:
                runs.append((k, [s]))
        merged: list[tuple[Optional[str], list]] = []
        for k, slots in runs:
            if merged and k is not None and merged[-1][0] is not None and size(merged[-1][1]) + size(slots) <= cap:
                merged[-1] = (k, merged[-1][1] + slots)
            else:
                merged.append((k, slots))
        units += [Unit(u.group, slots) for _, slots in merged]
    return Binding(
        binding.kind,
        units,
        binding.process_group,
        binding.owners,
        binding.mesh,
        signature=binding.signature,
        held=binding.held,
    )


class LayerwiseUpdates:
    """The hooks of one layer-wise APOLLO and the bookkeeping of which params got their gradient this step.

    Created by ``APOLLO(layerwise=True)``; ``attach`` is called at every (re)binding with the new
    per-param (or per-layer) buckets, ``step`` by ``APOLLO.step``. A bucket is updated at the hook of its last
    param's gradient (one param: at once), its gradients freed then; one whose params did not all get a
    gradient in backward is updated at ``step()`` with those it got."""

    def __init__(self, optimizer: Updater):
        self._optimizer = weakref.ref(optimizer)  # the hooks live on the params: don't keep the optimizer alive
        self._handles: list[Any] = []
        self._bucket_of: dict[int, Any] = {}  # id(param) -> its bucket
        self._slot_of: dict[int, Any] = {}  # id(param) -> its slot
        self._done: set[int] = set()  # positions of the params whose gradient arrived since the last step()
        self._waiting: dict[int, tuple[Any, list]] = {}  # id(bucket) -> (bucket, its params with a gradient) until all
        self._checked = False  # the binding was checked in this step (on the first hook)

    def attach(self, buckets: list) -> None:
        """Hook every bucket's parameters; hooks of an earlier binding are removed."""
        for h in self._handles:
            h.remove()
        slots = [(b, s) for b in buckets for s in b.slots]
        self._bucket_of = {id(s.param): b for b, s in slots}
        self._slot_of = {id(s.param): s for _, s in slots}
        self._handles = [s.param.register_post_accumulate_grad_hook(self._on_grad) for _, s in slots]
        guard_clipping()
        _LAYERWISE_PARAMS.update((id(s.param), s.param) for _, s in slots)
        self._done.clear()
        self._waiting.clear()

    def _on_grad(self, param: torch.Tensor) -> None:
        """``param``'s gradient is complete (and, under FSDP2, reduce-scattered): update it, free it."""
        opt = self._optimizer()
        if opt is None:  # the optimizer is gone; its hooks stay on the params but do nothing
            return
        if not self._checked:  # once per step: the groups still hold what the hooks are on (DeepSpeed re-points them)
            self._checked = True
            opt.ensure_bound()
        bucket = self._bucket_of.get(id(param))
        if bucket is None:
            raise RuntimeError(
                f"layer-wise APOLLO: a gradient arrived for a tensor of shape {tuple(param.shape)} that the optimizer's "
                "param groups no longer hold (they were re-pointed after the hooks were registered): call "
                "optimizer.ensure_bound() after an engine re-points the param groups, before the first backward"
            )
        s = self._slot_of[id(param)]
        if s.index in self._done:
            raise RuntimeError(
                f"layer-wise APOLLO: param {s.index} (shape {s.shape}) got a second gradient before optimizer.step(): "
                "gradient accumulation over several backward passes cannot work layer-wise (each update runs as soon "
                "as the gradient is complete); call optimizer.step() after every backward, or use layerwise=False"
            )
        self._done.add(s.index)
        _, arrived = self._waiting.setdefault(id(bucket), (bucket, []))
        arrived.append(param)
        if len(arrived) == len(bucket.slots):  # the bucket's last gradient: update it now
            self._update(opt, bucket)

    def _update(self, opt: Updater, bucket: Any) -> None:
        """Update ``bucket`` with the gradients its params got, and free them."""
        _, arrived = self._waiting.pop(id(bucket))
        int8 = int8_module(bucket.slots[0].param) if len(bucket.slots) == 1 else None  # never grouped
        with torch.no_grad():
            if int8 is not None:  # Q-APOLLO: update the dequantized weight, then re-quantize it
                int8.load_scratch()
            bad = opt.update_now([bucket])  # launched, not waited for; writes gated on the device by ``bad``
            if int8 is not None:  # the step count as the update saw it (+ 1), taken back later if it was skipped
                int8.store_scratch(bucket.slots[0].index + 1, int(bucket.step_count[0]), bad)
        for p in arrived:
            p.grad = None  # the point of layer-wise updates: this gradient's memory goes back now

    def step(self) -> None:
        """``optimizer.step()`` in layer-wise mode: the updates themselves ran in backward, each param's at most
        once (a second gradient is an error in its hook), but for buckets some of whose params got no gradient:
        updated now with those they got; a param without gradient is not updated (skipped, as in the ordinary
        step). RuntimeError when no param got a gradient since the previous step."""
        opt = self._optimizer()
        for bucket, _ in list(self._waiting.values()):  # some of its params got no gradient: update it with the rest
            self._update(opt, bucket)
        opt.ensure_bound()  # re-pointed groups re-bind here (and re-hook); their params were not updated
        self._checked = False
        done, self._done = self._done, set()
        # A param whose hook did not fire had no gradient: it is skipped, as the ordinary step and the reference
        # skip it. Nothing updated at all is a misuse (no backward, or hooks on params an engine replaced).
        if not done and any(b.slots for b in opt.buckets):
            raise RuntimeError(
                "layer-wise APOLLO: optimizer.step() found no parameter updated since the last step: run backward "
                "before step() (the updates run inside backward); if an engine re-pointed the param groups (accelerate), "
                "call optimizer.ensure_bound() after it did, before the first backward"
            )
