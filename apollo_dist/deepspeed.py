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
     projection_tf32 cuda_graph target_modules``), sets ``zero_allow_untested_optimizer`` and hands DeepSpeed the optimizer as a
     client optimizer;
  2. checks the config for DeepSpeed features APOLLO does not support (clear error up front), keeps
     ZeRO-3 at one sub-group per param group (fewer, larger buckets), calls ``deepspeed.initialize``
     and binds the optimizer at once (``APOLLO.ensure_bound``), so a layout it cannot map fails here.

The optimizer itself finds DeepSpeed's layout (apollo_dist.binding): ZeRO-1/2 and BF16_Optimizer
through ``p._hp_mapping`` (each param's fragment of the flat fp32 partition, cut anywhere), ZeRO-3
through ``p._z3_optimizer`` (each param's ceil(numel / W) chunk of its sub-group's partition). So a
plain ``deepspeed.initialize(model=m, optimizer=apollo_dist.APOLLO(...), config=cfg)`` (what
Lightning, accelerate and the Trainer do) is exact too; this function adds the JSON block and the
up-front checks. ``engine.save_checkpoint`` / ``load_checkpoint`` at the same world size and stage
resume exactly.

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

Offload: ``"offload_optimizer": {"device": "cpu"}`` (ZeRO 1-3) and ``"offload_param": {"device": "cpu"}``
(ZeRO-3) run APOLLO on the CPU partitions, same numbers as without offload (projections drawn on DeepSpeed's
compute device either way); ``zero_force_ds_cpu_optimizer`` is set to false for it.

Not supported (clear error at ``initialize``): NVMe offload (ZeRO-Infinity's nvme device), partial offload
(``ratio``), SuperOffload, ZeRO-1/2 elastic, DeepSpeed universal checkpoints (``load_universal``: refused at ``initialize``, at
``load_checkpoint`` and, for engines from plain ``deepspeed.initialize``, by APOLLO's binding; resume the native
checkpoint at any W with ``load_checkpoint`` below instead), ZeRO++ hpZ, MiCS, ZenFlow, torch_autocast, MoE, pipeline or tensor
model parallelism (``mpu``), low-precision master weights, ZeRO stage 0 with fp16/bf16. Checkpoints resume at
any world size and stage through `load_checkpoint` (``engine.load_checkpoint`` of engines from `initialize`): at the
same ones it is DeepSpeed's own load.

This is the only module of apollo_dist that imports deepspeed (lazily).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .groups import LOW_RANK_KEYS, param_groups
from .optimizer import APOLLO

# "optimizer": {"type": ...} values this adapter builds, and the preset each one starts from.
APOLLO_TYPES = {
    "apollo": "apollo",
    "apollo-mini": "apollo-mini",
    "apollo_mini": "apollo-mini",
    "apollomini": "apollo-mini",
}
OPTIMIZER_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "correct_bias",
    "scale_front",
    "disable_nl",
    "projection_tf32",
    "cuda_graph",
)
PARAM_KEYS = OPTIMIZER_KEYS + LOW_RANK_KEYS + ("target_modules",)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


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
            'the DeepSpeed config leaves train_batch_size and train_micro_batch_size_per_gpu unset or "auto": '
            "the training script must set at least one of them in the config before initialize"
        )


def _off(block: Any) -> bool:
    """True when an offload block is absent or targets "none"."""
    if not block:
        return True
    return str(block.get("device", "none") if isinstance(block, dict) else block).lower() == "none"


def _refuse_universal(config: Optional[dict] = None, engine: Any = None) -> None:
    """NotImplementedError naming the working route when a DeepSpeed universal-checkpoint load is asked for
    (``"checkpoint": {"load_universal": true}`` in ``config`` or ``engine``'s config): DeepSpeed's universal
    loader would put Adam-shaped partition state into APOLLO (apollo_dist.binding refuses it there too, for
    engines from plain ``deepspeed.initialize``)."""
    from .binding import UNIVERSAL_REFUSED

    on = (config.get("checkpoint") or {}).get("load_universal", False) if config is not None else False
    if engine is not None and callable(getattr(engine, "load_universal_checkpoint", None)):
        on = on or bool(engine.load_universal_checkpoint())
    if on:
        raise NotImplementedError(UNIVERSAL_REFUSED)


