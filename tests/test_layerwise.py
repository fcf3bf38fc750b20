"""Layer-wise APOLLO (updates inside backward, gradients freed at once) against the ordinary step."""

from __future__ import annotations

import os

import oracle
import poisoned
import pytest
import torch
from spawn import report, torchrun

from apollo_dist import APOLLO
from apollo_dist.binding import Binding
from apollo_dist.layerwise import per_param_binding

WORKER = "tests/workers/layerwise_fsdp2.py"


def _train(preset: str, layerwise: bool, steps: int = 30, probe: bool = False, names: bool = False):
    """TinyNet after ``steps`` (gap 7: four projection refreshes; weight decay and an lr schedule on),
    and the most gradient elements alive at once (a probe hook that runs before the optimizer's).
    ``names``: the groups carry param_names (layer-wise: one bucket per block and group)."""
    model = oracle.make_model(0)
    params = list(model.parameters())
    live = [0]

    def count(_p=None):
        live[0] = max(live[0], sum(q.numel() for q in params if q.grad is not None))

    if probe:
        for p in params:  # registered before the optimizer's hook, so it runs first
            p.register_post_accumulate_grad_hook(count)
    groups = (oracle.named_groups if names else oracle.groups)(model, preset)
    opt = APOLLO(groups, **oracle.HPARAMS, layerwise=layerwise)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
    for t in range(steps):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        if probe and not layerwise:
            count()  # the ordinary step: every gradient is alive when it runs
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, live[0]


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_single_process_matches_ordinary_step_and_never_holds_the_full_gradient(preset):
    """30 steps: parameters within 1e-5 (relative) of the ordinary step's; while backward runs at most
    one parameter's gradient is alive (the ordinary step holds all of them)."""
    ref, ordinary_live = _train(preset, layerwise=False, probe=True)
    ours, live = _train(preset, layerwise=True, probe=True)
    total = sum(p.numel() for p in ours.parameters())
    assert oracle.max_rel_diff(ours, ref) < 1e-5
    assert ordinary_live == total
    assert live <= max(p.numel() for p in ours.parameters()) < total
    assert all(p.grad is None for p in ours.parameters())


def test_layers_are_one_bucket_each_and_match_the_ordinary_step():
    """With param_names, a block's low-rank weights are one bucket (its plain-Adam params another), updated at
    the last of their gradients: the ordinary step's parameters to 1e-5; at most about a block's gradients alive."""
    ref, _ = _train("apollo", layerwise=False, steps=15)  # two projection refreshes
    ours, live = _train("apollo", layerwise=True, steps=15, probe=True, names=True)
    assert oracle.max_rel_diff(ours, ref) < 1e-5
    block = sum(p.numel() for p in ours.blocks[0].parameters())
    assert max(p.numel() for p in ours.parameters()) < live <= block + ours.head.weight.numel()
    assert all(p.grad is None for p in ours.parameters())
    opt = APOLLO(oracle.named_groups(oracle.make_model(0), "apollo"), **oracle.HPARAMS, layerwise=True)
    assert sorted(len(b.slots) for b in opt.buckets) == [1, 1, 4, 4, 8], [len(b.slots) for b in opt.buckets]
    # embed and head alone; per block: q, o, up, down weights (748 elements: more than the largest param, the
    # 407-element embedding, so blocks stay apart); both blocks' o and up biases, norm weights and biases (2 x 56)
    # merged into one bucket, no larger than the largest param


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_matches_ordinary_step_and_never_holds_the_full_gradient(tmp_path, world):
    """fully_shard per block and root, gloo: both presets, 30 steps, within 1e-4 of the ordinary step
    under FSDP2; on every rank the sharded gradients alive at once stay below the rank's total. A NaN in one
    rank's shard of two params' gradients: every rank leaves them out (the ordinary step without them)."""
    out = tmp_path / "r.json"
    torchrun(WORKER, world, "--out", str(out))
    r = report(out)
    poisoned_run = r["poisoned"]
    assert poisoned_run["max_rel_diff"] < 1e-4 and poisoned_run["counts"] == poisoned_run["ref_counts"], r
    assert sorted(set(poisoned_run["counts"])) == [6, 8], r
    assert r["max_rel_diff"]["grouped"] < 1e-4, r  # one bucket per block
    for preset in ("apollo", "apollo-mini"):
        assert r["max_rel_diff"][preset] < 1e-4, r
        assert r["ordinary_grad_numel"][preset] == r["total_numel"]
        assert all(live < total for live, total in zip(r["live_grad_numel"][preset], r["total_numel"])), r


