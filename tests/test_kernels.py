"""The fused Triton kernels, checked on CPU by Triton's interpreter (TRITON_INTERPRET=1 in a subprocess:
it must be set before triton is imported): each against its eager twin, then wired into the optimizer
against the oracle, one process and sharded (mid-row cuts, shared channels)."""

from __future__ import annotations

import json
import sys

import pytest
from spawn import report, run_checked, torchrun

INTERPRET = {"TRITON_INTERPRET": "1"}


def test_kernels_match_eager_and_oracle():
    proc = run_checked([sys.executable, "tests/workers/kernels_interpreted.py"], timeout=600, **INTERPRET)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, d in r["diffs"].items():
        if "skipped" in name or name.startswith("gated"):  # a skipped write is no write; gating changes no number
            assert d == 0, (name, d)
        else:
            assert d < (1e-5 if name.startswith("optimizer") else 1e-6), (name, d)
    assert all(n > 0 for n in r["launches"].values()), r["launches"]  # the optimizer ran on the kernels


@pytest.mark.parametrize("layout", ["flat", "fsdp2"])
def test_sharded_layouts_on_kernels_match_oracle(tmp_path, layout):
    """W = 3: unaligned mid-row pieces (flat) and shared channels (fsdp2) through the fused kernels."""
    out = tmp_path / "r.json"
    torchrun("tests/workers/core_equivalence.py", 3, "--layout", layout, "--out", str(out), **INTERPRET)
    assert report(out)["max_rel_diff"] < (1e-5 if layout == "flat" else 1e-4)
