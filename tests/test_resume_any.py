"""launch/train.py --resume DIR with a native checkpoint written at another world size or by the other
engine (issue 27): no conversion, each rank loading what it holds through apollo_dist's loader.

Every run: tiny LLaMA, fp32 on CPU (gloo, DeepSpeed's CPU accelerator), global batch 12 (micro-batch
12 / W), 10 steps with checkpoints at 5 and 10, APOLLO rank 8 or APOLLO-Mini (its preset), the projection
refreshed every 3 steps (a refresh on each side of the resume), NaN gradients at step 2 (a skipped step
whose count the checkpoint carries). The uninterrupted run is the one that wrote the checkpoint; the data
stream does not depend on W, so steps 6-10 at the new W and engine must repeat its losses (to 1e-5
relative: only the reductions' order differs).

The default run covers the distinct code (ZeRO-2 -> FSDP2, FSDP2 -> ZeRO-3, ZeRO-3 W=2 -> 3 with
APOLLO-Mini, bf16 masters across a W change, the refusals); the rest of the matrix (ZeRO-1/2/3,
W=2 -> 3 and 3 -> 2, both presets) is marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from spawn import run_checked

STEPS, RESUME_AT = 10, 5
SKIP_AT = "2"  # APOLLO_DIST_NONFINITE_GRAD_AT: every rank's gradients NaN at step 2 (the step is skipped)
COMMON = [
    "--model",
    "tiny",
    "--steps",
    str(STEPS),
    "--global-batch-size",
    "12",
    "--seq-len",
    "64",
    "--update-proj-gap",
    "3",
    "--eval-every",
    "10",
    "--eval-samples",
    "8",
    "--no-progress",
]
PRESET_FLAGS = {"apollo": ["--optimizer", "apollo", "--rank", "8"], "apollo-mini": ["--optimizer", "apollo-mini"]}
DS_CONFIGS = {
    "zero1": "ds_configs/apollo_zero1.json",
    "zero2": "ds_configs/apollo.json",
    "zero3": "ds_configs/apollo_zero3.json",
}

pytestmark = pytest.mark.usefixtures("corpus")


def launch(engine: str, world: int, args: list[str], timeout: int = 300, check: bool = True, **env: str):
    """launch/train.py on ``world`` CPU ranks: FSDP2 through launch/fsdp2.sh (torchrun), ZeRO-N through
    launch/zero2.sh (the deepspeed launcher) with that stage's JSON. Both add --dtype fp32."""
    if engine == "fsdp2":
        return run_checked(["bash", "launch/fsdp2.sh", *args], timeout, check, NPROC=str(world), **env)
    return run_checked(
        ["bash", "launch/zero2.sh", *args], timeout, check, NPROC=str(world), DS_CONFIG=DS_CONFIGS[engine], **env
    )


def rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def losses(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(metrics) if "loss" in r}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Callable[[str, int, str], Path]:
    """``source(engine, W, preset)``: the directory of an uninterrupted 10-step run (metrics.jsonl, ckpt/
    with step_0000005 and step_0000010), launched once per module and key."""
    base = tmp_path_factory.mktemp("resume_any")
    made: dict[tuple[str, int, str], Path] = {}

    def get(engine: str, world: int, preset: str) -> Path:
        key = (engine, world, preset)
        if key not in made:
            d = base / f"{engine}-w{world}-{preset}"
            out = ["--metrics-file", str(d / "metrics.jsonl"), "--save-dir", str(d / "ckpt"), "--save-every", "5"]
            proc = launch(engine, world, [*COMMON, *PRESET_FLAGS[preset], *out], APOLLO_DIST_NONFINITE_GRAD_AT=SKIP_AT)
            assert "done:" in proc.stdout, proc.stdout[-2000:]
            made[key] = d
        return made[key]

    return get