def test_state_dict_is_the_ordinary_one_and_resumes_exactly():
    """Layer-wise for 10 steps, its state_dict into a fresh layer-wise optimizer and into an ordinary one,
    10 more steps (the step driven by a closure): both equal 20 uninterrupted ordinary steps."""
    ref, _ = _train("apollo", layerwise=False, steps=20)
    for second in (True, False):
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
        for t in range(20):
            if t == 10:
                sd, sched_sd = opt.state_dict(), sched.state_dict()
                opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=second)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
                opt.load_state_dict(sd)  # after the scheduler's set-up, which writes the groups' lr
                sched.load_state_dict(sched_sd)
            opt.step(lambda t=t: oracle.loss_fn(model, *oracle.batch(t)).backward())
            sched.step()
            opt.zero_grad()
        assert oracle.max_rel_diff(model, ref) < 1e-5


def test_gradient_accumulation_is_an_error():
    model = oracle.make_model(0)
    _opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True)  # alive: its hooks run in backward
    oracle.loss_fn(model, *oracle.batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"param \d+ \(shape .*\) got a second gradient before optimizer.step\(\)"):
        oracle.loss_fn(model, *oracle.batch(1)).backward()


def test_step_without_any_update_is_an_error_and_a_param_without_gradient_is_skipped():
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True)
    with pytest.raises(RuntimeError, match="no parameter updated since the last step: run backward before step"):
        opt.step()
    # the head gets no gradient (a loss over the blocks' output only): skipped, as the ordinary step skips it
    head = model.head.weight.detach().clone()
    model.blocks[1](model.blocks[0](model.embed(oracle.batch(0)[0]))).square().mean().backward()
    opt.step()
    opt.zero_grad()  # harmless: the gradients are already gone
    assert torch.equal(model.head.weight, head) and int(opt.state[model.head.weight]["step"]) == 0
    assert int(opt.state[model.embed.weight]["step"]) == 1


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_layerwise_param_without_gradient_matches_oracle(preset):
    """The last block's MLP idle every third step (no hook fires for it): the oracle, which skips it."""
    ref = oracle.train_idle(oracle.oracle_class(), preset)
    ours = oracle.train_idle(APOLLO, preset, layerwise=True)
    assert oracle.max_rel_diff(ours, ref) < 1e-5


def test_grouped_layer_with_params_without_gradient_is_updated_at_step():
    """One bucket per block: on the steps where the last block's MLP is idle its bucket never completes in
    backward; ``step()`` updates it with the gradients it got (q, o), skipping up and down, as the oracle does."""
    ref = oracle.train_idle(oracle.oracle_class(), "apollo-mini")
    model = oracle.make_model(0)
    opt = APOLLO(oracle.named_groups(model, "apollo-mini"), **{**oracle.HPARAMS, "weight_decay": 0.01}, layerwise=True)
    for t in range(12):  # oracle.train_idle's loop
        oracle.set_idle(model, t)
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        opt.step()
        opt.zero_grad()
    assert oracle.max_rel_diff(model, ref) < 1e-5
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("preset", [pytest.param("apollo", marks=pytest.mark.slow), "apollo-mini"])
def test_nonfinite_gradient_skips_only_its_params_and_a_nonfinite_loss_changes_nothing(preset):
    """nonfinite="skip": a param whose gradient is NaN (a low-rank and a plain-Adam one, at two steps) is not
    updated and its step count does not advance, the others are: the ordinary step with those gradients left
    out (grad None), to 1e-5, same step counts; a warning names them. A NaN loss (every gradient NaN) leaves
    weights and every state tensor bitwise as they were."""
    ours = poisoned.train(preset, layerwise=True)
    ref = poisoned.train(preset, layerwise=False)
    assert oracle.max_rel_diff(ours["model"], ref["model"]) < 1e-5
    assert ours["steps"] == ref["steps"] and sorted(set(ours["steps"])) == [5, 7], ours["steps"]
    assert ours["untouched"] and ref["untouched"]
    assert ours["skipped"] == 3 and ref["skipped"] == 1  # two partial steps and the NaN loss's
    partial = [w for w in ours["warnings"] if "not updated at this step" in w]
    assert len(partial) == 2 and all(r"2 param(s): param " in w and "(shape (23, 11))" in w for w in partial)


def test_nonfinite_gradient_skips_its_bucket_when_layers_are_grouped():
    """One bucket per block (param_names): a NaN in one weight's gradient keeps the block's low-rank bucket
    from being updated (the ordinary step without those four gradients), the others go on."""
    ours = poisoned.train("apollo-mini", layerwise=True, names=True)
    ref = poisoned.train("apollo-mini", layerwise=False, names=True)
    assert oracle.max_rel_diff(ours["model"], ref["model"]) < 1e-5
    assert ours["steps"] == ref["steps"] and ours["steps"].count(5) == 5 and ours["untouched"], ours["steps"]
    assert sum("5 param(s): param " in w for w in ours["warnings"]) == 2, ours["warnings"]


