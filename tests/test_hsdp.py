"""APOLLO under FSDP2 on 2-D meshes (issue 18): HSDP, (Replicate(), Shard(0)) on (replicate, shard), and
FSDP2 x tensor parallel (torchtitan's order: column-/row-wise linears on "tp", then fully_shard on "dp":
(_StridedShard(0), Shard(0)) and (Shard(0), Shard(1)) weights); plus the block layout through APOLLO.bind.

One 4-rank launch of tests/workers/hsdp.py covers the optimizer: HSDP 2x2, 1x4, 4x1 and FSDP2 x TP 2x2,
1x4, 4x1 (dp x tp), both presets, 30 steps vs the apollo-torch oracle; DCP checkpoints written on 2x2,
resumed on 1x4, converted to the canonical form and loaded on 2x2 (HSDP, TP, and a bind() block
layout); a NaN loss on one rank. Three launches of launch/train.py cover the training job: HSDP 2x2
(--mesh 2x2) to step 20 with a DCP checkpoint at 10, converted to the canonical form, resumed under
FSDP2 W=3 and ZeRO-2 W=2. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spawn import report, run_checked, torchrun
from test_core import _one_channel_per_param_bytes

from apollo_dist import APOLLO
from apollo_dist.convert import convert

MESHES = ["2x2", "1x4", "4x1"]
PRESETS = ["apollo", "apollo-mini"]
TOL = 1e-4


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hsdp") / "r.json"
    torchrun(
        "tests/workers/hsdp.py",
        4,
        "--meshes",
        ",".join(MESHES),
        "--presets",
        ",".join(PRESETS),
        "--dcp-resume",
        "2x2:1x4",
        "--nan-step",
        "5",
        "--nan-rank",
        "1",
        "--tp-meshes",
        ",".join(MESHES),
        "--tp-resume",
        "2x2:1x4",
        "--grids",
        "2x2",
        "--out",
        str(out),
    )
    return report(out)


def _lowrank_channel_bytes(r: dict) -> int:
    """One channel (a row of both moments) per low-rank param: the slack of the per-rank state bound."""
    return sum(2 * 4 * rank for _, rank in r["lowrank_shapes"])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mesh", MESHES)
def test_hsdp_matches_oracle(hsdp, mesh, preset):
    """30 steps (gap 7: four projection refreshes) within 1e-4 of the oracle; params and moments are
    (Replicate(), Shard(0)) DTensors; the replicas of a shard hold bitwise-equal state; no rank holds more
    than reference / S plus one channel per param."""
    r = hsdp[f"{mesh}/{preset}"]
    assert r["max_rel_diff"] < TOL
    assert r["param_placements"] == [["R", "S(0)"]] and r["moment_placements"] == [["R", "S(0)"]]
    assert r["replicas_equal"]
    S = r["shard_size"]
    assert max(r["state_bytes"]) <= r["ref_state_bytes"] / S + _one_channel_per_param_bytes(r)
    assert sum(r["state_bytes"]) == r["ref_state_bytes"] * (4 // S)  # each shard's state once per replica


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mesh", MESHES)
def test_fsdp2_tp_matches_oracle(hsdp, mesh, preset):
    """FSDP2 x TP on a (dp, tp) mesh (embedding vocab-parallel, head column-wise, norms dp only): 30 steps
    within 1e-4 of the oracle. Column-wise weights are (_StridedShard(0), Shard(0)) row blocks, row-wise
    ones (Shard(0), Shard(1)) rectangles; the low-rank moments a rank keeps are <= reference / W plus one
    channel per param, and their sum is the reference's."""
    r = hsdp[f"tp{mesh}/{preset}"]
    assert r["max_rel_diff"] < TOL
    if mesh == "2x2":
        assert r["param_placements"] == [["S(0)", "S(1)"], ["_S(0, 2)", "S(0)"]]
    assert max(r["lowrank_state_bytes"]) <= r["ref_lowrank_state_bytes"] / 4 + _lowrank_channel_bytes(r)
    assert sum(r["lowrank_state_bytes"]) == r["ref_lowrank_state_bytes"]


