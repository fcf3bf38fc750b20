"""PyTorch Lightning: ``apollo_dist.APOLLO`` returned from ``LightningModule.configure_optimizers`` and
trained by ``lightning.pytorch.Trainer`` (accelerator="cpu", devices=2, precision="32-true",
max_steps=30, no gradient clipping, ``use_distributed_sampler=False``; each rank's DataLoader yields its
rank-major half of ``oracle.batch(t, size=12)``) equals the apollo-torch oracle trained on the full batch
in one process (parameters after 30 steps, max relative difference < 1e-4), for APOLLO and APOLLO-Mini.

Two launches of ``torchrun --standalone --nproc_per_node 2 tests/workers/lightning_worker.py`` (gloo;
Lightning takes the processes from torchrun's environment), one per strategy; the tests read their reports.
The resume test launches it twice more (``--strategy deepspeed-resume``: W=2, then W=3 resuming W=2's
checkpoint with ``apollo_dist.lightning.AnyWorldSizeResume``).

FSDP2: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` runs on CPU as shipped
(``configure_model`` calls ``fully_shard`` on each block and on the LightningModule with
``self.device_mesh["data_parallel"]``). Its defaults ("auto") would make a 1 x 2 mesh with
``data_parallel`` of size 1 (lightning/pytorch/strategies/model_parallel.py:147-150), hence the sizes.

DeepSpeed: Lightning 2.6's ``DeepSpeedStrategy`` does NOT run on CPU as shipped:

1. ``DeepSpeedStrategy.setup_environment`` (lightning/pytorch/strategies/deepspeed.py:342-346) raises
   ``RuntimeError: The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used.``
   for any accelerator that is not ``CUDAAccelerator`` (DeepSpeed itself runs on CPU: DS_ACCELERATOR=cpu).
2. With that check lifted, ``setup_distributed`` (deepspeed.py:352) calls
   ``_validate_device_index_selection`` (lightning/fabric/strategies/deepspeed.py:877-885), which wants the
   device indices to be 0..W-1; the CPU accelerator's devices are ``torch.device("cpu")`` (index None):
   ``RuntimeError: The selected device indices [None, None] don't match the local rank values of processes.``
3. Had that passed, ``_setup_model_and_optimizer`` (deepspeed.py:448) hands ``device_rank=root_device.index``
   (None) to DeepSpeed, whose ``DeepSpeedEngine._set_distributed_vars`` (deepspeed/runtime/engine.py:1942)
   fails on ``None >= 0`` (TypeError).

The two refusals are tested as such below. The equivalence runs use ``CPUDeepSpeedStrategy``: the
shipped class with only ``setup_environment``'s CUDA check removed (it calls what the original calls
after the check), given ``parallel_devices=[cpu:0, cpu:1]`` (a constructor argument; torch accepts the
index and keeps tensors on the CPU), which satisfies 2. and 3. Everything else (config, deepspeed.initialize
with the client optimizer, DeepSpeedPrecision's backward/step, the fit loop) is Lightning's own code.
"""

from __future__ import annotations

import pytest
from spawn import ROOT, report, torchrun

WORKER = str(ROOT / "tests" / "workers" / "lightning_worker.py")
TOL = 1e-4
PRESETS = ["apollo", "apollo-mini"]
TOTAL_ELEMENTS = 2422  # TinyNet's parameters


def launch(tmp_path_factory, strategy: str) -> dict:
    out = tmp_path_factory.mktemp(f"lightning-{strategy}") / "report.json"
    torchrun(WORKER, 2, "--strategy", strategy, "--out", str(out), timeout=300)
    r = report(out)
    errors = {k: v for k, v in r.items() if k.startswith("error/")}
    assert not errors, "\n".join(f"{k}:\n{v}" for k, v in errors.items())
    assert r["world"] == 2
    return r


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, "deepspeed")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, "fsdp2")


def check_case(r: dict) -> None:
    """30 optimizer steps by Lightning and by APOLLO, the oracle's parameters, and the work really
    split: each rank holds part of the model, the ranks together all of it."""
    assert r["global_step"] == 30
    assert r["steps"] == 30
    assert r["max_rel_diff"] < TOL
    assert sum(r["held_elements"]) == TOTAL_ELEMENTS
    assert all(0 < h < TOTAL_ELEMENTS for h in r["held_elements"])