def check_resume(src: Path, engine: str, world: int, tmp_path: Path) -> None:
    """Resume ``src``'s step-5 checkpoint under ``engine`` at ``world`` ranks with --resume alone (the run's
    settings come from the checkpoint) into a copy of its metrics file; assert: the start-up line names the
    resharded load (the engine's own at the same W and engine), the file keeps steps 0-5 as they were and
    gets 6-10 once each, the losses of 6-10 are the uninterrupted run's to 1e-5 relative, and the skipped
    step counted before the checkpoint is counted after it (rows and final line)."""
    metrics = tmp_path / "metrics.jsonl"
    shutil.copy(src / "metrics.jsonl", metrics)  # the resumed run truncates it to steps <= 5, then appends
    ckpt = src / "ckpt" / f"step_{RESUME_AT:07d}"
    proc = launch(
        engine, world, ["--no-progress", "--eval-every", "10", "--metrics-file", str(metrics), "--resume", str(ckpt)]
    )
    saved = json.loads((ckpt / "trainer.json").read_text())
    same = (saved["engine"], saved["world_size"]) == ("fsdp2" if engine == "fsdp2" else "deepspeed", world)
    how = "native" if same else f"native {saved['engine']} W={saved['world_size']}"  # own load, or resharded
    assert f"({how} checkpoint) at step {RESUME_AT}" in proc.stdout
    assert f"W={world} on cpu" in proc.stdout
    ref, got = rows(src / "metrics.jsonl"), rows(metrics)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(STEPS + 1))
    assert got[: RESUME_AT + 1] == ref[: RESUME_AT + 1]  # kept as written
    worst = max(abs(g["loss"] - r["loss"]) / abs(r["loss"]) for g, r in zip(got[RESUME_AT + 1 :], ref[RESUME_AT + 1 :]))
    print(f"{src.name} -> {engine} W={world}: max relative loss difference over steps 6-10 {worst:.2e}")
    assert worst <= 1e-5, f"max relative loss difference {worst:.2e} over steps 6-10"
    assert saved["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in got[RESUME_AT + 1 :]] == [1] * (STEPS - RESUME_AT)
    assert "skipped 1 of steps 1-10 (non-finite gradients)" in proc.stdout


# (source engine, W, target engine, W, preset): the distinct code in the default run, the rest slow.
DEFAULT_CELLS = [
    ("zero2", 2, "fsdp2", 3, "apollo"),  # DeepSpeed -> FSDP2, W up
    ("zero3", 2, "zero3", 3, "apollo-mini"),  # the same engine at another W; APOLLO-Mini's tensor scaling
]
SLOW_CELLS = [
    (f"zero{stage}", a, f"zero{stage}", b, preset)
    for stage in (1, 2, 3)
    for a, b in ((2, 3), (3, 2))
    for preset in ("apollo", "apollo-mini")
    if (f"zero{stage}", a, f"zero{stage}", b, preset) not in DEFAULT_CELLS
] + [
    ("fsdp2", 3, "zero3", 2, "apollo"),  # FSDP2 (DCP) -> ZeRO-3 (its partitions, model_copy), W down
    ("zero2", 2, "zero3", 2, "apollo"),  # same W, another stage: DeepSpeed's load, routed by apollo_dist
]


@pytest.mark.parametrize(
    "cell",
    DEFAULT_CELLS + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CELLS],
    ids=lambda c: f"{c[0]}-w{c[1]}-to-{c[2]}-w{c[3]}-{c[4]}",
)
def test_resume_at_another_w_or_engine_continues_the_run(cell, source, tmp_path):
    """--resume of a native checkpoint written at another W or by the other engine, with no conversion:
    steps 6-10 repeat the uninterrupted run (see check_resume for every assertion)."""
    src_engine, src_w, engine, world, preset = cell
    check_resume(source(src_engine, src_w, preset), engine, world, tmp_path)


