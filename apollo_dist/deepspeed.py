"""DeepSpeed adapter: ``apollo_dist.deepspeed.initialize`` is a drop-in for ``deepspeed.initialize``.

Usage, with the optimizer in the DeepSpeed JSON::

    {"optimizer": {"type": "APOLLO", "params": {"lr": 1e-3, "rank": 256, "target_modules": ["attn", "mlp"]}},
     "zero_optimization": {"stage": 2}, "bf16": {"enabled": true}, ...}

    engine, optimizer, _, scheduler = apollo_dist.deepspeed.initialize(model=model, config="ds_configs/apollo.json")

or with a client optimizer: ``initialize(model=model, optimizer=apollo_dist.APOLLO(groups, ...), config=...)``.
Same arguments and return value as ``deepspeed.initialize``.

What it does (DESIGN.md §3, §6):
  1. reads the config (``config`` / ``config_params`` / ``args.deepspeed_config``), takes out an
     ``"optimizer"`` block of type "APOLLO" or "APOLLO-Mini" and builds the optimizer from its params
     (the paper's preset, overridden by any of ``rank scale_type scale update_proj_gap proj
     proj_type``; plus ``lr betas eps weight_decay correct_bias scale_front disable_nl
     projection_tf32 target_modules``), sets ``zero_allow_untested_optimizer`` and hands DeepSpeed the optimizer as a
     client optimizer;
  2. after DeepSpeed has partitioned the model, builds one `Slot` per parameter from DeepSpeed's own
     bookkeeping and calls ``optimizer.bind(slots, dp_group, owners="position")``:
       ZeRO-1/2 (and BF16_Optimizer): the param's fragment of the flat fp32 partition
                 (``p._hp_mapping``: lp/hp fragment addresses), cut anywhere, even mid-row;
       ZeRO-3:   the param's ceil(numel / W) chunk of its sub-group's flat fp32 partition;
  3. makes the optimizer step whatever DeepSpeed hands it per call (ZeRO-1/2 steps one param group
     per call, ZeRO-3 one sub-group per call: this adapter keeps ZeRO-3 at one sub-group per param
     group) and makes ``state_dict`` / ``load_state_dict`` work on the model's params although
     DeepSpeed has replaced ``param_groups[i]["params"]`` with flat partitions, so
     ``engine.save_checkpoint`` / ``load_checkpoint`` at the same world size and stage resume exactly.

Batch sizes: ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
``gradient_accumulation_steps`` may be ``"auto"`` in the JSON. An "auto" value is dropped before
DeepSpeed sees it, so DeepSpeed derives it from the others (train = micro * accumulation * W). The
training script sets at least one of ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` in the
config dict before calling ``initialize``, e.g.::

    cfg = json.load(open("ds_configs/apollo.json"))
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.grad_accum
    engine, opt, _, sched = apollo_dist.deepspeed.initialize(model=model, config=cfg)

ZeRO-3 models may be built under ``deepspeed.zero.Init`` (APOLLO's groups read ``ds_shape``); hand
zero.Init a config without "auto" values, since it reads the JSON without this adapter.

DeepSpeed's per-parameter optimizer-state helpers (``safe_get_full_optimizer_state``) do not see
APOLLO's state: read ``optimizer.state[param]`` (this rank's owned channels / elements) instead.

Not supported (clear error at ``initialize``): optimizer/parameter offload (ZeRO-Offload, ZeRO-Infinity),
ZeRO-1/2 elastic and DeepSpeed universal checkpoints, ZeRO++ hpZ, MiCS, ZenFlow, torch_autocast, MoE, pipeline or tensor
model parallelism (``mpu``), low-precision master weights, ZeRO stage 0 with fp16/bf16. Checkpoints
resume at the same world size and stage; other world sizes go through ``tools/convert_checkpoint.py``.

This is the only module of apollo_dist that imports deepspeed (lazily).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import defaultdict
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from .core import Slot
from .groups import LOW_RANK_KEYS, param_groups
from .optimizer import APOLLO

# "optimizer": {"type": ...} values this adapter builds, and the preset each one starts from.
APOLLO_TYPES = {"apollo": "apollo", "apollo-mini": "apollo-mini", "apollo_mini": "apollo-mini", "apollomini": "apollo-mini"}
OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "correct_bias", "scale_front", "disable_nl", "projection_tf32")
PARAM_KEYS = OPTIMIZER_KEYS + LOW_RANK_KEYS + ("target_modules",)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedAPOLLO(APOLLO):
    """APOLLO as DeepSpeed's ZeRO wrappers drive it (``initialize`` turns the optimizer into one).

    DeepSpeed replaces ``param_groups[i]["params"]`` with flat fp32 partitions and calls ``step`` once
    per param group (ZeRO-1/2), once per sub-group (ZeRO-3) or once for all (BF16_Optimizer), each
    time with only that part's gradients in place. ``step`` therefore runs the buckets of exactly the
    groups DeepSpeed hands it; the layout itself comes from ``bind``.
    """

    _ds_groups: list[dict]  # the param group dicts, in order (DeepSpeed may swap the list, not the dicts)
    _ds_params: list[list[torch.Tensor]]  # each group's model params, as the optimizer received them

    @torch.no_grad()
    def step(self, closure=None):
        """Step the bound buckets of the param groups DeepSpeed passes in this call."""
        if self._buckets is None:
            raise RuntimeError("DeepSpeedAPOLLO.step before bind: build the engine with apollo_dist.deepspeed.initialize")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = {id(g) for g in self.param_groups if g["params"]}
        # DeepSpeed's ZeRO-1/2 narrows self.param_groups to the one group it steps; the base class's
        # hyperparameter lookup indexes the full list, so show it that for the duration of the step.
        handed = self.param_groups
        self.param_groups = self._ds_groups
        try:
            self._step_buckets([b for b in self._buckets if id(self._ds_groups[b.group_index]) in active])
        finally:
            self.param_groups = handed
        return loss

    @contextlib.contextmanager
    def _model_view(self) -> Iterator[None]:
        """Temporarily show the model's params in param_groups and only their state (the base class's
        state dict code maps state by param position; DeepSpeed's flat partitions are no params of ours)."""
        saved_lists = [g["params"] for g in self._ds_groups]
        saved_groups, saved_state = self.param_groups, self.state
        try:
            self.param_groups = self._ds_groups
            for g, params in zip(self._ds_groups, self._ds_params):
                g["params"] = params
            mine = {id(p) for params in self._ds_params for p in params}
            self.state = defaultdict(dict, {p: s for p, s in saved_state.items() if id(p) in mine})
            yield
        finally:
            for g, params in zip(self._ds_groups, saved_lists):
                g["params"] = params
            self.param_groups, self.state = saved_groups, saved_state

    def state_dict(self) -> dict[str, Any]:
        """The state of this rank's share, keyed by the model params' positions (same W and stage to load)."""
        with self._model_view():
            return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict`` of the same layout into the live buffers."""
        with self._model_view():
            super().load_state_dict(state_dict)


# -- config ---------------------------------------------------------------------------------------
def _resolve_config(args: Any, config: Any, config_params: Any) -> tuple[Any, dict]:
    """The config dict (copied) from wherever deepspeed.initialize would take it, and args without it."""
    if config is None and config_params is not None:
        config = config_params
    from_args = None
    for attr in ("deepspeed_config", "deepscale_config"):
        if getattr(args, attr, None) is not None:
            from_args = getattr(args, attr)
    if from_args is not None:
        if config is not None:
            raise ValueError("DeepSpeed config given both in args.deepspeed_config and as config=: pass one")
        config = from_args
        args = copy.copy(args)  # the caller's namespace keeps its path; DeepSpeed gets the edited dict
        for attr in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, attr):
                setattr(args, attr, None)
    if config is None:
        raise ValueError("DeepSpeed requires a config: pass config= (dict or JSON path) or args.deepspeed_config")
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    elif not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    return args, copy.deepcopy(config)


def _resolve_batch_sizes(config: dict) -> None:
    """Drop "auto" batch sizes so DeepSpeed derives them from the ones the script set."""
    for key in BATCH_KEYS:
        if config.get(key) == "auto":
            del config[key]
    if "train_batch_size" not in config and "train_micro_batch_size_per_gpu" not in config:
        raise ValueError(
            "the DeepSpeed config leaves train_batch_size and train_micro_batch_size_per_gpu unset or \"auto\": "
            "the training script must set at least one of them in the config before initialize"
        )


def _off(block: Any) -> bool:
    """True when an offload block is absent or targets "none"."""
    if not block:
        return True
    return str(block.get("device", "none") if isinstance(block, dict) else block).lower() == "none"


def _check_supported(config: dict, mpu: Any, model: torch.nn.Module) -> int:
    """Raise NotImplementedError for DeepSpeed features the adapter does not handle; return the ZeRO stage."""
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    low_precision = (config.get("fp16") or {}).get("enabled") or (config.get("bf16") or config.get("bfloat16") or {}).get("enabled")
    if stage == 0 and low_precision:
        raise NotImplementedError("apollo_dist with DeepSpeed: fp16/bf16 needs ZeRO stage 1, 2 or 3 (stage 0 runs fp32 only)")
    if not _off(zero.get("offload_optimizer")) or zero.get("cpu_offload"):
        raise NotImplementedError(
            "apollo_dist with DeepSpeed: ZeRO-Offload (zero_optimization.offload_optimizer) is not supported yet; "
            "remove offload_optimizer or set its device to \"none\""
        )
    if not _off(zero.get("offload_param")) or zero.get("cpu_offload_params"):
        raise NotImplementedError("apollo_dist with DeepSpeed: zero_optimization.offload_param is not supported yet")
    unsupported = {
        "elastic_checkpoint": zero.get("elastic_checkpoint", False),
        "universal checkpoints (checkpoint.load_universal)": (config.get("checkpoint") or {}).get("load_universal", False),
        "zero_hpz_partition_size > 1 (ZeRO++ hpZ)": int(zero.get("zero_hpz_partition_size", 1)) > 1,
        "mics_shard_size (MiCS)": int(zero.get("mics_shard_size", -1)) > 0,
        "zenflow": bool(zero.get("zenflow")),
        "torch_autocast": (config.get("torch_autocast") or {}).get("enabled", False),
        "low-precision master weights": any(zero.get(k) for k in ("fp16_master_weights_and_gradients", "bf16_master_weights_and_gradients")),
        "pipeline parallelism": type(model).__name__ in ("PipelineModule", "DualPipeVModule"),
        "model parallelism (mpu)": mpu is not None,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise NotImplementedError(f"apollo_dist with DeepSpeed: {', '.join(bad)} not supported yet")
    return stage


def _optimizer_from_config(block: dict, model: torch.nn.Module, model_parameters: Any) -> APOLLO:
    """Build APOLLO from an ``{"type": "APOLLO" | "APOLLO-Mini", "params": {...}}`` block."""
    preset = APOLLO_TYPES[str(block["type"]).lower()]
    params = dict(block.get("params") or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the {block['type']} optimizer params: expected some of {list(PARAM_KEYS)}")
    kwargs = {k: params.pop(k) for k in OPTIMIZER_KEYS if k in params}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    target = params.pop("target_modules", ("attn", "mlp"))
    groups = param_groups(model, target_modules=[target] if isinstance(target, str) else target, preset=preset, **params)
    if model_parameters is not None:  # only what the caller asked to optimize, in the model's order
        wanted = set()
        for item in model_parameters:
            wanted.update(id(p) for p in (item["params"] if isinstance(item, dict) else [item]))
        for g in groups:
            keep = [(p, n) for p, n in zip(g["params"], g["param_names"]) if id(p) in wanted]
            g["params"], g["param_names"] = [p for p, _ in keep], [n for _, n in keep]
        groups = [g for g in groups if g["params"]]
    return APOLLO(groups, **kwargs)


def _take_optimizer(config: dict, optimizer: Any, model: torch.nn.Module, model_parameters: Any) -> Optional[APOLLO]:
    """The APOLLO to hand DeepSpeed (built from the config or the client's), or None when APOLLO is not in play."""
    block = config.get("optimizer")
    is_apollo_block = isinstance(block, dict) and str(block.get("type", "")).lower() in APOLLO_TYPES
    if isinstance(block, dict) and not is_apollo_block:
        apollo_keys = sorted(set(block.get("params") or {}) & set(LOW_RANK_KEYS + ("target_modules",)))
        if apollo_keys:
            raise ValueError(
                f"optimizer type {block.get('type')!r} is built by DeepSpeed, but its params carry APOLLO keys "
                f"{apollo_keys}: set \"type\": \"APOLLO\" (or \"APOLLO-Mini\")"
            )
        if isinstance(optimizer, APOLLO):
            raise ValueError(
                f"got an APOLLO client optimizer and a config optimizer of type {block.get('type')!r}: "
                "remove the config's \"optimizer\" block (or make it the APOLLO one and pass no optimizer)"
            )
        return None
    if is_apollo_block:
        if optimizer is not None:
            raise ValueError(
                f"the config asks for {block['type']} and a client optimizer ({type(optimizer).__name__}) was passed too: pass one"
            )
        del config["optimizer"]  # DeepSpeed's optimizer-name check does not know APOLLO
        return _optimizer_from_config(block, model, model_parameters)
    return optimizer if isinstance(optimizer, APOLLO) else None


# -- binding DeepSpeed's layout --------------------------------------------------------------------
def _flat_fragment_slots(opt: APOLLO, lp_groups: list[list[torch.Tensor]], flats: list[torch.Tensor]) -> list[Slot]:
    """ZeRO-1/2 and BF16_Optimizer: each param's fragment of its group's flat fp32 partition."""
    index = {id(p): idx for _, idx, p in opt._indexed}
    slots = []
    for params, flat in zip(lp_groups, flats):
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # none of this param's elements are in this rank's partition
                slots.append(Slot(p, index[id(p)], tuple(p.shape), 0, 0, flat.narrow(0, 0, 0), lambda: None))
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            # DeepSpeed assigns flat.grad afresh at every step: look it up at step time.
            grad = lambda flat=flat, a=hp.start, n=hp.numel: None if flat.grad is None else flat.grad.narrow(0, a, n)
            slots.append(Slot(p, index[id(p)], tuple(p.shape), lp.start, lp.start + lp.numel, flat.narrow(0, hp.start, hp.numel), grad))
    return slots


def _zero3_slots(opt: APOLLO, zero: Any, rank: int) -> list[Slot]:
    """ZeRO-3: each param's chunk [rank * c, (rank + 1) * c) ∩ [0, numel), c = ceil(numel / W), inside its
    sub-group's flat fp32 partition (chunks laid end to end, padding included)."""
    index = {id(p): idx for _, idx, p in opt._indexed}
    slots = []
    for params, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
        offset = 0
        for p in params:
            chunk, numel = p.partition_numel(), p.ds_numel
            start, end = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
            start = end if end <= start else start
            n = end - start
            grad = lambda flat=flat, a=offset, n=n: None if flat.grad is None else flat.grad.narrow(0, a, n)
            slots.append(Slot(p, index[id(p)], tuple(p.ds_shape), start, end, flat.narrow(0, offset, n), grad))
            offset += chunk
    return slots


def bind_engine(engine: Any, opt: APOLLO) -> None:
    """Bind the partition layout of a built DeepSpeed engine into ``opt`` (``initialize`` calls this)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(engine, "has_moe_layers", False):
        raise NotImplementedError("apollo_dist with DeepSpeed: MoE layers are not supported yet")
    wrapper = engine.optimizer
    if wrapper is opt:  # stage 0, fp32: plain replicas, APOLLO finds them itself (DDP)
        return
    group = getattr(wrapper, "dp_process_group", None) or dist.group.WORLD
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        slots, flats = _flat_fragment_slots(opt, wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups), wrapper.single_partition_of_fp32_groups
    elif isinstance(wrapper, BF16_Optimizer):
        slots, flats = _flat_fragment_slots(opt, wrapper.bf16_groups, wrapper.fp32_groups_flat_partition), wrapper.fp32_groups_flat_partition
    elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        if len(wrapper.fp16_groups) != len(opt.param_groups):
            raise NotImplementedError(
                f"apollo_dist with ZeRO-3 needs one sub-group per param group (APOLLO steps a group's params together), "
                f"got {len(wrapper.fp16_groups)} sub-groups for {len(opt.param_groups)} groups: raise "
                f"zero_optimization.sub_group_size above every group's per-rank element count"
            )
        slots, flats = _zero3_slots(opt, wrapper, dist.get_rank(group)), wrapper.fp32_partitioned_groups_flat
    else:
        raise NotImplementedError(f"apollo_dist with DeepSpeed: optimizer wrapper {type(wrapper).__name__} is not supported")
    low = [f.dtype for f in flats if f.dtype != torch.float32]
    if low:
        raise NotImplementedError(f"apollo_dist with DeepSpeed needs fp32 master weights, DeepSpeed keeps them in {low[0]}")
    if not hasattr(opt, "_ds_params"):
        raise RuntimeError("bind_engine: record the model params first (apollo_dist.deepspeed.initialize does)")
    opt.__class__ = DeepSpeedAPOLLO  # same object: DeepSpeed's wrapper and the caller keep their references
    # A torch LR scheduler built before this point wrapped ``step`` on the instance, which would hide
    # the class's step; drop the wrapper (it only counts calls for a warning).
    if "step" in vars(opt) and getattr(vars(opt)["step"], "_wrapped_by_lr_sched", False):
        del opt.step
    opt._ds_groups = list(opt.param_groups)
    opt.bind(slots, group, owners="position")


def initialize(
    args: Any = None,
    model: Optional[torch.nn.Module] = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: Optional[int] = None,
    mpu: Any = None,
    dist_init_required: Optional[bool] = None,
    collate_fn: Any = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with APOLLO bound to the ZeRO layout. Returns (engine, optimizer, dataloader, scheduler).

    Raises ValueError on a misconfigured optimizer (unknown APOLLO keys, APOLLO together with another
    optimizer) and NotImplementedError on a DeepSpeed feature the adapter does not support yet.
    """
    import deepspeed

    if model is None:
        raise ValueError("initialize requires a model")
    args, config = _resolve_config(args, config, config_params)
    _resolve_batch_sizes(config)
    if model_parameters is not None:
        model_parameters = list(model_parameters)  # read more than once below
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        # DeepSpeed would call it with model_parameters; call it here so an APOLLO it returns gets bound.
        optimizer = optimizer(model_parameters if model_parameters is not None else model.parameters())
    opt = _take_optimizer(config, optimizer, model, model_parameters)
    if opt is None:  # not APOLLO: plain DeepSpeed
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                                    dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                                    mesh_param=mesh_param, **({} if distributed_port is None else {"distributed_port": distributed_port}))
    _check_supported(config, mpu, model)
    empty = [i for i, g in enumerate(opt.param_groups) if not g["params"]]
    if empty:
        raise ValueError(f"APOLLO param groups {empty} are empty: DeepSpeed drops empty groups, remove them")
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        # One ZeRO-3 sub-group per param group, unless the user chose a size (checked after init).
        zero.setdefault("sub_group_size", 10**15)
    config["zero_allow_untested_optimizer"] = True
    # The model's params per group, before DeepSpeed swaps in its flat partitions.
    opt._ds_params = [list(g["params"]) for g in opt.param_groups]
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=opt, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=config, mesh_param=mesh_param, **({} if distributed_port is None else {"distributed_port": distributed_port}),
    )
    bind_engine(engine, opt)
    return engine, ds_optimizer, loader, scheduler
