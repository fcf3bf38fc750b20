"""GPU-only checks (run through the device machine; skipped where there is no CUDA)."""

from __future__ import annotations

import oracle
import pytest
import torch
from launch_count import Launches

from apollo_dist import APOLLO
from apollo_dist.kernels import MultiUpdate, StepScalars, scaled_update_eager
from apollo_dist.step_graph import StepGraph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train_cuda(opt_cls, preset: str, steps: int = 30, **kw):
    model = oracle.make_model().cuda()
    opt = opt_cls(oracle.groups(model, preset), **oracle.HPARAMS, **kw)
    for t in range(steps):
        x, y = (v.cuda() for v in oracle.batch(t))
        oracle.loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_cuda_matches_oracle(preset):
    """On CUDA (projections from the CUDA generator, the fused Triton kernels): oracle to < 1e-5; every
    kernel of the step was launched (in the eager warm-up steps and the captures the graph replays)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _train_cuda(oracle.oracle_class(), preset)
    with Launches() as launches:
        ours = _train_cuda(APOLLO, preset)
    assert all(n > 0 for n in launches.counts.values()), launches.counts
    assert oracle.max_rel_diff(ours, ref) < 1e-5  # measured on H100: 5.5e-7 (APOLLO), 5.4e-7 (Mini)


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_cuda_param_without_gradient_matches_oracle(preset):
    """On CUDA, the last block's MLP idle every third step (grads None): the fused kernels gate the idle params'
    moments, limiter and update per param (the step is not graphed while a gradient is missing; it is graphed
    again on the complete steps between): oracle to < 1e-5, and the step kernels ran."""
    torch.backends.cuda.matmul.allow_tf32 = False

    def run(opt_cls):
        model = oracle.make_model().cuda()
        opt = opt_cls(oracle.groups(model, preset), **{**oracle.HPARAMS, "weight_decay": 0.01})
        for t in range(30):
            oracle.set_idle(model, t)
            oracle.loss_fn(model, *(v.cuda() for v in oracle.batch(t))).backward()
            opt.step()
            opt.zero_grad()
        return model

    ref = run(oracle.oracle_class())
    with Launches() as launches:
        ours = run(APOLLO)
    assert all(n > 0 for n in launches.counts.values()), launches.counts
    assert oracle.max_rel_diff(ours, ref) < 1e-5


def test_fused_multi_update_equals_eager():
    """One Triton launch over tall and wide blocks of odd sizes equals the per-param eager update."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes, per_row = [(517, 301), (301, 517), (7, 3), (4099, 1)], [True, False, True, False]
    params = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    sizes = [s[0] if r else s[1] for s, r in zip(shapes, per_row)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    coef = torch.rand(sum(sizes), device="cuda", generator=g)
    expect = [p.clone() for p in params]
    for p, gr, r, off, k in zip(expect, grads, per_row, offsets, sizes):
        scaled_update_eager(p, gr, coef[off : off + k], r, -1e-3)
    from apollo_dist.kernels import fused

    assert fused(*params, *grads)
    update = MultiUpdate(params, per_row, offsets)
    scalars = StepScalars(torch.device("cuda"))
    scalars.set(0.0, -1e-3)
    with Launches() as launches:
        update(grads, coef, scalars)
    assert launches.counts["_multi_update_kernel"] == 1  # the kernel, not the eager twin
    for a, b in zip(params, expect):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "rank, tf32, bound", [(1, False, 1e-5), (256, True, 5e-3), (16, True, 5e-3), (256, False, 1e-5), (16, False, 1e-5)]
)
def test_fused_projection_matches_cublas(rank, tf32, bound):
    """One multi-tensor launch over tall, wide and odd-sized gradients equals cuBLAS + vector_norm per
    weight: to fp32 reordering at rank 1, to TF32's rounding (measured 7.4e-4 at LLaMA-1b) with TF32;
    exact rank > 1 (cuBLAS per weight, the norms in one launch) to fp32 reordering."""
    from apollo_dist import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2048, 512, True), (517, 301, True), (301, 1030, False), (1, 77, True), (64, 2049, False)]
    grads, projs, slots, out = [], [], [], 0
    for rows, n, tall in shapes:
        grads.append(torch.randn(rows, n, device="cuda", generator=g))
        projs.append(torch.randn((rank, n) if tall else (rows, rank), device="cuda", generator=g))
        slots.append((rows, n, tall, out))
        out += rows if tall else n
    proj = kernels.MultiProjection(slots, rank, torch.device("cuda"))
    fused = (torch.empty(out, rank, device="cuda"), torch.empty(out, device="cuda"))
    exact = (torch.empty(out, rank, device="cuda"), torch.empty(out, device="cuda"))
    with Launches() as launches:
        proj(grads, projs, *fused, tf32=tf32)  # one launch (exact rank > 1: the norms' launch)
        assert launches.since(dict.fromkeys(launches.counts, 0)) == {"_project_kernel": 1}
        saved, kernels.triton = kernels.triton, None
        try:
            before = launches.snapshot()
            proj(grads, projs, *exact, tf32=False)  # the eager twin: no launch
            assert launches.since(before) == {}
        finally:
            kernels.triton = saved
    for a, b in zip(fused, exact):
        assert float((a - b).abs().max() / b.abs().max()) < bound


def _train_graph(preset: str, cuda_graph: bool, nonfinite: str, tf32: bool, set_to_none: bool, steps: int = 30):
    """30 steps on CUDA with an lr that changes every step, projections redrawn every 7 steps, a NaN
    gradient at step 10 ("skip"), gradients freed by zero_grad or kept."""
    model = oracle.make_model().cuda()
    opt = APOLLO(
        oracle.groups(model, preset), **oracle.HPARAMS, cuda_graph=cuda_graph, nonfinite=nonfinite, projection_tf32=tf32
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for t in range(steps):
        x, y = (v.cuda() for v in oracle.batch(t))
        oracle.loss_fn(model, x, y).backward()
        if t == 10 and nonfinite == "skip":
            model.embed.weight.grad[0, 0] = float("nan")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=set_to_none)
    return model, opt


# Exact rank > 1 (cuBLAS reads the gradients directly): replayed while they stay put (set_to_none=False);
# the fused kernels read them through pointer tables: replayed whatever zero_grad does.
@pytest.mark.parametrize(
    "preset, tf32, set_to_none", [("apollo-mini", False, True), ("apollo", True, True), ("apollo", False, False)]
)
@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
def test_captured_step_equals_eager_step(preset, tf32, set_to_none, nonfinite):
    """The step replayed as a CUDA graph gives bitwise the numbers of the eager step (lr schedule, projection
    refresh, a skipped non-finite step), and it was replayed, not re-captured every step."""
    torch.backends.cuda.matmul.allow_tf32 = False
    graph_model, graph_opt = _train_graph(preset, True, nonfinite, tf32, set_to_none)
    eager_model, eager_opt = _train_graph(preset, False, nonfinite, tf32, set_to_none)
    graph = graph_opt._graph
    assert graph.replays >= 20 and graph.captures <= StepGraph.MAX_GRAPHS and not graph.disabled, vars(graph)
    for a, b in zip(graph_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    skipped = 1 if nonfinite == "skip" else 0
    assert graph_opt.skipped_steps == eager_opt.skipped_steps == skipped
    assert graph_opt.steps_taken == eager_opt.steps_taken == 30 - skipped
