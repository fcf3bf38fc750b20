"""The trainers people use, on GPUs with NCCL (skipped without CUDA; run through the device tool and
recorded in BENCHMARKS.md): transformers.Trainer under FSDP2 (accelerate) and DeepSpeed ZeRO-2/3, and
Lightning's shipped DeepSpeedStrategy and ModelParallelStrategy, each on every visible GPU (at most 2)
against the single-GPU apollo-torch run (the Trainer's own optim="apollo_adamw", or apollo-torch on
the full batch for Lightning). fp32; the projections are drawn by CUDA generators on both sides.
"""

from __future__ import annotations

import sys

import pytest
import torch
from spawn import report, run_checked, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WORLD = min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 0
GPU_ENV = {"DS_ACCELERATOR": "cuda"}
HF = "tests/workers/hf_trainer.py"
LIGHTNING = "tests/workers/lightning_worker.py"


def _hf(tmp_path, name: str, *args: str, world: int) -> dict:
    out = tmp_path / f"{name}.json"
    common = ("--gpu", "--dir", str(tmp_path / name), "--out", str(out), *args)
    if world == 1 and "reference" in args:
        run_checked([sys.executable, HF, *common], timeout=600, **GPU_ENV)
    else:
        torchrun(HF, world, *common, timeout=600, **GPU_ENV)
    return {int(k): v for k, v in report(out)["losses"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    return _hf(tmp_path_factory.mktemp("ref"), "reference", "--mode", "reference", world=1)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_trainer_on_gpus_matches_single_gpu_reference(tmp_path, reference, engine):
    args = ["--fsdp2"] if engine == "fsdp2" else ["--stage", engine[-1]]
    losses = _hf(tmp_path, engine, "--mode", "apollo_dist", *args, world=WORLD)
    diff = max(abs(losses[k] - reference[k]) for k in reference)
    print(f"Trainer {engine} W={WORLD}: max |loss - reference| over 20 steps = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp2"])
def test_lightning_on_gpus_matches_oracle(tmp_path, strategy):
    if strategy == "fsdp2" and 12 % WORLD:
        pytest.skip("the global batch of 12 rows splits over 1, 2, 3, 4 or 6 GPUs")
    out = tmp_path / "r.json"
    torchrun(LIGHTNING, WORLD, "--strategy", strategy, "--gpu", "--out", str(out), timeout=600, **GPU_ENV)
    r = report(out)
    errors = {k: v for k, v in r.items() if k.startswith("error/")}
    assert not errors, "\n".join(errors.values())
    cases = {k: v for k, v in r.items() if isinstance(v, dict) and "max_rel_diff" in v}
    for name, case in cases.items():
        print(f"Lightning {name} W={WORLD}: max rel diff {case['max_rel_diff']:.2e}, {case['steps']} steps")
        assert case["steps"] == 30 and case["max_rel_diff"] < 1e-4
    assert len(cases) == (4 if strategy == "deepspeed" else 2)
