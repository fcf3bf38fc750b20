"""proj="svd" (the reference's) and proj="dct" (SVD-free, arXiv 2505.17967): one process against the oracle
and a direct computation of the selection rule; sharded engines against one process; state in checkpoints."""

from __future__ import annotations

import importlib.util
import sys
import types

import oracle
import pytest
import torch
from dct_cases import mirror_misses
from spawn import deepspeed_workers

from apollo_dist import APOLLO
from apollo_dist.projection import DCTProjector, dct_basis, dct_pick, dct_rows, dct_scores


def proj_groups(model, preset: str, proj: str, gap: int = 7) -> list[dict]:
    """`oracle.groups` with ``proj`` in the low-rank group."""
    gs = oracle.groups(model, preset, gap=gap)
    for g in gs:
        if "rank" in g:
            g["proj"] = proj
    return gs


def train(opt_cls, preset: str, proj: str, steps: int = 30, gap: int = 7, hook=None, **kw):
    """`oracle.train` with ``proj``; ``hook(t, model, opt)`` runs after each backward, before the step."""
    model = oracle.make_model(0)
    opt = opt_cls(proj_groups(model, preset, proj, gap), **oracle.HPARAMS, **kw)
    for t in range(steps):
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        if hook is not None:
            hook(t, model, opt)
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_svd_single_process_matches_oracle(preset):
    """30 steps, gap 7 (refreshes at steps 0, 7, 14, 21, 28): max relative difference < 1e-4."""
    ref, _ = train(oracle.oracle_class(), preset, "svd")
    ours, opt = train(APOLLO, preset, "svd")
    assert oracle.max_rel_diff(ours, ref) < 1e-4
    # and not the random projection's result
    rand, _ = train(APOLLO, preset, "random")
    assert oracle.max_rel_diff(rand, ref) > 1e-2


def test_svd_rank_above_the_smaller_dimension_matches_oracle():
    """r = 16 > 11: the reference keeps min(m, n)-wide moments; the zero rows of our r-row P change nothing."""

    def run(opt_cls):
        model = oracle.make_model(0)
        gs = oracle.groups(model, "apollo", rank=16, gap=7)
        for g in gs:
            if "rank" in g:
                g["proj"] = "svd"
        opt = opt_cls(gs, **oracle.HPARAMS)
        for t in range(9):
            oracle.loss_fn(model, *oracle.batch(t)).backward()
            opt.step()
            opt.zero_grad()
        return model

    with pytest.warns(UserWarning, match="exceeds the smaller dimension"):
        ours = run(APOLLO)
    assert oracle.max_rel_diff(ours, run(oracle.oracle_class())) < 1e-4


def test_svd_state_is_the_reference_projector_matrix():
    """The saved P is the reference's ortho_matrix (same orientation and signs) after the last refresh."""
    _, ref = train(oracle.oracle_class(), "apollo", "svd", steps=9)
    _, ours = train(APOLLO, "apollo", "svd", steps=9)
    low = [g for g in ours.param_groups if "rank" in g][0]["params"]
    ref_low = [g for g in ref.param_groups if "rank" in g][0]["params"]
    for p, q in zip(low, ref_low):
        P = ours.state[p]["projection"]
        assert P.shape == ref.state[q]["projector"].ortho_matrix.shape
        torch.testing.assert_close(P, ref.state[q]["projector"].ortho_matrix, rtol=1e-4, atol=1e-5)


def test_svd_layerwise_matches_oracle():
    """Layer-wise updates (one process): each weight's SVD refresh inside its own hook."""
    ref, _ = train(oracle.oracle_class(), "apollo", "svd", steps=16)
    ours, _ = train(APOLLO, "apollo", "svd", steps=16, layerwise=True)
    assert oracle.max_rel_diff(ours, ref) < 1e-4


