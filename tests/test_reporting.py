"""What launch/train.py tells the user when a run quietly goes wrong (issue 26, items 2 and 8), on CPU
(tiny LLaMA, fp32, gloo):

- Steps skipped for non-finite gradients (APOLLO's ``nonfinite="skip"``, or DeepSpeed's own overflow
  check under ZeRO): NaN gradients injected through launch/engines.py's APOLLO_DIST_NONFINITE_GRAD_AT hook;
  every metrics row carries the cumulative ``skipped_steps``, the progress bar and the final line show it,
  and a native resume keeps counting from the checkpoint.
- A full disk while saving (a small tmpfs; needs root to mount, skipped otherwise): one clear line naming
  "no space left on device", the step directory, the bytes to write and the bytes free; the partial step
  directory is gone, `latest` names the earlier step and --resume from it repeats the run's losses.
  Canonical writes (apollo_dist.checkpoint.streaming) say the same. The error forms torch gives are
  recognized without a mount too.

About 3 minutes on 2 cores (the full-disk tests mount a tmpfs: root only, skipped otherwise).
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from test_train import LAUNCHES, TINY, losses, run, train_py

pytestmark = pytest.mark.usefixtures("corpus")

NAN_AT = "APOLLO_DIST_NONFINITE_GRAD_AT"


def rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def skipped(metrics: Path) -> dict[int, int]:
    """Step -> the skipped_steps its row carries (every step row must carry one)."""
    return {r["step"]: r["skipped_steps"] for r in rows(metrics) if "loss" in r}


def done_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("done:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


# -- skipped steps ---------------------------------------------------------------------------------
def test_skipped_steps_single_in_rows_bar_summary_and_across_resume(tmp_path):
    """One process: NaN gradients at steps 3, 4 and 7. Rows count 0,0,1,2,2,2,3,...; the bar shows
    ``skipped=2``; the final line says 3 of steps 1-10; resumed from step 5 (trainer.json holds 2), the
    rows of steps 6-10 are the uninterrupted run's, losses and counts."""
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    with_bar = [a for a in TINY if a != "--no-progress"]
    out = ["--metrics-file", str(metrics), "--save-dir", str(ckpt), "--save-every", "5"]
    proc = run(train_py("--engine", "single", *with_bar, *out), **{NAN_AT: "3,4,7"})
    want = {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 3, 8: 3, 9: 3, 10: 3}
    assert skipped(metrics) == want
    assert "skipped=2" in proc.stderr and "skipped=3" in proc.stderr  # tqdm's postfix
    assert "skipped 3 of steps 1-10 (non-finite gradients)" in done_line(proc.stdout)
    assert json.loads((ckpt / "step_0000005" / "trainer.json").read_text())["skipped_steps"] == 2

    resumed = tmp_path / "resumed.jsonl"
    proc = run(
        train_py("--no-progress", "--metrics-file", str(resumed), "--resume", str(ckpt / "step_0000005")),
        **{NAN_AT: "7"},
    )
    assert skipped(resumed) == {s: n for s, n in want.items() if s > 5}
    ref, got = losses(metrics), losses(resumed)
    assert all(abs(got[s] - ref[s]) <= 1e-6 * abs(ref[s]) for s in got), (got, ref)  # same steps skipped
    assert "skipped 3 of steps 1-10" in done_line(proc.stdout)
    assert "step 10: val_loss" in proc.stdout and "(3 steps skipped so far: non-finite gradients)" in proc.stdout


@pytest.mark.parametrize("name", ["fsdp2", "zero2"])
def test_skipped_steps_multi_rank(name, tmp_path):
    """W=2, NaN gradients on rank 1 only at steps 3 and 4: every rank skips (APOLLO's decision under FSDP2,
    DeepSpeed's overflow check under ZeRO-2, which never calls APOLLO for them); rank 0's rows and final
    line count both."""
    metrics = tmp_path / "m.jsonl"
    proc = run(LAUNCHES[name](["--metrics-file", str(metrics)]), **{NAN_AT: "3:1,4:1"})
    assert skipped(metrics) == {s: min(max(s - 2, 0), 2) for s in range(1, 11)}
    assert "skipped 2 of steps 1-10 (non-finite gradients)" in done_line(proc.stdout)
    assert "step 5: val_loss" in proc.stdout and "(2 steps skipped so far" in proc.stdout


# -- a full disk -----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path) -> Iterator:
    """``mount(size_mib)``: a fresh tmpfs of that size under tmp_path (root only: skipped otherwise)."""
    mounted: list[Path] = []

    def mount(size_mib: float) -> Path:
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={int(size_mib * 1024)}k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {proc.stderr.strip()[:200]}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert proc.returncode == 1 and len(lines) == 1, f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_full_disk_while_saving_single(tmpfs, tmp_path):
    """One process saving into a 7 MiB tmpfs: step 5's checkpoint (~4.9 MB) fits, step 10's does not.
    Before: torch's `unexpected pos` RuntimeError and a step_0000010/state.pt.tmp left behind."""
    fs = tmpfs(7)
    ckpt, metrics = fs / "ckpt", tmp_path / "m.jsonl"
    out = ["--metrics-file", str(metrics), "--save-dir", str(ckpt), "--save-every", "5"]
    proc = run(train_py("--engine", "single", *TINY, *out), check=False)
    line = error_line(proc)
    assert f"no space left on device writing {ckpt / 'step_0000010'}: " in line, line
    assert " (model and optimizer state) to write, " in line and " free on its file system; " in line, line
    assert "the partial step_0000010 was removed and `latest` still names step_0000005" in line, line
    need, free = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", line))
    assert 4_000_000 < need < 5_000_000  # the tiny model's fp32 weights (3.5 MB) and APOLLO's state
    assert 2_000_000 < free < need  # 7 MiB less step 5's checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000005"]
    assert (ckpt / "latest").read_text().strip() == "step_0000005"

    resumed = tmp_path / "resumed.jsonl"
    run(train_py("--metrics-file", str(resumed), "--save-dir", str(tmp_path / "ckpt2"), "--resume", str(ckpt)))
    ref, got = losses(metrics), losses(resumed)
    assert sorted(got) == list(range(6, 11))
    assert all(abs(got[s] - ref[s]) <= 1e-6 * abs(ref[s]) for s in got), (got, ref)


def test_full_disk_while_writing_a_canonical_checkpoint(tmpfs):
    """apollo_dist.checkpoint.streaming: 2 MiB of tensors into a 1 MiB tmpfs; DiskFullError names the
    destination (not its staging directory) and the bytes; nothing is left on the file system."""
    import torch

    from apollo_dist.checkpoint.streaming import DiskFullError, ShardedWriter, staged_directories

    fs = tmpfs(1)
    dst = fs / "canon"
    items = [(f"p{i}", [(f"p{i}/w", torch.float32, (128, 1024))]) for i in range(4)]  # 512 KiB each
    with pytest.raises(DiskFullError) as info:
        with staged_directories(dst) as (tmp,):
            writer = ShardedWriter(tmp, items, "state-{:05d}-of-{:05d}.safetensors", shard_bytes=2**20)
            for name, _ in items:
                writer.put({f"{name}/w": torch.zeros(128, 1024)})
            writer.close()
    msg = str(info.value)
    assert msg.startswith(f"no space left on device writing {dst}: 2,097,152 bytes (2.0 MiB) to write, "), msg
    assert info.value.errno == errno.ENOSPC and list(fs.iterdir()) == []
    free = int(msg.split("to write, ")[1].split(" bytes")[0].replace(",", ""))
    assert 0.9 * 2**20 < free <= 2**20  # the whole tmpfs, once the partial files are gone


def test_disk_full_forms(tmp_path):
    """What is a full disk (no mount needed): OSError ENOSPC (also as the context of torch's error),
    torch.save's `unexpected pos` / `basic_ios::clear` RuntimeError while fewer bytes than needed are free
    (it keeps no errno), the same inside DCP's CheckpointException (a BaseException); not another error,
    nor torch's message while the space is there."""
    from torch.distributed.checkpoint.api import CheckpointException

    from apollo_dist.checkpoint.streaming import is_disk_full

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        outer.__context__ = inner
        return outer

    huge = 2**62
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 0)
    assert is_disk_full(chained(RuntimeError("x"), OSError(errno.ENOSPC, "No space")), tmp_path, 0)
    assert is_disk_full(torch_error, tmp_path, huge)
    assert is_disk_full(chained(RuntimeError("unexpected pos 7"), RuntimeError("basic_ios::clear")), tmp_path, huge)
    assert is_disk_full(CheckpointException("write", {1: (torch_error, None)}), tmp_path / "missing" / "dir", huge)
    assert not is_disk_full(torch_error, tmp_path, 1)  # space is there: some other write failure
    assert not is_disk_full(OSError(errno.EIO, "I/O error"), tmp_path, huge)
    assert not is_disk_full(ValueError("unexpected pos"), tmp_path, huge)
