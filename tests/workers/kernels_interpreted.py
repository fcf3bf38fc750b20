"""The Triton kernels of apollo_dist.kernels, run on CPU tensors by Triton's interpreter
(TRITON_INTERPRET=1, set by the caller before anything imports triton), against their eager twins
and, wired into the optimizer, against the oracle. Prints one JSON line of measured differences and of
the kernels each "fused" and each "eager" call launched (``paths``: a fused call that fell back to its
eager twin would compare the twin with itself; the test asserts which kernels ran)."""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import oracle  # noqa: E402
import torch  # noqa: E402
from dct_cases import mirror_misses  # noqa: E402
from launch_count import Launches  # noqa: E402

from apollo_dist import APOLLO, kernels, projection  # noqa: E402

assert kernels.fused(torch.zeros(1)), "the interpreter should take CPU tensors"
gen = torch.Generator().manual_seed(0)
rand = lambda *s: torch.randn(*s, generator=gen)
diffs: dict[str, float] = {}
launches = Launches().__enter__()  # every kernel launch of this script is counted
paths: dict[str, dict[str, int]] = {}  # name -> {kernel: launches} of that call


def counted(name: str, fn, *args, **kw):
    """``fn(*args, **kw)``, the kernels it launched recorded as ``paths[name]``."""
    before = launches.snapshot()
    try:
        return fn(*args, **kw)
    finally:
        paths[name] = launches.since(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def eager(fn, *args, **kw):
    """Run ``fn`` with the kernels switched off (the eager twins)."""
    saved, kernels.triton = kernels.triton, None
    try:
        return fn(*args, **kw)
    finally:
        kernels.triton = saved


# 1. projection + channel norms: tall, wide, square, a one-row slot; ranks 1 (FMA), 3 (padded dot), 32;
# exact rank > 1: R from the matmul per weight, the norms from one norms-only launch.
slots_shapes = [(37, 23, True), (23, 37, False), (16, 16, True), (1, 29, True), (5, 70, False)]
for r, tf32 in ((1, False), (3, True), (32, True), (3, False), (32, False)):
    grads, projs, slots, out = [], [], [], 0
    for rows, n, tall in slots_shapes:
        grads.append(rand(rows, n))
        projs.append(rand(r, n) if tall else rand(rows, r))
        slots.append((rows, n, tall, out))
        out += rows if tall else n
    res = {}
    for mode in ("fused", "eager"):
        proj = kernels.MultiProjection(slots, r, torch.device("cpu"))
        T_R, T_g = torch.full((out, r), float("nan")), torch.full((out,), float("nan"))
        fn = proj if mode == "fused" else lambda *a, **k: eager(proj, *a, **k)
        counted(f"projection_r{r}{'_tf32' if tf32 else ''}/{mode}", fn, grads, projs, T_R, T_g, tf32=tf32)
        res[mode] = (T_R, T_g)
    diffs[f"projection_r{r}{'_tf32' if tf32 else ''}"] = max(
        rel(res["fused"][0], res["eager"][0]), rel(res["fused"][1], res["eager"][1])
    )

# 2. Adam on channel rows (r = 1, 5, 256)
for r in (1, 5, 256):
    R, m, v = rand(33, r), rand(33, r), rand(33, r).abs()
    outs = []
    for mode, fn in (("fused", kernels.channel_adam_), ("eager", lambda *a: eager(kernels.channel_adam_, *a))):
        mm, vv = m.clone(), v.clone()
        n_sq, r_sq = counted(f"channel_adam_r{r}/{mode}", fn, R, mm, vv, 0.9, 0.999, 1e-6)
        outs.append((mm, vv, n_sq, r_sq))
    diffs[f"channel_adam_r{r}"] = max(rel(a, b) for a, b in zip(*outs))
    mm, vv = m.clone(), v.clone()  # a skipped step (device flag set) writes no moment
    counted(f"channel_adam_skipped_r{r}/fused", kernels.channel_adam_, R, mm, vv, 0.9, 0.999, 1e-6, torch.ones(()))
    diffs[f"channel_adam_skipped_r{r}"] = max(rel(mm, m), rel(vv, v))

# 3. scaled update over tall and wide blocks of odd sizes
shapes, per_row = [(517, 31), (31, 517), (7, 3), (2049, 1)], [True, False, True, False]
grads = [rand(*s) for s in shapes]
sizes = [s[0] if row else s[1] for s, row in zip(shapes, per_row)]
offsets = [sum(sizes[:i]) for i in range(len(sizes))]
coef = torch.rand(sum(sizes), generator=gen)
base = [rand(*s) for s in shapes]
outs = []
scalars = kernels.StepScalars(torch.device("cpu"))
scalars.set(0.0, -1e-3)
for mode in ("fused", "eager"):
    params = [p.clone() for p in base]
    upd = kernels.MultiUpdate(params, per_row, offsets)
    counted(f"multi_update/{mode}", upd if mode == "fused" else lambda *a: eager(upd, *a), grads, coef, scalars)
    outs.append(params)
diffs["multi_update"] = max(rel(a, b) for a, b in zip(*outs))
params = [p.clone() for p in base]
counted(
    "multi_update_skipped/fused", kernels.MultiUpdate(params, per_row, offsets), grads, coef, scalars, torch.ones(())
)
diffs["multi_update_skipped"] = max(rel(a, b) for a, b in zip(params, base))

# 4. plain Adam over 1-D params of odd sizes, with decay
sizes = [3001, 5, 2048]
grads = [rand(k) for k in sizes]
base = [rand(k) for k in sizes]
outs = []
scalars.set(1e-2, -1e-3)
for mode in ("fused", "eager"):
    params = [p.clone() for p in base]
    adam = kernels.MultiAdam(params, torch.zeros(sum(sizes)), torch.zeros(sum(sizes)))
    fn = adam if mode == "fused" else lambda *a: eager(adam, *a)
    counted(f"multi_adam/{mode}", lambda: [fn(grads, 0.9, 0.999, 1e-6, scalars) for _ in range(3)])
    outs.append(params + [adam.exp_avg, adam.exp_avg_sq])
    # the sum of squares that decides a skip: finite, and inf with one NaN / inf element
    bad = [g.clone() for g in grads]
    bad[1][2] = float("nan")
    fn = adam.sum_sq if mode == "fused" else lambda g: eager(adam.sum_sq, g)
    outs[-1] += [counted(f"multi_sum_sq/{mode}", fn, grads)]
    outs[-1] += [torch.isfinite(counted(f"multi_sum_sq_nonfinite/{mode}", fn, bad)).float()]
diffs["multi_adam"] = max(rel(a, b) for a, b in zip(outs[0][:-2], outs[1][:-2]))
diffs["multi_sum_sq"] = rel(outs[0][-2], outs[1][-2])
diffs["multi_sum_sq_nonfinite"] = float(outs[0][-1] + outs[1][-1])  # 0: both saw the NaN
params = [p.clone() for p in base]
adam = kernels.MultiAdam(params, torch.zeros(sum(sizes)), torch.zeros(sum(sizes)))
counted("multi_adam_skipped/fused", adam, grads, 0.9, 0.999, 1e-6, scalars, torch.ones(()))
diffs["multi_adam_skipped"] = max([rel(a, b) for a, b in zip(params, base)] + [float(adam.exp_avg.abs().max())])

# 4b. DCT scores: one pass over the FFT's half spectrum vs the eager float64 sums (odd and even N, the splits of
# 256 rows, N = 1 and 2); a small score next to its large mirror (N - k) picked as the float64 rule picks it;
# batched decisions (forced on the CPU) equal single ones
for rows, N in ((37, 11), (600, 64), (513, 33), (5, 9), (3, 2), (4, 1)):
    X = rand(rows, N)
    got = counted(f"dct_scores_{rows}x{N}/fused", projection.dct_scores, X, True)
    diffs[f"dct_scores_{rows}x{N}"] = rel(
        got, counted(f"dct_scores_{rows}x{N}/eager", eager, projection.dct_scores, X, True)
    )


diffs["dct_mirror_picks"] = counted("dct_mirror_picks/fused", mirror_misses)
shapes = [(37, 11), (11, 37), (37, 11), (16, 16), (600, 33), (600, 33)]  # the last: a batch of two, 3 splits each
grads = [rand(*s) for s in shapes]
dct = projection.DCTProjector()
projection._DCT_BATCH_ON_CPU = True
batched = counted("dct_decide_all/fused", dct.decide_all, [lambda G=G: G for G in grads], shapes, 4)
projection._DCT_BATCH_ON_CPU = False
diffs["dct_decide_all"] = sum(not torch.equal(b, dct.decide(G, 4)) for b, G in zip(batched, grads))

# 5. the whole optimizer on the kernels vs the oracle (30 steps, gap 7, weight decay)
for preset in sys.argv[1:] or ["apollo", "apollo-mini"]:
    ours = counted(f"optimizer_{preset}/fused", oracle.train, APOLLO, preset)
    diffs[f"optimizer_{preset}"] = oracle.max_rel_diff(ours, oracle.train(oracle.oracle_class(), preset))
# TF32 asked for: rank 5 goes through the projection kernel too (fp32 in the interpreter: same result)
ours = counted("optimizer_apollo_tf32/fused", oracle.train, APOLLO, "apollo", projection_tf32=True)
diffs["optimizer_apollo_tf32"] = oracle.max_rel_diff(ours, oracle.train(oracle.oracle_class(), "apollo"))


# 6. a non-finite gradient at steps 4 and 9, gated on the device (the fused kernels write nothing, the
# host learns it at the next call), against the same run that leaves those steps out: bitwise equal.
def train_with_bad_steps(preset: str, leave_out: bool):
    model = oracle.make_model()
    opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
    taken = []
    for t in range(14):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        if t in (4, 9):
            model.embed.weight.grad[1, 2] = float("nan") if t == 4 else float("inf")
        if not (leave_out and t in (4, 9)):
            opt.step()
        opt.zero_grad()
        taken.append(opt.steps_taken)
    return model, opt.skipped_steps, taken


for preset in ("apollo", "apollo-mini"):
    gated = counted(f"gated_skip_{preset}/fused", train_with_bad_steps, preset, False)
    ref = train_with_bad_steps(preset, True)
    diffs[f"gated_skip_{preset}"] = oracle.max_rel_diff(gated[0], ref[0])
    assert gated[1] == 2 and ref[1] == 0 and gated[2] == ref[2] and gated[2][-1] == 12, (gated[1:], ref[1:])

print(json.dumps({"diffs": diffs, "paths": paths}))
