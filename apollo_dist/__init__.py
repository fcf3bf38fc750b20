"""apollo_dist: APOLLO and APOLLO-Mini, sharded for DeepSpeed ZeRO 1/2/3 and PyTorch FSDP2."""
from .core import Slot
from .groups import PRESETS, param_groups, preset
from .optimizer import APOLLO

__all__ = ["APOLLO", "PRESETS", "Slot", "param_groups", "preset"]
__version__ = "0.1.0"
