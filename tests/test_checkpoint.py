"""World-size-independent checkpoints (DESIGN.md §4, issue 5).

The cross-engine tests run launch/train.py (tiny LLaMA, fp32, CPU, gloo): 10 steps at W=2 under
ZeRO-2, save, convert, resume at W=3 under FSDP2, at W=1 under ZeRO-3 and at W=3 under ZeRO-1, up
to step 20, with update_proj_gap 3 so the projection refreshes after the resume (steps 12, 15, 18).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import torch
from spawn import ROOT, run_checked, worker_env
from workers import synthetic_ckpt

from apollo_dist import APOLLO
from apollo_dist.checkpoint import CanonicalCheckpoint, CheckpointError, LiveSource, load_canonical, save_canonical
from apollo_dist.convert import convert

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TRAIN = "launch/train.py"
FLAGS = (
    "--model tiny --steps 20 --seq-len 32 --global-batch-size 6 --rank 8 --update-proj-gap 3 "
    "--eval-every 1000 --eval-samples 2 --no-progress"
).split()
TOL = 1e-4


# -- helpers ---------------------------------------------------------------------------------------
def ds_config(tmp: Path, stage: int) -> str:
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return str(path)


def train(nproc: int, engine_flags: list[str], *extra: str, script: str = TRAIN) -> subprocess.CompletedProcess:
    return run_checked([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", script, *engine_flags, *FLAGS, *extra])


def losses(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def rel_diffs(a: dict[int, float], b: dict[int, float], steps) -> dict[int, float]:
    return {s: abs(a[s] - b[s]) / abs(a[s]) for s in steps}


def canonical_equal(a: Path, b: Path) -> list[str]:
    """Differences between two canonical checkpoints: every tensor bit for bit, per-param facts,
    group hyperparameters and steps, trainer step and lr schedule (not the source's description)."""
    ca, cb = CanonicalCheckpoint(a), CanonicalCheckpoint(b)
    diffs = []
    if [vars(e) for e in ca.meta.params] != [vars(e) for e in cb.meta.params]:
        diffs.append("param entries")
    if ca.meta.groups != cb.meta.groups:
        diffs.append(f"groups {ca.meta.groups} != {cb.meta.groups}")
    for k in ("step", "scheduler"):
        if ca.meta.trainer.get(k) != cb.meta.trainer.get(k):
            diffs.append(f"trainer {k}: {ca.meta.trainer.get(k)} != {cb.meta.trainer.get(k)}")
    if ca.meta.generator_device != cb.meta.generator_device:
        diffs.append("generator_device")
    for e in ca.meta.params:
        ta, tb = ca.read(e), cb.read(e)
        diffs += [f"{e.name}/{k}" for k in ta if not torch.equal(ta[k], tb[k])]
    return diffs


# -- the cross-engine run (once per session) -------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted ZeRO-2 W=2 to step 20 (checkpoints at 10 and 20), its step-10 checkpoint
    converted, and the three resumes; plus a native save right after loading the canonical form
    under FSDP2 W=3 and ZeRO-3 W=1 (the round trip)."""
    tmp = tmp_path_factory.mktemp("resume")
    z = {s: ds_config(tmp, s) for s in (1, 2, 3)}
    train(
        2,
        ["--deepspeed", z[2]],
        "--save-dir",
        str(tmp / "z2"),
        "--save-every",
        "10",
        "--metrics-file",
        str(tmp / "base.jsonl"),
    )
    convert(tmp / "z2", tmp / "c10", tag="step_0000010")
    resumes = {
        "fsdp2-w3": (3, ["--engine", "fsdp2"]),
        "zero3-w1": (1, ["--deepspeed", z[3]]),
        "zero1-w3": (3, ["--deepspeed", z[1]]),
    }
    out = {"tmp": tmp, "base": losses(tmp / "base.jsonl"), "logs": {}}
    for name, (n, flags) in resumes.items():
        proc = train(n, flags, "--resume", str(tmp / "c10"), "--metrics-file", str(tmp / f"{name}.jsonl"))
        out[name] = losses(tmp / f"{name}.jsonl")
        out["logs"][name] = proc.stdout
    for name, (n, flags) in {"fsdp2-w3": resumes["fsdp2-w3"], "zero3-w1": resumes["zero3-w1"]}.items():
        save = tmp / f"rt-{name}"
        train(n, flags, "--resume", str(tmp / "c10"), "--save-dir", str(save), script="tests/workers/ckpt_roundtrip.py")
        convert(save, tmp / f"rt-{name}.canonical")
    # Same W, same engine, no conversion: FSDP2's DCP checkpoint (get_state_dict / set_state_dict).
    train(
        3,
        ["--engine", "fsdp2"],
        "--resume",
        str(tmp / "rt-fsdp2-w3" / "step_0000010"),
        "--metrics-file",
        str(tmp / "dcp.jsonl"),
    )
    out["dcp"] = losses(tmp / "dcp.jsonl")
    return out


RESUMED = ["fsdp2-w3", "zero3-w1", "zero1-w3"]


@pytest.mark.parametrize("name", RESUMED)
def test_resume_says_canonical_and_continues_from_step_10(runs, name):
    assert "(canonical checkpoint) at step 10" in runs["logs"][name]
    assert sorted(runs[name]) == list(range(11, 21))


@pytest.mark.parametrize("name", RESUMED)
def test_resume_other_world_size_and_engine_matches_uninterrupted(runs, name):
    """Per-step losses 11..20 within 1e-4 (relative) of the uninterrupted ZeRO-2 W=2 run."""
    diffs = rel_diffs(runs["base"], runs[name], range(11, 21))
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("name", RESUMED[1:])
def test_resumes_agree_across_engines(runs, name):
    """The resumed runs agree with each other (FSDP2 W=3 vs ZeRO-3 W=1 vs ZeRO-1 W=3)."""
    diffs = rel_diffs(runs["fsdp2-w3"], runs[name], range(11, 21))
    assert max(diffs.values()) < TOL, diffs


def test_native_dcp_resume_continues_exactly(runs):
    """FSDP2 W=3 resumed from its own DCP checkpoint (saved right after loading the canonical form)
    trains exactly like the run resumed from the canonical form: the APOLLO state round-trips DCP."""
    assert runs["dcp"] == runs["fsdp2-w3"]


def test_dcp_missing_rank_file_is_named_by_the_cli(runs, tmp_path):
    src = tmp_path / "dcp"
    shutil.copytree(runs["tmp"] / "rt-fsdp2-w3" / "step_0000010", src)
    (src / "__2_0.distcp").unlink()
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", str(src), str(tmp_path / "c")],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and not (tmp_path / "c").exists()
    assert re.search(r"error: .*__2_0\.distcp: missing", proc.stderr), proc.stderr


@pytest.mark.parametrize("name", ["fsdp2-w3", "zero3-w1"])
def test_round_trip_canonical_engine_native_canonical_is_bit_exact(runs, name):
    tmp = runs["tmp"]
    assert canonical_equal(tmp / "c10", tmp / f"rt-{name}.canonical") == []


def test_export_hf_gives_the_trained_models_logits(runs, tmp_path):
    """The step-20 ZeRO-2 checkpoint exported: from_pretrained's logits equal the model rebuilt from
    the canonical master weights (the trained model's fp32 weights)."""
    from transformers import AutoModelForCausalLM

    from launch.model import build_model, llama_config

    canon, hf = tmp_path / "c20", tmp_path / "hf"
    convert(runs["tmp"] / "z2", canon, export_hf=hf, hf_config=llama_config("tiny", 259, 32).to_dict())
    ck = CanonicalCheckpoint(canon)
    ref = build_model(llama_config("tiny", 259, 32), seed=123)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(ck.read(next(e for e in ck.meta.params if e.name == n))["weight"])
    model = AutoModelForCausalLM.from_pretrained(hf)
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=x).logits, ref(input_ids=x).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert ck.meta.trainer["step"] == 20


# -- format, single process ------------------------------------------------------------------------
def _trained(steps: int = 6, **low):
    model = oracle.make_model()
    groups = oracle.groups(model, "apollo", gap=3)
    groups[1].update(low)
    opt = APOLLO(groups, **oracle.HPARAMS)
    for t in range(steps):
        x, y = oracle.batch(t)
        oracle.loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def canonical(tmp_path) -> Path:
    model, opt = _trained()
    save_canonical(LiveSource(opt, model, {"step": 6}), tmp_path / "c")
    return tmp_path / "c"


def test_moments_are_in_the_references_orientation():
    """Canonical moments equal apollo-torch's own state (m x r tall, r x n wide) after 6 steps."""
    model, opt = _trained()
    ref = oracle.make_model()
    ref_opt = oracle.oracle_class()(oracle.groups(ref, "apollo", gap=3), **oracle.HPARAMS)
    for t in range(6):
        x, y = oracle.batch(t)
        oracle.loss_fn(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    src = LiveSource(opt, model)
    for (name, _), q in zip(model.named_parameters(), ref.parameters()):
        e = next(e for e in src.meta.params if e.name == name)
        got = src.read(e)
        for k in ("exp_avg", "exp_avg_sq"):
            want = ref_opt.state[q][k]
            assert got[k].shape == want.shape, (name, k)
            assert (got[k] - want).abs().max() <= 1e-5 * want.abs().max() + 1e-12, (name, k)


def test_index_records_format_names_shapes_hparams_and_checksums(canonical):
    ix = json.loads((canonical / "index.json").read_text())
    assert ix["format"] == "apollo_dist.canonical" and ix["format_version"] == 2  # 3 only with expert slices
    assert ix["generator_device"] == "cpu" and ix["trainer"]["step"] == 6
    low = ix["param_groups"][1]
    assert (low["rank"], low["update_proj_gap"], low["scale_type"], low["step"]) == (5, 3, "channel", 6)
    wide = ix["params"]["blocks.0.mlp.down.weight"]  # 11 x 23: wide, moments r x n
    assert wide["shape"] == [11, 23] and wide["tensors"]["exp_avg"]["shape"] == [5, 23]
    for fname, info in ix["files"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", info["sha256"]) and (canonical / fname).stat().st_size == info["bytes"]


def test_load_continues_exactly(canonical):
    model, opt = _trained()
    fresh = oracle.make_model(seed=7)
    fresh_opt = APOLLO(oracle.groups(fresh, "apollo", gap=3), lr=1.0)
    assert load_canonical(canonical, fresh_opt, fresh)["step"] == 6
    for t in range(6, 14):  # crosses projection refreshes at t = 6, 9, 12
        for m, o in ((model, opt), (fresh, fresh_opt)):
            x, y = oracle.batch(t)
            oracle.loss_fn(m, x, y).backward()
            o.step()
            o.zero_grad()
    assert oracle.max_rel_diff(fresh, model) == 0.0


def _fresh(**low):
    model = oracle.make_model()
    groups = oracle.groups(model, "apollo", gap=3)
    groups[1].update(low)
    return model, APOLLO(groups, **oracle.HPARAMS)


def test_corrupted_file_fails_its_checksum(canonical):
    f = next(canonical.glob("state-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{re.escape(f.name)}.*SHA-256.*corrupted"):
        load_canonical(canonical, *reversed(_fresh()))


def test_truncated_file_is_named(canonical):
    f = next(canonical.glob("state-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(f.name)}.*truncated"):
        load_canonical(canonical, *reversed(_fresh()))


def test_different_model_names_the_param(canonical):
    model = oracle.TinyNet(h=25)  # mlp.up is 25 x 11 now
    opt = APOLLO(oracle.groups(model, "apollo", gap=3))
    with pytest.raises(CheckpointError, match=r"param blocks\.0\.mlp\.up\.\w+ has shape \(23,.*the model's is \(25,"):
        load_canonical(canonical, opt, model)
    model = oracle.make_model()
    model.blocks[0].attn["renamed"] = model.blocks[0].attn.pop("q")
    opt = APOLLO(oracle.groups(model, "apollo", gap=3))
    with pytest.raises(CheckpointError, match=r"no param 'blocks\.0\.attn\.renamed\.weight'"):
        load_canonical(canonical, opt, model)


@pytest.mark.parametrize("key, value", [("rank", 4), ("update_proj_gap", 5), ("scale_type", "tensor")])
def test_different_apollo_hyperparameters_are_named(canonical, key, value):
    model, opt = _fresh(**{key: value})
    saved = {"rank": 5, "update_proj_gap": 3, "scale_type": "'channel'"}[key]
    with pytest.raises(
        CheckpointError, match=rf"param group 1: the checkpoint has {key}={saved}, this optimizer {key}="
    ):
        load_canonical(canonical, opt, model)


def test_failed_conversion_changes_no_destination(canonical, tmp_path):
    """A corrupted source: convert raises, DST keeps its old content, no temporary directory is left."""
    dst, hf = tmp_path / "dst", tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    f = next(canonical.glob("state-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        convert(canonical, dst, export_hf=hf, hf_config={"model_type": "llama"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "dst"]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        convert(canonical, dst)


# -- native DeepSpeed files: missing / truncated rank files, bounded memory -------------------------
def _synthetic(tmp: Path, **kw) -> Path:
    return synthetic_ckpt.write(tmp / "ds", **kw)


def test_deepspeed_reassembly_is_exact_with_mid_row_cuts(tmp_path):
    _synthetic(tmp_path, layers=2, dim=40, world=3, vocab=101)
    convert(tmp_path / "ds", tmp_path / "c")
    ck = CanonicalCheckpoint(tmp_path / "c")
    for i, e in enumerate(ck.meta.params):
        got = ck.read(e)
        for k, shape in synthetic_ckpt.canonical_shapes(e.shape, e.lowrank).items():
            assert torch.equal(got[k], synthetic_ckpt.expected(i, k, shape)), (e.name, k)


def test_missing_rank_file_is_named_and_nothing_is_written(tmp_path):
    step = _synthetic(tmp_path, layers=1, dim=16, world=3, vocab=50)
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing \(the checkpoint was written by 3 ranks\)",
    ):
        convert(tmp_path / "ds", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_truncated_rank_file_is_named(tmp_path):
    step = _synthetic(tmp_path, layers=1, dim=16, world=2, vocab=50)
    f = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        convert(tmp_path / "ds", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def _peak_rss_mib(src: Path, dst: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", str(src), str(dst)],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(re.search(r"peak RSS (\d+) MiB", proc.stdout).group(1))


def test_conversion_memory_is_bounded_by_one_parameter(tmp_path):
    """A 61-param checkpoint of ~370 MiB converts within ~4 of its 8 MiB-parameters' worth of memory
    above the converter's baseline (a 2 MiB checkpoint): pieces are read and released param by param."""
    small = _synthetic(tmp_path / "small", layers=1, dim=64, world=2, vocab=64)
    big = _synthetic(tmp_path / "big", layers=20, dim=1024, world=2, vocab=1024)
    size = sum(p.stat().st_size for p in big.iterdir()) / 2**20
    base = _peak_rss_mib(small.parent, tmp_path / "c-small")
    peak = _peak_rss_mib(big.parent, tmp_path / "c-big")
    param_mib = 2048 * 1024 * 4 / 2**20 * (1 + 2 * 64 / 1024)  # largest param: weight + low-rank moments
    assert size > 350
    print(f"synthetic {size:.0f} MiB: converter peak RSS {peak:.0f} MiB, baseline {base:.0f} MiB")
    assert peak - base < 4 * param_mib + 16, (peak, base, size)


def test_help_explains_sources_outputs_and_safety():
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    text = proc.stdout
    for needle in (
        "DeepSpeed",
        "ZeRO stage 1, 2 or 3",
        "DCP",
        "--tag",
        "latest",
        "--export-hf",
        "from_pretrained",
        "SHA-256",
        "temporary",
        "--overwrite",
        "one parameter",
    ):
        assert needle in text, needle
