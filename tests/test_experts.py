"""Fused mixture-of-experts weights (apollo_dist.experts, DESIGN.md §2.9): each expert slice of a 3-D
[E, out, in] weight is an APOLLO weight of its own, equal to apollo-torch on the same model with one
nn.Linear per expert (tests/moe.py: fixed routing, an expert that never gets a token, one that sits out
every third step)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import moe
import oracle
import pytest
import torch
from spawn import deepspeed_workers, run_checked

from apollo_dist import APOLLO, param_groups


@pytest.mark.parametrize("preset", ["apollo-mini", pytest.param("apollo", marks=pytest.mark.slow)])
def test_fused_experts_match_oracle_on_unfused_model(preset):
    """30 steps, gap 7 (refreshes), decay on: fused model under APOLLO = apollo-torch on per-expert Linears."""
    ref = moe.train(moe.make_model(fused=False), oracle.oracle_class(), preset)
    ours = moe.train(moe.make_model(), APOLLO, preset)
    assert moe.max_rel_diff(ours, ref) < 1e-4


def test_expert_seeds_and_steps_follow_the_unfused_positions():
    """Expert e of a fused weight at seed position k has seed k + 1 + e; later params shift by E - 1 per fused
    weight. The expert no token reached is skipped (step 0, untouched, no decay); the quiet one missed steps."""
    steps = 6
    fused, unfused = moe.make_model(), moe.make_model(fused=False)
    init = moe.fused_state(fused)
    opts = []
    for model in (fused, unfused):
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        for t in range(steps):
            oracle.loss_fn(model, *moe.batch(t)).backward()
            opt.step()
            opt.zero_grad()
        opt.ensure_bound()  # reads the last step's device decisions (which params were live)
        opts.append(opt)
    fo, uo = opts
    up = {id(p): st for p, st in uo.state.items()}
    names_u = dict(unfused.named_parameters())
    for name, p in fused.named_parameters():
        st = fo.state[p]
        if p.dim() == 3:
            for e in range(moe.E):
                ust = up[id(names_u[f"{name}.{e}.weight"])]
                assert st["seed"] + e == ust["seed"]
                assert float(st["step"][e]) == float(ust["step"])
            assert float(st["step"][moe.NEVER]) == 0 and float(st["step"][moe.QUIET]) == steps - steps // 3
            assert torch.equal(p[moe.NEVER], init[name][moe.NEVER])
        elif p in fo.state and "seed" in st:
            assert st["seed"] == up[id(names_u[name])]["seed"]


def test_param_groups_target_fused_experts_by_name():
    model = moe.make_model()
    low = param_groups(model, target_modules=["experts"])[1]
    assert [n.rsplit(".", 1)[1] for n in low["param_names"]] == ["gate_up_proj", "down_proj"] * 2
    assert all(p.dim() == 3 for p in low["params"])


def test_experts_stored_in_out_are_refused():
    model = moe.make_model()
    model.blocks[0].mlp.experts.is_transposed = True  # as transformers marks GPT-OSS / Llama4 experts
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.experts\.gate_up_proj .*\[E, in, out\]"):
        param_groups(model)


def _engines(tmp_path, preset: str) -> dict:
    parts = "fsdp2,zero2,zero3,fsdp2_few" + (",zero1" if preset == "apollo" else "")  # ZeRO-1: ZeRO-2's binding
    return deepspeed_workers(
        "tests/workers/moe_equivalence.py", 3, tmp_path / "r.json", "--parts", parts, "--presets", preset
    )


@pytest.mark.parametrize("preset", ["apollo-mini", pytest.param("apollo", marks=pytest.mark.slow)])
def test_fused_experts_under_fsdp2_zero2_zero3_match_oracle(tmp_path, preset):
    """W = 3, one launch: FSDP2 (Shard(0) over 8 experts: 3, 3, 2 whole experts per rank; and over 2: one rank
    holds none), plain
    deepspeed.initialize ZeRO-2 and ZeRO-3 (flat partitions cut through experts, mid-row), 30 steps with
    refreshes, against apollo-torch on the unfused model: weights and losses within 1e-4."""
    r = _engines(tmp_path, preset)
    for engine in ("fsdp2", "zero2", "zero3") + (("zero1",) if preset == "apollo" else ()):
        got = r[f"{engine}/{preset}"]
        assert got["max_rel_diff"] < 1e-4, (engine, got)
        assert got["loss_rel_diff"] < 1e-5, (engine, got)
        # the reference keeps no state for the expert no token reached (grad None, never stepped); we keep zeros
        assert sum(got["state_bytes"]) >= got["ref_state_bytes"]
    held = r[f"fsdp2/{preset}"]["experts_held"]  # per rank, the experts of the 4 fused weights it holds
    assert [sorted(set(h)) for h in held] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    few = r[f"fsdp2_few/{preset}"]  # E = 2 < W = 3: the last rank holds no expert
    assert few["experts_held"] == [[0, 0], [1, 1], []] and few["max_rel_diff"] < 1e-4, few


@pytest.mark.parametrize("preset", ["apollo-mini", pytest.param("apollo", marks=pytest.mark.slow)])
def test_fused_experts_resume_at_another_world_size(tmp_path, preset):
    """ZeRO-2 at W = 3 (partitions cut through experts), 12 steps, native checkpoint and its canonical form (one
    entry per expert slice, own seed and step); FSDP2 at W = 3, 12 steps, DCP (get_state_dict: moments (E, C, r)
    DTensors). Resumed at W = 3 by DeepSpeed's own load (same W, same stage), and at W = 2 from other initial weights: ZeRO-3 (apollo_dist.deepspeed.load_checkpoint of the
    native one), FSDP2 (the canonical one; the DCP one through DCP's own set_state_dict, and through the loader):
    the remaining 18 steps match apollo-torch's uninterrupted run on the unfused model."""
    ck = tmp_path / "ck"
    args = ("--presets", preset, "--ckpt-dir", str(ck))
    parts = "save,dcp_save,resume_zero2"
    same = deepspeed_workers("tests/workers/moe_equivalence.py", 3, tmp_path / "r3.json", "--parts", parts, *args)
    got = same[f"resume-zero2/{preset}"]  # the same W and stage: DeepSpeed's own load_checkpoint
    assert got["max_rel_diff"] < 1e-4 and got["loss_rel_diff"] < 1e-5, got
    index = json.loads((ck / f"{preset}-canonical" / "index.json").read_text())["params"]
    name = "blocks.0.mlp.experts.gate_up_proj"
    assert name not in index and index[f"{name}.{moe.NEVER}"]["shape"] == [2 * moe.FF, moe.H]
    assert [index[f"{name}.{e}"]["seed"] - index[f"{name}.0"]["seed"] for e in range(moe.E)] == list(range(moe.E))
    assert index[f"{name}.{moe.NEVER}"]["step"] == 0 and index[f"{name}.0"]["step"] == 12
    r = deepspeed_workers(
        "tests/workers/moe_equivalence.py",
        2,
        tmp_path / "r2.json",
        "--parts",
        "resume_zero3,resume_fsdp2,resume_dcp",
        *args,
    )
    for engine in ("zero3", "fsdp2", "dcp", "loader"):
        got = r[f"resume-{engine}/{preset}"]
        assert got["max_rel_diff"] < 1e-4 and got["loss_rel_diff"] < 1e-5, (engine, got)


MIXTRAL = Path(__file__).parent / "tiny_mixtral.json"  # transformers' Mixtral: experts fused [E, out, in]


def _mixtral() -> torch.nn.Module:
    from launch.model import build_model, llama_config

    return build_model(llama_config(str(MIXTRAL), 259, 32), seed=0)


def _fused(opt: APOLLO) -> list[str]:
    return [n for g in opt.param_groups if "rank" in g for n, p in zip(g["param_names"], g["params"]) if p.dim() == 3]


def test_deepspeed_json_and_train_py_target_mixtral_experts():
    """The DeepSpeed JSON's APOLLO block (target_modules) and train.py's optimizer (default targets attn, mlp:
    Mixtral's experts sit under mlp) give the fused experts of transformers' Mixtral the low-rank group."""
    from apollo_dist.deepspeed import _optimizer_from_config
    from launch import engines, train

    model = _mixtral()
    opt = _optimizer_from_config({"type": "APOLLO", "params": {"rank": 4, "target_modules": ["experts"]}}, model, None)
    assert sorted(_fused(opt)) == sorted(n for n, p in model.named_parameters() if p.dim() == 3)
    assert len(_fused(opt)) == 4  # gate_up_proj and down_proj of 2 layers
    hp = train.resolve_hparams(args := train.parse_args(["--model", str(MIXTRAL)]), train.defaults_config(args, {}))
    assert _fused(engines.build_optimizer(model, hp)) == _fused(opt)


def test_apollo_trainer_targets_experts_unless_matching_transformers():
    """APOLLOTrainer's groups from optim_target_modules: fused experts of matched modules are low-rank (each
    expert slice its own seed, after the other params' positions); match_transformers=true keeps transformers'
    apollo_adamw groups (nn.Linear only: the experts stay in the plain group)."""
    from transformers import TrainingArguments

    from apollo_dist.hf import param_groups_from_args

    model = _mixtral()
    args = TrainingArguments(output_dir="/tmp/unused", optim_target_modules=["attn", "mlp"], report_to=[])
    low = param_groups_from_args(args, model)[-1]
    assert sum(p.dim() == 3 for p in low["params"]) == 4 and all(p.dim() in (2, 3) for p in low["params"])
    args.optim_args = "match_transformers=true"
    low = param_groups_from_args(args, model)[-1]
    assert not any(p.dim() == 3 for p in low["params"])


@pytest.mark.slow  # CI: test_deepspeed_json_and_train_py_target_mixtral_experts builds train.py's optimizer on it
def test_train_py_runs_a_tiny_mixtral(tmp_path, corpus):
    """launch/train.py --model <Mixtral config JSON>: 3 steps (refreshes every 2), APOLLO on the experts."""
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "launch/train.py", "--model", str(MIXTRAL), "--steps", "3", "--global-batch-size", "4"]
    cmd += ["--micro-batch-size", "2", "--seq-len", "32", "--rank", "8", "--update-proj-gap", "2", "--eval-every", "0"]
    run_checked([*cmd, "--dtype", "fp32", "--no-progress", "--metrics-file", str(metrics)], timeout=300)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows][-1] == 3 and all(math.isfinite(r["loss"]) for r in rows)