def test_nonfinite_gradient_per_param_on_the_kernels():
    """The same through the fused kernels (Triton's interpreter): every hook's update ran on them (one
    projection, channel-Adam and update launch per low-rank param and step, plain Adam per other param), the
    writes gated on the device per param as defined above."""
    import json
    import sys

    from spawn import run_checked

    proc = run_checked([sys.executable, "tests/workers/layerwise_interpreted.py"], timeout=600, TRITON_INTERPRET="1")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["diff"] < 1e-5 and r["steps"] == r["ref_steps"] and sorted(set(r["steps"])) == [4, 6], r
    assert r["untouched"] and r["skipped"] == 3, r
    low_rank, plain = 8, r["buckets"] - 8  # TinyNet: 2 blocks x (q, o, up, down) weights
    n = r["launches"]
    assert n["_project_kernel"] == n["_channel_adam_kernel"] == n["_multi_update_kernel"] == 7 * low_rank, n
    assert n["_multi_adam_kernel"] == 7 * plain, n


@pytest.mark.parametrize("nonfinite, int8", [("raise", False), ("skip", False), ("raise", True)])
def test_backward_reads_no_tensor_value_on_the_host(nonfinite, int8):
    """No host sync in the hooks: during backward (every param's update, int8 re-quantization included), no
    tensor value is read on the host (.item(), int(), bool(), .tolist()) but the host vectors of step counts;
    step() then reads the decisions once. The eager twins (CPU) gate on the device as the kernels do."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from apollo_dist.quant import quantize_model

    model = oracle.make_model(0)
    if int8:
        quantize_model(model, group_size=8)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True, nonfinite=nonfinite)
    host = {b.step_count.untyped_storage().data_ptr() for b in opt.buckets}
    reads = []

    def check(t: torch.Tensor, how: str) -> None:
        if t.untyped_storage().data_ptr() not in host:
            reads.append(f"{how} of a {tuple(t.shape)} tensor")

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                check(args[0], str(func))
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def spied_tolist(t):
        check(t, "tolist")
        return tolist(t)

    for t in range(3):
        loss = oracle.loss_fn(model, *oracle.batch(t))
        torch.Tensor.tolist = spied_tolist
        try:
            with Spy():
                loss.backward()
        finally:
            torch.Tensor.tolist = tolist
        opt.step()
        opt.steps_taken  # noqa: B018  ("skip": the host copy of the flags read here, not at the next first hook)
    assert reads == [], reads[:5]
    assert opt.steps_taken == 3


def test_nonfinite_raise_names_the_params_in_step_and_training_goes_on():
    """The layer-wise default "raise": backward runs through (no host sync in it); ``step()`` raises naming the
    param, which was not updated (weight, moments, step count), while the others were; the next step trains it
    again. A NaN loss raises and changes nothing."""
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True)
    up = model.blocks[0].mlp["up"].weight
    bad = [False]
    up.register_hook(lambda g: g * float("nan") if bad[0] else g)
    for t in range(2):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = opt.state[up]["exp_avg"].clone()
    bad[0] = True
    oracle.loss_fn(model, *oracle.batch(2)).backward()  # no error in backward
    with pytest.raises(
        FloatingPointError, match=r"non-finite gradient in 1 param\(s\): param \d+ \(shape \(23, 11\)\) at step 3"
    ):
        opt.step()
    assert torch.equal(up, before["blocks.0.mlp.up.weight"]) and torch.equal(opt.state[up]["exp_avg"], moments)
    assert int(opt.state[up]["step"]) == 2 and int(opt.state[model.head.weight]["step"]) == 3
    assert not torch.equal(model.head.weight, before["head.weight"])
    bad[0] = False
    oracle.loss_fn(model, *oracle.batch(3)).backward()
    opt.step()
    assert int(opt.state[up]["step"]) == 3 and not torch.equal(up, before["blocks.0.mlp.up.weight"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = [int(opt.state[p]["step"]) for p in model.parameters()]
    (oracle.loss_fn(model, *oracle.batch(4)) * float("nan")).backward()
    with pytest.raises(
        FloatingPointError, match=r"non-finite gradient in \d+ param\(s\).*0 other param\(s\) were updated"
    ):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [int(opt.state[p]["step"]) for p in model.parameters()] == steps


def test_layouts_without_a_per_parameter_hook_are_refused():
    """DeepSpeed's flat partitions and adapters' explicit bindings: clear errors (at the binding, and in
    apollo_dist.deepspeed.initialize before DeepSpeed starts)."""
    with pytest.raises(ValueError, match="does not run under DeepSpeed ZeRO"):
        per_param_binding(Binding("flat", []))
    with pytest.raises(ValueError, match="'explicit' binding"):
        per_param_binding(Binding("explicit", []))
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), layerwise=True)
    with pytest.raises(ValueError, match="'explicit' binding"):
        opt.bind(opt.slots())
    from apollo_dist.deepspeed import initialize

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    with pytest.raises(NotImplementedError, match="does not run under DeepSpeed ZeRO"):
        initialize(model=model, optimizer=opt, config=config)


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--deepspeed", "ds_configs/apollo.json"], 2, "--layerwise does not run under DeepSpeed"),
        (["--grad-clip", "1.0"], 1, "--grad-clip 1 must be 0"),
        (["--global-batch-size", "8", "--micro-batch-size", "2"], 2, "needs gradient accumulation 1 .* this run has 2"),
    ],
)
def test_train_py_refuses_what_layerwise_cannot_do(flags, world, message):
    """launch/train.py --layerwise: one-line UsageErrors before any process group; clipping defaults to 0."""
    from launch import train

    flags = [os.path.join(train.ROOT, f) if f.endswith(".json") else f for f in flags]
    args = train.parse_args(["--layerwise", *flags])
    cfg = train.load_json(args.deepspeed, "--deepspeed") if args.deepspeed else None
    with pytest.raises(train.UsageError, match=message):
        train.resolve_run(args, cfg, train.defaults_config(args, cfg), world)
    args = train.parse_args(["--layerwise", "--global-batch-size", "8", "--micro-batch-size", "4"])
    run = train.resolve_run(args, None, train.defaults_config(args, None), 2)
    assert run.layerwise and run.grad_clip == 0.0 and run.grad_accum == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_cuda_layerwise_matches_ordinary_step(preset):
    """On CUDA (per-param buckets through the Triton kernels, counted): the ordinary step's parameters to < 1e-5."""
    from launch_count import Launches

    def run(layerwise: bool) -> torch.nn.Module:
        model = oracle.make_model(0).cuda()
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS, layerwise=layerwise)
        for t in range(30):
            x, y = (v.cuda() for v in oracle.batch(t))
            oracle.loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        return model

    with Launches() as launches:
        layerwise = run(True)
    assert all(launches.counts[k] > 0 for k in ("_project_kernel", "_channel_adam_kernel", "_multi_update_kernel"))
    assert oracle.max_rel_diff(layerwise, run(False)) < 1e-5


