"""Hugging Face ``transformers.Trainer`` with APOLLO, in three changed lines::

    from apollo_dist.hf import APOLLOTrainer                                   # 1
    args = TrainingArguments(..., optim="apollo_adamw", optim_target_modules=["attn", "mlp"],
                             optim_args="rank=256,update_proj_gap=200")         # 2
    trainer = APOLLOTrainer(model=model, args=args, train_dataset=ds)          # 3 (was Trainer)

It works with no engine, DDP, DeepSpeed ZeRO-1/2/3 (``TrainingArguments(deepspeed=...)``) and FSDP2
(``fsdp_config={"fsdp_version": 2}``): the Trainer hands the optimizer to accelerate / DeepSpeed, and
APOLLO binds to whatever they leave in its param groups (apollo_dist.binding).
``trainer.train(resume_from_checkpoint=...)`` continues a run on another number of GPUs: FSDP2 through
accelerate's own resharding load; DeepSpeed through `apollo_dist.deepspeed.load_checkpoint`, to which
APOLLOTrainer routes the engine's ``load_checkpoint`` (another W or ZeRO stage; the same ones go to DeepSpeed's
loader). The Trainer's own state (global step, scheduler.pt, data position) resumes as at the same W; keep the
global batch (per_device_train_batch_size x W x gradient_accumulation_steps) the same.

The optimizer is built by `build_optimizer` from TrainingArguments: ``optim_target_modules`` (list,
regex or "all-linear"; the weights of ``nn.Linear`` modules, and the fused 3-D expert weights of the modules a
list or regex matches: each expert slice an APOLLO weight, apollo_dist.experts; positions then differ from
transformers', which leaves experts on Adam) and ``optim_args`` ("rank=..,proj=..,
proj_type=..,scale_type=..,scale=..,update_proj_gap=..", transformers' defaults: rank 128, channel,
scale 1, gap 200) are read as transformers' own ``optim="apollo_adamw"`` reads them, so the param
positions, hence the projections, are those of a run with transformers' single-GPU APOLLO.
``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` are NOT read the same way by
default. transformers (``trainer_optimizer._get_apollo_optimizer``) passes only ``lr`` to
``APOLLOAdamW(...)`` and puts ``betas`` / ``eps`` in the low-rank group alone, so with ``apollo_adamw``:

==========================  ==========================================  =========================================
                            transformers' ``apollo_adamw``              APOLLOTrainer (default)
==========================  ==========================================  =========================================
low-rank weights            adam_beta1/2, adam_epsilon, no decay        adam_beta1/2, adam_epsilon, weight_decay
other params                (0.9, 0.999), eps 1e-6, no decay            adam_beta1/2, adam_epsilon, weight_decay
                            (APOLLOAdamW's constructor defaults)        (none on biases and norms: the Trainer's
                                                                        ``get_decay_parameter_names``)
==========================  ==========================================  =========================================

With TrainingArguments' defaults (betas (0.9, 0.999), adam_epsilon 1e-8, weight_decay 0) the only
difference is eps on the other params: 1e-8 here, 1e-6 there. The default honours every argument the
user set (transformers drops ``weight_decay`` and the betas / eps of the other params without a word).
``optim_args="...,match_transformers=true"`` builds exactly transformers' groups and hyperparameters
instead (one group of the other params with APOLLOAdamW's defaults, no weight decay anywhere; a nonzero
``weight_decay`` is then ignored with a warning), for a run that must repeat an ``apollo_adamw`` run;
transformers itself ignores that key, so the same ``optim_args`` work with ``Trainer`` too.

Refused with a clear error, because the Trainer would otherwise drop or replace APOLLO without a word:
``optimizers=(opt, ...)`` (discarded under DeepSpeed, transformers issue #38753), a DeepSpeed JSON
``"optimizer"`` block (the Trainer then builds DeepSpeed's optimizer), ``zero_force_ds_cpu_optimizer: true``
with DeepSpeed offload (accelerate would swap in DeepSpeedCPUAdam; APOLLOTrainer sets it to false when the
config offloads), NVMe offload, and the layer-wise ``apollo_adamw_layerwise``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from .binding import global_shape
from .experts import refuse_transposed
from .groups import LOW_RANK_KEYS
from .optimizer import APOLLO

# transformers' defaults for optim="apollo_adamw" (trainer_optimizer._get_apollo_optimizer)
HF_DEFAULTS = {
    "rank": 128,
    "proj": "random",
    "scale_type": "channel",
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
}
# what transformers' APOLLOAdamW(params, lr=...) gives the params outside the low-rank group (its constructor's defaults)
APOLLO_ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}
EXTRA_KEYS = ("projection_tf32", "nonfinite", "cuda_graph")
COMPAT_KEY = "match_transformers"  # optim_args: transformers' apollo_adamw hyperparameters (see the module docstring)
OPTIM_NAMES = ("apollo_adamw", "adamw_torch", "adamw_torch_fused")  # what optim= may say (the defaults are AdamW's)


def parse_optim_args(text: Optional[str]) -> dict[str, Any]:
    """``"rank=256,scale_type=tensor,..."`` -> typed APOLLO keys; ValueError naming an unknown key or bad value."""
    out: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optim_args: {item!r} is not key=value")
        if key in ("rank", "update_proj_gap"):
            out[key] = int(value)
        elif key == "scale":
            out[key] = float(value)
        elif key in ("proj", "proj_type", "scale_type", "nonfinite"):
            out[key] = value
        elif key in ("projection_tf32", "cuda_graph", COMPAT_KEY):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            raise ValueError(
                f"optim_args: unknown APOLLO key {key!r}: expected some of {list(LOW_RANK_KEYS + EXTRA_KEYS + (COMPAT_KEY,))}"
            )
    return out


def param_groups_from_args(
    args: Any, model: nn.Module, decay_names: Optional[set[str]] = None, optim_args: Optional[dict[str, Any]] = None
) -> list[dict[str, Any]]:
    """APOLLO param groups as transformers' ``apollo_adamw`` lays them out: every param not targeted
    first (split into weight-decay and no-decay groups: the targeted weights keep their positions), then
    the targeted ``nn.Linear`` weights (and fused expert weights, `fused_expert_names`) with the low-rank keys. ``decay_names``: params that get weight
    decay (default: all); ``optim_args``: `parse_optim_args` of ``args.optim_args`` when the caller has it
    already. With ``match_transformers`` in it: transformers' two groups and hyperparameters exactly (the
    module docstring), each group carrying its own betas, eps and weight decay."""
    from transformers.trainer_utils import check_target_module_exists

    targets = args.optim_target_modules if args.optim_target_modules is not None else ["attn", "mlp"]
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    target_names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or check_target_module_exists(targets, name))
    }
    if not target_names:
        raise ValueError(f"optim_target_modules={targets!r} match no nn.Linear of the model")
    parsed = parse_optim_args(args.optim_args) if optim_args is None else optim_args
    if not all_linear and not parsed.get(COMPAT_KEY):  # fused experts of matched modules (apollo_dist.experts)
        target_names |= fused_expert_names(model, lambda name: check_target_module_exists(targets, name))
    keys = {**HF_DEFAULTS, **{k: v for k, v in parsed.items() if k in LOW_RANK_KEYS}}
    wd = float(args.weight_decay)
    if parsed.get(COMPAT_KEY):
        if wd != 0.0:
            warnings.warn(
                f"optim_args {COMPAT_KEY}=true: weight_decay={wd} is ignored, as transformers' apollo_adamw "
                "ignores it (leave match_transformers out to apply it)",
                stacklevel=3,
            )
        low_hp = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon, "weight_decay": 0.0}
        split = (
            [(n, p) for n, p in model.named_parameters() if n not in target_names],
            [(n, p) for n, p in model.named_parameters() if n in target_names],
        )
        return [
            {"params": [p for _, p in ps], "param_names": [n for n, _ in ps], **hp}
            for ps, hp in ((split[0], dict(APOLLO_ADAMW_DEFAULTS)), (split[1], {**low_hp, **keys}))
            if ps
        ]
    decay, no_decay, low = [], [], []
    for name, p in model.named_parameters():
        if name in target_names:
            low.append((name, p))
        elif decay_names is None or name in decay_names:
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    groups = [
        {"params": [p for _, p in ps], "param_names": [n for n, _ in ps], "weight_decay": w, **extra}
        for ps, w, extra in ((decay, wd, {}), (no_decay, 0.0, {}), (low, wd, keys))
        if ps
    ]
    return groups


def fused_expert_names(model: nn.Module, matches: Any) -> set[str]:
    """The 3-D weights (fused MoE experts [E, out, in]) of the modules whose name ``matches``; experts stored
    [E, in, out] (transformers' ``is_transposed``: GPT-OSS, Llama4) are a ValueError naming the weight."""
    out = set()
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if len(global_shape(p)) == 3:
                refuse_transposed(f"{name}.{pname}", module, global_shape(p), "optim_target_modules")
                out.add(f"{name}.{pname}")
    return out


def build_optimizer(args: Any, model: nn.Module, decay_names: Optional[set[str]] = None) -> APOLLO:
    """``apollo_dist.APOLLO`` from ``transformers.TrainingArguments`` (see the module docstring)."""
    parsed = parse_optim_args(args.optim_args)
    return APOLLO(
        param_groups_from_args(args, model, decay_names, parsed),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=float(args.weight_decay),
        **{k: v for k, v in parsed.items() if k in EXTRA_KEYS},
    )


def check_trainer_setup(args: Any, optimizers: Any = None) -> None:
    """Raise where the Trainer would drop or replace APOLLO; warn where a setting is ignored."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim.endswith("layerwise"):
        raise NotImplementedError(
            f'optim={optim!r}: layer-wise APOLLO is not supported by APOLLOTrainer; use optim="apollo_adamw"'
        )
    if optim not in OPTIM_NAMES:
        warnings.warn(f"APOLLOTrainer trains with APOLLO: optim={optim!r} is ignored", stacklevel=3)
    if optimizers is not None and optimizers[0] is not None:
        raise ValueError(
            "APOLLOTrainer builds APOLLO from TrainingArguments: do not pass optimizers=(optimizer, ...) "
            "(under DeepSpeed the Trainer discards it and builds AdamW, transformers issue #38753); "
            "set optim_target_modules / optim_args instead"
        )
    ds = getattr(args, "hf_deepspeed_config", None)
    config = ds.config if ds is not None else {}
    block = config.get("optimizer")
    if block:
        raise ValueError(
            f'the DeepSpeed config has an "optimizer" block (type {block.get("type")!r}): under the Trainer it '
            "replaces APOLLO; remove the block (APOLLOTrainer hands APOLLO to DeepSpeed itself)"
        )
    from .deepspeed import check_offload, offloads

    if offloads(config):
        if config.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                "DeepSpeed offload with zero_force_ds_cpu_optimizer true: accelerate would replace APOLLO by "
                "DeepSpeedCPUAdam; set it to false (or leave it out: APOLLOTrainer sets it)"
            )
        check_offload(config)
        # accelerate swaps a client optimizer for DeepSpeedCPUAdam under offload unless this is false
        config["zero_force_ds_cpu_optimizer"] = False


def route_deepspeed_load(accelerator: Any) -> bool:
    """Route the load_checkpoint of the DeepSpeed engine ``accelerator`` prepared (if any) to
    `apollo_dist.deepspeed.load_checkpoint`; True when there was one. transformers' ``deepspeed_load_checkpoint``
    (``resume_from_checkpoint``, ``load_best_model_at_end``) then resumes at any W and ZeRO stage: the same W
    and stage still go to DeepSpeed's own loader."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return False
    from .deepspeed import _route_load_checkpoint

    _route_load_checkpoint(wrapped.engine)
    return True


def _trainer_class():
    import transformers

    class APOLLOTrainer(transformers.Trainer):
        """``transformers.Trainer`` whose optimizer is ``apollo_dist.APOLLO`` built from its TrainingArguments
        (same arguments as Trainer; see apollo_dist.hf)."""

        def __init__(self, *args: Any, **kwargs: Any):
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            if training_args is not None:
                check_trainer_setup(training_args, kwargs.get("optimizers"))
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                self.optimizer = build_optimizer(self.args, opt_model, set(self.get_decay_parameter_names(opt_model)))
            return self.optimizer

        def create_scheduler(
            self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None
        ) -> torch.optim.lr_scheduler.LRScheduler:
            """Trainer's scheduler; under DeepSpeed also routes the engine's ``load_checkpoint`` to
            `apollo_dist.deepspeed.load_checkpoint` (``resume_from_checkpoint`` at another W or ZeRO stage).
            The Trainer calls this right after ``accelerator.prepare`` and before it loads a checkpoint."""
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            route_deepspeed_load(self.accelerator)
            return scheduler

    return APOLLOTrainer


def __getattr__(name: str):
    """``APOLLOTrainer`` on first use (transformers is imported only by code that asks for it)."""
    if name == "APOLLOTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'apollo_dist.hf' has no attribute {name!r}")