def test_expert_slices_are_projected_in_one_batched_product():
    """The expert slices of each fused weight (same shape, gradients back to back) are one batched product (one
    launch per fused weight on cuBLAS, not E); R and ||G_c||^2 as slot by slot."""
    from apollo_dist.core import LowRankBucket

    model = moe.make_model()
    opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
    oracle.loss_fn(model, *moe.batch(0)).backward()
    opt.step()
    b = next(b for b in opt.buckets if isinstance(b, LowRankBucket))
    b.begin({**opt.param_groups[1], "scale_front": False, "disable_nl": False})
    b.prepare(opt.param_groups[1])
    grads = [b._grads[i] for i in b.active]
    projs = [b.proj[i] for i in b.active]
    products = b.project._batched(grads, projs)
    assert sum(G.dim() == 3 and G.shape[0] == moe.E for _, G, _ in products) == 4  # 2 fused weights x 2 layers
    batched = (b.T_R.clone(), b.T_g.clone())
    b.project.runs = []  # slot by slot
    b.prepare(opt.param_groups[1])
    torch.testing.assert_close(batched, (b.T_R, b.T_g), rtol=1e-6, atol=1e-7)
    b.discard()


def test_canonical_round_trip_and_hf_export_of_fused_experts(tmp_path):
    """One process: the canonical form of a live optimizer (LiveSource) has one entry per expert slice; loaded
    into a fresh optimizer it continues exactly; the Hugging Face export stacks the slices back into the fused
    weight (the model's own name and shape)."""
    from safetensors import safe_open

    from apollo_dist.checkpoint import LiveSource, load_checkpoint, save_canonical
    from apollo_dist.convert import convert

    def run(model, opt, steps):
        for t in steps:
            oracle.loss_fn(model, *moe.batch(t)).backward()
            opt.step()
            opt.zero_grad()

    model = moe.make_model()
    opt = APOLLO(param_groups(model, preset="apollo", rank=3, update_proj_gap=2), **oracle.HPARAMS)
    run(model, opt, range(4))
    save_canonical(LiveSource(opt, model), tmp_path / "c")
    saved = {k: v.clone() for k, v in moe.fused_state(model).items()}
    again = moe.make_model(seed=1)
    opt2 = APOLLO(param_groups(again, preset="apollo", rank=3, update_proj_gap=2), **oracle.HPARAMS)
    load_checkpoint(tmp_path / "c", opt2, again)
    run(model, opt, range(4, 7))
    run(again, opt2, range(4, 7))
    assert moe.max_rel_diff(again, model) == 0.0
    convert(tmp_path / "c", export_hf=tmp_path / "hf", hf_config={"model_type": "test"})
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        name = "blocks.1.mlp.experts.down_proj"
        assert f"{name}.0" not in f.keys()
        assert torch.equal(f.get_tensor(name), saved[name])  # [E, H, I], as the model holds it
    ix = json.loads((tmp_path / "c" / "index.json").read_text())
    assert ix["params"][f"{name}.2"]["expert"] == [name, 2]
    assert ix["format_version"] == 2  # version 2's name rule reads these slices right: older readers still can


