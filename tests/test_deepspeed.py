"""DeepSpeed adapter (apollo_dist.deepspeed): real ZeRO 1/2/3 engines on CPU (DS_ACCELERATOR=cpu, gloo)
against the apollo-torch oracle, plus the errors a misconfiguration gets.

Two launches of ``deepspeed --num_gpus W tests/workers/ds_equivalence.py`` (W = 2 with every part, W = 3
with equivalence and checkpoints) run all engines; the tests below read their reports.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import oracle
import pytest
from spawn import ROOT, deepspeed_workers

WORKER = str(ROOT / "tests" / "workers" / "ds_equivalence.py")
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
TOL = 1e-4  # the bar; DeepSpeed's gradient averaging alone gives ~1e-6


def deepspeed_launch(world: int, out: Path, *args: str) -> dict:
    """``deepspeed --num_gpus world WORKER --out out args`` on CPU; the worker's report."""
    return deepspeed_workers(WORKER, world, out, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("ds")
    return {
        2: deepspeed_launch(
            2,
            tmp / "w2.json",
            "--parts",
            "equivalence,extras,checkpoint,fp16,bf16,zero_init,subgroups,plain,plain_bf16,plain_errors",
            "--ckpt-dir",
            str(tmp / "ck2"),
        ),
        3: deepspeed_launch(
            3, tmp / "w3.json", "--parts", "equivalence,checkpoint,plain,idle", "--ckpt-dir", str(tmp / "ck3")
        ),
    }


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_zero_matches_oracle(runs, world, stage, preset):
    """fp32, 30 steps, projection refreshed every 7, buckets of 50 elements (params cut mid-row)."""
    r = runs[world][f"eq/stage{stage}/{preset}"]
    assert r["steps"] == 30
    assert r["max_rel_diff"] < TOL


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_state_bytes_per_rank(runs, world, stage, preset):
    """Summed over ranks the moments are the reference's; each rank within the issue's bound
    (ZeRO-3: reference / W + one channel per param; ZeRO-1/2: the reference's state for the elements
    DeepSpeed gave it + one channel per param cut at its edges)."""
    r = runs[world][f"eq/stage{stage}/{preset}"]
    assert sum(r["state_bytes"]) == r["ref_state_bytes"]
    for held, bound in zip(r["state_bytes"], r["state_bound"]):
        assert held <= bound


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_accumulation_clipping_scheduler_and_json_optimizer(runs, stage):
    """2 micro-batches per step, gradient_clipping 1.0, WarmupLR from the JSON, overlap_comm, APOLLO
    built from {"type": "APOLLO", "params": ...}: the oracle with the same clipping and schedule."""
    r = runs[2][f"extras/stage{stage}"]
    assert r["steps"] == 30 and r["lr"] == pytest.approx(oracle.HPARAMS["lr"])
    assert r["max_rel_diff"] < TOL


def test_client_lr_scheduler_passed_to_initialize(runs):
    """lr_scheduler=callable given to initialize (it wraps optimizer.step before the layout is bound):
    ZeRO-2 still steps every group once per step, as the oracle does."""
    r = runs[2]["extras/client_scheduler"]
    assert r["steps"] == 30 and r["max_rel_diff"] < TOL


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_resumes_exactly(runs, world, stage):
    """engine.save_checkpoint after 6 steps; a fresh engine (other initial weights) load_checkpoint-s and
    runs 6 more: parameters, moments, limiter norms, step counts and master weights equal the
    uninterrupted run's bit for bit (the resume crosses a projection refresh)."""
    r = runs[world][f"ckpt/stage{stage}"]
    assert r["loaded_steps"] == 6
    assert r["param_diff"] == 0.0
    assert r["state_diff"] == [0.0] * world
    assert r["lr_diff"] == 0.0


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_skips_step_and_keeps_state(runs, stage):
    """An inf in the loss: DeepSpeed skips the step and halves the loss scale; APOLLO's step count,
    moments, limiter norms and fp32 master weights are untouched; the next step runs."""
    r = runs[2][f"fp16/stage{stage}"]
    assert r["skipped"] == 1
    assert r["loss_scale"][1] < r["loss_scale"][0]
    assert r["state_diff_on_overflow"] == [0.0, 0.0]
    assert (r["steps_before"], r["steps_after_overflow"], r["steps_after_next"]) == (3, 3, 4)
    assert r["finite"]


def test_bf16_zero1_bf16_optimizer_and_zero2(runs):
    """bf16: ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) and ZeRO-2 step the
    same way, and stay near the fp32 oracle (bf16 forward/backward noise over 10 steps at lr 3e-2)."""
    z1, z2 = runs[2]["bf16/stage1"], runs[2]["bf16/stage2"]
    assert z1["wrapper"] == "BF16_Optimizer" and z2["wrapper"] == "DeepSpeedZeroOptimizer"
    assert z1["steps"] == z2["steps"] == 10
    assert abs(z1["max_rel_diff"] - z2["max_rel_diff"]) < 1e-2
    assert z2["max_rel_diff"] < 0.25  # a smoke bound (chaotic lr 3e-2); the bf16 oracle is tests/test_bf16.py


def test_zero3_model_built_under_zero_init(runs):
    """Params partitioned from birth (shapes only in ds_shape): groups found, result equals the oracle."""
    r = runs[2]["zero_init/stage3"]
    assert r["lowrank_params"] == 8
    assert r["max_rel_diff"] < TOL


@pytest.mark.parametrize("how", ["adapter", "plain"])
def test_zero3_sub_groups_match_oracle(runs, how):
    """sub_group_size 100 splits each param group into several ZeRO-3 sub-groups, each stepped on its
    own by DeepSpeed: one bucket per sub-group, the oracle's result."""
    r = runs[2][f"subgroups/{how}"]
    assert r["sub_groups"] > 2 and r["buckets"] == r["sub_groups"] and r["steps"] == 30
    assert r["max_rel_diff"] < TOL


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_plain_deepspeed_initialize_matches_oracle(runs, world, stage, preset):
    """APOLLO handed to plain deepspeed.initialize (what Lightning, accelerate and the Trainer do), fp32,
    2 micro-batches per step, clipping 1.0: the oracle after 30 steps."""
    r = runs[world][f"plain/stage{stage}/{preset}"]
    assert r["steps"] == 30
    assert r["max_rel_diff"] < TOL


def test_plain_deepspeed_initialize_unsupported_layouts_raise(runs):
    """Through plain deepspeed.initialize: stage 0 with bf16 (FP16_UnfusedOptimizer: fp32 copies in the groups,
    and a step with zero gradients at initialize) is a clear error before anything is stepped (ZeRO-Offload
    works: tests/test_offload.py)."""
    assert "ZeRO stage 1, 2 or 3" in runs[2]["plain_errors/bf16_stage0"]["error"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_plain_deepspeed_initialize_bf16(runs, stage):
    """bf16 (ZeRO-1 with fp32 accumulation runs BF16_Optimizer): plain deepspeed.initialize gives the
    adapter's result, and stays near the fp32 oracle (bf16 forward/backward)."""
    r = runs[2][f"plain_bf16/stage{stage}"]
    assert r["steps"] == 10 and r["wrapper"] == ("BF16_Optimizer" if stage == 1 else r["wrapper"])
    assert r["diff_vs_adapter"] < 1e-6
    assert r["max_rel_diff_vs_fp32_oracle"] < 0.25  # smoke only; the bf16 oracle is tests/test_bf16.py


# -- misuse: errors raised before DeepSpeed builds anything ------------------------------------------
def _config(**extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "APOLLO", "params": {"lr": 1e-3, "rank": 4}},
    }
    cfg.update(extra)
    return cfg


def _initialize(**kw):
    from apollo_dist.deepspeed import initialize

    return initialize(model=oracle.make_model(0), **kw)


def test_unknown_apollo_keys_are_named():
    cfg = _config(optimizer={"type": "APOLLO-Mini", "params": {"lr": 1e-3, "rnak": 4, "momentum": 0.9}})
    with pytest.raises(ValueError, match=r"unknown keys \['momentum', 'rnak'\]"):
        _initialize(config=cfg)


def test_apollo_keys_under_a_deepspeed_optimizer_type():
    cfg = _config(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "rank": 4, "scale_type": "tensor"}})
    with pytest.raises(ValueError, match=r"'AdamW' is built by DeepSpeed.*\['rank', 'scale_type'\]"):
        _initialize(config=cfg)


