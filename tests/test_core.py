"""The sharded APOLLO core against the apollo-torch oracle: one process, simulated layouts, FSDP2."""

from __future__ import annotations

import io

import oracle
import pytest
import torch
from spawn import report, torchrun

from apollo_dist import APOLLO, param_groups
from apollo_dist.layout import ParamLayout, position_owners, touched_channels

WORKER = "tests/workers/core_equivalence.py"


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_single_process_matches_oracle(preset):
    """30 steps, gap 7 (four projection refreshes), weight decay on: max relative difference < 1e-5."""
    ref = oracle.train(oracle.oracle_class(), preset)
    ours = oracle.train(APOLLO, preset)
    assert oracle.max_rel_diff(ours, ref) < 1e-5


@pytest.mark.parametrize("options", [{"scale_front": True}, {"disable_nl": True}, {"correct_bias": False}])
def test_options_match_oracle(options):
    ref = oracle.train(oracle.oracle_class(), "apollo", steps=12, **options)
    ours = oracle.train(APOLLO, "apollo", steps=12, **options)
    assert oracle.max_rel_diff(ours, ref) < 1e-5


def test_position_owners_tile_channels_and_keep_local_rows():
    """Owned ranges tile [0, C) in rank order; a tall row held whole is owned by its holder."""
    for m, n in [(23, 11), (11, 23), (11, 11), (1, 7), (7, 1)]:
        numel = m * n
        for cuts in ([0, numel], [0, 5, numel], [0, 40, 41, 100, numel], [0, 0, numel, numel]):
            cuts = [min(c, numel) for c in cuts]
            ranges = list(zip(cuts[:-1], cuts[1:]))
            owners = position_owners(m, n, ranges)
            flat = [c for a, b in owners for c in range(a, b)]
            assert flat == list(range(m if m >= n else n))
            if m >= n:
                for w, (a, b) in enumerate(ranges):
                    for row in range(m):
                        if a <= row * n and (row + 1) * n <= b:
                            assert owners[w][0] <= row < owners[w][1]
            lay = ParamLayout(m, n, ranges, owners)
            shared = lay.shared_mask()
            for c in range(lay.channels):  # local <=> one toucher that also owns it
                touchers = [
                    w
                    for w, (a, b) in enumerate(ranges)
                    if touched_channels(m, n, a, b)[0] <= c < touched_channels(m, n, a, b)[1]
                ]
                owner = next(w for w, (a, b) in enumerate(owners) if a <= c < b)
                assert bool(shared[c]) == (touchers != [owner])


@pytest.mark.parametrize("world", [2, 3])
def test_flat_partition_layout_matches_oracle(tmp_path, world):
    """Params cut mid-row and mid-parameter (ZeRO-1/2-like flat partition) give the one-process result."""
    out = tmp_path / "r.json"
    torchrun(WORKER, world, "--layout", "flat", "--out", str(out))
    r = report(out)
    assert r["max_rel_diff"] < 1e-5
    assert sum(r["state_bytes"]) == r["ref_state_bytes"]