def test_collectives_on_the_sharding_ranks_only_and_constant(hsdp):
    """APOLLO's collectives run on the ranks that split the weights only (HSDP: the shard sub-mesh, none on
    the replicate dim, none at all with S = 1; FSDP2 x TP: dp and tp flattened), and their number per step
    does not grow with the number of params (2 vs 5 blocks)."""
    for key in [f"{m}/{p}" for m in MESHES for p in PRESETS] + [f"tp{m}/{p}" for m in MESHES for p in PRESETS]:
        r = hsdp[key]
        assert not any(r["collectives_elsewhere"])
        # reduce-scatter, all-reduce of norms, all-gather of factors (channel only), non-finite flag
        expect = 0 if r["shard_size"] == 1 else (4 if key.endswith("/apollo") else 3)
        assert set(r["collectives_per_step"]) == {expect}, key
    for deep, base in (("deep", "2x2/apollo"), ("deep-tp", "tp2x2/apollo")):
        d = hsdp[deep]
        assert not any(d["collectives_elsewhere"]) and set(d["collectives_per_step"]) == set(
            hsdp[base]["collectives_per_step"]
        )


def test_dcp_checkpoint_reshards_between_meshes(hsdp):
    """15 steps on 2x2, DCP save, load on 1x4 (another shard size: DCP reshards the 2-D moment DTensors),
    15 more steps: the oracle's 30 steps."""
    assert hsdp["2x2:1x4/apollo"]["max_rel_diff"] < TOL


def test_nonfinite_gradient_skipped_by_every_replica(hsdp):
    """Rank 1's loss is NaN at step 5 (before FSDP2 reduces): the NaN reaches both replica groups, each
    decides over its shard group alone and all four ranks skip that step; the result is the oracle's
    without step 5."""
    r = hsdp["2x2:nan/apollo"]
    assert r["skipped_per_rank"] == [1, 1, 1, 1] and r["replicas_equal"]
    assert r["max_rel_diff"] < TOL


def test_tp_dcp_and_canonical_checkpoints(hsdp):
    """FSDP2 x TP: 15 steps on 2x2, DCP save, load on 1x4 (the moments' placements differ: DCP reshards);
    the same checkpoint converted to the canonical form and loaded on 2x2 (rectangles read per rank): the
    oracle's 30 steps."""
    assert hsdp["tp2x2:1x4/apollo"]["max_rel_diff"] < TOL
    assert hsdp["tp2x2:canonical:tp2x2/apollo"]["max_rel_diff"] < TOL


def test_block_layout_through_bind(hsdp):
    """APOLLO.bind with rectangular blocks (a 2 x 2 grid of every weight): the oracle, both from scratch
    and from the HSDP checkpoint's canonical form; the low-rank state per rank <= reference / 4 + a channel."""
    for key in ("grid2x2/apollo", "2x2:canonical:grid2x2/apollo"):
        r = hsdp[key]
        assert r["max_rel_diff"] < TOL and set(r["collectives_per_step"]) == {4}, key
        assert max(r["lowrank_state_bytes"]) <= r["ref_lowrank_state_bytes"] / 4 + _lowrank_channel_bytes(r)


def test_canonical_checkpoint_loads_into_hsdp(hsdp):
    """The 2x2 DCP checkpoint converted to the canonical form, loaded on 2x2 (each rank reads its rows and
    channels; replicas read the same), 15 more steps: the oracle's 30 steps."""
    r = hsdp["2x2:canonical:2x2/apollo"]
    assert r["max_rel_diff"] < TOL and r["replicas_equal"]


