"""Param groups from a model, with the paper's presets (DESIGN.md §1)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from .binding import global_shape
from .experts import refuse_transposed

# The APOLLO paper's settings (also transformers' optim="apollo_adamw").
PRESETS: dict[str, dict[str, Any]] = {
    "apollo": {
        "rank": 256,
        "proj": "random",
        "proj_type": "std",
        "scale_type": "channel",
        "scale": 1.0,
        "update_proj_gap": 200,
    },
    "apollo-mini": {
        "rank": 1,
        "proj": "random",
        "proj_type": "std",
        "scale_type": "tensor",
        "scale": 128.0,
        "update_proj_gap": 200,
    },
}
# The keys of a low-rank group beyond Adam's (the param-group API and the on-disk name: "rank" is the
# projection rank r). Each changes what the optimizer computes from the same state ("structural"): a
# checkpoint or state dict must agree with the optimizer on them.
LOW_RANK_KEYS = ("rank", "proj", "proj_type", "scale_type", "scale", "update_proj_gap")
# The ones with a choice (proj_type supports one value): what flags set and resumes compare.
TUNABLE_LOW_RANK_KEYS = ("rank", "proj", "scale_type", "scale", "update_proj_gap")
# Per-group keys APOLLO.state_dict adds that describe the run, not the group (this run's win on load).
RUN_KEYS = ("generator_device", "scale_front", "disable_nl")


def warn_run_changes(where: str, saved: dict[str, Any], live: dict[str, Any], stacklevel: int = 3) -> None:
    """Warn, naming each, when a loaded state's run-level settings (`RUN_KEYS`) differ from this run's, which
    win: another generator device draws other projections from the same seeds; ``scale_front`` and
    ``disable_nl`` change the limiter. ``saved`` may lack keys (older checkpoints): those are not compared."""
    changed = [f"{k}={saved[k]!r} -> {live[k]!r}" for k in RUN_KEYS if k in saved and k in live and saved[k] != live[k]]
    if changed:
        warnings.warn(
            f"{where}: saved with other run settings than this run's, which are used from here on: {', '.join(changed)}"
            + (
                " (projections are drawn on another device type from the same seeds: P changes from the next "
                "refresh on; moments stay valid, the run is not bit-identical to one that stayed)"
                if any(c.startswith("generator_device") for c in changed)
                else ""
            ),
            stacklevel=stacklevel,
        )


def preset(name: str) -> dict[str, Any]:
    """The low-rank group keys of preset ``name`` ("apollo" or "apollo-mini")."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown APOLLO preset {name!r}: expected one of {sorted(PRESETS)}")
    return dict(PRESETS[key])


_preset_keys = preset  # param_groups' argument ``preset`` shadows the function's name


def param_groups(
    model: torch.nn.Module,
    target_modules: Iterable[str] = ("attn", "mlp"),
    preset: str = "apollo",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Two param groups for ``APOLLO``: the 2-D weights of modules whose name contains one of
    ``target_modules`` get the low-rank ``preset`` (keys overridable, e.g. ``rank=128``); every other
    trainable parameter gets plain Adam. Groups carry ``param_names``. A 3-D weight of a matched module is a
    fused mixture-of-experts weight [E, out, in] (transformers 5.x's ``experts.gate_up_proj`` / ``down_proj``,
    under ``mlp``: the defaults match them): each expert slice is an APOLLO weight of its own
    (apollo_dist.experts); experts stored [E, in, out] (GPT-OSS, Llama4) are a ValueError.

    Raises ValueError when no parameter matches ``target_modules``. Warns once when ``rank`` exceeds
    the smaller dimension of a matched weight (the reference then keeps r-wide moments anyway).
    """
    targets = tuple(target_modules)
    keys = _preset_keys(preset)
    unknown = set(overrides) - set(LOW_RANK_KEYS)
    if unknown:
        raise ValueError(f"unknown APOLLO group keys {sorted(unknown)}: expected some of {list(LOW_RANK_KEYS)}")
    keys.update({k: v for k, v in overrides.items() if v is not None})
    low, low_names, rest, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.rsplit(".", 1)[0]
        if len(global_shape(p)) in (2, 3) and any(t in module for t in targets):
            if len(global_shape(p)) == 3:
                refuse_transposed(
                    name, model.get_submodule(module) if "." in name else None, global_shape(p), "target_modules"
                )
            low.append(p)
            low_names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    if not low:
        raise ValueError(f"target_modules {list(targets)} match no 2-D weight of the model")
    small = [(n, global_shape(p)) for n, p in zip(low_names, low) if keys["rank"] > min(global_shape(p)[-2:])]
    if small:
        warnings.warn(
            f"APOLLO rank {keys['rank']} exceeds the smaller dimension of {len(small)} weight(s), e.g. "
            f"{small[0][0]} {small[0][1]}: their moments are r-wide anyway, as the reference runs it",
            stacklevel=2,
        )
    groups = [{"params": low, "param_names": low_names, **keys}]
    if rest:
        groups.insert(0, {"params": rest, "param_names": rest_names})
    return groups