def test_bf16_masters_come_from_the_checkpoint(tmp_path):
    """bf16 (fp32 masters, bf16 compute): ZeRO-2 W=2 trains 3 steps and saves; FSDP2 W=3 resumes it and, by
    the test hook APOLLO_DIST_SAVE_ON_RESUME, saves what the load put into it before any step. Read back
    param by param (apollo_dist.checkpoint.open_checkpoint on both native checkpoints), the fp32 master
    weights, the moments and the limiter norms are bitwise the saved ones, and seeds and per-param steps
    equal; the masters are not bf16 values (re-deriving them from the bf16 weights would show)."""
    import torch

    from apollo_dist.checkpoint import open_checkpoint

    src, again = tmp_path / "src", tmp_path / "again"
    args = [*COMMON, "--steps", "3", *PRESET_FLAGS["apollo"], "--dtype", "bf16"]  # wins over the script's fp32
    launch("zero2", 2, [*args, "--metrics-file", str(src / "m.jsonl"), "--save-dir", str(src / "ckpt")])
    launch(
        "fsdp2",
        3,
        ["--dtype", "bf16", "--metrics-file", str(again / "m.jsonl"), "--save-dir", str(again / "ckpt")]
        + ["--resume", str(src / "ckpt"), "--no-progress"],
        APOLLO_DIST_SAVE_ON_RESUME="1",
    )
    a, b = open_checkpoint(src / "ckpt" / "step_0000003"), open_checkpoint(again / "ckpt" / "step_0000003")
    assert json.loads((again / "ckpt" / "step_0000003" / "trainer.json").read_text())["world_size"] == 3
    assert set(a.index["params"]) == set(b.index["params"]) and len(a.meta.params) > 5
    entries = {e.name: e for e in b.meta.params}
    not_bf16 = 0
    for entry in a.meta.params:
        ta, tb = a.read(entry), b.read(entries[entry.name])
        assert set(ta) == set(tb), entry.name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{entry.name}/{key}"
        w = ta["weight"]
        assert w.dtype == torch.float32
        not_bf16 += int(not torch.equal(w, w.bfloat16().float()))
        for k in ("seed", "step"):
            assert a.index["params"][entry.name].get(k) == b.index["params"][entry.name].get(k), (entry.name, k)
    assert not_bf16 == len(a.meta.params)  # every master moved off the bf16 grid in 3 steps


def test_refusals(tmp_path):
    """What only the writing engine and W read is a one-line UsageError (train.resume_how, before any process
    group): an --engine single checkpoint (one torch.save file) under another engine, an AdamW checkpoint at
    another W; the same engine and W is the engine's own load, another one the resharding loader."""
    from types import SimpleNamespace as NS

    from launch import train

    path = str(tmp_path)  # no index.json: a native checkpoint
    fsdp2_w3, apollo = NS(engine="fsdp2", world=3), NS(optimizer="apollo")
    assert train.resume_how(path, {"engine": "fsdp2", "world_size": 3}, fsdp2_w3, apollo) == "native"
    assert train.resume_how(path, {"engine": "deepspeed", "world_size": 2}, fsdp2_w3, apollo) == "native deepspeed W=2"
    with pytest.raises(train.UsageError, match="a --engine single checkpoint .* resumes only under --engine single"):
        train.resume_how(path, {"engine": "single", "world_size": 1}, fsdp2_w3, apollo)
    with pytest.raises(train.UsageError, match="written by fsdp2 with W=2, this run is fsdp2 with W=3; AdamW"):
        train.resume_how(path, {"engine": "fsdp2", "world_size": 2}, fsdp2_w3, NS(optimizer="adamw"))


def test_new_w_that_does_not_split_the_batch_names_those_that_do(source):
    """Resuming the global batch 12 of a W=2 checkpoint at W=5 (WORLD_SIZE as a launcher sets it; the check
    runs before any process group): one line naming the world sizes that split it and where it came from."""
    import sys

    ckpt = source("zero2", 2, "apollo") / "ckpt" / "step_0000005"
    proc = run_checked(
        [sys.executable, "launch/train.py", "--engine", "fsdp2", "--resume", str(ckpt)], 120, False, WORLD_SIZE="5"
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-1500:]
    assert lines[0] == (
        "train.py: error: --global-batch-size 12 is not divisible by W x micro-batch = 5 x 2 = 10; it splits evenly "
        "over W = 1, 2, 3, 4, 6, 12: launch one of those, or give another --global-batch-size (12: the resumed "
        "checkpoint's global batch; another --global-batch-size changes the batches from the resumed step on)"
    )


def test_world_sizes_for():
    """The world sizes the error lists: divisors of the global batch (of global / micro with a micro-batch
    given), times tp; none when the micro-batch does not divide the batch."""
    from launch.train import world_sizes_for

    assert world_sizes_for(12, None) == [1, 2, 3, 4, 6, 12]
    assert world_sizes_for(12, 2) == [1, 2, 3, 6]
    assert world_sizes_for(12, 5) == []
    assert world_sizes_for(8, None, tp=2) == [2, 4, 8, 16]
