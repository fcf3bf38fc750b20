"""The CPU step's one-pass projection kernel (apollo_dist.cpu_kernels, C++ built on first use): R and ||G_c||^2
against float64 sums, on odd shapes and strided row views (the mid-row pieces of ZeRO partitions), non-finite
values propagated, results independent of the thread count, and the optimizer the same with the PyTorch ops."""

from __future__ import annotations

import pytest
import torch

from apollo_dist import APOLLO, cpu_kernels, kernels, param_groups


@pytest.fixture(scope="module")
def lib():
    built = cpu_kernels._load()
    assert built is not None, "the C++ kernel must build on a machine with a compiler (CI has one)"
    return built


def _exact(G: torch.Tensor, P: torch.Tensor, tall: bool) -> tuple[torch.Tensor, torch.Tensor]:
    G, P = G.double(), P.double()
    R = G @ P.t() if tall else G.t() @ P
    return R.float(), (G**2).sum(dim=1 if tall else 0).float()


@pytest.mark.parametrize("tall", [True, False])
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("shape", [(37, 300), (300, 37), (1, 9), (257, 513)])
def test_projection_and_norms_match_float64(lib, shape, r, tall):
    torch.manual_seed(0)
    base = torch.randn(shape[0], shape[1] + 3)
    G = base[:, 1 : 1 + shape[1]]  # a row view with a stride of its own (ld > n), as a partition piece
    P = torch.randn(r, shape[1]) if tall else torch.randn(shape[0], r)
    c = shape[0] if tall else shape[1]
    R, g = torch.full((c, r), 7.0), torch.full((c,), 7.0)
    kernels.project_eager(G, P, tall, R, g)
    want_R, want_g = _exact(G, P, tall)
    torch.testing.assert_close(R, want_R, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=0)


def test_non_finite_values_reach_their_channel_only(lib):
    G = torch.randn(40, 30)
    G[3, 5], G[7, 9] = float("nan"), float("inf")
    for tall, bad in ((True, [3, 7]), (False, [5, 9])):
        c = 40 if tall else 30
        R, g = torch.zeros(c, 1), torch.zeros(c)
        kernels.project_eager(G, torch.randn(1, 30) if tall else torch.randn(40, 1), tall, R, g)
        assert not torch.isfinite(g[bad]).any() and not torch.isfinite(R[bad]).any()
        good = [i for i in range(c) if i not in bad]
        assert torch.isfinite(g[good]).all() and torch.isfinite(R[good]).all()


def test_results_do_not_depend_on_the_thread_count(lib):
    torch.manual_seed(1)
    G = torch.randn(700, 900)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for tall in (True, False):
                c = 700 if tall else 900
                R, g = torch.zeros(c, 1), torch.zeros(c)
                kernels.project_eager(G, torch.ones(1, 900) if tall else torch.ones(700, 1), tall, R, g)
                out.append((tall, R, g))
    finally:
        torch.set_num_threads(threads)
    for tall, R, g in out[2:]:
        ref = out[0] if tall else out[1]
        assert torch.equal(R, ref[1]) and torch.equal(g, ref[2])


def test_a_batch_of_expert_slices_is_each_slice(lib):
    torch.manual_seed(2)
    G3, P3 = torch.randn(4, 30, 20), torch.randn(4, 1, 20)
    R, g = torch.zeros(120, 1), torch.zeros(120)
    kernels.project_eager(G3, P3, True, R, g)
    for e in range(4):
        want_R, want_g = _exact(G3[e], P3[e], True)
        torch.testing.assert_close(R[30 * e : 30 * (e + 1)], want_R, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g[30 * e : 30 * (e + 1)], want_g, rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_optimizer_with_and_without_the_kernel(lib, monkeypatch, preset):
    """10 steps with a refresh: the kernel and PyTorch's ops (the fallback without a compiler) give the same
    weights up to summation order."""

    def train(use_kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_kernels, "_lib", lib if use_kernel else None)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24))
        opt = APOLLO(param_groups(model, preset=preset, rank=4, update_proj_gap=4, target_modules=["0", "2"]), lr=1e-2)
        for t in range(10):
            x = torch.randn(8, 24, generator=torch.Generator().manual_seed(t))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero_except_leaves_only_the_ranges_already_zeroed():
    """The gradient store's clearer skips what the CPU update zeroed in its pass (address, numel ranges, any
    order, some outside the buffer) and zeroes every other element."""
    from apollo_dist.binding import zero_except

    buf = torch.ones(30)
    buf[3:7], buf[12:20] = 5.0, 5.0  # "already zero": left as they are, so 5 shows they were not written
    elsewhere = torch.ones(4)
    zero_except(buf, [(buf[12:20].data_ptr(), 8), (elsewhere.data_ptr(), 4), (buf[3:7].data_ptr(), 4)])
    assert buf.tolist() == [0.0] * 3 + [5.0] * 4 + [0.0] * 5 + [5.0] * 8 + [0.0] * 10
    assert elsewhere.tolist() == [1.0] * 4


