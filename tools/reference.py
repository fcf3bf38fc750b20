"""The reference APOLLO, apollo-torch 1.0.3 (CC-BY-NC), loaded for comparisons: the test oracle
(tests/oracle.py), tools/bench.py's apollo-torch rows and tools/train_reference.py. The library never
imports it; install it with `pip install --no-deps apollo-torch==1.0.3`."""

from __future__ import annotations

import sys
import types

import torch


def stub_bitsandbytes() -> None:
    """apollo_torch/__init__ imports bitsandbytes' 8-bit optimizers, which we never use: stub them."""
    if "bitsandbytes" in sys.modules:
        return
    names = ["bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer", "bitsandbytes.functional"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["bitsandbytes"].__path__ = []
    mods["bitsandbytes.optim"].__path__ = []
    mods["bitsandbytes.optim.optimizer"].Optimizer2State = type("Optimizer2State", (torch.optim.Optimizer,), {})
    mods["bitsandbytes"].optim = mods["bitsandbytes.optim"]
    mods["bitsandbytes"].functional = mods["bitsandbytes.functional"]
    mods["bitsandbytes.optim"].optimizer = mods["bitsandbytes.optim.optimizer"]
    sys.modules.update(mods)


def oracle_class():
    """apollo_torch.APOLLOAdamW (bitsandbytes stubbed first)."""
    stub_bitsandbytes()
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW
