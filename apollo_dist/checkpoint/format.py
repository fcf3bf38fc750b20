"""What a canonical checkpoint holds and describes: its format constants, `ParamEntry` / `Meta` (everything
but the tensors), the `Source` protocol of anything readable one parameter at a time, and the checks of
param-group hyperparameters. The directory layout is in the package's docstring (apollo_dist.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from ..groups import LOW_RANK_KEYS, RUN_KEYS

FORMAT = "apollo_dist.canonical"
# 3: expert slices recorded ("expert"; written only where version 2's name rule would misread);
# 2: per-param "step" and "projection" records; 1: steps per group only
FORMAT_VERSION = 3
INDEX_FILE = "index.json"
SHARD_BYTES = 2 * 2**30  # safetensors files of at most ~2 GiB (a bigger single tensor gets its own file)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file, param or value."""


@dataclass
class ParamEntry:
    """One optimized parameter of a checkpoint."""

    name: str
    group: int
    shape: tuple[int, ...]
    seed: int
    r: Optional[int] = None  # the projection rank (index.json's "rank"); None: plain Adam
    step: Optional[int] = None  # the optimizer steps that updated it (a param without gradient in a step is
    # skipped, so params of a group can differ); None: its group's "step" (checkpoints before per-param steps)
    proj: str = "random"  # the group's projection; "svd" and "dct" keep a "projection" tensor
    expert: Optional[tuple[str, int]] = None  # (fused weight's name, e): expert slice e of a fused 3-D weight

    @property
    def lowrank(self) -> bool:
        return self.r is not None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensors of this param and their shapes (moments in the reference's orientation)."""
        if not self.lowrank:
            return {"weight": self.shape, "exp_avg": self.shape, "exp_avg_sq": self.shape}
        m, n = self.shape
        moments = (m, self.r) if m >= n else (self.r, n)
        out = {"weight": self.shape, "exp_avg": moments, "exp_avg_sq": moments, "limiter_norm": (1,)}
        if self.proj == "svd":  # the whole P, the reference's orientation
            out["projection"] = (self.r, n) if m >= n else (m, self.r)
        elif self.proj == "dct":  # the r selected basis vectors
            out["projection"] = (self.r,)
        return out

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of canonical tensor ``key`` (the DCT's indices are int64, everything else fp32)."""
        return torch.int64 if key == "projection" and self.proj == "dct" else torch.float32


def canonical_entries(entry: ParamEntry) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of each canonical tensor of ``entry``, as its safetensors file names them."""
    return [(f"{entry.name}/{k}", entry.dtype(k), s) for k, s in entry.tensor_shapes().items()]


@dataclass
class Meta:
    """Everything of a checkpoint but the tensors."""

    params: list[ParamEntry]
    groups: list[dict[str, Any]]  # JSON hyperparameters of each group, with "step" (the most any param took)
    generator_device: str = "cpu"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"scale_front": False, "disable_nl": False})
    trainer: dict[str, Any] = field(default_factory=dict)  # "step" (data position), "scheduler", "run", "hf_config"
    source: dict[str, Any] = field(default_factory=dict)  # where it came from: engine, world size, path


class Source(Protocol):
    """A checkpoint readable one parameter at a time (canonical or native)."""

    meta: Meta

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``entry`` (see `ParamEntry.tensor_shapes`), fp32 on CPU."""


def jsonable(value: Any) -> Any:
    """``value`` as JSON types (tuples as lists, 0-d tensors as numbers); TypeError when it has none."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a canonical checkpoint's index")


def group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The JSON hyperparameters of a param group (no params, names or run-level keys)."""
    return {k: jsonable(v) for k, v in group.items() if k not in ("params", "param_names") + RUN_KEYS}


def check_same_hyperparameters(where: str, saved: dict[str, Any], live: dict[str, Any]) -> None:
    """CheckpointError naming ``where``, the key and both values when APOLLO's low-rank keys differ
    (each changes what the optimizer computes from the same state)."""
    for key in LOW_RANK_KEYS:
        a, b = saved.get(key), live.get(key)
        if (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and not isinstance(a, bool)
            and float(a) == float(b)
        ):
            continue
        if a != b:
            raise CheckpointError(f"{where}: the checkpoint has {key}={a!r}, this optimizer {key}={b!r}")
