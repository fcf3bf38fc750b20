"""transformers.Trainer with APOLLO (apollo_dist.hf.APOLLOTrainer), on CPU with gloo: the real Trainer,
accelerate and DeepSpeed, against the single-process Trainer with transformers' own
``optim="apollo_adamw"`` (apollo-torch, the oracle) on the same global batches; and the settings that
would make the Trainer drop APOLLO are refused.
"""

from __future__ import annotations

import sys
import warnings

import pytest
from spawn import report, run_checked, torchrun

WORKER = "tests/workers/hf_trainer.py"
TOL = 1e-4


def _run(tmp_path, name: str, *args: str, world: int = 1) -> dict:
    out = tmp_path / f"{name}.json"
    common = ("--dir", str(tmp_path / name.split("_resume")[0]), "--out", str(out), *args)
    if world == 1:
        run_checked([sys.executable, WORKER, *common], timeout=600)
    else:
        torchrun(WORKER, world, *common, timeout=600)
    return report(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    r = _run(tmp_path_factory.mktemp("hf"), "reference", "--mode", "reference")
    assert r["optimizer"] == "AdamW"  # apollo_torch.APOLLOAdamW's class name
    return {int(k): v for k, v in r["losses"].items()}


def _max_diff(a: dict, b: dict, steps) -> float:
    return max(
        abs(float(a[str(k)] if str(k) in a else a[k]) - float(b[str(k)] if str(k) in b else b[k])) for k in steps
    )


def test_trainer_one_process_matches_transformers_apollo(tmp_path, reference):
    """Three changed lines: APOLLOTrainer with transformers' optim_target_modules / optim_args gives the
    same param positions, hence the same projections, as optim="apollo_adamw": same losses for 20 steps."""
    r = _run(tmp_path, "single", "--mode", "apollo_dist")
    assert r["optimizer"] == "APOLLO" and r["steps_taken"] == 20
    assert _max_diff(r["losses"], reference, range(1, 21)) < TOL


def test_trainer_defaults_match_transformers_apollo_with_match_transformers(tmp_path):
    """TrainingArguments' defaults (adam_epsilon 1e-8, not the pinned 1e-6 above): transformers gives the
    other params APOLLOAdamW's eps 1e-6 and the low-rank group 1e-8. optim_args match_transformers=true
    (given to both: transformers ignores the key) builds the same per-param hyperparameters and the same
    losses; without it APOLLOTrainer gives every group 1e-8, and only the other params' eps differs."""
    ref = _run(tmp_path, "ref_defaults", "--mode", "reference", "--defaults", "--match-transformers")
    ours = _run(tmp_path, "ours_defaults", "--mode", "apollo_dist", "--defaults", "--match-transformers")
    assert ref["optimizer"] == "AdamW" and ours["optimizer"] == "APOLLO" and ours["steps_taken"] == 20
    low = [h[3] is not None for h in ref["hparams"]]
    assert any(low) and not all(low)
    assert {h[1] for h, lo in zip(ref["hparams"], low) if not lo} == {1e-6}  # APOLLOAdamW's default eps
    assert {h[1] for h, lo in zip(ref["hparams"], low) if lo} == {1e-8}  # adam_epsilon's default
    assert ours["hparams"] == ref["hparams"]
    assert _max_diff(ours["losses"], ref["losses"], range(1, 21)) < TOL
    plain = _run(tmp_path, "plain_defaults", "--mode", "apollo_dist", "--defaults")
    assert [h[1] for h in plain["hparams"]] == [1e-8] * len(low)  # adam_epsilon on every group
    assert [h[:1] + h[2:] for h in plain["hparams"]] == [h[:1] + h[2:] for h in ref["hparams"]]
    assert _max_diff(plain["losses"], ref["losses"], range(1, 21)) > 10 * TOL  # measured 1.9e-3: eps matters here


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_matches_reference_and_resumes(tmp_path, reference, stage):
    """Trainer(deepspeed=ZeRO-2/3 JSON) at W=2: per-step losses within 1e-4 of the single-process
    reference for 20 steps (projections refreshed at 5, 10, 15); a Trainer checkpoint at step 10 and
    resume_from_checkpoint give steps 11-20 again."""
    full = _run(tmp_path, f"z{stage}", "--mode", "apollo_dist", "--stage", str(stage), "--save-steps", "10", world=2)
    assert full["optimizer"] == "APOLLO" and full["world"] == 2 and full["steps_taken"] == 20
    assert _max_diff(full["losses"], reference, range(1, 21)) < TOL
    resumed = _run(
        tmp_path,
        f"z{stage}_resume",
        "--mode",
        "apollo_dist",
        "--stage",
        str(stage),
        "--resume",
        str(tmp_path / f"z{stage}" / "checkpoint-10"),
        world=2,
    )
    assert resumed["steps_taken"] == 20
    assert _max_diff(resumed["losses"], full["losses"], range(11, 21)) < 1e-6


@pytest.mark.slow
def test_trainer_deepspeed_offload_keeps_apollo(tmp_path, reference):
    """Trainer(deepspeed=ZeRO-3 with offload_optimizer and offload_param cpu), W=2, no zero_force_ds_cpu_optimizer
    in the JSON: APOLLOTrainer sets it false, so accelerate keeps APOLLO (not DeepSpeedCPUAdam), which steps the
    CPU partitions: the single-process reference's losses."""
    r = _run(tmp_path, "z3_offload", "--mode", "apollo_dist", "--stage", "3", "--offload", world=2)
    assert r["optimizer"] == "APOLLO" and r["offloaded"] and r["steps_taken"] == 20
    assert _max_diff(r["losses"], reference, range(1, 21)) < TOL


# -- what the Trainer would silently do with APOLLO, refused ---------------------------------------------
def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    kw.setdefault("optim_target_modules", ["attn", "mlp"])
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def _model():
    from workers.hf_trainer import make_model

    return make_model()


def test_param_groups_follow_transformers_layout_and_weight_decay(tmp_path):
    """Targeted nn.Linear weights last (transformers' positions), weight decay on them and on the other
    weights but not on biases and norms; optim_args typed; unknown keys named."""
    from apollo_dist.hf import APOLLOTrainer, build_optimizer, parse_optim_args

    model = _model()
    args = _args(
        tmp_path,
        weight_decay=0.1,
        learning_rate=3e-3,
        adam_beta1=0.8,
        optim="apollo_adamw",
        optim_args="rank=8,scale_type=tensor,scale=128,update_proj_gap=50",
    )
    trainer = APOLLOTrainer(model=model, args=args, train_dataset=[])
    opt = trainer.create_optimizer()
    names = [n for g in opt.param_groups for n in g["param_names"]]
    low = opt.param_groups[-1]
    assert low["rank"] == 8 and low["scale_type"] == "tensor" and low["scale"] == 128.0 and low["update_proj_gap"] == 50
    assert all(".self_attn." in n or ".mlp." in n for n in low["param_names"])
    assert names[-len(low["params"]) :] == low["param_names"]  # the low-rank weights come last
    assert [n for n, _ in model.named_parameters() if n not in low["param_names"]] == sorted(
        names[: -len(low["params"])], key=[n for n, _ in model.named_parameters()].index
    )
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert no_decay and all("norm" in n for g in no_decay for n in g["param_names"])
    assert (
        low["weight_decay"] == 0.1
        and opt.param_groups[0]["lr"] == 3e-3
        and opt.param_groups[0]["betas"] == (0.8, 0.999)
    )
    assert parse_optim_args("rank=4, projection_tf32=true") == {"rank": 4, "projection_tf32": True}
    with pytest.raises(ValueError, match="unknown APOLLO key 'ranks'"):
        build_optimizer(_args(tmp_path, optim_args="ranks=4"), model)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        build_optimizer(_args(tmp_path, optim_target_modules=["nothing_here"]), model)


def _per_param(opt) -> list[tuple]:
    """(lr, betas, eps, weight_decay, low-rank keys) of every param, in position order."""
    keys = ("rank", "proj", "proj_type", "scale_type", "scale", "update_proj_gap")
    return [
        (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], tuple(g.get(k) for k in keys))
        for g in opt.param_groups
        for _ in g["params"]
    ]