def _one_channel_per_param_bytes(r: dict) -> int:
    """Slack of the state bound: one channel (row/column of both moments) per low-rank param, plus
    one row of both Adam moments per other param (FSDP2 shards dim 0 with ceil)."""
    low = sum(2 * 4 * rank for _, rank in r["lowrank_shapes"])
    model = oracle.TinyNet()
    lowrank_numel = {tuple(s) for s, _ in r["lowrank_shapes"]}
    rest = sum(
        2 * 4 * (p[0].numel() if p.dim() > 1 else 1)
        for p in model.parameters()
        if not (p.dim() == 2 and tuple(p.shape) in lowrank_numel)
    )
    return low + rest


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_fsdp2_matches_oracle(tmp_path, world, preset):
    """fully_shard + APOLLO via torchrun (gloo): parameters after 30 steps within 1e-4 of the oracle;
    state sums to the reference's and the largest rank holds <= 1/W of it plus one channel per param."""
    out = tmp_path / "r.json"
    torchrun(WORKER, world, "--layout", "fsdp2", "--preset", preset, "--out", str(out))
    r = report(out)
    assert r["max_rel_diff"] < 1e-4
    assert sum(r["state_bytes"]) == r["ref_state_bytes"]
    assert max(r["state_bytes"]) <= r["ref_state_bytes"] / world + _one_channel_per_param_bytes(r)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_repointed_fsdp2_matches_oracle(tmp_path, world, preset):
    """accelerate's FSDP2 flow: APOLLO built on the unsharded model, state_dict()/load_state_dict() before
    the first step, then fully_shard and each group's params re-pointed to the DTensors: the oracle."""
    out = tmp_path / "r.json"
    torchrun(WORKER, world, "--layout", "repointed", "--preset", preset, "--out", str(out))
    r = report(out)
    assert r["max_rel_diff"] < 1e-4
    assert sum(r["state_bytes"]) == r["ref_state_bytes"]
    assert max(r["state_bytes"]) <= r["ref_state_bytes"] / world + _one_channel_per_param_bytes(r)


def test_repointed_params_step_the_new_tensors_and_free_the_old():
    """One process: the groups re-pointed to copies (same shapes) before the first step: the copies
    train like the oracle; from the first step on the optimizer keeps nothing of the originals."""
    import gc
    import weakref

    ref = oracle.train(oracle.oracle_class(), "apollo", steps=12)
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    opt.load_state_dict(opt.state_dict())
    copy = oracle.make_model(0)
    originals = [weakref.ref(p) for p in model.parameters()]
    by_id = {id(p): q for p, q in zip(model.parameters(), copy.parameters())}
    for g in opt.param_groups:
        g["params"] = [by_id[id(p)] for p in g["params"]]
    del model, by_id
    for t in range(12):
        x, y = oracle.batch(t)
        oracle.loss_fn(copy, x, y).backward()
        opt.step()
        opt.zero_grad()
        if t == 0:  # the first step re-binds: nothing of the old binding keeps the originals alive
            gc.collect()
            assert all(r() is None for r in originals)
    assert oracle.max_rel_diff(copy, ref) < 1e-5


def test_repointing_after_training_started_is_an_error():
    model, other = oracle.make_model(0), oracle.make_model(1)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    oracle.loss_fn(model, *oracle.batch(0)).backward()
    opt.step()
    by_id = {id(p): q for p, q in zip(model.parameters(), other.parameters())}
    for g in opt.param_groups:
        g["params"] = [by_id[id(p)] for p in g["params"]]
    oracle.loss_fn(other, *oracle.batch(1)).backward()
    with pytest.raises(ValueError, match="re-pointed them after the first step"):
        opt.step()


def test_groups_holding_tensors_of_other_shapes_are_an_error():
    """A group whose params were replaced by flattened copies (what an unknown engine might do) is
    refused, naming the group and both shapes; so is a group that lost params."""
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    opt.param_groups[1]["params"] = [
        p.detach().reshape(-1).clone().requires_grad_() for p in opt.param_groups[1]["params"]
    ]
    with pytest.raises(ValueError, match=r"param group 1, param 0: holds a tensor of shape \(121,\)"):
        opt.step()
    opt.param_groups[1]["params"] = opt.param_groups[1]["params"][:2]
    with pytest.raises(ValueError, match="param group 1 holds 2 tensors, APOLLO was built with 8"):
        opt.step()
    with pytest.raises(NotImplementedError, match="add_param_group after construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def test_collectives_per_step_do_not_grow_with_params(tmp_path):
    """Same number of collectives per step for a 2-block and a 5-block model (no per-param collectives)."""
    counts = []
    for layers in (2, 5):
        out = tmp_path / f"c{layers}.json"
        torchrun(WORKER, 2, "--layout", "fsdp2", "--steps", "4", "--layers", str(layers), "--out", str(out))
        counts.append(report(out)["collectives_per_step"][1:])  # step 0 also binds the layout
    # reduce-scatter, all-reduce of norms, all-gather of factors, all-reduce of the non-finite flag
    assert counts[0] == counts[1] and max(counts[0]) <= 4


def _tiny_groups(**low):
    model = oracle.make_model()
    groups = param_groups(model, preset="apollo", rank=5)
    groups[1].update(low)
    return groups


@pytest.mark.parametrize(
    "low, message",
    [
        ({"rank": 0}, "rank=0"),
        ({"scale_type": "row"}, "scale_type='row'"),
        ({"proj_type": "diagonal"}, "proj_type='diagonal'"),
        ({"update_proj_gap": 0}, "update_proj_gap=0"),
    ],
)
def test_invalid_group_keys_name_group_and_value(low, message):
    with pytest.raises(ValueError, match="param group 1") as e:
        APOLLO(_tiny_groups(**low))
    assert message in str(e.value)


def test_invalid_hyperparameters():
    model = oracle.make_model()
    with pytest.raises(ValueError, match="lr=-1"):
        APOLLO(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        APOLLO(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"param group 0.*shape \(11,\)"):
        APOLLO([{"params": [model.blocks[0].norm.weight], "rank": 2}])
    with pytest.raises(ValueError, match="match no 2-D weight"):
        param_groups(model, target_modules=("nothing",))


def test_state_dict_round_trip_continues_exactly():
    """Save after 10 steps, load into a fresh optimizer, continue: same as never stopping."""

    def run(split: bool):
        model = oracle.make_model()
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        for t in range(20):
            if split and t == 10:
                sd = {k: v for k, v in opt.state_dict().items()}
                sd = torch.load(_save(sd), weights_only=False)
                opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
                opt.load_state_dict(sd)
            x, y = oracle.batch(t)
            oracle.loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        return model

    assert oracle.max_rel_diff(run(True), run(False)) == 0.0


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "mode, layout", [("skip", "fsdp2"), ("raise", "fsdp2"), ("skip-on-device", "fsdp2"), ("skip-on-device", "flat")]
)
def test_nonfinite_gradient_on_one_rank_same_decision_everywhere(tmp_path, mode, layout):
    """A NaN in one rank's gradient shard at step 5: every rank skips that step (and the result equals
    the oracle that never took it) or every rank raises; no rank hangs in a collective. "skip-on-device":
    the fused kernels (Triton's interpreter on CPU) skip it from the all-reduced device flag, no host sync; with
    ZeRO-style flat pieces cut mid-row some writes are eager on some ranks: the same collectives run everywhere.
    On the device, every rank's non-finite check and plain Adam ran in their kernels at all 12 steps (counted)."""
    out, counts = tmp_path / "r.json", tmp_path / "launches"
    on_device = mode == "skip-on-device"
    env = {"TRITON_INTERPRET": "1"} if on_device else {}
    mode = mode.split("-")[0]
    counts.mkdir()
    torchrun(
        *(("tests/workers/launch_counted.py", 3, str(counts), WORKER) if on_device else (WORKER, 3)),
        "--layout",
        layout,
        "--steps",
        "12",
        "--nan-step",
        "5",
        "--nan-rank",
        "1",
        "--nonfinite",
        mode,
        "--out",
        str(out),
        **env,
    )
    r = report(out)
    if mode == "skip":
        assert r["skipped_per_rank"] == [1, 1, 1] and r["raised_per_rank"] == [0, 0, 0]
    else:
        assert r["raised_per_rank"] == [1, 1, 1] and r["skipped_per_rank"] == [0, 0, 0]
    assert r["max_rel_diff"] < 1e-4
    if on_device:
        for rank in range(3):
            launched = report(counts / f"rank{rank}.json")
            assert launched["_multi_sum_sq_kernel"] == launched["_multi_adam_kernel"] == 12, (rank, launched)


def test_repeated_skips_warn():
    """Three non-finite steps in a row warn (then 10, 100, ...), naming the count; a taken step resets it."""
    import warnings

    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    seen, warned = [], []
    for t in range(5):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        if t < 4:
            model.head.weight.grad.view(-1)[0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
            seen.append(opt.skipped_steps)  # reading it settles the step's device decision
        warned += [(t, str(w.message)) for w in caught if w.category is RuntimeWarning]
        opt.zero_grad()
    assert seen == [1, 2, 3, 4, 4] and opt.steps_taken == 1
    assert len(warned) == 1 and warned[0][0] == 2 and "the last 3 steps were skipped" in warned[0][1], warned


def test_nonfinite_single_process_leaves_everything_untouched():
    model = oracle.make_model()
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    for t in range(3):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    oracle.loss_fn(model, *oracle.batch(3)).backward()
    model.embed.weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v))
    strict = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        strict.step()


def test_segment_sums_over_chunks_and_empty_segments():
    """Per-param sums of channel values: segments longer than a chunk, empty ones, none at all."""
    from apollo_dist.core import segment_index, segment_sums

    lengths = [0, 5, 3000, 1, 1024, 2048, 0]
    x = torch.randn(3, sum(lengths), dtype=torch.float64)
    expect = torch.stack([s.sum(dim=1) for s in torch.split(x, lengths, dim=1)], dim=1)
    torch.testing.assert_close(segment_sums(x, segment_index(lengths, torch.device("cpu"), chunk=1024)), expect)
    assert segment_sums(torch.zeros(3, 0), segment_index([], torch.device("cpu"))).shape == (3, 0)
    assert segment_sums(torch.zeros(3, 0), segment_index([0, 0], torch.device("cpu"))).eq(0).all()


def test_dcp_state_init_does_not_step_a_fresh_optimizer():
    """DCP's state-dict helpers run a zero-gradient step on an optimizer whose state is empty: APOLLO's
    state holds the seeds from construction, so nothing moves (no step counted, no weight decay)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = oracle.make_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    _init_optim_state(opt)
    assert opt.steps_taken == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_param_without_gradient_is_skipped_like_the_oracle(preset):
    """A tall and a wide target weight and a bias left out of the graph every third step (grad None): the
    reference skips them (no moment update, no decay, their own step count and projection epoch); so do we.
    Before per-param step counts the missing gradient counted as zero: 0.21 relative difference."""
    ref = oracle.train_idle(oracle.oracle_class(), preset)
    ours = oracle.train_idle(APOLLO, preset)
    assert oracle.max_rel_diff(ours, ref) < 1e-5
    zeros = oracle.train_idle(oracle.oracle_class(), preset, zeros=True)
    assert oracle.max_rel_diff(ours, zeros) > 1e-3  # the test can tell skipping from a zero gradient


def test_param_without_gradient_keeps_its_own_step_count():
    """The idle params' ``step`` counts only the steps that updated them; the others count every step."""
    model, opt = _trained(6, idle=True)
    idle = {id(p) for p in oracle.idle_params(model)}
    steps = {id(p): int(opt.state[p]["step"]) for p in model.parameters()}
    assert {steps[i] for i in idle} == {4} and {s for i, s in steps.items() if i not in idle} == {6}
    assert opt.steps_taken == 6
    sd = opt.state_dict()  # per-param counts survive a save and load
    fresh = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    fresh.load_state_dict(sd)
    assert {int(fresh.state[p]["step"]) for p in oracle.idle_params(model)} == {4}


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_fsdp2_param_without_gradient_matches_oracle(tmp_path, preset):
    """FSDP2 W=3 (FSDP2 leaves an unused param's sharded grad None on every rank; ranks holding none of a
    param's rows learn from the step's one all-reduce that nobody has it): the oracle, which skips it."""
    out = tmp_path / "r.json"
    torchrun(WORKER, 3, "--layout", "fsdp2", "--preset", preset, "--idle", "--steps", "12", "--out", str(out))
    r = report(out)
    assert r["max_rel_diff"] < 1e-4