def test_hf_export_knows_expert_slices_from_the_index_not_the_name(tmp_path):
    """The index records which entries are expert slices (format 3): low-rank 2-D weights named by number (an
    nn.ParameterList) export as themselves; a format-2 index (slices known by their name then) still stacks."""
    from safetensors import safe_open

    from apollo_dist.checkpoint import LiveSource, save_canonical
    from apollo_dist.convert import convert

    class Numbered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(6, 4)) for _ in range(3)])

    torch.manual_seed(0)
    model = Numbered()
    opt = APOLLO(param_groups(model, preset="apollo", rank=2), **oracle.HPARAMS)
    sum((w**2).sum() for w in model.mlp).backward()
    opt.step()
    save_canonical(LiveSource(opt, model), tmp_path / "c")
    ix = json.loads((tmp_path / "c" / "index.json").read_text())
    assert ix["params"]["mlp.1"]["rank"] == 2 and ix["format_version"] == 3  # low-rank, named like a slice
    convert(tmp_path / "c", export_hf=tmp_path / "hf", hf_config={"model_type": "test"})
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["mlp.0", "mlp.1", "mlp.2"] and f.get_tensor("mlp.1").shape == (6, 4)

    model = moe.make_model()
    opt = APOLLO(param_groups(model, preset="apollo", rank=3), **oracle.HPARAMS)
    oracle.loss_fn(model, *moe.batch(0)).backward()
    opt.step()
    save_canonical(LiveSource(opt, model), tmp_path / "v2")
    path = tmp_path / "v2" / "index.json"  # as apollo_dist wrote it before format 3
    ix = json.loads(path.read_text())
    ix["format_version"] = 2
    for rec in ix["params"].values():
        rec.pop("expert", None)
    path.write_text(json.dumps(ix))
    convert(tmp_path / "v2", export_hf=tmp_path / "hf2", hf_config={"model_type": "test"}, verify=False)
    with safe_open(str(tmp_path / "hf2" / "model.safetensors"), "pt") as f:
        name = "blocks.1.mlp.experts.down_proj"
        assert f"{name}.0" not in f.keys()
        assert torch.equal(f.get_tensor(name), moe.fused_state(model)[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["apollo", "apollo-mini"])
def test_cuda_fused_experts_match_oracle_on_unfused_model(preset):
    """On CUDA (projections from the CUDA generator, the Triton kernels, the batched cuBLAS product, the step as a
    CUDA graph where complete): fused experts against apollo-torch on the unfused model, 30 steps."""
    torch.backends.cuda.matmul.allow_tf32 = False

    def run(model, opt_cls):
        model = model.cuda()
        opt = opt_cls(oracle.groups(model, preset), **oracle.HPARAMS)
        for t in range(30):
            oracle.loss_fn(model, *(v.cuda() for v in moe.batch(t))).backward()
            opt.step()
            opt.zero_grad()
        return model.cpu()

    ref = run(moe.make_model(fused=False), oracle.oracle_class())
    ours = run(moe.make_model(), APOLLO)
    assert moe.max_rel_diff(ours, ref) < 1e-4


@pytest.mark.slow
def test_fused_experts_under_hsdp_match_oracle(tmp_path):
    """HSDP, W = 4 on a (2, 2) (replicate, shard) mesh: each shard rank holds 4 whole experts, the replicas the
    same; both presets, 30 steps, against apollo-torch on the unfused model."""
    r = deepspeed_workers("tests/workers/moe_equivalence.py", 4, tmp_path / "r.json", "--parts", "hsdp")
    for preset in ("apollo", "apollo-mini"):
        got = r[f"hsdp/{preset}"]
        assert got["max_rel_diff"] < 1e-4 and got["loss_rel_diff"] < 1e-5, got
        assert [sorted(set(h)) for h in got["experts_held"]] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def test_layerwise_with_fused_experts_is_refused():
    model = moe.make_model()
    with pytest.raises(NotImplementedError, match="layer-wise APOLLO with fused expert weights"):
        APOLLO(oracle.groups(model, "apollo"), layerwise=True, nonfinite="raise")


@pytest.mark.parametrize("proj", ["svd", "dct"])
def test_gradient_projections_with_fused_experts_are_refused(proj):
    from apollo_dist import APOLLO

    with pytest.raises(NotImplementedError, match=rf"proj='{proj}' with a fused expert weight"):
        APOLLO(param_groups(moe.make_model(), proj=proj), lr=1e-3)


def test_fused_experts_never_step_as_a_cuda_graph(monkeypatch):
    """An expert's live flag is decided per step into a fresh tensor that a replayed CUDA graph would not write
    (step counts and skips would come from the captured step): with fused experts the step is never captured.
    The rule alone decides here: every other condition of `_graphable` is made true (nothing runs on a GPU)."""
    graphable = {}
    for fused in (True, False):
        model = moe.make_model(fused=fused)
        opt = APOLLO(oracle.groups(model, "apollo-mini"), **oracle.HPARAMS)
        oracle.loss_fn(model, *moe.batch(0)).backward()
        opt.step()
        for b in opt.buckets:
            monkeypatch.setattr(b, "fused", lambda: True)
            monkeypatch.setattr(b, "complete", lambda: True)
        monkeypatch.setattr(opt, "_device", torch.device("cuda"))
        graphable[fused] = opt._graph is not None and opt._graphable(opt.buckets)
    assert graphable == {True: False, False: True}
