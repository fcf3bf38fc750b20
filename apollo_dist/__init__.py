"""apollo_dist: APOLLO and APOLLO-Mini, sharded for DeepSpeed ZeRO 1/2/3 and PyTorch FSDP2."""

from .core import Slot
from .groups import PRESETS, param_groups, preset
from .optimizer import APOLLO

__all__ = ["APOLLO", "PRESETS", "Slot", "param_groups", "preset"]


def __getattr__(name: str):
    """``apollo_dist.deepspeed`` on first use: DeepSpeed is imported only by code that asks for it."""
    if name == "deepspeed":
        import importlib

        return importlib.import_module(".deepspeed", __name__)
    raise AttributeError(f"module 'apollo_dist' has no attribute {name!r}")


__version__ = "0.1.0"