def _trained(steps: int = 3, idle: bool = False, **kw) -> tuple[torch.nn.Module, APOLLO]:
    """The oracle model after ``steps`` APOLLO steps (``idle``: the last block's MLP sits out every third)."""
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS, **kw)
    for t in range(steps):
        oracle.set_idle(model, t, oracle.IDLE_EVERY if idle else 0)
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_load_with_other_run_settings_warns_what_changed():
    """A state saved on CUDA (other projections from the same seeds) or with another scale_front /
    disable_nl: loading it warns, naming each setting and both values; a fresh state (no step, no
    projection drawn: accelerate's CPU -> GPU move) does not."""
    import warnings

    _, opt = _trained()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["generator_device"], g["scale_front"] = "cuda", True
    _, other = _trained(0)
    with pytest.warns(UserWarning, match=r"generator_device='cuda' -> 'cpu', scale_front=True -> False.*P changes"):
        other.load_state_dict(sd)
    fresh = APOLLO(oracle.groups(oracle.make_model(0), "apollo"), **oracle.HPARAMS)
    sd0 = fresh.state_dict()
    for g in sd0["param_groups"]:
        g["generator_device"] = "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(sd0)


def test_canonical_load_with_other_run_settings_warns(tmp_path):
    from apollo_dist.checkpoint import LiveSource, load_canonical, save_canonical

    model, opt = _trained(disable_nl=True)
    save_canonical(LiveSource(opt, model), tmp_path / "c")
    fresh_model, fresh = _trained(0)
    with pytest.warns(UserWarning, match=r"disable_nl=True -> False"):
        load_canonical(tmp_path / "c", fresh, fresh_model)


def test_load_of_a_state_with_another_shape_is_refused_and_loads_nothing():
    """A moment with the right number of elements but another shape (here transposed) is an error naming the
    param, the key and both shapes, and nothing is loaded (no moment, no hyperparameter)."""
    _, opt = _trained()
    sd = opt.state_dict()
    pid = next(k for k, st in sd["state"].items() if "limiter_norm" in st and st["exp_avg"].shape[0] != 5)
    sd["state"][pid]["exp_avg"] = sd["state"][pid]["exp_avg"].t().contiguous()
    for g in sd["param_groups"]:
        g["lr"] = 123.0
    _, other = _trained(1)
    before = {k: v.clone() for k, v in other.state_dict()["state"][0].items() if torch.is_tensor(v)}
    with pytest.raises(
        ValueError, match=rf"param {pid}: saved state 'exp_avg' has shape \(5, \d+\), this optimizer's is"
    ):
        other.load_state_dict(sd)
    after = other.state_dict()
    assert all(torch.equal(after["state"][0][k], v) for k, v in before.items())
    assert all(g["lr"] != 123.0 for g in other.param_groups)


def test_canonical_checkpoint_keeps_per_param_steps(tmp_path):
    """Idle params' own step counts go through a canonical checkpoint and come back."""
    from apollo_dist.checkpoint import LiveSource, load_canonical, save_canonical

    model, opt = _trained(6, idle=True)
    save_canonical(LiveSource(opt, model), tmp_path / "c")
    fresh_model = oracle.make_model(0)
    fresh = APOLLO(oracle.groups(fresh_model, "apollo"), **oracle.HPARAMS)
    load_canonical(tmp_path / "c", fresh, fresh_model)
    got = {n: int(fresh.state[p]["step"]) for n, p in fresh_model.named_parameters()}
    want = {n: int(opt.state[p]["step"]) for n, p in model.named_parameters()}
    assert got == want and sorted(set(got.values())) == [4, 6]


def test_apollo_of_finds_it_inside_the_wrappers_users_hold():
    """accelerate's AcceleratedOptimizer (what the HF Trainer holds) and a chain of them lead to the APOLLO;
    anything else is a TypeError naming the chain."""
    from accelerate import Accelerator

    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    _, wrapped = Accelerator(cpu=True).prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    assert APOLLO.of(opt) is opt and APOLLO.of(wrapped) is opt
    with pytest.raises(TypeError, match=r"no APOLLO inside AdamW"):
        APOLLO.of(torch.optim.AdamW(model.parameters()))