def test_the_update_zeroes_the_gradients_it_reads_when_asked(lib):
    """kernels.MultiUpdate with zero_grads: the same weights as addcmul_ (bit for bit: one rounding, as PyTorch's
    CPU addcmul_), weight decay after, the gradients zeroed and reported; a param without gradient untouched."""
    from apollo_dist.kernels import MultiUpdate, StepScalars

    torch.manual_seed(3)
    ps = [torch.randn(6, 4), torch.randn(3, 8), torch.randn(5, 5)]
    gs = [torch.randn_like(p) for p in ps]
    coef = torch.rand(6 + 8 + 5)
    want = [p.clone() for p in ps]
    for p, g, c, row in zip(want[:2], gs[:2], (coef[:6], coef[6:14]), (True, False)):
        p.addcmul_(g, c[:, None] if row else c[None, :], value=-1.0)
        p.add_(p, alpha=-0.01)
    scalars = StepScalars(torch.device("cpu"), 3)
    scalars.set([1.0] * 3, -0.01, [True, True, False])
    upd = MultiUpdate(ps, [True, False, True], [0, 6, 14])
    grads = [g.clone() for g in gs]
    zeroed = upd(grads, coef, scalars, None, (torch.tensor([1.0, 1.0, 0.0]), lambda: [True, True, False]), True)
    assert torch.equal(ps[0], want[0]) and torch.equal(ps[1], want[1]) and torch.equal(ps[2], want[2])
    assert sorted(zeroed) == sorted((g.data_ptr(), g.numel()) for g in grads[:2])
    assert not grads[0].any() and not grads[1].any() and torch.equal(grads[2], gs[2])


def test_adam_is_the_eager_step_in_one_pass(lib):
    """The plain-Adam kernel (embeddings, head, norms on the CPU): moments bitwise the eager ops', the weight
    within an ulp or two (the square root is correctly rounded here, torch's vectorized one not always), with and
    without decay; non-contiguous or non-fp32 tensors are refused (False, nothing written)."""
    gen = torch.Generator().manual_seed(0)
    n = 100_003  # several threads' chunks and a vector tail
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2
    m0, v0 = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5
    b1, b2, eps, step = 0.9, 0.999, 1e-6, 1e-3 / 0.1
    for decay in (0.0, -1e-5):
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        assert cpu_kernels.adam_(p, m, v, g, b1, b2, eps, step, decay)
        me = m0.clone().mul_(b1).add_(g, alpha=1 - b1)
        ve = v0.clone().mul_(b2).addcmul_(g, g, value=1 - b2)
        pe = p0.clone().addcdiv_(me, ve.sqrt().add_(eps), value=-step)
        if decay:
            pe.add_(pe, alpha=decay)
        assert torch.equal(m, me) and torch.equal(v, ve)
        torch.testing.assert_close(p, pe, rtol=2e-7, atol=1e-8)  # an ulp of the update where p nearly cancels
        exact = p0.double() - step * me.double() / (ve.double().sqrt() + eps)
        exact = exact + decay * exact
        torch.testing.assert_close(p.double(), exact, rtol=1e-6, atol=1e-8)
    strided = torch.zeros(2 * n)[::2]
    assert not cpu_kernels.adam_(strided, m, v, g, b1, b2, eps, step, 0.0)
    assert not cpu_kernels.adam_(p.double(), m.double(), v.double(), g.double(), b1, b2, eps, step, 0.0)
    assert torch.equal(strided, torch.zeros(n))