def _meshes(world: int) -> list[str]:
    """Every R x S = world ("2x2", "1x4", "4x1" for 4; "1x1" for 1)."""
    return [f"{r}x{world // r}" for r in range(1, world + 1) if world % r == 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_hsdp_nccl_matches_oracle(tmp_path):
    """The same launch with NCCL on the GPUs this machine has (4 used when there are 4 or more; on one
    GPU the 1x1 meshes: NCCL, the CUDA generator's projections and the Triton kernels through the 2-D
    mesh code): every mesh and preset within 1e-4 of the oracle on CUDA, collectives on the shard group
    only, the DCP and canonical resumes and the non-finite skip too."""
    world = 4 if torch.cuda.device_count() >= 4 else min(torch.cuda.device_count(), 2)
    meshes, out = _meshes(world), tmp_path / "r.json"
    torchrun(
        "tests/workers/hsdp.py",
        world,
        "--meshes",
        ",".join(meshes),
        "--presets",
        ",".join(PRESETS),
        "--dcp-resume",
        f"{meshes[0]}:{meshes[-1]}",
        "--nan-step",
        "5",
        "--nan-rank",
        str(world - 1),
        "--tp-meshes",
        ",".join(meshes),
        "--tp-resume",
        f"{meshes[0]}:{meshes[-1]}",
        "--device",
        "cuda",
        "--out",
        str(out),
        DS_ACCELERATOR="cuda",
    )
    r = report(out)
    assert {f"{m}/{p}" for m in meshes for p in PRESETS} | {f"tp{m}/{p}" for m in meshes for p in PRESETS} <= set(r)
    for key, v in r.items():
        if key not in ("deep", "deep-tp"):
            assert v["max_rel_diff"] < TOL and v["replicas_equal"], (key, v["max_rel_diff"])
            assert not any(v["collectives_elsewhere"])
            S = v["shard_size"]
            assert max(v["state_bytes"]) <= v["ref_state_bytes"] / S + _one_channel_per_param_bytes(v)
    assert r[f"{meshes[0]}:nan/apollo"]["skipped_per_rank"] == [1] * world


# -- the training job: --mesh, DCP, canonical, other engines ----------------------------------------
FLAGS = (
    "--model tiny --steps 20 --seq-len 32 --global-batch-size 12 --rank 8 --update-proj-gap 3 "
    "--eval-every 1000 --eval-samples 2 --no-progress"
).split()


def _train(nproc: int, *args: str) -> None:
    from launch.launchers import launcher

    run_checked([launcher("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "launch/train.py", *args, *FLAGS])


def _losses(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def resumes(tmp_path_factory) -> dict:
    """HSDP 2x2 to step 20 (DCP checkpoint at 10); step 10 converted; resumed at FSDP2 W=3, ZeRO-2 W=2 and
    HSDP x TP (a 2 x 1 x 2 mesh: replicate, shard, tp) W=4."""
    tmp = tmp_path_factory.mktemp("hsdp-resume")
    _train(
        4,
        "--engine",
        "fsdp2",
        "--mesh",
        "2x2",
        "--save-dir",
        str(tmp / "hsdp"),
        "--save-every",
        "10",
        "--metrics-file",
        str(tmp / "base.jsonl"),
    )
    convert(tmp / "hsdp" / "step_0000010", tmp / "c10")
    (tmp / "z2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = {"base": _losses(tmp / "base.jsonl")}
    for name, n, flags in (
        ("fsdp2-w3", 3, ["--engine", "fsdp2"]),
        ("zero2-w2", 2, ["--deepspeed", str(tmp / "z2.json")]),
        ("hsdp-tp-w4", 4, ["--engine", "fsdp2", "--mesh", "2x1", "--tp", "2"]),
    ):
        _train(n, *flags, "--resume", str(tmp / "c10"), "--metrics-file", str(tmp / f"{name}.jsonl"))
        out[name] = _losses(tmp / f"{name}.jsonl")
    return out


@pytest.mark.parametrize("name", ["fsdp2-w3", "zero2-w2", "hsdp-tp-w4"])
def test_hsdp_checkpoint_resumes_under_other_engines(resumes, name):
    """Losses 11..20 after HSDP 2x2 -> canonical -> FSDP2 W=3 / ZeRO-2 W=2 / HSDP x TP (--mesh 2x1 --tp 2:
    transformers' LLaMA layers column-/row-wise) within 1e-4 of the uninterrupted HSDP run (projections
    refresh at steps 12, 15, 18: after the resume)."""
    got, base = resumes[name], resumes["base"]
    assert sorted(got) == list(range(11, 21))
    diffs = {s: abs(got[s] - base[s]) / abs(base[s]) for s in got}
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "fsdp2", "--mesh", "3x2"], "--mesh 3x2: R x S = 6, the launcher started W = 4 ranks"),
        (
            ["--deepspeed", "x.json", "--mesh", "2x2"],
            "--mesh 2x2 shapes FSDP2's device mesh, this run's engine is deepspeed",
        ),
        (["--engine", "fsdp2", "--mesh", "2by2"], "--mesh 2by2: expected RxS"),
        (["--engine", "fsdp2", "--tp", "3"], "--tp 3: must be >= 1 and divide W = 4"),
        (["--engine", "fsdp2", "--tp", "2", "--mesh", "2x2"], "--mesh 2x2: R x S = 4, W / tp = 2 data-parallel ranks"),
        (
            ["--engine", "fsdp2", "--tp", "2", "--global-batch-size", "3"],
            "not divisible by W / tp x micro-batch = 2 x 1 = 2",
        ),
        (["--engine", "fsdp2", "--tp", "2", "--init-from", "x"], "--tp 2 with --init-from"),
    ],
)
def test_mesh_and_tp_flag_errors_are_one_line(flags, message):
    from launch import train

    with pytest.raises(train.UsageError) as e:
        train.resolve_run(train.parse_args(flags), None, {}, 4)
    assert message in str(e.value) and "\n" not in str(e.value)
    run = train.resolve_run(
        train.parse_args(["--engine", "fsdp2", "--mesh", "1x2", "--tp", "2", "--global-batch-size", "4"]), None, {}, 4
    )
    assert (run.mesh, run.tp, run.micro_batch_size) == ((1, 2), 2, 2)


# -- layouts APOLLO does not map: a clear error, never a silent step ---------------------------------
@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unsupported_placements_name_param_placements_and_mesh(world_of_one):
    """Partial, a strided shard that is not FSDP2-over-TP's, low-rank params split over different mesh dims:
    NotImplementedError naming the param, its placements and its mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    cases = [
        ((1,), ("tp",), [Partial()], r"Partial\(sum\).*1-D mesh of shape \(1,\) \('tp',\)"),
        ((1, 1), ("dp", "tp"), [_StridedShard(0, split_factor=2), Shard(1)], r"_StridedShard.*2-D mesh"),
        (
            (1, 1, 1),
            ("a", "b", "c"),
            [Replicate(), _StridedShard(0, split_factor=3), Shard(0)],
            r"3-D mesh of shape \(1, 1, 1\)",
        ),
    ]
    for shape, names, placements, message in cases:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        p = torch.nn.Parameter(DTensor.from_local(torch.zeros(6, 4), mesh, placements, run_check=False))
        with pytest.raises(NotImplementedError, match=r"param 0 \(shape \(6, 4\)\).*" + message):
            APOLLO([{"params": [p], "rank": 2}])
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    a, b = (
        torch.nn.Parameter(DTensor.from_local(torch.zeros(6, 4), mesh, pl, run_check=False))
        for pl in ([Shard(0), Shard(1)], [Shard(0), Replicate()])
    )
    with pytest.raises(
        NotImplementedError,
        match=r"param 1: split over mesh dims \[0\] of \('dp', 'tp'\), other low-rank params over \[0, 1\]",
    ):
        APOLLO([{"params": [a, b], "rank": 2}])
