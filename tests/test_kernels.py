"""The fused Triton kernels, checked on CPU by Triton's interpreter (TRITON_INTERPRET=1 in a subprocess:
it must be set before triton is imported): each against its eager twin, then wired into the optimizer
against the oracle, one process and sharded (mid-row cuts, shared channels)."""

from __future__ import annotations

import json
import sys

import pytest
from spawn import report, run_checked, torchrun

INTERPRET = {"TRITON_INTERPRET": "1"}


# what each "fused" call of the worker must launch (and nothing else); its "eager" twin launches nothing
ONE_CALL = {
    "projection_": {"_project_kernel": 1},  # exact r > 1 too: R from cuBLAS, the norms from one launch
    "channel_adam_": {"_channel_adam_kernel": 1},
    "multi_update": {"_multi_update_kernel": 1},
    "multi_adam_skipped": {"_multi_adam_kernel": 1},
    "multi_adam": {"_multi_adam_kernel": 3},  # three steps
    "multi_sum_sq": {"_multi_sum_sq_kernel": 1},
    "dct_scores": {"_dct_scores_kernel": 1},
    "dct_mirror_picks": {"_dct_scores_kernel": 10},  # ten gradients, one at a time
    "dct_decide_all": {"_dct_scores_kernel": 3},  # three sizes, one batch each
}
# a step: the non-finite check (sum of squares), projection, channel Adam, scaled update, plain Adam
STEP_KERNELS = (
    "_multi_sum_sq_kernel",
    "_project_kernel",
    "_channel_adam_kernel",
    "_multi_update_kernel",
    "_multi_adam_kernel",
)


def test_kernels_match_eager_and_oracle():
    proc = run_checked([sys.executable, "tests/workers/kernels_interpreted.py"], timeout=600, **INTERPRET)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, d in r["diffs"].items():
        if "skipped" in name or name.startswith("gated"):  # a skipped write is no write; gating changes no number
            assert d == 0, (name, d)
        else:
            assert d < (1e-5 if name.startswith("optimizer") else 1e-6), (name, d)
    paths = r["paths"]
    assert {n.split("/")[0] for n in paths} == set(r["diffs"]), "every difference comes from counted calls"
    for name, launched in paths.items():
        case, mode = name.split("/")
        if mode == "eager":
            assert launched == {}, (name, launched)  # the twin, not a kernel
        elif case.startswith(("optimizer", "gated")):  # every step on the kernels, one launch each (one bucket)
            steps = 14 if case.startswith("gated") else 30  # gated: the NaN steps launch too, and write nothing
            assert launched == dict.fromkeys(STEP_KERNELS, steps), (name, launched)
        else:
            assert launched == next(v for k, v in ONE_CALL.items() if case.startswith(k)), (name, launched)


@pytest.mark.parametrize("layout", ["flat", "fsdp2"])
def test_sharded_layouts_on_kernels_match_oracle(tmp_path, layout):
    """W = 3: unaligned mid-row pieces (flat) and shared channels (fsdp2) through the fused kernels: every
    rank's step ran on them, one launch per kernel and step (tests/workers/launch_counted.py counts them per
    rank). Flat: a rank holding no row of a low-rank weight (rank 0 here) launches only the plain-Adam and
    non-finite-check kernels; every kernel ran on some rank."""
    out, counts = tmp_path / "r.json", tmp_path / "launches"
    counts.mkdir()
    worker = ("tests/workers/core_equivalence.py", "--layout", layout, "--out", str(out))
    torchrun("tests/workers/launch_counted.py", 3, str(counts), *worker, **INTERPRET)
    assert report(out)["max_rel_diff"] < (1e-5 if layout == "flat" else 1e-4)
    per_rank = [report(counts / f"rank{r}.json") for r in range(3)]
    for rank, launched in enumerate(per_rank):
        assert {launched[k] for k in STEP_KERNELS} <= {0, 30}, (rank, launched)  # 30 steps, none half eager
        assert launched["_multi_sum_sq_kernel"] == launched["_multi_adam_kernel"] == 30, (rank, launched)
        if layout == "fsdp2":  # every rank holds rows of every weight
            assert all(launched[k] == 30 for k in STEP_KERNELS), (rank, launched)
    assert all(any(launched[k] == 30 for launched in per_rank) for k in STEP_KERNELS), per_rank