def _check_supported(config: dict, mpu: Any, model: torch.nn.Module) -> int:
    """Raise NotImplementedError for DeepSpeed features the adapter does not handle; return the ZeRO stage."""
    _refuse_universal(config)
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    low_precision = (config.get("fp16") or {}).get("enabled") or (
        config.get("bf16") or config.get("bfloat16") or {}
    ).get("enabled")
    if stage == 0 and low_precision:
        raise NotImplementedError(
            "apollo_dist with DeepSpeed: fp16/bf16 needs ZeRO stage 1, 2 or 3 (stage 0 runs fp32 only)"
        )
    check_offload(config)
    unsupported = {
        "elastic_checkpoint": zero.get("elastic_checkpoint", False),
        "universal checkpoints (checkpoint.load_universal)": (config.get("checkpoint") or {}).get(
            "load_universal", False
        ),
        "zero_hpz_partition_size > 1 (ZeRO++ hpZ)": int(zero.get("zero_hpz_partition_size", 1)) > 1,
        "mics_shard_size (MiCS)": int(zero.get("mics_shard_size", -1)) > 0,
        "zenflow": bool(zero.get("zenflow")),
        "torch_autocast": (config.get("torch_autocast") or {}).get("enabled", False),
        "low-precision master weights": any(
            zero.get(k) for k in ("fp16_master_weights_and_gradients", "bf16_master_weights_and_gradients")
        ),
        "pipeline parallelism": type(model).__name__ in ("PipelineModule", "DualPipeVModule"),
        "model parallelism (mpu)": mpu is not None,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise NotImplementedError(f"apollo_dist with DeepSpeed: {', '.join(bad)} not supported yet")
    return stage


def offloads(config: dict) -> bool:
    """Whether the config offloads the optimizer (ZeRO-Offload) or the params (ZeRO-Infinity) anywhere."""
    zero = config.get("zero_optimization") or {}
    return bool(
        not _off(zero.get("offload_optimizer"))
        or not _off(zero.get("offload_param"))
        or zero.get("cpu_offload")
        or zero.get("cpu_offload_params")
    )


def check_offload(config: dict) -> None:
    """Offload APOLLO supports: ``offload_optimizer`` {"device": "cpu"} under ZeRO 1-3 and ``offload_param``
    {"device": "cpu"} under ZeRO-3, all of it (APOLLO steps the CPU partitions; DESIGN.md §2.7). NotImplementedError
    naming the key for NVMe, partial offload (``ratio``), SuperOffload, and with ``zero_force_ds_cpu_optimizer``
    true (DeepSpeed would refuse or replace the client optimizer)."""
    zero = config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        block = zero.get(key)
        if isinstance(block, dict) and str(block.get("device", "none")).lower() == "nvme":
            raise NotImplementedError(
                f"apollo_dist with DeepSpeed: ZeRO-Infinity NVMe offload (zero_optimization.{key}.device nvme) is not "
                'supported; use "device": "cpu" (APOLLO\'s optimizer state is small enough for host memory)'
            )
    opt = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    if float(opt.get("ratio", 1.0)) != 1.0:
        raise NotImplementedError(
            f"apollo_dist with DeepSpeed: zero_optimization.offload_optimizer.ratio={opt['ratio']} (partial offload "
            "steps part of the model with another optimizer on the GPU) is not supported; remove ratio"
        )
    if opt.get("super_offload"):
        raise NotImplementedError(
            "apollo_dist with DeepSpeed: zero_optimization.offload_optimizer.super_offload not supported"
        )
    if not _off(zero.get("offload_param")) and int(zero.get("stage", 0)) != 3:
        raise NotImplementedError("apollo_dist with DeepSpeed: zero_optimization.offload_param needs ZeRO stage 3")
    if offloads(config) and config.get("zero_force_ds_cpu_optimizer") is True:
        raise NotImplementedError(
            "apollo_dist with DeepSpeed offload: zero_force_ds_cpu_optimizer is true, so DeepSpeed refuses any optimizer "
            "but DeepSpeedCPUAdam; set it to false (APOLLO runs its step on the CPU partitions itself)"
        )


def _optimizer_from_config(block: dict, model: torch.nn.Module, model_parameters: Any) -> APOLLO:
    """Build APOLLO from an ``{"type": "APOLLO" | "APOLLO-Mini", "params": {...}}`` block."""
    preset = APOLLO_TYPES[str(block["type"]).lower()]
    params = dict(block.get("params") or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in the {block['type']} optimizer params: expected some of {list(PARAM_KEYS)}"
        )
    kwargs = {k: params.pop(k) for k in OPTIMIZER_KEYS if k in params}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    target = params.pop("target_modules", ("attn", "mlp"))
    groups = param_groups(
        model, target_modules=[target] if isinstance(target, str) else target, preset=preset, **params
    )
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
                f'{apollo_keys}: set "type": "APOLLO" (or "APOLLO-Mini")'
            )
        if isinstance(optimizer, APOLLO):
            raise ValueError(
                f"got an APOLLO client optimizer and a config optimizer of type {block.get('type')!r}: "
                'remove the config\'s "optimizer" block (or make it the APOLLO one and pass no optimizer)'
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
    # Everything but the optimizer, as given (distributed_port only when given: DeepSpeed has its own default).
    passed = dict(args=args, model=model, model_parameters=model_parameters, training_data=training_data)
    passed.update(lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn)
    passed.update(config=config, mesh_param=mesh_param)
    if distributed_port is not None:
        passed["distributed_port"] = distributed_port
    if opt is None:  # not APOLLO: plain DeepSpeed
        return deepspeed.initialize(optimizer=optimizer, **passed)
    _check_supported(config, mpu, model)
    if opt.layerwise:
        from .layerwise import DEEPSPEED_REFUSED

        raise NotImplementedError(DEEPSPEED_REFUSED)
    empty = [i for i, g in enumerate(opt.param_groups) if not g["params"]]
    if empty:
        raise ValueError(f"APOLLO param groups {empty} are empty: DeepSpeed drops empty groups, remove them")
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        # One ZeRO-3 sub-group per param group, unless the user chose a size (checked after init).
        zero.setdefault("sub_group_size", 10**15)
    config["zero_allow_untested_optimizer"] = True
    if offloads(config):  # DeepSpeed keeps a client optimizer with offload only when told to
        config["zero_force_ds_cpu_optimizer"] = False
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(optimizer=opt, **passed)
    if getattr(engine, "has_moe_layers", False):
        raise NotImplementedError("apollo_dist with DeepSpeed: MoE layers are not supported yet")
    opt.ensure_bound()  # what DeepSpeed left in the groups, now: an unsupported layout fails here, not mid-run
    _route_load_checkpoint(engine)
    return engine, ds_optimizer, loader, scheduler


# The keys DeepSpeed's engine writes into a model-states file besides the client's (engine._common_checkpoint_state
# and engine._load_checkpoint's list): what `load_checkpoint` leaves out of the client state it returns.
_ENGINE_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
)