def test_clipping_layerwise_params_is_refused():
    """clip_grad_norm_ / clip_grad_value_ after a layer-wise backward would clip nothing (the gradients were
    applied and freed): an error naming the cause, through torch and through accelerate (which Lightning's
    gradient_clip_val and the Trainer reach the same way); other params still clip."""
    from accelerate import Accelerator

    model = oracle.make_model(0)
    _opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, layerwise=True)  # alive: its hooks run
    oracle.loss_fn(model, *oracle.batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_ on \d+ parameter\(s\) that layer-wise APOLLO"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match=r"clip_grad_value_ on 1 parameter\(s\)"):
        torch.nn.utils.clip_grad_value_(model.head.weight, 1.0)
    with pytest.raises(RuntimeError, match="nothing would be clipped"):
        Accelerator(cpu=True).clip_grad_norm_(model.parameters(), 1.0)
    other = torch.nn.Linear(3, 3)
    other(torch.ones(2, 3)).sum().backward()
    assert float(torch.nn.utils.clip_grad_norm_(other.parameters(), 1e-3)) > 1e-3
    assert float(torch.linalg.vector_norm(other.weight.grad)) <= 1e-3 * 1.01


def test_layerwise_fsdp2_resumes_at_another_world_size(tmp_path):
    """Layer-wise APOLLO under FSDP2 at W=2, DCP checkpoint at step 5 (get_state_dict), loaded at W=3 into a
    layer-wise optimizer by apollo_dist's any-W loader (other initial weights), steps 6-12 with a projection
    refresh at 7: the uninterrupted W=2 run's weights, both presets, and every param at step 12."""
    args = ("--dir", str(tmp_path), "--out", str(tmp_path / "r.json"))
    torchrun("tests/workers/layerwise_resume.py", 2, "--part", "save", *args)
    torchrun("tests/workers/layerwise_resume.py", 3, "--part", "load", *args)
    r = report(tmp_path / "r.json")
    assert r["world"] == 3
    for preset in ("apollo", "apollo-mini"):
        assert r[preset]["steps"] == [12], r
        assert r[preset]["max_rel_diff"] < 1e-5, (preset, r[preset])
