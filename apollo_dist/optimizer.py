"""``apollo_dist.APOLLO``: a drop-in for ``apollo_torch.APOLLOAdamW`` that runs sharded.

Same constructor arguments and param-group keys as the reference. The parameters it steps are
described by `Slot`s (what this rank holds of each); it finds them itself for plain tensors (one
process, DDP) and FSDP2 DTensors, and an engine adapter hands them over with `bind` (DeepSpeed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from .core import AdamBucket, Collectives, LowRankBucket, Slot
from .layout import ParamLayout, chunk_owners, matrix_dims, position_owners

GROUP_DEFAULTS = {"proj": "random", "proj_type": "std", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200}
SCALE_TYPES = ("channel", "tensor")


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 params keep their shape in ds_shape


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
    if group["proj"] != "random":
        raise ValueError(f"{where}: unsupported proj={group['proj']!r}: only 'random' (APOLLO) is supported")
    if group["proj_type"] != "std":
        raise ValueError(f"{where}: unsupported proj_type={group['proj_type']!r}: only 'std' is supported")
    if group["scale_type"] not in SCALE_TYPES:
        raise ValueError(f"{where}: unknown scale_type={group['scale_type']!r}: expected one of {SCALE_TYPES}")
    if not group["scale"] > 0:
        raise ValueError(f"{where}: invalid scale={group['scale']}: must be > 0")
    if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
        raise ValueError(f"{where}: invalid update_proj_gap={group['update_proj_gap']!r}: must be an integer >= 1")
    for j, p in enumerate(group["params"]):
        shape = _global_shape(p)
        if len(shape) != 2:
            raise ValueError(f"{where}: a group with 'rank' holds only 2-D weights, but param {j} has shape {shape}")


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor"


def local_slots(params: list[tuple[int, torch.Tensor]]) -> list[Slot]:
    """Slots for plain tensors: every element is held here (one process, or DDP's replicas)."""
    slots = []
    for idx, p in params:
        if not p.is_contiguous():
            raise ValueError(f"APOLLO needs contiguous parameters; param {idx} with shape {tuple(p.shape)} is not")
        grad = lambda p=p: None if p.grad is None else p.grad.reshape(-1)
        slots.append(Slot(p, idx, tuple(p.shape), 0, p.numel(), p.data.view(-1), grad))
    return slots


def dtensor_slots(params: list[tuple[int, torch.Tensor]]) -> tuple[list[Slot], Any]:
    """Slots for FSDP2 DTensors (Shard(0) on a 1-D mesh, uneven last shard), and their mesh."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    slots, mesh = [], None
    for idx, p in params:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"param {idx}: APOLLO supports FSDP2 DTensors with placements (Shard(0),) on a 1-D mesh, "
                f"got {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
            )
        if mesh is not None and p.device_mesh != mesh:
            raise NotImplementedError("APOLLO needs every parameter on the same FSDP2 device mesh")
        mesh = p.device_mesh
        local = p._local_tensor
        _, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        row = math.prod(p.shape[1:])
        start = offset[0] * row if local.numel() else 0
        grad = lambda p=p: None if p.grad is None else p.grad._local_tensor.reshape(-1)
        slots.append(Slot(p, idx, tuple(p.shape), start, start + local.numel(), local.view(-1), grad))
    return slots, mesh


class APOLLO(torch.optim.Optimizer):
    """APOLLO / APOLLO-Mini (arXiv 2412.05270), sharded across ranks.

    Args are those of ``apollo_torch.APOLLOAdamW``. Param groups that carry ``rank`` run APOLLO on
    their 2-D weights with keys ``rank``, ``proj`` ("random"), ``proj_type`` ("std"), ``scale_type``
    ("channel" | "tensor"), ``scale``, ``update_proj_gap`` (steps); other groups run the reference's
    plain Adam. ``projection_tf32`` (not in the reference; off by default) runs the projection
    matmuls in TF32 on GPUs: faster, and R changes by ~1e-3 relative. ``nonfinite``: what a step
    does when any rank's gradient holds inf/NaN: "skip" (default: no weight, moment or step count
    changes on any rank; counted in ``skipped_steps``), "raise" (FloatingPointError on every rank)
    or "ignore" (no check, no host sync). ``lr`` is per step, ``eps`` is added to sqrt(exp_avg_sq), ``weight_decay`` is
    decoupled and applied after the update.

    Works as-is on plain parameters and on FSDP2 (``fully_shard``) DTensors; DeepSpeed goes through
    ``apollo_dist.deepspeed.initialize``. State per parameter: ``exp_avg`` / ``exp_avg_sq`` for the
    channels this rank owns, channel-major (C x r, C = max(m, n)), ``limiter_norm``, ``step``, ``seed``.
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
        nonfinite: str = "skip",
    ):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        _check_group(-1, {**defaults, "params": []})
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _check_group(i, group)
        self.scale_front = scale_front
        self.disable_nl = disable_nl
        self.projection_tf32 = projection_tf32
        if nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"invalid nonfinite={nonfinite!r}: expected 'skip', 'raise' or 'ignore'")
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._comm = Collectives(None)
        # Seeds as the reference gives them: 1 + the param's position among all params received.
        self._indexed: list[tuple[int, int, torch.Tensor]] = []  # (group, index, param) of trainable params
        index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._indexed.append((gi, index, p))
                    self.state[p]["seed"] = index + 1
                index += 1
        self._buckets: Optional[list[Union[AdamBucket, LowRankBucket]]] = None
        self._mesh = None

    # -- binding the layout -------------------------------------------------------------------
    def bind(self, slots: list[Slot], process_group: Optional[dist.ProcessGroup] = None, owners: str = "position") -> None:
        """Tell the optimizer what this rank holds (engine adapters call this once, before any step).

        ``slots``: one per trainable parameter given to the optimizer, on every rank, in the same
        order (empty ranges allowed). ``process_group``: the ranks that share the parameters (None: W = 1).
        ``owners``: "position" (channels follow the elements each rank holds) or "chunk" (torch.chunk's
        rule, so FSDP2 state is a regular Shard(0) DTensor).
        """
        comm = self._comm = Collectives(process_group)
        by_param = {id(s.param): s for s in slots}
        missing = [idx for _, idx, p in self._indexed if id(p) not in by_param]
        if missing:
            raise ValueError(f"bind: no slot for trainable params at positions {missing[:8]}")
        device = slots[0].data.device if slots else torch.device("cpu")
        ranges = self._all_ranges([by_param[id(p)] for _, _, p in self._indexed], comm, device)
        buckets = []
        for gi, group in enumerate(self.param_groups):
            members = [(k, by_param[id(p)]) for k, (g, _, p) in enumerate(self._indexed) if g == gi]
            g_slots = [s for _, s in members]
            if "rank" not in group:
                buckets.append(AdamBucket(gi, g_slots))
                continue
            layouts = []
            for k, s in members:
                m, n = matrix_dims(s.shape)
                rs = ranges[k]
                own = chunk_owners(m, n, comm.world) if owners == "chunk" else position_owners(m, n, rs)
                layouts.append(ParamLayout(m, n, rs, own))
            buckets.append(LowRankBucket(gi, g_slots, layouts, group, comm, device))
        self._buckets = buckets
        self._world, self._rank, self._device = comm.world, comm.rank, device  # for layout()
        self._expose_state()

    @staticmethod
    def _all_ranges(slots: list[Slot], comm: Collectives, device: torch.device) -> list[list[tuple[int, int]]]:
        """Every rank's element range of every param (one all-gather at bind time)."""
        mine = torch.tensor([[s.start, s.end] for s in slots], dtype=torch.int64).reshape(-1, 2)
        if comm.world == 1:
            return [[tuple(r)] for r in mine.tolist()]
        every = comm.all_gather(mine.to(device)).view(comm.world, len(slots), 2).cpu()
        return [[tuple(every[w, k].tolist()) for w in range(comm.world)] for k in range(len(slots))]

    def _ensure_bound(self) -> None:
        if self._buckets is not None:
            return
        params = [(idx, p) for _, idx, p in self._indexed]
        if params and all(_is_dtensor(p) for _, p in params):
            slots, self._mesh = dtensor_slots(params)
            self.bind(slots, self._mesh.get_group(), owners="chunk")
        elif any(_is_dtensor(p) for _, p in params):
            raise NotImplementedError("APOLLO got a mix of DTensor and plain parameters: shard the whole model with fully_shard")
        else:
            self.bind(local_slots(params))

    def _expose_state(self) -> None:
        """Point ``self.state[param]`` at the buckets' buffers (DTensors under FSDP2, so DCP reshards them)."""
        for b in self._buckets:
            for i, s in enumerate(b.slots):
                st = self.state[s.param]
                st["step"] = b.step_count
                if isinstance(b, LowRankBucket):
                    o0, o1 = b.geom[i].o0, b.geom[i].o1
                    rows = slice(b.o_off[i], b.o_off[i] + o1 - o0)
                    st["exp_avg"] = self._as_global(b.exp_avg[rows], s, (b.layouts[i].channels, b.rank_r))
                    st["exp_avg_sq"] = self._as_global(b.exp_avg_sq[rows], s, (b.layouts[i].channels, b.rank_r))
                    st["limiter_norm"] = b.limiter_norm[i : i + 1]
                else:
                    st["exp_avg"] = self._as_global(b.exp_avg[i], s)
                    st["exp_avg_sq"] = self._as_global(b.exp_avg_sq[i], s)

    def _as_global(self, local: torch.Tensor, s: Slot, channel_shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """This rank's piece of a moment as state exposes it: as is, or under FSDP2 a DTensor with the
        global shape (the param's, or (C, r) channel-major for low-rank moments) so DCP reshards it."""
        if self._mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        if channel_shape is None:  # plain-Adam state shaped and sharded like the param
            p = s.param
            return DTensor.from_local(local.view(p._local_tensor.shape), self._mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        C, r = channel_shape
        return DTensor.from_local(local, self._mesh, [Shard(0)], run_check=False, shape=(C, r), stride=(r, 1))

    # -- stepping -----------------------------------------------------------------------------
    def _hparams(self, gi: int) -> dict:
        return {**self.param_groups[gi], "scale_front": self.scale_front, "disable_nl": self.disable_nl, "projection_tf32": self.projection_tf32}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One APOLLO step on the held elements of every parameter (a fixed number of collectives)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_bound()
        self._step_buckets(self._buckets)
        return loss

    def _step_buckets(self, buckets: list) -> bool:
        """Step ``buckets``; all ranks take one decision on non-finite gradients. Returns False if skipped."""
        hparams = [self._hparams(b.group_index) for b in buckets]
        for b, hp in zip(buckets, hparams):
            b.prepare(hp)
        if self.nonfinite != "ignore":
            bad = sum((b.nonfinite().to(self._device) for b in buckets), torch.zeros((), device=self._device))
            if self._comm.world > 1:
                self._comm.all_reduce(bad)
            if bad.item() > 0:  # one host sync per step: the decision gates every write below
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"APOLLO: non-finite gradient on {int(bad.item())} rank-bucket(s) at step {self._step_number(buckets)}; "
                        "nothing was updated (nonfinite='skip' skips such steps instead)"
                    )
                self.skipped_steps += 1
                for b in buckets:
                    b.grads = None
                return False
        for b, hp in zip(buckets, hparams):
            b.finish(hp)
        return True

    @staticmethod
    def _step_number(buckets: list) -> int:
        return int(buckets[0].step_count) + 1 if buckets else 0

    # -- state dicts --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``apollo_layout`` (see `layout`) and, in each group, the projection
        generator's device type, ``scale_front`` and ``disable_nl``, so that a native checkpoint can be
        reassembled offline at any world size (apollo_dist.checkpoint). DCP's get_state_dict keeps the
        groups' keys and drops the layout (DCP reshards by itself)."""
        self._ensure_bound()
        sd = super().state_dict()
        sd["apollo_layout"] = self.layout()
        for g in sd["param_groups"]:  # run-level facts, per group so that DCP keeps them
            g.update(generator_device=self._device.type, scale_front=self.scale_front, disable_nl=self.disable_nl)
        return sd

    def layout(self) -> dict[str, Any]:
        """This rank's part of the layout: world size, rank, the projection generator's device type
        (CPU and CUDA draw different P), and per param, keyed like ``state_dict()["state"]``: group,
        global shape, held flat elements [start, end) and, for low-rank params, owned channels [o0, o1)."""
        self._ensure_bound()
        params: dict[int, dict[str, Any]] = {}
        for b in self._buckets:
            for i, s in enumerate(b.slots):
                entry = {"group": b.group_index, "shape": list(s.shape), "start": s.start, "end": s.end}
                if isinstance(b, LowRankBucket):
                    entry["owned"] = list(b.layouts[i].owners[self._rank])
                params[s.index] = entry
        return {"version": 1, "world_size": self._world, "rank": self._rank, "generator_device": self._device.type, "params": params}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the same layout (same W and engine); copies into the live buffers."""
        self._ensure_bound()
        saved_layout = state_dict.get("apollo_layout")
        if saved_layout is not None and saved_layout["params"] != self.layout()["params"]:
            raise ValueError(
                f"optimizer state was saved at world size {saved_layout['world_size']} (rank {saved_layout['rank']}) with "
                f"another partition layout than this run's (world size {self._world}, rank {self._rank}): convert it "
                "with tools/convert_checkpoint.py and load it with apollo_dist.checkpoint.load_canonical"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        id_map = {}
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(f"param group {gi}: state has {len(saved['params'])} params, optimizer has {len(mine['params'])}")
            for key in ("rank", "scale_type", "update_proj_gap", "scale"):
                if mine.get(key) != saved.get(key):
                    raise ValueError(f"param group {gi}: saved {key}={saved.get(key)!r} differs from this optimizer's {mine.get(key)!r}")
            id_map.update(zip(saved["params"], mine["params"]))
            for k, v in saved.items():
                if k not in ("params", "param_names", "generator_device", "scale_front", "disable_nl"):  # run-level: this run's
                    mine[k] = v
        for pid, saved_state in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                raise ValueError(f"optimizer state names param id {pid}, which this optimizer does not have")
            live = self.state[p]
            for k, v in saved_state.items():
                if k == "seed":
                    if int(v) != live["seed"]:
                        raise ValueError(f"param {pid}: saved seed {v} differs from {live['seed']} (params in another order?)")
                    continue
                if k not in live:
                    raise ValueError(f"param {pid}: unknown optimizer state key {k!r}")
                dst, src = live[k], v
                dst_l = dst._local_tensor if _is_dtensor(dst) else dst
                src_l = src._local_tensor if _is_dtensor(src) else torch.as_tensor(src)
                if dst_l.shape != src_l.shape and dst_l.numel() != src_l.numel():
                    raise ValueError(f"param {pid}: state {k!r} has shape {tuple(src_l.shape)}, expected {tuple(dst_l.shape)}")
                dst_l.copy_(src_l.reshape(dst_l.shape))
