"""Resuming a user's own DeepSpeed script with APOLLO at another world size (issue 27), on CPU (gloo).

The script is the plain one: ``deepspeed.initialize(model, optimizer=apollo_dist.APOLLO(...), config)``,
``engine.save_checkpoint`` at W, then at the new W ``apollo_dist.deepspeed.load_checkpoint(engine, dir)``
(or, for engines from ``apollo_dist.deepspeed.initialize``, their own ``engine.load_checkpoint(dir)``).
TinyNet, fp32, projection refreshed every 3 steps, checkpoint after step 5 of 10: steps 6-10 at the new W
must give the uninterrupted run's per-step losses. Three launches of tests/workers/ds_resume.py (W = 2
saves, W = 3 loads and saves, W = 2 loads) run the default cells, the bf16, memory and universal-route
cases; the slow cells take three more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from spawn import ROOT, deepspeed_workers, worker_env

WORKER = str(ROOT / "tests" / "workers" / "ds_resume.py")
TOL = 1e-5  # relative, per step (the bar; gradient averaging over 2 vs 3 ranks gives ~1e-7)
PRESETS = ("apollo", "apollo-mini")

DEFAULT_2TO3 = ["z2_2to3_apollo_plain", "z1_2to3_apollo_plain"]
DEFAULT_3TO2 = ["z3_3to2_apollo-mini_plain", "z2_3to2_apollo-mini_adapter"]
SAME_W = "z2_2to2_apollo_plain"
ALL_PLAIN = [
    f"z{stage}_{src}to{dst}_{preset}_plain"
    for stage in (1, 2, 3)
    for src, dst in ((2, 3), (3, 2))
    for preset in PRESETS
]
SLOW = [c for c in ALL_PLAIN if c not in DEFAULT_2TO3 + DEFAULT_3TO2]

MIB = 1 << 20
RSS_SLACK = 16 * MIB  # Python objects, allocator rounding, the model-states file's pickle (stated in the bound)


def ds_launch(world: int, out: Path, *args: str) -> dict:
    """``deepspeed --num_gpus world WORKER --out out args`` on CPU (as tests/test_deepspeed.py): the report."""
    return deepspeed_workers(WORKER, world, out, *args)


def to_universal(step_dir: Path, *extra: str) -> subprocess.Popen:
    """DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``) on ``step_dir``, started."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir)]
    cmd += ["--output_folder", f"{step_dir}_universal", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    return subprocess.Popen(
        [*cmd, *extra], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """W=2 saves; W=3 loads those (memory measured first) and saves; W=2 loads those, a same-W checkpoint and
    AdamW's universal checkpoint (converted while W=3 runs)."""
    tmp = tmp_path_factory.mktemp("dsr")
    d = ["--dir", str(tmp)]
    r = {"dir": tmp}
    r[1] = ds_launch(
        2, tmp / "1.json", *d, "--save", ",".join([*DEFAULT_2TO3, SAME_W]), "--bf16=save", "--memory=save", "--adamw"
    )
    converting = [to_universal(tmp / f"adamw_z{stage}" / "global_step5", "--inject_missing_state") for stage in (2, 3)]
    r[2] = ds_launch(
        3,
        tmp / "2.json",
        *d,
        "--memory=load",
        "--load",
        ",".join(DEFAULT_2TO3),
        "--save",
        ",".join(DEFAULT_3TO2),
        "--bf16=load",
    )
    for proc in converting:
        rc, out = finish(proc)
        assert rc == 0, out[-3000:]
    r[3] = ds_launch(2, tmp / "3.json", *d, "--load", ",".join([*DEFAULT_3TO2, SAME_W]), "--universal")
    return r


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory) -> dict:
    """The remaining ZeRO stage x direction x preset cells, in three launches."""
    tmp = tmp_path_factory.mktemp("dsr_slow")
    d = ["--dir", str(tmp)]
    up = [c for c in SLOW if "_2to3_" in c]
    down = [c for c in SLOW if "_3to2_" in c]
    r = ds_launch(2, tmp / "1.json", *d, "--save", ",".join(up))
    r.update(ds_launch(3, tmp / "2.json", *d, "--load", ",".join(up), "--save", ",".join(down)))
    r.update(ds_launch(2, tmp / "3.json", *d, "--load", ",".join(down)))
    return r


def merged(runs: dict) -> dict:
    return {**runs[1], **runs[2], **runs[3]}


def check_continues(r: dict, cell: str) -> None:
    """Steps 6-10 after the load equal the uninterrupted run's to TOL, counters and client state restored."""
    saved, loaded = r[f"save/{cell}"], r[f"load/{cell}"]
    assert saved["steps"] == 10 and loaded["steps"] == 10
    assert loaded["global_steps"] == 5 and loaded["global_samples"] == 60
    assert loaded["client_cell"] == cell and loaded["path"] == "global_step5"
    ref, got = saved["losses"][5:], loaded["losses"]
    assert len(got) == 5
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert rel < TOL, (got, ref)


@pytest.mark.parametrize("cell", DEFAULT_2TO3 + DEFAULT_3TO2)
def test_resume_at_new_world_size(runs, cell):
    """Default cells: ZeRO-2 W=2->3 (APOLLO), ZeRO-1 W=2->3 (APOLLO), ZeRO-3 W=3->2 (APOLLO-Mini) through
    ``apollo_dist.deepspeed.load_checkpoint(engine, dir)`` on a plain ``deepspeed.initialize`` engine, and ZeRO-2
    W=3->2 (APOLLO-Mini) through ``engine.load_checkpoint(dir)`` of an ``apollo_dist.deepspeed.initialize`` engine:
    per-step losses of steps 6-10 equal the uninterrupted run's within 1e-5 relative, global steps/samples and the
    client state come back, and DeepSpeed's own load (which refuses another W) was not called."""
    r = merged(runs)
    check_continues(r, cell)
    assert r[f"load/{cell}"]["deepspeed_loads"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("cell", SLOW)
def test_resume_at_new_world_size_slow(slow_runs, cell):
    """The other cells of ZeRO-1/2/3 x (W=2->3, 3->2) x (APOLLO, APOLLO-Mini), plain ``deepspeed.initialize``
    + ``apollo_dist.deepspeed.load_checkpoint``: the same continuation to 1e-5."""
    check_continues(slow_runs, cell)
    assert slow_runs[f"load/{cell}"]["deepspeed_loads"] == 0


def test_same_world_size_delegates_to_deepspeed(runs):
    """``apollo_dist.deepspeed.load_checkpoint`` on a checkpoint of the same W and stage calls DeepSpeed's own
    ``engine.load_checkpoint`` once (a spy on DeepSpeedEngine.load_checkpoint), and the run continues."""
    r = merged(runs)
    assert r[f"load/{SAME_W}"]["deepspeed_loads"] == 1
    check_continues(r, SAME_W)


def test_bf16_masters_come_from_checkpoint(runs):
    """ZeRO-2 bf16 saved at W=2 and loaded at W=3: on every rank every slot's fp32 master weights equal the
    checkpoint's bit for bit (read with DeepSpeedSource), and they are not bf16 values (so they were not
    re-derived from the bf16 model weights); two more steps run."""
    r = runs[2]["bf16/load"]
    assert r["source_world"] == 2 and r["dtype"] == "torch.bfloat16" and r["deepspeed_loads"] == 0
    assert len(r["ranks"]) == 3
    for row in r["ranks"]:
        assert row["mismatched"] == [] and row["compared"] > 0
        assert row["off_bf16"] > row["compared"] // 2
    assert all(l == l and 0 < l < 10 for l in r["losses_after"])  # noqa: E741


def test_peak_memory_of_a_load_at_new_world_size(runs):
    """ZeRO-2 fp32 W=2 -> 3, a TinyNet with two 2.1M-element params (5.5M in all): the peak RSS of each rank during
    ``apollo_dist.deepspeed.load_checkpoint``, above what it held with the engine built (VmHWM reset just before),
    is no more than its share of the checkpoint's optimizer files (1/3) plus one parameter's tensors (weight and
    both Adam moments of the largest param, fp32) plus 16 MiB; of that, the anonymous memory (not the mapped
    checkpoint pages) is within one parameter's tensors plus 8 MiB."""
    r = runs[2]["memory/load"]
    assert r["world"] == 3 and r["source_world"] == 2
    share = r["optim_files_bytes"] / 3
    one_param = 3 * 4 * r["largest_param_numel"]
    for row in r["ranks"]:
        assert row["peak_over_base"] <= share + one_param + RSS_SLACK, (row, share, one_param)
        assert row["anon_peak_over_base"] <= one_param + 8 * MIB, (row, one_param)


UNIVERSAL_ROUTE = "apollo_dist.deepspeed.load_checkpoint(engine, load_dir)"


def test_universal_checkpoint_load_is_refused(runs):
    """DeepSpeed's universal route into APOLLO (AdamW's ZeRO-2/3 checkpoint converted by ds_to_universal, loaded
    with ``"checkpoint": {"load_universal": true}``) is a NotImplementedError naming the working route, never a
    silent load: at ``apollo_dist.deepspeed.initialize``; at ``apollo_dist.deepspeed.load_checkpoint``; at
    DeepSpeed's own ``engine.load_checkpoint`` once APOLLO is bound (after a step); and when DeepSpeed's own load
    ran before APOLLO's first step (nothing of APOLLO's bound to refuse it then), at that first step. ZeRO-3: what
    DeepSpeed 0.19.8 does before any APOLLO code runs is recorded too."""
    u = runs[3]["universal"]

    def refused(outcome: str) -> bool:
        return outcome.startswith("NotImplementedError") and UNIVERSAL_ROUTE in outcome and "load_universal" in outcome

    assert refused(u["adapter/initialize"])
    for stage in (2, 3):
        assert refused(u[f"z{stage}/apollo_dist.deepspeed.load_checkpoint"])
        assert refused(u[f"z{stage}/engine.load_checkpoint/after_a_step"])
    assert u["z2/engine.load_checkpoint/before_first_step"] == "ok"
    assert refused(u["z2/engine.load_checkpoint/next_step"])
    # ZeRO-3 before the first step: DeepSpeed's load refused by APOLLO at the load or at the next step
    z3 = u["z3/engine.load_checkpoint/before_first_step"], u["z3/engine.load_checkpoint/next_step"]
    assert refused(z3[0]) or (z3[0] == "ok" and refused(z3[1])), z3


@pytest.mark.slow
@pytest.mark.parametrize("inject", [False, True])
def test_ds_to_universal_on_an_apollo_checkpoint(runs, inject):
    """DeepSpeed's converter on an APOLLO ZeRO-2 checkpoint fails (its input is not Adam-shaped partition
    state): without ``--inject_missing_state`` on the missing universal_checkpoint_info, with it an IndexError
    in zero_checkpoint._strip_tensor_paddings. What DeepSpeed 0.19.8 does, recorded (not our code)."""
    step_dir = runs["dir"] / DEFAULT_2TO3[0] / "global_step5"
    rc, out = finish(to_universal(step_dir, *(["--inject_missing_state"] if inject else [])))
    assert rc != 0
    if inject:
        assert "IndexError" in out and "_strip_tensor_paddings" in out, out[-2000:]
    else:
        assert "universal_checkpoint_info" in out, out[-2000:]
