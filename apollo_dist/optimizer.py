"""``apollo_dist.APOLLO``: a drop-in for ``apollo_torch.APOLLOAdamW`` that runs sharded.

Same constructor arguments and param-group keys as the reference. The parameters it steps are
described by `Slot`s (what this rank holds of each). It binds to whatever its param groups hold when
it first steps (apollo_dist.binding: plain tensors, FSDP2 DTensors, DeepSpeed ZeRO partitions) and
binds again when an engine re-points them before training starts; an adapter may also hand the slots
over itself with `bind`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from .binding import Binding, Received, Unit, detect, global_shape, is_dtensor
from .buckets import Bucket, build_buckets, exposed_state
from .core import Collectives, LowRankBucket, Slot
from .experts import expand_experts, fused_layout
from .groups import RUN_KEYS, TUNABLE_LOW_RANK_KEYS, warn_run_changes
from .layerwise import LayerwiseUpdates, layer_of, per_param_binding
from .projection import PROJECTIONS
from .quant import int8_module, refuse_int8
from .step_graph import StepGraph

GROUP_DEFAULTS = {"proj": "random", "proj_type": "std", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200}
SCALE_TYPES = ("channel", "tensor")


def _check_group(i: int, group: dict) -> None:
    """ValueError naming group ``i`` and the bad value."""
    where = f"param group {i}"
    if float(group["lr"]) < 0.0:
        raise ValueError(f"{where}: invalid learning rate lr={group['lr']}: must be >= 0")
    for j, b in enumerate(group["betas"]):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: invalid betas[{j}]={b}: must be in [0, 1)")
    if group["eps"] < 0.0:
        raise ValueError(f"{where}: invalid eps={group['eps']}: must be >= 0")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"{where}: invalid weight_decay={group['weight_decay']}: must be >= 0")
    if "rank" not in group:
        return
    for k, v in GROUP_DEFAULTS.items():
        group.setdefault(k, v)
    if not isinstance(group["rank"], int) or group["rank"] < 1:
        raise ValueError(f"{where}: invalid rank={group['rank']!r}: must be an integer >= 1")
    if group["proj"] not in PROJECTIONS:
        raise ValueError(f"{where}: unsupported proj={group['proj']!r}: expected one of {PROJECTIONS}")
    if group["proj_type"] != "std":
        raise ValueError(
            f"{where}: unsupported proj_type={group['proj_type']!r}: only 'std' is supported (the reference's "
            "'reverse_std', 'left' and 'right' fail with channel-wise scaling)"
        )
    if group["scale_type"] not in SCALE_TYPES:
        raise ValueError(f"{where}: unknown scale_type={group['scale_type']!r}: expected one of {SCALE_TYPES}")
    if not group["scale"] > 0:
        raise ValueError(f"{where}: invalid scale={group['scale']}: must be > 0")
    if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
        raise ValueError(f"{where}: invalid update_proj_gap={group['update_proj_gap']!r}: must be an integer >= 1")
    for j, p in enumerate(group["params"]):
        shape = global_shape(p)
        if len(shape) not in (2, 3):  # 3-D: fused experts [E, out, in], one APOLLO weight per slice (experts.py)
            raise ValueError(
                f"{where}: a group with 'rank' holds only 2-D weights and 3-D fused expert weights, but param {j} has shape {shape}"
            )
        if len(shape) == 3 and group["proj"] != "random":  # svd / dct state is kept per param, not per slice
            raise NotImplementedError(
                f"{where}: proj={group['proj']!r} with a fused expert weight (param {j}, shape {shape}) is not "
                "supported: use proj='random' for the group holding fused experts"
            )


def _nonfinite_policy(nonfinite: Optional[str], layerwise: bool) -> str:
    """The ``nonfinite`` argument checked, or its default ("raise" layer-wise, else "skip")."""
    if nonfinite is None:
        return "raise" if layerwise else "skip"
    if nonfinite not in ("skip", "raise", "ignore"):
        raise ValueError(f"invalid nonfinite={nonfinite!r}: expected 'skip', 'raise' or 'ignore'")
    return nonfinite


class APOLLO(torch.optim.Optimizer):
    """APOLLO / APOLLO-Mini (arXiv 2412.05270), sharded across ranks.

    Args are those of ``apollo_torch.APOLLOAdamW``. Param groups that carry ``rank`` run APOLLO on
    their 2-D weights with keys ``rank``, ``proj`` ("random", "svd": the reference's, "dct": SVD-free,
    arXiv 2505.17967), ``proj_type`` ("std"), ``scale_type``
    ("channel" | "tensor"), ``scale``, ``update_proj_gap`` (steps); other groups run the reference's
    plain Adam. ``projection_tf32`` (not in the reference; off by default) runs the projection
    matmuls in TF32 on GPUs: faster, and R changes by ~1e-3 relative. ``nonfinite``: what a step
    does when any rank's gradient holds inf/NaN: "skip" (default: no weight, moment or step count
    changes on any rank; counted in ``skipped_steps``), "raise" (FloatingPointError on every rank)
    or "ignore" (no check). "skip" takes no host sync where the step's writes run in the fused GPU kernels:
    the decision is a flag on the device that gates every write, and the host reads it at the next ``step``
    (or ``state_dict``, ``steps_taken``, ``skipped_steps``). ``cuda_graph`` (default True): on one GPU (no collectives in the
    step), with every write in the fused kernels, the step is captured as a CUDA graph and replayed
    (apollo_dist.step_graph); same numbers, a host cost that does not grow with the number of weights.
    ``lr`` is per step, ``eps`` is added to sqrt(exp_avg_sq), ``weight_decay`` is
    decoupled and applied after the update.

    ``layerwise=True`` (apollo_dist.layerwise): each parameter is updated inside backward as soon as its
    gradient is complete (under FSDP2: reduce-scattered), and its gradient is freed at once, so the
    whole model's gradient is never held; same numbers as the ordinary step. ``step()`` then only
    checks that some param was updated since the last step and reads the non-finite decisions. One process
    and FSDP2 only (DeepSpeed: an error); no gradient accumulation (an error), no global-norm clipping.
    Where the groups carry ``param_names``, the params of one layer (names up to their first number, e.g.
    ``model.layers.3``) are one bucket, updated when the last of their gradients is complete. The non-finite
    check is per bucket (a param, or a layer's params of one group), on the device (no host sync in backward):
    a bucket with an inf/NaN gradient (on any rank) is not written and its step counts do not advance, the
    others are updated (a non-finite loss: nothing changes). ``nonfinite`` defaults to "raise" there: ``step()`` raises
    FloatingPointError naming those params; "skip" warns naming them (counted in ``skipped_steps``).

    Whoever drives it: it steps what its param groups hold at each ``step`` — the params themselves
    (one process, DDP), FSDP2 DTensors (also when the lists were re-pointed after construction, as
    accelerate does), or the flat partitions of DeepSpeed ZeRO 1/2/3 (plain ``deepspeed.initialize``
    or ``apollo_dist.deepspeed.initialize``). Anything else is a clear error, never a silent step.
    Seeds are positional: param k of all groups (in order, trainable or not) gets seed k + 1.
    State per parameter: ``exp_avg`` / ``exp_avg_sq`` for the channels this rank owns, channel-major
    (C x r, C = max(m, n)), ``limiter_norm``, ``step``, ``seed``; with ``proj`` "svd" / "dct" also
    ``projection`` (the whole P, r x n tall / m x r wide; the r DCT indices, int64), the same on every rank.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, dict]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        projection_tf32: bool = False,
        nonfinite: Optional[str] = None,
        layerwise: bool = False,
        cuda_graph: bool = True,
    ):
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        _check_group(-1, {**defaults, "params": []})
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _check_group(i, group)
        self.scale_front = scale_front
        self.disable_nl = disable_nl
        self.projection_tf32 = projection_tf32
        self.nonfinite = _nonfinite_policy(nonfinite, layerwise)
        self._layerwise = LayerwiseUpdates(self) if layerwise else None  # updates run in backward; step() only checks
        self._skipped = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._skipped_in_a_row = 0  # ... since the last step taken (warned about at 3, 10, 100, ...)
        self._pending: Optional[_Pending] = None  # a step whose device decisions the host has not read yet
        self._updated: list[tuple] = []  # layer-wise: (bucket, count added, flags at) of each update_now this step
        # ... their decisions on the device, [non-finite count, live per slot] per bucket
        self._update_flags: Optional[torch.Tensor] = None
        self._update_at: dict[int, int] = {}  # ... where each bucket's are in it, by id(bucket)
        self._bad: Optional[torch.Tensor] = None  # the step's non-finite count (device)
        self._flags: Optional[torch.Tensor] = None  # W > 1: [non-finite count, ranks with each param's gradient]
        self._host: dict[int, torch.Tensor] = {}  # pinned host copies of those, by length
        self._graph = StepGraph() if cuda_graph else None
        # The group dicts (engines re-point their "params" and may narrow param_groups to one of them
        # while stepping, but keep the dicts) and the params as received, by position, held weakly.
        self._groups: list[dict] = list(self.param_groups)
        self._group_index = {id(g): i for i, g in enumerate(self._groups)}
        self._received: list[list[Received]] = Received.of(self._groups)
        self._binding: Optional[Binding] = None
        self._buckets: list[Bucket] = []
        self._clear_grads: dict[int, Callable[..., None]] = {}  # by id(bucket): the engine's gradient store zeroed
        self._prepare_grads: dict[int, Callable[[], tuple[list[Slot], bool]]] = {}  # by id(bucket): the same,
        # before the step (ZeRO-Offload), with the params the step must refuse
        self._comm = Collectives(None)
        self._device_live = False  # which params are live is decided on the device even at W = 1 (fused experts)
        self._world, self._rank, self._device = 1, 0, torch.device("cpu")
        self._generator_device = self._device  # where projections are drawn (ZeRO-Offload: the GPU, not the state's)
        if any(is_dtensor(p) for g in self._groups for p in g["params"]):
            self.ensure_bound()  # built after fully_shard: state exists from the start (DCP checkpoints at step 0)
        else:  # seeds now, the rest at binding: a non-empty state keeps DCP from a zero-gradient "init" step
            for g, row in zip(self._groups, self._received):
                for p, r in zip(g["params"], row):
                    if r.trainable:
                        self.state[p]["seed"] = r.seed
            if layerwise:  # the hooks must be on the params before the first backward: bind now
                self.ensure_bound()

    @staticmethod
    def of(obj: Any) -> "APOLLO":
        """The APOLLO inside ``obj``: an APOLLO, or anything that holds one under ``.optimizer`` however deep
        (DeepSpeed's ZeRO optimizer and its engine, accelerate's AcceleratedOptimizer, Lightning's
        LightningOptimizer). TypeError naming the chain when there is none."""
        chain, cur = [], obj
        while not isinstance(cur, APOLLO):
            chain.append(type(cur).__name__)
            if not hasattr(cur, "optimizer") or len(chain) > 16:
                raise TypeError(f"no APOLLO inside {' -> '.join(chain)} (followed .optimizer)")
            cur = cur.optimizer
        return cur

    @property
    def layerwise(self) -> bool:
        """Whether updates run inside backward (``layerwise=True``, apollo_dist.layerwise)."""
        return self._layerwise is not None

    def add_param_group(self, param_group: dict) -> None:
        """Only while constructing: seeds are the params' positions, fixed at construction."""
        if hasattr(self, "_groups"):
            raise NotImplementedError(
                "APOLLO.add_param_group after construction is not supported: pass every group to the constructor"
            )
        super().add_param_group(param_group)

    # -- binding ------------------------------------------------------------------------------
    def ensure_bound(self) -> None:
        """Bind to what the param groups hold now, unless the current binding still maps it.

        Collective when it binds (one all-gather of the layout): call it on every rank. Raises when
        the groups now hold tensors it cannot map, or other tensors than those it has already stepped."""
        self._settle()
        lists = [g["params"] for g in self._all_groups()]
        if self._binding is None or not self._binding.accepts(lists):
            self._install(detect(lists, self._received, ["rank" in g for g in self._all_groups()]))

    def bind(
        self, slots: list[Slot], process_group: Optional[dist.ProcessGroup] = None, owners: str = "position"
    ) -> None:
        """Tell the optimizer what this rank holds (for adapters of layouts `ensure_bound` does not detect).

        ``slots``: one per trainable parameter given to the optimizer, on every rank, in the same
        order (empty ranges allowed); ``Slot.index`` is the param's position. ``process_group``: the
        ranks that share the parameters (None: W = 1). ``owners``: "position" (channels follow the
        elements each rank holds) or "chunk" (torch.chunk's rule, so FSDP2 state is a regular Shard(0)
        DTensor). The binding stays until ``bind`` is called again.
        """
        group_of = {r.position: gi for gi, row in enumerate(self._received) for r in row}
        trainable = [r.position for row in self._received for r in row if r.trainable]
        missing = sorted(set(trainable) - {s.index for s in slots})
        if missing:
            raise ValueError(f"bind: no slot for trainable params at positions {missing[:8]}")
        units = [Unit(gi, [s for s in slots if group_of[s.index] == gi]) for gi in range(len(self._groups))]
        self._install(Binding("explicit", units, process_group, owners))

    def _all_groups(self) -> list[dict]:
        """The full list of group dicts, also while an engine shows a narrowed ``param_groups``."""
        current = self.param_groups
        if all(id(g) in self._group_index for g in current):
            return self._groups
        if len(current) == len(self._groups) and all("params" in g for g in current):
            # the groups were replaced wholesale (e.g. torch's own load_state_dict): same order, new dicts
            self._groups = list(current)
            self._group_index = {id(g): i for i, g in enumerate(self._groups)}
            return self._groups
        raise ValueError(
            f"APOLLO's param_groups hold {len(current)} groups it does not know (it was built with {len(self._groups)}): "
            "param groups cannot be added or dropped after construction"
        )

    def _install(self, binding: Binding) -> None:
        """Build the buckets of ``binding`` (one all-gather of every rank's element ranges)."""
        if _most_steps(self._buckets) > 0:
            raise ValueError(
                "APOLLO's param groups now hold other tensors than the ones it has been training "
                f"({self._binding.kind} -> {binding.kind}): an engine re-pointed them after the first step or load. "
                "Shard or wrap the model (fully_shard, deepspeed.initialize, accelerator.prepare) before the first "
                "step and before loading optimizer state"
            )
        binding = expand_experts(binding, self._received)
        if self._layerwise is not None:  # one bucket per param or per layer, stepped at its last param's hook
            if any(r.experts for row in self._received for r in row):
                raise NotImplementedError("layer-wise APOLLO with fused expert weights (3-D) is not supported")
            binding = per_param_binding(binding, self._layer_key())
        else:
            refuse_int8((s for u in binding.units for s in u.slots), "APOLLO(layerwise=False)")
        buckets, comm, device = build_buckets(binding, self._groups)
        self._binding, self._buckets, self._comm = binding, buckets, comm
        if self._graph is not None:
            self._graph.reset()
        self._bucket_of = {id(u): b for u, b in zip(binding.units, buckets)}
        self._updated, self._update_flags = [], None
        self._clear_grads = {id(b): u.clear_grads for u, b in zip(binding.units, buckets) if u.clear_grads}
        self._prepare_grads = {id(b): u.prepare_grads for u, b in zip(binding.units, buckets) if u.prepare_grads}
        for b in buckets:  # the CPU update zeroes what it reads of a store about to be zeroed (one pass, not two)
            if id(b) in self._clear_grads and hasattr(b, "zero_grads"):
                b.zero_grads = True
        self._world, self._rank, self._device = comm.world, comm.rank, device
        self._generator_device = binding.generator_device or device
        # an expert's gradient slice that is all zero means no token reached it: decided on the device (core)
        self._device_live = any(s.expert is not None for b in buckets for s in b.slots)
        self.state = exposed_state(buckets, binding.mesh)  # for the params bound now; others' entries dropped
        if self._layerwise is not None:
            self._layerwise.attach(buckets)

    def _layer_key(self) -> Callable[[Slot], Optional[str]]:
        """Layer-wise buckets: a slot's layer from its param's name (``param_names`` of its group, as
        `apollo_dist.param_groups`, the HF Trainer and launch/train.py give them; `layerwise.layer_of`); None (a
        bucket of its own) without a name and for int8 weights (they share one scratch per shape: one at a time)."""
        names = {}
        for g, row in zip(self._groups, self._received):
            for r, name in zip(row, g.get("param_names") or []):
                names[r.position] = name
        return lambda s: None if int8_module(s.param) is not None else layer_of(names.get(s.index))

    # -- what this rank holds (public view for checkpoints, tools and tests) --------------------
    @property
    def buckets(self) -> list[Bucket]:
        """The bound buckets (binding first if needed): one per param group, or per ZeRO-3 sub-group."""
        self.ensure_bound()
        return self._buckets

    def slots(self) -> list[Slot]:
        """This rank's `Slot`s of every trainable param, in position order (binding first if needed)."""
        return sorted((s for b in self.buckets for s in b.slots), key=lambda s: s.index)

    @property
    def process_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks that share the parameters (None when every rank steps everything)."""
        self.ensure_bound()
        return self._comm.group

    @property
    def device(self) -> torch.device:
        """Where the state lives (and projections are drawn, except under ZeRO-Offload: on DeepSpeed's compute
        device, as without offload; ``run_settings()["generator_device"]``)."""
        self.ensure_bound()
        return self._device

    def run_settings(self) -> dict[str, Any]:
        """The run-level settings a saved state records (`groups.RUN_KEYS`): the projection generator's device
        type (CPU and CUDA draw different P from one seed), ``scale_front``, ``disable_nl``."""
        self.ensure_bound()
        return {
            "generator_device": self._generator_device.type,
            "scale_front": self.scale_front,
            "disable_nl": self.disable_nl,
        }

    @property
    def steps_taken(self) -> int:
        """Optimizer steps applied so far (skipped non-finite steps not counted): the most any param was
        updated (a param without gradient in a step is not updated, as in the reference)."""
        return _most_steps(self.buckets)

    # -- stepping -----------------------------------------------------------------------------
    def _hparams(self, gi: int) -> dict:
        return {
            **self._groups[gi],
            "scale_front": self.scale_front,
            "disable_nl": self.disable_nl,
            "projection_tf32": self.projection_tf32,
        }

    def _active_buckets(self) -> list:
        """The buckets of the tensors that ``param_groups`` shows now (an engine may show one group, or
        one ZeRO-3 sub-group's partition, per call)."""
        self.ensure_bound()
        out = []
        for g in self.param_groups:
            out.extend(self._bucket_of[id(u)] for u in self._binding.active(self._group_index[id(g)], g["params"]))
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One APOLLO step on the held elements of the tensors the param groups hold now (a fixed number
        of collectives)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layerwise is not None:  # the updates ran in backward: check that some param got one, read decisions
            self._layerwise.step()
            self._updates_taken()
            return loss
        self._step_buckets(self._active_buckets())
        return loss

    def update_now(self, buckets: list) -> Optional[torch.Tensor]:
        """Update ``buckets`` (from `buckets`) at once, outside ``step``: what layer-wise APOLLO's gradient hook
        calls for its param's bucket (apollo_dist.layerwise). The ordinary step's device work, with every write
        gated on the device by these buckets' own non-finite check (unless nonfinite="ignore"; at W > 1 all ranks
        take one decision, through one all-reduce per call): no host sync, fused or eager. Their step counts
        advance now; the next ``step()`` reads the decisions of every call since the last one and takes back
        the count of a param that was not updated ("raise": FloatingPointError there; "skip": read at the
        following call, warned). Returns the call's non-finite count (0-dim, on the device, valid until that
        ``step()``; None with "ignore") for writes the caller gates on it (int8 weights)."""
        hparams = [self._hparams(b.group_index) for b in buckets]
        for b, hp in zip(buckets, hparams):
            b.begin(hp)
            b.scalars.gate_on_device = True  # the eager twins too: no host read of the flag
        check = self.nonfinite != "ignore"
        try:
            bad = self._record_update(buckets, self._device_step(buckets, hparams, check, gated=check))
            return bad if check else None
        finally:
            for b in buckets:
                b.discard()

    def _record_update(self, buckets: list, bad: torch.Tensor) -> torch.Tensor:
        """Count the steps of an `update_now` call as taken and keep its decisions on the device (no host sync):
        [non-finite count, (W > 1) ranks with each slot's gradient] per bucket, at the bucket's place in one
        buffer that ``step()`` copies to the host once ("ignore" at W = 1: never read). Returns the first bucket's
        count."""
        if self._update_flags is None or self._update_flags.device != self._device:
            self._update_at, k = {}, 0
            for b in self._buckets:
                self._update_at[id(b)] = k
                k += 1 + len(b.slots)
            self._update_flags = torch.zeros(k, device=self._device)
        here = self._comm.world == 1  # the host knows which params have a gradient
        k = 1
        for b in buckets:
            at, n = self._update_at[id(b)], len(b.slots)
            self._update_flags[at : at + 1].copy_(bad.reshape(1))
            if not here:
                self._update_flags[at + 1 : at + 1 + n].copy_(self._flags[k : k + n])
            k += n
            inc = torch.tensor(b.scalars.live(), dtype=torch.float32) if here else torch.ones(n)
            b.step_count += inc
            self._updated.append((b, inc, at))
        at = self._update_at[id(buckets[0])]
        return self._update_flags[at]

    def _updates_taken(self) -> None:
        """Layer-wise ``step()``: the decisions of this step's `update_now` calls to the host (one copy), read
        now with "raise" (one host sync per step: FloatingPointError naming the params not updated), else at
        the next call (`_settle`)."""
        records, self._updated = self._updated, []
        if not records or (self._comm.world == 1 and self.nonfinite == "ignore"):
            return  # W = 1 "ignore": every count added was right
        here = self._comm.world == 1
        buckets, applied, at = zip(*records)
        live_at = [None if here else a + 1 for a in at]
        self._read_later(self._update_flags, list(buckets), list(applied), list(at), live_at)
        if self.nonfinite != "raise":
            return
        failed = self._settle()
        if failed:
            slots = [s for b in failed for s in b.slots]
            steps = int(max(float(b.step_count.max()) for b in failed)) + 1
            others = sum(len(b.slots) for b in buckets) - len(slots)
            raise FloatingPointError(
                f"APOLLO (layer-wise): non-finite gradient in {_names(slots)} at step {steps}: not updated (weights, "
                f"moments and step counts unchanged); {others} other param(s) were updated in this backward and keep "
                "their update (nonfinite='skip' warns instead)"
            )

    def _step_buckets(self, buckets: list) -> None:
        """Step ``buckets``; all ranks take one decision on non-finite gradients ("skip": settled at the next
        call, see `_settle`)."""
        hparams = [self._hparams(b.group_index) for b in buckets]
        if self._prepare_grads:
            self._prepare_offloaded_grads(buckets)
        for b, hp in zip(buckets, hparams):
            b.begin(hp)
        # "skip": every write is gated by the device flag (the fused kernels read it on the device, the eager
        # paths read it on the host), so every rank runs the same collectives whatever its slots; "raise":
        # decided on the host before anything is written.
        gated = self.nonfinite == "skip"
        check = self.nonfinite != "ignore"
        try:
            if self.nonfinite != "raise" and self._graphable(buckets):
                key = self._graph_key(buckets, hparams, gated)
                body = lambda: self._device_step(buckets, hparams, check, gated)
                if self._graph.run(key, body, lambda: [b.point_at_grads() for b in buckets]):
                    self._taken(buckets, gated)  # replayed
                    return
            bad = self._device_step(buckets, hparams, check, gated)
            if check and not gated:  # "raise": one host sync before any write
                if bad.item() > 0:
                    _undo_refreshes(buckets)
                    raise FloatingPointError(
                        f"APOLLO: non-finite gradient on {int(bad.item())} rank-bucket(s) at step "
                        f"{self._step_number(buckets)}; nothing was updated (nonfinite='skip' skips such steps instead)"
                    )
                for b, hp in zip(buckets, hparams):
                    b.finish(hp)
            self._taken(buckets, gated)
        finally:
            for b in buckets:
                b.discard()
                if id(b) in self._clear_grads:  # ZeRO-3: a param without gradient next step must not get this one
                    self._clear_grads[id(b)](getattr(b, "zeroed", ()))  # what the update zeroed is skipped

    def _prepare_offloaded_grads(self, buckets: list) -> None:
        """ZeRO-Offload: zero the gradient store where a param got no gradient (`binding.OffloadedGrads`), and refuse
        a step whose gradient DeepSpeed accumulated wrong (a param with a gradient in some of the step's micro-steps
        but not all) on every rank when one finds it, at the step's first call (DeepSpeed calls ``step`` once per
        group or ZeRO-3 sub-group): one all-reduce per step where DeepSpeed accumulates several micro-steps."""
        partial, accumulated = [], False
        for b in buckets:
            if id(b) in self._prepare_grads:
                found, several = self._prepare_grads[id(b)]()  # the whole binding's, at the step's first unit
                partial += found
                accumulated |= several
        if not accumulated:
            return
        count = torch.tensor([float(len(partial))])
        if self._world > 1:
            self._comm.all_reduce(count)
        if count.item() > 0:
            where = _names(partial) if partial else "params of another rank's micro-batches"
            raise RuntimeError(
                f"APOLLO with DeepSpeed ZeRO-Offload: {where} got a gradient in some micro-steps of step "
                f"{self._step_number(self._buckets)} but not in all; DeepSpeed's offloaded gradient accumulation "
                "(0.19) gets such a gradient wrong (it adds the previous step's where the first micro-steps gave none, "
                "and drops the earlier micro-steps' where the last gave none; its own optimizers too), so nothing was "
                "updated. Use gradient_accumulation_steps 1 or no offload_optimizer, or make every micro-batch reach "
                "these params"
            )

    def _device_step(self, buckets: list, hparams: list[dict], check: bool, gated: bool) -> torch.Tensor:
        """The step's device work (no host sync, nothing host-side that changes between steps: a CUDA graph
        may capture it). Returns the number of rank-buckets with a non-finite gradient (0-dim; all ranks
        agree), into ``self._bad``. ``gated`` ("skip"): ``finish`` runs and writes nothing when it is > 0; else
        ``finish`` runs only when ``check`` is off ("raise": the host decides and calls it).
        At W > 1 the same all-reduce tells every rank which params have a gradient on some rank (a rank that
        holds none of a param's elements cannot know; under FSDP2 it sees ``grad is None`` either way)."""
        for b, hp in zip(buckets, hparams):
            b.prepare(hp)
        bad = self._bad_buffer()
        if check:
            bad.copy_(sum((b.nonfinite().to(self._device) for b in buckets), torch.zeros((), device=self._device)))
        elif self._comm.world > 1 or self._device_live:  # "ignore": the flags below still decide which params are live
            bad.zero_()
        if self._comm.world > 1 or self._device_live:
            # Over APOLLO's group only (HSDP: the shard sub-mesh). Replicas agree without asking: FSDP2
            # all-reduced their gradients (bitwise-identical results; an inf/NaN anywhere reaches all).
            self._flags = torch.cat([bad.reshape(1)] + [b.scalars.live_t for b in buckets])
            if self._comm.world > 1:
                self._comm.all_reduce(self._flags)
            bad.copy_(self._flags[0])
            k = 1
            for b in buckets:
                b.scalars.live_from(self._flags[k : k + len(b.slots)])
                k += len(b.slots)
        if gated or not check:
            for b, hp in zip(buckets, hparams):
                b.finish(hp, bad if gated else None)
        return bad

    def _bad_buffer(self) -> torch.Tensor:
        """The step's non-finite count, one persistent 0-dim tensor (a captured step writes it in place)."""
        if self._bad is None or self._bad.device != self._device:
            self._bad = torch.zeros((), device=self._device)
            self._host = {}
        return self._bad

    def _taken(self, buckets: list, gated: bool) -> None:
        """Count the step taken now by each param that has a gradient (at W > 1 by every param: the all-reduce
        decided on the device which have one); where the host has not seen the device's decisions (the skip
        flag of a device-gated step, W > 1's live params), read them at the next call (`_settle`)."""
        here = self._comm.world == 1 and not self._device_live  # the host knows which params have a gradient
        applied, live_at, k = [], [], 1
        for b in buckets:
            inc = torch.tensor(b.scalars.live(), dtype=torch.float32) if here else torch.ones(len(b.slots))
            b.step_count += inc
            applied.append(inc)
            live_at.append(None if here else k)  # W > 1: [count, live per slot of each bucket]
            k += len(b.slots)
        if here and not gated:
            return
        src = self._bad.reshape(1) if here else self._flags
        self._read_later(src, buckets, applied, [0] * len(buckets), live_at)

    def _read_later(
        self, src: torch.Tensor, buckets: list, applied: list, bad_at: list[int], live_at: list[Optional[int]]
    ) -> None:
        """Copy the device decisions ``src`` to pinned host memory without waiting (an event marks the copy);
        `_settle` reads them: each bucket's non-finite count at ``bad_at``, its slots' live flags at ``live_at``
        (None: ``applied`` already counts only the slots with a gradient)."""
        host = self._host.get(len(src))
        if host is None:
            host = self._host[len(src)] = torch.zeros(len(src), pin_memory=self._device.type == "cuda")
        event = None
        if self._device.type == "cuda":
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(src)
        self._pending = _Pending(buckets, applied, host, event, bad_at, live_at)

    def _settle(self) -> list:
        """Read the device's decisions of the last step (waits for them): a skipped step is undone (layer-wise:
        the buckets whose gradient was non-finite), and at W > 1 the params without gradient on any rank take
        back their count. Returns the buckets not updated for a non-finite gradient ("skip": counted, warned)."""
        if self._pending is None:
            return []
        p, self._pending = self._pending, None
        if p.event is not None:
            p.event.synchronize()
        failed = []
        for b, inc, bad_at, live_at in zip(p.buckets, p.applied, p.bad_at, p.live_at):
            live = inc if live_at is None else (p.host[live_at : live_at + len(b.slots)] > 0).float()
            bad = bool(p.host[bad_at] > 0)
            b.step_count += (0.0 if bad else live) - inc
            if bad:
                failed.append(b)
        if not failed:
            self._skipped_in_a_row = 0
            return failed
        _undo_refreshes(failed)  # their svd / dct refreshes happen again at their next step
        if self.nonfinite != "skip":
            return failed
        self._skipped += 1
        if len(failed) < len(p.buckets):  # layer-wise: the other params were updated in this step
            self._skipped_in_a_row = 0
            slots = [s for b in failed for s in b.slots]
            others = sum(len(b.slots) for b in p.buckets) - len(slots)
            warnings.warn(
                f"APOLLO (layer-wise): non-finite (inf/NaN) gradient in {_names(slots)}: not updated at this step "
                f"(nonfinite='skip'); {others} other param(s) were updated",
                RuntimeWarning,
                stacklevel=3,
            )
            return failed
        self._skipped_in_a_row += 1
        n = self._skipped_in_a_row
        if n == 3 or (n >= 10 and n == 10 ** (len(str(n)) - 1)):
            warnings.warn(
                f"APOLLO: the last {n} steps were skipped for non-finite (inf/NaN) gradients ({self._skipped} skipped "
                f"in all; nonfinite='skip'): the weights have not changed since step {_most_steps(self._buckets)}. "
                "Check the loss, the learning rate and, in fp16, the loss scale",
                RuntimeWarning,
                stacklevel=3,
            )
        return failed

    @staticmethod
    def _step_number(buckets: list) -> int:
        return _most_steps(buckets) + 1 if buckets else 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (``nonfinite="skip"``; layer-wise: steps in which some param
        was not updated for one)."""
        self._settle()
        return self._skipped

    def _graphable(self, buckets: list) -> bool:
        """A CUDA graph may capture the step: one GPU, no collective, every bucket stepped in this call, every
        write in a fused kernel, every gradient present. Not with fused experts: their live flags are a fresh
        tensor per step (`_device_step`), which a replayed graph would not write."""
        return (
            self._graph is not None
            and self._device.type == "cuda"
            and self._comm.world == 1
            and not self._device_live
            and len(buckets) == len(self._buckets)
            and all(b.fused() and b.complete() for b in buckets)
        )

    @staticmethod
    def _graph_key(buckets: list, hparams: list[dict], gated: bool) -> tuple:
        """What a captured step bakes in: the buckets, the addresses of the gradients it reads directly (the
        kernels read the others through pointer tables, rewritten before each replay; the other tensors never
        move: projections are redrawn in place), the hyperparameters read as constants (all but lr and weight
        decay, which reach the kernels through `StepScalars`), and the skip mode."""
        baked = tuple(
            repr(sorted((k, v) for k, v in hp.items() if k not in ("params", "lr", "weight_decay", "param_names")))
            for hp in hparams
        )
        ptrs = tuple(g.data_ptr() for b, hp in zip(buckets, hparams) for g in b.direct_grads(hp))
        return (tuple(id(b) for b in buckets), ptrs, baked, gated)

    # -- state dicts --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict form, keyed by the params' positions (whatever tensors an engine left in
        the groups), plus ``apollo_layout`` (see `layout`) and, in each group, the projection
        generator's device type, ``scale_front`` and ``disable_nl``, so that a native checkpoint can be
        reassembled offline at any world size (apollo_dist.checkpoint). DCP's get_state_dict keeps the
        groups' keys and drops the layout (DCP reshards by itself)."""
        self.ensure_bound()
        groups = []
        for g, row in zip(self._groups, self._received):
            saved = {k: v for k, v in g.items() if k != "params"}
            saved.update(params=[r.position for r in row], **self.run_settings())
            groups.append(saved)
        state = {s.index: dict(self.state[s.param]) for s in self.slots()}
        return {"state": state, "param_groups": groups, "apollo_layout": self.layout()}

    def layout(self) -> dict[str, Any]:
        """This rank's part of the layout: world size, rank, the projection generator's device type
        (CPU and CUDA draw different P), and per param, keyed like ``state_dict()["state"]``: group,
        global shape, held flat elements [start, end) (or ``block``: [r0, r1, c0, c1]) and, for low-rank
        params, owned channels [o0, o1)."""
        params: dict[int, dict[str, Any]] = {}
        for b in self.buckets:
            for i, s in enumerate(b.slots):
                if s.expert is not None:  # a fused expert weight: one entry, per expert its range and channels
                    if s.expert == 0:
                        params[s.index] = fused_layout(b, i, global_shape(s.param)[0], self._rank)
                    continue
                entry = {"group": b.group_index, "shape": list(s.shape), "start": s.start, "end": s.end}
                if s.block is not None:
                    entry["block"] = list(s.block)
                if isinstance(b, LowRankBucket):
                    entry["owned"] = list(b.layouts[i].owners[self._rank])
                params[s.index] = entry
        params = dict(sorted(params.items()))
        return {
            "version": 1,
            "world_size": self._world,
            "rank": self._rank,
            "generator_device": self._generator_device.type,
            "params": params,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the same layout (same W and engine); copies into the live buffers."""
        self.ensure_bound()
        saved_layout = state_dict.get("apollo_layout")
        if saved_layout is not None and saved_layout["params"] != self.layout()["params"]:
            raise ValueError(
                f"optimizer state was saved at world size {saved_layout['world_size']} (rank {saved_layout['rank']}) with "
                f"another partition layout than this run's (world size {self._world}, rank {self._rank}): convert it "
                "with tools/convert_checkpoint.py and load it with apollo_dist.checkpoint.load_canonical"
            )
        position = self._load_groups(state_dict["param_groups"])
        slot_at = {s.index: s for s in self.slots()}
        pairs = []
        for pid, saved_state in state_dict["state"].items():
            s = slot_at.get(position.get(pid, -1))
            if s is None:
                raise ValueError(f"optimizer state names param id {pid}, which this optimizer does not train")
            pairs.append((pid, self.state[s.param], saved_state))
        for pid, live, saved_state in pairs:  # every param checked before anything is written
            _load_param_state(pid, live, saved_state, write=False)
        # A state that took no step drew no projection (accelerate moves a fresh one from CPU to the GPU this way)
        if state_dict["param_groups"] and any(
            float(torch.as_tensor(_local(st.get("step", 0))).max()) > 0 for st in state_dict["state"].values()
        ):
            warn_run_changes("optimizer state", state_dict["param_groups"][0], self.run_settings())
        _take_hyperparameters_into(self._groups, state_dict["param_groups"])
        for pid, live, saved_state in pairs:
            _load_param_state(pid, live, saved_state)
        for b in self._buckets:
            if isinstance(b, LowRankBucket):
                b.reset_projections()  # svd / dct: P from the loaded state

    def _load_groups(self, saved_groups: list[dict[str, Any]]) -> dict[Any, int]:
        """Check the saved groups against these (warn where run-level settings differ); returns saved param
        id -> position."""
        if len(saved_groups) != len(self._groups):
            raise ValueError(
                f"optimizer state has {len(saved_groups)} param groups, this optimizer has {len(self._groups)}"
            )
        position = {}
        for gi, (mine, row, saved) in enumerate(zip(self._groups, self._received, saved_groups)):
            if len(row) != len(saved["params"]):
                raise ValueError(f"param group {gi}: state has {len(saved['params'])} params, optimizer has {len(row)}")
            for key in TUNABLE_LOW_RANK_KEYS:
                if mine.get(key) != saved.get(key):
                    raise ValueError(
                        f"param group {gi}: saved {key}={saved.get(key)!r} differs from this optimizer's {mine.get(key)!r}"
                    )
            position.update(zip(saved["params"], (r.position for r in row)))
        return position


@dataclass
class _Pending:
    """A step whose device decisions the host reads at the next call: the buckets stepped, the counts added
    to each (per param), the host copy of the decisions and its event; where each bucket's non-finite count
    is in it, and its slots' live flags (ranks with each param's gradient; None where the host knew them and
    ``applied`` counts only the params with a gradient)."""

    buckets: list
    applied: list[torch.Tensor]
    host: torch.Tensor
    event: Optional[Any]
    bad_at: list[int]
    live_at: list[Optional[int]]


def _names(slots: list) -> str:
    """'param 3 (shape (23, 11)), ...' for a message (the first 8)."""
    shown = ", ".join(f"param {s.index} (shape {tuple(s.shape)})" for s in slots[:8])
    return f"{len(slots)} param(s): {shown}" + (", ..." if len(slots) > 8 else "")


def _undo_refreshes(buckets: list) -> None:
    """A step not taken: the svd / dct projections it refreshed refresh again at the next step."""
    for b in buckets:
        if isinstance(b, LowRankBucket):
            b.undo_refresh()


def _most_steps(buckets: list) -> int:
    """The most steps any param of ``buckets`` has taken (0 when none)."""
    return int(max((float(b.step_count.max()) for b in buckets if len(b.step_count)), default=0.0))


def _local(t: Any) -> Any:
    """A DTensor's local part (DCP may hand state back as DTensors), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def _take_hyperparameters_into(groups: list[dict], saved_groups: list[dict[str, Any]]) -> None:
    """The saved groups' hyperparameters (lr, betas, ...; not the run-level keys, this run's) into ``groups``."""
    for mine, saved in zip(groups, saved_groups):
        for k, v in saved.items():
            if k not in ("params", "param_names") + RUN_KEYS:
                mine[k] = v


def _load_param_state(pid: Any, live: dict[str, Any], saved: dict[str, Any], write: bool = True) -> None:
    """Check one param's saved state against its live buffers and (``write``) copy it in (the seed is checked,
    not copied)."""
    for k, v in saved.items():
        if k == "seed":
            if int(v) != live["seed"]:
                raise ValueError(f"param {pid}: saved seed {v} differs from {live['seed']} (params in another order?)")
            continue
        if k not in live:
            raise ValueError(f"param {pid}: unknown optimizer state key {k!r}")
        dst, src = live[k], v
        dst_l, src_l = _local(dst), torch.as_tensor(_local(src))
        if dst_l.shape != src_l.shape and not dst_l.numel() == src_l.numel() == 1:  # a scalar may be 0-d or (1,)
            raise ValueError(
                f"param {pid}: saved state {k!r} has shape {tuple(src_l.shape)}, this optimizer's is "
                f"{tuple(dst_l.shape)} (another layout, projection rank or orientation): not loaded"
            )
        if write:
            dst_l.copy_(src_l.reshape(dst_l.shape))