def test_apollo_client_optimizer_with_a_config_optimizer():
    from apollo_dist import APOLLO

    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"))
    from apollo_dist.deepspeed import initialize

    with pytest.raises(ValueError, match="APOLLO client optimizer and a config optimizer of type 'Adam'"):
        initialize(model=model, optimizer=opt, config=_config(optimizer={"type": "Adam", "params": {"lr": 1e-3}}))
    with pytest.raises(ValueError, match="asks for APOLLO and a client optimizer"):
        initialize(model=model, optimizer=opt, config=_config())


@pytest.mark.parametrize(
    "zero, message",
    [
        ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_optimizer.device nvme"),
        ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_param.device nvme"),
        ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}, "ratio=0.5"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs ZeRO stage 3"),
        ({"stage": 2, "elastic_checkpoint": True}, "elastic_checkpoint not supported yet"),
        ({"stage": 3, "zero_hpz_partition_size": 2}, "hpZ"),
    ],
)
def test_unsupported_zero_features(zero, message):
    with pytest.raises(NotImplementedError, match=message):
        _initialize(config=_config(zero_optimization=zero))


def test_universal_checkpoint_loading_is_refused():
    with pytest.raises(NotImplementedError, match="universal checkpoints"):
        _initialize(config=_config(checkpoint={"load_universal": True}))