# -- DeepSpeed ------------------------------------------------------------------------------------
def test_deepspeed_strategy_refuses_cpu_accelerator(deepspeed_run):
    """Refusal 1 of the module docstring (Trainer(strategy=DeepSpeedStrategy(stage=2), accelerator="cpu"))."""
    r = deepspeed_run["deepspeed/refused/as_shipped"]
    assert (
        r["refused"]
        == "RuntimeError: The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used."
    )
    assert r["where"].rsplit(":", 1)[0].endswith("lightning/pytorch/strategies/deepspeed.py")


def test_deepspeed_strategy_refuses_cpu_devices_without_index(deepspeed_run):
    """Refusal 2 of the module docstring (CUDA check lifted, Lightning's own CPU devices)."""
    r = deepspeed_run["deepspeed/refused/cuda_guard_lifted"]
    assert r["refused"].startswith(
        "RuntimeError: The selected device indices [None, None] don't match the local rank values"
    )
    assert r["where"].rsplit(":", 1)[0].endswith("lightning/fabric/strategies/deepspeed.py")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_deepspeed_strategy_matches_oracle(deepspeed_run, stage, preset):
    """ZeRO-2 / ZeRO-3 through Lightning's DeepSpeedStrategy (CUDA check lifted, see above), reduce and
    all-gather buckets of 50 elements; ZeRO-3's parameters gathered with GatheredParameters."""
    r = deepspeed_run[f"deepspeed/stage{stage}/{preset}"]
    check_case(r)
    assert r["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    zero = r["ds_config"]["zero_optimization"]
    assert zero["stage"] == stage and zero["reduce_bucket_size"] == 50
    assert r["ds_config"]["gradient_clipping"] == 0.0
    assert r["ds_config"]["train_micro_batch_size_per_gpu"] == 6


# -- FSDP2 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_model_parallel_strategy_fsdp2_matches_oracle(fsdp2_run, preset):
    """ModelParallelStrategy as shipped, fully_shard on the blocks and the LightningModule: every
    parameter a DTensor, APOLLO stepped directly by Lightning; full_tensor() at the end."""
    r = fsdp2_run[f"fsdp2/{preset}"]
    check_case(r)
    assert r["optimizer"] == "APOLLO"
    assert r["dtensor_params"] == 18


# -- DeepSpeed: fit(ckpt_path=...) at another world size ----------------------------------------------
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_strategy_fit_resumes_at_another_world_size(tmp_path, stage):
    """``trainer.fit(module, ckpt_path=...)`` with ``callbacks=[apollo_dist.lightning.AnyWorldSizeResume()]``
    (the one-line change): W=2 ZeRO-2 (ZeRO-3: marked slow) trains 10 steps (APOLLO, update_proj_gap 3, global batch 12 = 6 x 2) and
    saves after step 5 (ModelCheckpoint, DeepSpeed's checkpoint directory); W=3 (12 = 4 x 3) resumes it. Without
    the callback DeepSpeed refuses; with it steps 6-10 give the uninterrupted run's losses within 1e-5 relative,
    the parameters after step 10 agree within 1e-5 relative, and Lightning's global step continues to 10 from the
    client state the loader returns (its loops)."""
    ckpt = tmp_path / "ckpt"
    runs = {}
    for world, phase in ((2, "full"), (3, "resume")):
        out = tmp_path / f"{phase}.json"
        args = ("--strategy", "deepspeed-resume", "--stage", str(stage), "--phase", phase, "--ckpt-dir", str(ckpt))
        torchrun(WORKER, world, *args, "--out", str(out), timeout=300)
        r = report(out)
        errors = {k: v for k, v in r.items() if k.startswith("error/")}
        assert not errors, "\n".join(f"{k}:\n{v}" for k, v in errors.items())
        assert r["world"] == world
        runs[phase] = r[f"resume/{phase}"]
        if phase == "resume":
            assert "Automatic adjustment of ZeRO's optimizer state partitioning" in r["unrouted"]["refused"]
    full, resumed = runs["full"], runs["resume"]
    assert full["global_step"] == 10 and full["steps"] == 10
    assert resumed["load_checkpoint"] == "apollo_dist.deepspeed.load_checkpoint"
    assert resumed["global_step"] == 10 and resumed["steps"] == 10  # 5 loaded + 5 taken here
    assert sorted(resumed["losses"], key=int) == [str(t) for t in range(6, 11)]
    for step in range(6, 11):
        a, b = full["losses"][str(step)], resumed["losses"][str(step)]
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    for name, ref in full["final"].items():
        scale = max(abs(v) for v in ref)
        assert max(abs(x - y) for x, y in zip(resumed["final"][name], ref)) <= 1e-5 * scale, name
