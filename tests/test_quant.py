"""int8 weights (Q-APOLLO): group-wise quantization, stochastic rounding, layer-wise training and exact resume."""

from __future__ import annotations

import io

import oracle
import pytest
import torch

from apollo_dist import APOLLO, param_groups
from apollo_dist.quant import Int8Linear, dequantize_groupwise, quantize_groupwise, quantize_model

GROUP = 20  # small models: d = 32 and h = 48 give full and partial (12, 8) groups per row


def _group_scales(scale: torch.Tensor, n: int, group: int) -> torch.Tensor:
    return scale.repeat_interleave(group, dim=1)[:, :n]


@pytest.mark.parametrize("n, group", [(256, 128), (300, 128), (48, GROUP)])
def test_round_trip_error_is_within_half_a_step(n, group):
    """Nearest rounding: |w - deq(q(w))| <= scale / 2 per element; stochastic: < scale; int8 in [-127, 127];
    an all-zero group stays exactly zero."""
    w = torch.randn(7, n, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 7).unsqueeze(1)
    w[3, :group] = 0.0
    for generator, bound in ((None, 0.5), (torch.Generator().manual_seed(1), 1.0)):
        q, scale = quantize_groupwise(w, group, generator)
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (7, -(-n // group))
        assert int(q.abs().max()) <= 127
        err = (dequantize_groupwise(q, scale, group) - w).abs()
        assert bool((err <= bound * _group_scales(scale, n, group) * (1 + 1e-6)).all())
        assert bool((dequantize_groupwise(q, scale, group)[3, :group] == 0).all())


def test_stochastic_rounding_is_unbiased():
    """A weight plus an update of 0.3 quantization steps: nearest rounding loses the update entirely,
    the mean of 1000 stochastic roundings recovers it (within 5 standard errors, per element and overall)."""
    group, draws = 128, 1000
    q0, scale0 = quantize_groupwise(torch.randn(4, 256, generator=torch.Generator().manual_seed(0)), group)
    base = dequantize_groupwise(q0, scale0, group)  # exactly representable
    step = _group_scales(scale0, 256, group)
    w = base + 0.3 * step * (q0.abs() != 127)  # each group's absmax element stays: the scales stay the same
    nearest = dequantize_groupwise(*quantize_groupwise(w, group), group)
    torch.testing.assert_close(nearest, base, rtol=1e-6, atol=0)  # the update is lost
    mean = (
        sum(
            dequantize_groupwise(*quantize_groupwise(w, group, torch.Generator().manual_seed(s)), group)
            for s in range(draws)
        )
        / draws
    )
    stderr = 0.5 * step / draws**0.5  # std of one draw <= step / 2
    assert bool(((mean - w).abs() <= 5 * stderr + 1e-7).all())  # every element
    bias = float(((mean - w) / step).mean())  # in steps, over the 1024 elements: nearest rounding's is -0.3
    assert abs(bias) < 5 * 0.5 / (draws * w.numel()) ** 0.5


def _model(quantized: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = oracle.TinyNet(vocab=37, d=32, h=48)
    if quantized:
        quantize_model(model, group_size=GROUP)
    return model


def _optimizer(model: torch.nn.Module, layerwise: bool = True) -> APOLLO:
    groups = param_groups(model, preset="apollo", rank=4, update_proj_gap=7)
    for g in groups:
        g.pop("param_names")
    return APOLLO(groups, **oracle.HPARAMS, layerwise=layerwise)


def _train(model, opt, steps: range) -> list[float]:
    losses = []
    for t in steps:
        loss = oracle.loss_fn(model, *oracle.batch(t))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_int8_layerwise_trains_like_fp32_and_stores_int8():
    """30 steps of layer-wise APOLLO on the int8 model follow the fp32 run (losses within 1%, measured
    0.08%; weights within 10% in Frobenius norm); the
    target weights are int8 buffers plus group scales, their parameters hold no values."""
    fp32, int8 = _model(False), _model(True)
    ref = _train(fp32, _optimizer(fp32), range(30))
    got = _train(int8, _optimizer(int8), range(30))
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 0.01
    layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 8
    for m in layers:
        assert m.weight_int8.dtype == torch.int8 and m.weight.untyped_storage().nbytes() == 4 and m.weight.grad is None
    sd = int8.state_dict()
    assert "blocks.0.mlp.up.weight" not in sd and sd["blocks.0.mlp.up.weight_int8"].dtype == torch.int8
    assert sd["blocks.0.mlp.down.weight_scale"].shape == (32, 3)  # 48 inputs: groups of 20, 20, 8
    deq = {n: m.dequantize() for n, m in int8.named_modules() if isinstance(m, Int8Linear)}
    drift = max(
        float((deq[n] - fp32.get_submodule(n).weight.detach()).norm() / fp32.get_submodule(n).weight.detach().norm())
        for n in deq
    )
    assert drift < 0.1  # the weights stay near the fp32 run's (measured 0.074: rounding noise, 30 steps at lr 3e-2)


def test_int8_nonfinite_loss_leaves_the_int8_weights_untouched():
    """A NaN loss under layer-wise "skip": the stochastic re-quantization of every int8 weight is gated on the
    device too, so int8 values, scales, every other weight and the optimizer state stay bitwise as they were."""
    model = _model(True)
    opt = _optimizer(model)
    opt.nonfinite = "skip"
    _train(model, opt, range(2))
    opt.steps_taken  # noqa: B018  (settles step 2)
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = [torch.as_tensor(v).clone() for st in opt.state.values() for k, v in sorted(st.items())]
    (oracle.loss_fn(model, *oracle.batch(2)) * float("nan")).backward()
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, model_sd[k]) for k, v in model.state_dict().items())
    after = [torch.as_tensor(v) for st in opt.state.values() for k, v in sorted(st.items())]
    assert all(torch.equal(a, b) for a, b in zip(after, opt_state))


def test_int8_layerwise_resumes_exactly_from_its_checkpoint():
    """Model and optimizer state dicts after 10 steps (int8 weights and scales, moments, steps) into a fresh
    int8 model and optimizer, 10 more steps: bitwise the uninterrupted run (the rounding noise is seeded)."""
    whole = _model(True)
    _train(whole, _optimizer(whole), range(20))
    first = _model(True)
    opt = _optimizer(first)
    _train(first, opt, range(10))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = _model(True)
    resumed.load_state_dict(saved["model"])
    opt = _optimizer(resumed)
    opt.load_state_dict(saved["optimizer"])
    _train(resumed, opt, range(10, 20))
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int8_misuse_is_refused():
    model = _model(True)
    with pytest.raises(ValueError, match=r"param \d+ \(shape \(32, 32\)\) is an int8 weight .*\(layerwise=True\)"):
        _optimizer(model, layerwise=False).step()
    from apollo_dist.checkpoint import LiveSource

    with pytest.raises(ValueError, match=r"canonical checkpoints \(LiveSource\): param \d+"):
        LiveSource(_optimizer(model), model)
    with pytest.raises(RuntimeError, match="a float weight for an int8 layer"):
        model.load_state_dict(_model(False).state_dict())
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        quantize_model(_model(False), target_modules=("nothing",))


@pytest.mark.parametrize("flags, world", [([], 1), (["--layerwise", "--engine", "fsdp2"], 2)])
def test_train_py_int8_needs_layerwise_in_one_process(flags, world):
    from launch import train

    args = train.parse_args(["--weight-quant", "int8", "--global-batch-size", "8", "--micro-batch-size", "4", *flags])
    with pytest.raises(train.UsageError, match="--weight-quant int8 needs --layerwise and --engine single"):
        train.resolve_run(args, None, train.defaults_config(args, None), world)


def test_train_py_bf16_parameters_run_in_one_process_only():
    from launch import train

    args = train.parse_args(["--param-dtype", "bf16", "--engine", "fsdp2", "--global-batch-size", "4"])
    with pytest.raises(train.UsageError, match="--param-dtype bf16 runs in one process .* engine is fsdp2"):
        train.resolve_run(args, None, train.defaults_config(args, None), 2)


@pytest.mark.parametrize("param_dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_train_py_int8_layerwise_resume_takes_its_settings(tmp_path, corpus, param_dtype):
    """A --layerwise --weight-quant int8 job resumed with --resume alone continues exactly (the int8,
    layer-wise and parameter-dtype settings come from the checkpoint); resuming it as float weights is a
    one-line error. bf16 parameters: the paper's pure-bf16 one-GPU setting."""
    import json
    import sys

    from spawn import run_checked

    flags = (
        "launch/train.py --engine single --model tiny --steps 4 --global-batch-size 2 --seq-len 32 "
        "--rank 8 --eval-every 100 --eval-samples 2 --dtype fp32 --no-progress"
    ).split()
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    run_checked(
        [
            sys.executable,
            *flags,
            "--layerwise",
            "--weight-quant",
            "int8",
            "--param-dtype",
            param_dtype,
            "--metrics-file",
            str(whole),
            "--save-dir",
            str(tmp_path / "ckpt"),
            "--save-every",
            "2",
        ],
        timeout=300,
    )
    step2 = str(tmp_path / "ckpt" / "step_0000002")
    run_checked(
        [sys.executable, "launch/train.py", "--no-progress", "--metrics-file", str(resumed), "--resume", step2],
        timeout=300,
    )
    loss = lambda p: {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines()) if "loss" in r}  # noqa: E731
    assert loss(resumed) == {s: v for s, v in loss(whole).items() if s > 2}
    saved = torch.load(tmp_path / "ckpt" / "step_0000004" / "state.pt", map_location="cpu", weights_only=True)["model"]
    assert (
        saved["model.norm.weight"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[param_dtype]
    )  # no fp32 copy
    assert json.loads((tmp_path / "ckpt" / "step_0000004" / "trainer.json").read_text())["param_dtype"] == param_dtype
    proc = run_checked(
        [sys.executable, "launch/train.py", "--resume", step2, "--weight-quant", "none", "--layerwise"], check=False
    )
    assert (
        proc.returncode == 2 and "the checkpoint has weight_quant 'int8', this run weight_quant 'none'" in proc.stderr
    )