def test_unsupported_precision_and_parallelism():
    with pytest.raises(NotImplementedError, match="stage 1, 2 or 3"):
        _initialize(config=_config(zero_optimization={"stage": 0}, bf16={"enabled": True}))
    with pytest.raises(NotImplementedError, match="low-precision master weights"):
        _initialize(
            config=_config(
                zero_optimization={"stage": 2, "bf16_master_weights_and_gradients": True}, bf16={"enabled": True}
            )
        )
    with pytest.raises(NotImplementedError, match="model parallelism"):
        _initialize(config=_config(), mpu=object())


def test_auto_batch_sizes_need_one_set_by_the_script():
    cfg = _config(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    with pytest.raises(ValueError, match="training script must set"):
        _initialize(config=cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_build_and_are_supported(path):
    """Every ds_configs/*.json: an APOLLO block the adapter accepts, a supported ZeRO setup, "auto"
    batch sizes that resolve once the script sets the micro-batch size."""
    import apollo_dist.deepspeed as ads

    cfg = json.loads(path.read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    ads._resolve_batch_sizes(cfg)
    assert "train_batch_size" not in cfg and cfg["train_micro_batch_size_per_gpu"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 256 exceeds the tiny test model's dims: warned, not wrong
        opt = ads._take_optimizer(cfg, None, oracle.make_model(0), None)
    assert "optimizer" not in cfg and opt is not None
    assert ads._check_supported(cfg, None, oracle.make_model(0)) in (1, 2, 3)


def test_adapter_reachable_as_attribute_without_importing_deepspeed_early():
    """``apollo_dist.deepspeed.initialize`` works after a bare ``import apollo_dist``; the core alone
    never imports deepspeed."""
    import subprocess
    import sys

    code = (
        "import sys, apollo_dist; assert 'deepspeed' not in sys.modules; "
        "assert callable(apollo_dist.deepspeed.initialize); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_zero_param_without_gradient_steps_as_zero_gradient(runs, stage, preset):
    """W=3, plain deepspeed.initialize: ZeRO-1/2 hand the optimizer zeros for a param that got no gradient,
    ZeRO-3 its last gradient again unless cleared (APOLLO's binding zeroes ZeRO-3's store after each step:
    0.5 relative off before): APOLLO equals apollo-torch given zero gradients, not the one-process skip."""
    r = runs[3][f"idle/stage{stage}/{preset}"]
    assert r["zeros"] < TOL
    assert r["skipped"] > 1e-3
