"""tools/bench_dist.py: the multi-GPU benchmark driver, run for real on CPU (gloo, 2 ranks, tiny model)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from spawn import run_checked

from tools import bench_dist


def test_engines_and_optimizers_table(tmp_path, corpus):
    """One launch per (engine, optimizer): rows with times, memory and every rank's state; APOLLO-Mini's
    state is below AdamW's; ratios are against AdamW of the same engine. (The DeepSpeed launch path runs in
    the --max-batch test below.)"""
    out = tmp_path / "b.json"
    proc = run_checked(
        [
            sys.executable,
            "tools/bench_dist.py",
            "--world",
            "2",
            "--model",
            "tiny",
            "--engines",
            "fsdp2",
            "--optimizers",
            "adamw,apollo-mini",
            "--micro-batch",
            "2",
            "--seq-len",
            "32",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        timeout=900,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["optimizer"]) for r in rows] == [("fsdp2", "adamw"), ("fsdp2", "apollo-mini")]
    for r in rows:
        assert r["full_step_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["state_bytes_per_rank"]) == 2
        assert r["launch_to_first_step_s"] > 0 and len(r["host_rss_model_built_gib"]) == 2
    adamw, mini = rows
    assert max(mini["state_bytes_per_rank"]) < min(adamw["state_bytes_per_rank"])
    assert "| fsdp2 | apollo-mini | 2 | 2 |" in proc.stdout and "1.000x" in proc.stdout


def test_max_batch_ladder_in_one_launch(monkeypatch):
    """The sizes tried grow by at most 1.5x; one launch tries them all; the largest size with all its
    steps logged is the answer, and its rows are the ones timed (out of memory above 5 here)."""
    assert bench_dist.ladder(20) == [1, 2, 3, 4, 6, 8, 12, 16]
    calls = []

    def fake_run(engine, optimizer, mb, steps, args, workdir, probe=None):
        calls.append(probe)
        rows = [
            {"step": i, "micro_batch": s, "loss": 1.0, "tokens_per_s": 10.0 * s, "peak_mem_gib": s}
            for s in probe
            if s <= 5
            for i in range(steps)
        ]
        rows.append(
            {"step": 99, "micro_batch": 6, "loss": 1.0, "tokens_per_s": 1.0, "peak_mem_gib": 6}
        )  # died in step 2
        return {"rows": rows, "command": "", "launched": 0.0}

    monkeypatch.setattr(bench_dist, "run_once", fake_run)
    mb, run = bench_dist.max_micro_batch(
        "zero3", "adamw", argparse.Namespace(max_batch_limit=256, search_steps=2), "/tmp"
    )
    assert len(calls) == 1 and calls[0][:6] == [1, 2, 3, 4, 6, 8] and calls[0][-1] == 256
    assert mb == 4 and [r["micro_batch"] for r in run["rows"]] == [4, 4] and run["all_rows"][0]["micro_batch"] == 1


@pytest.mark.slow  # the search is asserted in CI on a stubbed job (above); this one launches the real job
def test_max_batch_search_runs_the_job_once(tmp_path, corpus):
    """--max-batch under ZeRO-3 (the deepspeed launcher), W = 1: one launch of launch/train.py
    --probe-micro-batches tries 1, 2 (the limit) in turn; the row is size 2's, timed from its second step,
    with the launch's start-up; the job refuses sizes that do not increase."""
    out = tmp_path / "m.json"
    run_checked(
        [
            sys.executable,
            "tools/bench_dist.py",
            "--world",
            "1",
            "--model",
            "tiny",
            "--engines",
            "zero3",
            "--optimizers",
            "apollo-mini",
            "--max-batch",
            "--max-batch-limit",
            "2",
            "--search-steps",
            "2",
            "--warmup",
            "1",
            "--seq-len",
            "32",
            "--activation-checkpointing",
            "--json",
            str(out),
        ],
        timeout=600,
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert (
        row["micro_batch"] == 2
        and "--probe-micro-batches 1,2" in row["command"]
        and "--activation-checkpointing" in row["command"]
    )
    assert row["tokens_per_s"] > 0 and row["launch_to_first_step_s"] > 0 and row["state_bytes_per_rank"][0] > 0
    proc = run_checked(
        [
            sys.executable,
            "launch/train.py",
            "--engine",
            "single",
            "--model",
            "tiny",
            "--probe-micro-batches",
            "2,2",
            "--global-batch-size",
            "1",
            "--micro-batch-size",
            "1",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "--probe-micro-batches 2,2" in proc.stderr


def test_bad_arguments_name_the_value():
    proc = run_checked([sys.executable, "tools/bench_dist.py", "--engines", "zero4"], check=False)
    assert proc.returncode == 2 and "zero4" in proc.stderr
    proc = run_checked([sys.executable, "tools/bench_dist.py", "--optimizers", "sgd"], check=False)
    assert proc.returncode == 2 and "sgd" in proc.stderr