def load_checkpoint(engine: Any, load_dir: Any, tag: Optional[str] = None, **kwargs: Any) -> tuple[Any, dict]:
    """``engine.load_checkpoint`` that also resumes at another world size, another ZeRO stage or from the
    other engine's checkpoint, with no offline step. Returns what ``engine.load_checkpoint`` returns:
    (the model-states file loaded, as DeepSpeed returns it; a non-DeepSpeed checkpoint: its directory), the
    client state.

    ``engine``: from plain ``deepspeed.initialize`` with an APOLLO, or from ``apollo_dist.deepspeed.initialize``
    (whose ``engine.load_checkpoint`` is this function). ``load_dir``: a DeepSpeed save directory (``latest``
    names the tag, or ``tag``) or step directory; or any other checkpoint `apollo_dist.checkpoint.load_checkpoint`
    reads (FSDP2 DCP, canonical, launch/train.py's step directories). A DeepSpeed checkpoint written at this
    engine's data-parallel world size and ZeRO stage goes to DeepSpeed's own ``load_checkpoint`` (with
    ``kwargs``); anything else is loaded by APOLLO's loader, each rank taking only what it holds, one param at a
    time: fp32 master weights (the model's own copy follows), APOLLO's state, per-param steps and seeds; from a
    DeepSpeed checkpoint also the engine's counters (global steps and samples, skipped steps), its lr scheduler
    (unless ``load_lr_scheduler_states=False``) and the client state saved with it.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    _refuse_universal(engine=engine)  # before anything is read: never DeepSpeed's universal loader into APOLLO
    from .checkpoint.format import CheckpointError
    from .checkpoint.live import load_checkpoint as load_any
    from .native_checkpoints import DeepSpeedSource, is_deepspeed_dir, resolve_deepspeed_dir

    original = functools.partial(DeepSpeedEngine.load_checkpoint, engine)  # the class's: an instance may carry us
    path = Path(load_dir)
    if not is_deepspeed_dir(path) and tag is None:  # DCP, canonical, a train.py save directory of those
        if kwargs.get("load_module_only"):
            raise CheckpointError(f"{path}: load_module_only reads DeepSpeed checkpoints only")
        trainer = load_any(path, engine.optimizer, engine.module)
        _load_scheduler(engine, trainer.get("scheduler"), kwargs)
        return str(path), {}
    step_dir = resolve_deepspeed_dir(path, tag)
    source = DeepSpeedSource(step_dir)
    world = getattr(engine, "seq_dp_world_size", engine.dp_world_size)
    if (source.world, source.stage) == (world, engine.zero_optimization_stage()) or kwargs.get("load_module_only"):
        return original(load_dir, tag, **kwargs)
    if kwargs.get("load_optimizer_states") is False:
        raise CheckpointError(
            f"{step_dir}: written at W={source.world} ZeRO-{source.stage}, this engine is W={world} "
            f"ZeRO-{engine.zero_optimization_stage()}: the weights come with the optimizer state here "
            "(load_optimizer_states=False is not supported across world sizes)"
        )
    states = torch.load(source.model_file, map_location="cpu", mmap=True, weights_only=False)
    load_any(step_dir, engine.optimizer, engine.module, tag=None)
    _load_buffers(engine, states)
    engine.global_steps = states.get("global_steps", engine.global_steps)
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states.get("skipped_steps", engine.skipped_steps)
    _load_scheduler(engine, states.get("lr_scheduler"), kwargs)
    # the path DeepSpeed's own load returns: the model-states file it read
    return str(source.model_file), {k: v for k, v in states.items() if k not in _ENGINE_KEYS}


def _load_scheduler(engine: Any, state: Optional[dict], kwargs: dict) -> None:
    """The engine's lr scheduler from ``state`` (when it has one, the checkpoint one, and it is asked for)."""
    if kwargs.get("load_lr_scheduler_states", True) and engine.lr_scheduler is not None and state is not None:
        engine.lr_scheduler.load_state_dict(state)


def _load_buffers(engine: Any, states: dict) -> None:
    """The module's buffers from a model-states file that holds them whole (ZeRO-1/2 save the whole module,
    ZeRO-3 its buffers); params come from the optimizer's loader."""
    module_sd = states.get("module") or {}
    buffers = dict(engine.module.named_buffers())
    with torch.no_grad():
        for name in states.get("buffer_names") or []:
            saved, live = module_sd.get(name), buffers.get(name)
            if saved is not None and live is not None and tuple(saved.shape) == tuple(live.shape):
                live.copy_(saved)


def _route_load_checkpoint(engine: Any) -> None:
    """``engine.load_checkpoint`` becomes `load_checkpoint` (any W, any stage, the other engine's checkpoints)."""
    engine.load_checkpoint = functools.partial(load_checkpoint, engine)