@pytest.mark.parametrize("proj", ["svd", "dct"])
def test_nonfinite_refresh_step_is_skipped_and_refreshes_again(proj):
    """A NaN gradient at a refresh step (7): the step is skipped and the next step refreshes from its own
    gradient, so the run equals one that never saw step 7's batch (bit for bit)."""

    def nan_at_7(t, model, opt):
        if t == 7:
            model.blocks[0].mlp["up"].weight.grad.view(-1)[0] = float("nan")

    got, opt = train(APOLLO, "apollo", proj, steps=12, hook=nan_at_7)
    assert opt.skipped_steps == 1
    model = oracle.make_model(0)
    ref = APOLLO(proj_groups(model, "apollo", proj), **oracle.HPARAMS)
    for t in [t for t in range(12) if t != 7]:
        oracle.loss_fn(model, *oracle.batch(t)).backward()
        ref.step()
        ref.zero_grad()
    assert oracle.max_rel_diff(got, model) == 0.0


@pytest.mark.parametrize("proj", ["svd", "dct"])
def test_skipped_refresh_leaves_the_saved_projection_as_it_was(proj):
    """The state a checkpoint saves after a skipped refresh step (NaN at step 7) is the last taken step's
    projection, not one decided from the NaN gradient."""
    before = {}

    def nan_at_7(t, model, opt):
        if t == 7:
            before.update({id(p): st["projection"].clone() for p, st in opt.state.items() if "projection" in st})
            model.blocks[0].mlp["up"].weight.grad.view(-1)[0] = float("nan")

    _, opt = train(APOLLO, "apollo", proj, steps=8, hook=nan_at_7)
    assert opt.skipped_steps == 1 and before
    for p, st in opt.state.items():
        if id(p) in before:
            assert torch.equal(st["projection"], before[id(p)])


def _paper_rule(G: torch.Tensor, r: int) -> list[int]:
    """The DCT selection written out on one matrix: the orthonormal DCT-II basis from its definition, the
    gradient's rows (tall) or columns (wide) projected on every basis vector, the r largest L2 norms."""
    m, n = G.shape
    size = n if m >= n else m
    C = torch.tensor(
        [
            [
                (1 / size if k == 0 else 2 / size) ** 0.5
                * torch.cos(torch.tensor(torch.pi * k * (2 * i + 1) / (2 * size), dtype=torch.float64)).item()
                for i in range(size)
            ]
            for k in range(size)
        ],
        dtype=torch.float64,
    )
    G = G.double()
    norms = (G @ C.T).norm(dim=0) if m >= n else (C @ G).norm(dim=1)
    return sorted(range(size), key=lambda k: (-norms[k].item(), k))[:r]


@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_dct_indices_follow_the_rule_at_each_refresh(preset):
    """After every refresh (steps 0, 7, 14) each weight's stored indices are the paper's rule on that step's gradient."""
    seen, checked = {}, []

    def hook(t, model, opt):
        low = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
        if t - 1 in seen:  # the state the refresh at t - 1 left
            r = [g for g in opt.param_groups if "rank" in g][0]["rank"]
            for p, G in zip(low, seen[t - 1]):
                assert opt.state[p]["projection"].tolist() == _paper_rule(G, r), (t - 1, tuple(G.shape))
                checked.append(p)
        if t % 7 == 0:
            seen[t] = [p.grad.clone() for p in low]

    _, opt = train(APOLLO, preset, "dct", steps=16, hook=hook)
    assert len(checked) == 3 * 8


def test_dct_basis_and_pick():
    """The basis is orthonormal; ties go to the lower index; r above the basis size pads with -1."""
    for size in (1, 7, 11, 64):
        C = dct_basis(size, torch.device("cpu"))
        torch.testing.assert_close(C @ C.T, torch.eye(size), atol=1e-5, rtol=0)
    assert dct_pick(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2).tolist() == [1, 2]
    assert dct_pick(torch.tensor([2.0, 1.0]), 3).tolist() == [0, 1, -1]


def _ista_projector():
    """ista-daslab-optimizers' FFT/DCT low-rank projector (its package __init__ imports wandb: bypassed)."""
    if "ista_daslab_optimizers" not in sys.modules:
        spec = importlib.util.find_spec("ista_daslab_optimizers")
        if spec is None:
            pytest.skip("ista-daslab-optimizers not installed (pip install --no-deps ista-daslab-optimizers)")
        pkg = types.ModuleType("ista_daslab_optimizers")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["ista_daslab_optimizers"] = pkg
    from ista_daslab_optimizers.fft_low_rank.fft_projector import FFTLowRankProjector
    from ista_daslab_optimizers.utils.dct import dct3_matrix

    return FFTLowRankProjector, dct3_matrix


def test_dct_scores_are_the_basis_products_and_matrix_pads_with_zero_rows():
    """The FFT route (`dct_rows`' two halves, odd, even and tiny lengths) is the product with the basis to fp32
    rounding; `DCTProjector.matrix` gives the basis rows of the indices and zero rows for -1, either side."""
    for rows, n in ((5, 1), (9, 2), (13, 7), (6, 16), (3, 201)):
        G = torch.randn(rows, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        exact = G @ dct_basis(n, torch.device("cpu")).double().T
        torch.testing.assert_close(torch.cat(dct_rows(G.float()), -1).double(), exact, atol=2e-6, rtol=0)
        torch.testing.assert_close(dct_scores(G.float(), True).double(), exact.square().sum(0), atol=0, rtol=1e-5)
        torch.testing.assert_close(dct_scores(G.T.float(), False).double(), exact.square().sum(0), atol=0, rtol=1e-5)
    proj, C = DCTProjector(), dct_basis(4, torch.device("cpu"))
    idx = torch.tensor([3, 0, -1])
    tall = proj.matrix(9, 4, 3, torch.device("cpu"), 0, idx)
    assert torch.equal(tall, torch.stack([C[3], C[0], torch.zeros(4)]))
    assert torch.equal(proj.matrix(4, 9, 3, torch.device("cpu"), 0, idx), tall.T)
    zero = torch.zeros(4)  # any negative index is a zero row (a hand-made state's -2 is not the basis's row 2)
    assert torch.equal(
        proj.matrix(9, 4, 3, torch.device("cpu"), 0, torch.tensor([3, -2, -5])), torch.stack([C[3], zero, zero])
    )
    # ZeRO-Offload keeps the indices on the CPU and draws P on the GPU: the state follows the basis's device
    # (the meta device stands in for the GPU here; without the move this raised)
    assert proj.matrix(9, 4, 3, torch.device("meta"), 0, idx).device.type == "meta"


@pytest.mark.parametrize("shape", [(23, 11), (11, 23), (16, 16)])
def test_dct_selection_matches_the_public_implementation(shape):
    """ista-daslab-optimizers' similarity (matmul, L2 norm) on the DCT-II basis vectors selects the same set."""
    Projector, dct3_matrix = _ista_projector()
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    r = 4
    theirs = Projector(torch.zeros(shape), rank=r, proj=None, rotate_subspace=False, ell_norm=2)
    Q = dct3_matrix(min(shape), torch.float32, "cpu")  # rows: the DCT-II basis vectors
    _, norms = theirs.compute_similarity_matmul(Q.T, G)  # tall: scores G @ Q^T's columns, wide: Q @ G's rows
    assert sorted(torch.topk(norms, r).indices.tolist()) == sorted(
        dct_pick(dct_scores(G, shape[0] >= shape[1]), r).tolist()
    )


# -- sharded engines (one launch per preset: deepspeed --num_gpus 3, gloo) -------------------------
_RUNS: dict[str, dict] = {}


def _sharded(preset: str, tmp_path_factory) -> dict:
    """The projections worker at W = 3 for ``preset``: FSDP2 and ZeRO-3 svd vs the oracle, FSDP2 and ZeRO-2 dct
    vs one process, resumes at another W (run once per preset, shared by the tests below)."""
    if preset not in _RUNS:
        tmp = tmp_path_factory.mktemp(f"proj_{preset}")
        _RUNS[preset] = deepspeed_workers(
            "tests/workers/projections.py",
            3,
            tmp / "r.json",
            "--parts",
            "fsdp2_svd,zero3_svd,fsdp2_layerwise_svd,fsdp2_dct,zero2_dct,resume",
            "--presets",
            preset,
            "--ckpt-dir",
            str(tmp),
        )
    return _RUNS[preset]


SHARDED_PRESETS = ["apollo", pytest.param("apollo-mini", marks=pytest.mark.slow)]


@pytest.mark.parametrize("preset", SHARDED_PRESETS)
def test_svd_fsdp2_and_zero3_match_oracle(preset, tmp_path_factory):
    """W = 3, 30 steps, 5 refreshes (each weight's SVD on one rank, broadcast): within 1e-4 of apollo-torch;
    also FSDP2 with layer-wise updates (each weight's refresh inside its own hook)."""
    r = _sharded(preset, tmp_path_factory)
    assert r[f"fsdp2_svd/{preset}"] < 1e-4
    assert r[f"zero3_svd/{preset}"] < 1e-4
    assert r[f"fsdp2_layerwise_svd/{preset}"] < 1e-4


@pytest.mark.parametrize("preset", SHARDED_PRESETS)
def test_dct_fsdp2_and_zero2_equal_one_process(preset, tmp_path_factory):
    """W = 3: the same indices as one process at every weight; parameters within 1e-5 (APOLLO). APOLLO-Mini
    within 1e-4: its run amplifies rounding (one process, the loss scaled by 1 + 1e-7: 4e-5 after 30 steps)."""
    r = _sharded(preset, tmp_path_factory)
    bound = 1e-5 if preset == "apollo" else 1e-4
    for engine in ("fsdp2", "zero2"):
        assert r[f"{engine}_dct/{preset}/same_indices"]
        assert r[f"{engine}_dct/{preset}"] < bound


@pytest.mark.parametrize("preset", SHARDED_PRESETS)
def test_resume_at_another_world_size_continues(preset, tmp_path_factory):
    """dct: one process -> canonical -> FSDP2 W = 3; svd: ZeRO-3 W = 3 -> native checkpoint -> one process;
    resumed at step 10, refreshes at 14, 21, 28: the uninterrupted run's result."""
    r = _sharded(preset, tmp_path_factory)
    assert r[f"resume/dct/one->fsdp2/{preset}"] < (1e-5 if preset == "apollo" else 1e-4)
    assert r[f"resume/svd/zero3->one/{preset}"] < 1e-4


# -- entry points -------------------------------------------------------------------------------
def _low(opt) -> dict:
    return next(g for g in opt.param_groups if "rank" in g)


def test_proj_reaches_the_optimizer_from_every_entry_point(tmp_path):
    """param_groups(proj=...), the DeepSpeed JSON's optimizer block, train.py --proj (and the JSON it reads),
    APOLLOTrainer's optim_args."""
    import dataclasses
    import json

    from apollo_dist import param_groups
    from apollo_dist.deepspeed import _optimizer_from_config
    from apollo_dist.hf import build_optimizer
    from launch import engines, train

    model = oracle.make_model(0)
    assert _low(APOLLO(param_groups(model, rank=3, proj="dct")))["proj"] == "dct"
    block = {"type": "APOLLO-Mini", "params": {"lr": 1e-3, "proj": "svd"}}
    assert _low(_optimizer_from_config(block, model, None))["proj"] == "svd"

    args = train.parse_args(["--proj", "svd", "--rank", "3"])
    hp = train.resolve_hparams(args, train.defaults_config(args, None))
    assert hp.proj == "svd"
    opt = engines.build_optimizer(model, dataclasses.replace(hp, target_modules=["attn", "mlp"]))
    assert _low(opt)["proj"] == "svd"
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "APOLLO", "params": {"rank": 3, "proj": "dct"}}}))
    args = train.parse_args(["--deepspeed", str(cfg)])
    assert (
        train.resolve_hparams(args, train.defaults_config(args, train.load_json(str(cfg), "--deepspeed"))).proj == "dct"
    )

    from transformers import TrainingArguments
    from workers.hf_trainer import make_model

    hf_args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        optim_target_modules=["attn", "mlp"],
        optim_args="proj=dct",
    )
    assert _low(build_optimizer(hf_args, make_model()))["proj"] == "dct"


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"proj": "qr"}, r"param group 1: unsupported proj='qr': expected one of \('random', 'svd', 'dct'\)"),
        ({"proj": "svd", "proj_type": "left"}, r"unsupported proj_type='left': only 'std' is supported"),
        ({"proj": "dct", "proj_type": "reverse_std"}, r"unsupported proj_type='reverse_std'"),
    ],
)
def test_unsupported_projections_are_refused(keys, message):
    from apollo_dist import param_groups

    with pytest.raises(ValueError, match=message):
        APOLLO(param_groups(oracle.make_model(0), rank=3, **keys))


def test_loading_a_state_of_another_projection_is_refused():
    """A random-projection state into an svd optimizer (no P to continue with): an error naming proj."""
    _, opt = train(APOLLO, "apollo", "random", steps=2)
    model = oracle.make_model(0)
    other = APOLLO(proj_groups(model, "apollo", "svd"), **oracle.HPARAMS)
    with pytest.raises(ValueError, match="saved proj='random' differs from this optimizer's 'svd'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.slow
def test_native_checkpoints_carry_the_projection(tmp_path):
    """FSDP2 W = 3 -> DCP (the projection a plain tensor, the same on every rank): svd resumed by FSDP2 at W = 3
    through torch's set_state_dict (vs the oracle), dct by one process through load_checkpoint (vs one process);
    DeepSpeed's own save / load at W = 3: ZeRO-3 svd, ZeRO-2 dct. Each resumed at step 10, refreshes after."""
    r = deepspeed_workers(
        "tests/workers/projections.py",
        3,
        tmp_path / "r.json",
        "--parts",
        "dcp,ds_native,zero1_svd",
        "--ckpt-dir",
        str(tmp_path),
    )
    for preset in ("apollo", "apollo-mini"):
        dct_bound = 1e-5 if preset == "apollo" else 1e-4
        assert r[f"dcp/svd/fsdp2->fsdp2/{preset}"] < 1e-4
        assert r[f"dcp/dct/fsdp2->one/{preset}"] < dct_bound
        assert r[f"ds_native/zero3_svd/{preset}"] < 1e-4
        assert r[f"ds_native/zero2_dct/{preset}"] < dct_bound
        assert r[f"ds_native/zero2_dct/{preset}/same_indices"]
        assert r[f"zero1_svd/{preset}"] < 1e-4  # and ZeRO-1 (plain deepspeed.initialize) vs the oracle


@pytest.mark.slow
def test_svd_hsdp_and_tp_match_oracle(tmp_path):
    """svd on 2-D meshes, W = 4 (tests/workers/hsdp.py --proj svd): HSDP 2x2 and FSDP2 x TP 2x2 (tall weights
    split by columns and wide ones by rows: whole gradients assembled by reduce-scatter), DCP resharded to
    1x4 and canonical checkpoints midway: within 1e-4 of apollo-torch's svd."""
    from spawn import report, torchrun

    out = tmp_path / "r.json"
    torchrun(
        "tests/workers/hsdp.py", 4, "--proj", "svd", "--meshes", "2x2", "--presets", "apollo", "--count-layers", "0",
        "--tp-meshes", "2x2", "--tp-resume", "2x2:1x4", "--out", str(out),
    )  # fmt: skip
    r = report(out)
    keys = ["2x2/apollo", "tp2x2/apollo", "2x2:1x4/apollo", "tp2x2:1x4/apollo", "2x2:canonical:2x2/apollo"]
    keys.append("tp2x2:canonical:tp2x2/apollo")
    for key in keys:
        assert r[key]["max_rel_diff"] < 1e-4, key


def test_dct_batched_decisions_are_the_single_ones(monkeypatch):
    """`DCTProjector.decide_all` (a refresh at W = 1) scores same-shape gradients in batches on a GPU (tall and wide
    ones of one size together, split where a batch would pass its element budget): the same picks as one
    `decide` each (the batched path forced on the CPU, with a budget of about two gradients)."""
    from apollo_dist import projection

    monkeypatch.setattr(projection, "_DCT_BATCH_ON_CPU", True)
    monkeypatch.setattr(projection, "_DCT_BATCH_ELEMENTS", 2 * 37 * 11)
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 11), (11, 37), (37, 11), (16, 16), (37, 11), (5, 9), (16, 16)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    proj = DCTProjector()
    for r in (1, 4, 12):
        got = proj.decide_all([lambda G=G: G for G in grads], shapes, r)
        for G, g in zip(grads, got):
            assert torch.equal(g, proj.decide(G, r)), (tuple(G.shape), r)


def test_dct_scores_keep_a_small_mirror_score_exact():
    """A score is a sum of three column sums of the FFT's half spectrum, shared with its mirror frequency N - k: a
    gradient along c_j with a tiny component along c_(N-j) must still pick c_(N-j) second, as the float64 rule does
    (with fp32 sums that absolute error, ~1e-7 of the largest score, swapped such picks in a third of the cases)."""
    assert mirror_misses() == 0