def test_hyperparameters_against_transformers_apollo_adamw(tmp_path):
    """transformers' own optim="apollo_adamw" optimizer (APOLLOAdamW built by the Trainer) with every
    argument off its default: match_transformers=true gives every param its lr, betas, eps, weight decay and
    low-rank keys (weight_decay ignored, with a warning, as transformers ignores it); the default differs
    exactly where apollo_dist.hf's docstring says: weight decay (not on norms), and the other params' betas
    and eps are the TrainingArguments' ones."""
    from transformers import Trainer

    from apollo_dist.hf import APOLLOTrainer

    model = _model()
    kw = dict(weight_decay=0.1, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    kw["optim"] = "apollo_adamw"
    compat = _args(tmp_path, optim_args="rank=8,update_proj_gap=50,match_transformers=true", **kw)
    theirs = _per_param(Trainer(model=model, args=compat, train_dataset=[]).create_optimizer())
    with pytest.warns(UserWarning, match="weight_decay=0.1 is ignored"):
        same = _per_param(APOLLOTrainer(model=model, args=compat, train_dataset=[]).create_optimizer())
    assert same == theirs
    low = [h[4][0] == 8 for h in theirs]
    assert any(low) and not all(low)
    assert {h[1:4] for h, lo in zip(theirs, low) if not lo} == {((0.9, 0.999), 1e-6, 0.0)}  # APOLLOAdamW's
    assert {h[1:4] for h, lo in zip(theirs, low) if lo} == {((0.8, 0.99), 1e-7, 0.0)}
    plain = APOLLOTrainer(
        model=model, args=_args(tmp_path, optim_args="rank=8,update_proj_gap=50", **kw), train_dataset=[]
    )
    ours = _per_param(plain.create_optimizer())
    decay = set(plain.get_decay_parameter_names(model))
    names = [n for g in plain.optimizer.param_groups for n in g["param_names"]]
    assert [(h[0], h[4]) for h in ours] == [(h[0], h[4]) for h in theirs]  # lr and the low-rank keys: the same
    assert [h[1:3] for h in ours] == [((0.8, 0.99), 1e-7)] * len(ours)
    assert [h[3] for h in ours] == [0.1 if n in decay else 0.0 for n in names]
    assert {n for n in names if n not in decay} and all("norm" in n for n in names if n not in decay)


def test_trainer_settings_that_would_drop_apollo_are_refused(tmp_path):
    from apollo_dist import APOLLO
    from apollo_dist.hf import APOLLOTrainer, check_trainer_setup

    model = _model()
    with pytest.raises(ValueError, match="transformers issue #38753"):
        APOLLOTrainer(model=model, args=_args(tmp_path), optimizers=(APOLLO(model.parameters()), None))
    with pytest.raises(NotImplementedError, match="layer-wise"):
        APOLLOTrainer(model=model, args=_args(tmp_path, optim="apollo_adamw_layerwise"))
    with pytest.warns(UserWarning, match="optim='adafactor' is ignored"):
        check_trainer_setup(_args(tmp_path, optim="adafactor"))

    def ds(config):  # real TrainingArguments with a DeepSpeed config (not built into an engine here)
        return _args(tmp_path, optim="apollo_adamw", deepspeed=config)

    with pytest.raises(ValueError, match='"optimizer" block .* replaces APOLLO'):
        check_trainer_setup(ds({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match="DeepSpeedCPUAdam"):
        check_trainer_setup(ds({**offload, "zero_force_ds_cpu_optimizer": True}))
    with pytest.raises(NotImplementedError, match="nvme"):
        check_trainer_setup(ds({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    args = ds(offload)  # ZeRO-Offload: accelerate must keep APOLLO (not swap in DeepSpeedCPUAdam)
    check_trainer_setup(args)
    assert args.hf_deepspeed_config.config["zero_force_ds_cpu_optimizer"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer_setup(ds({"zero_optimization": {"stage": 3}}))
