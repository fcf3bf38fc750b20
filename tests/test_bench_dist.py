"""tools/bench_dist.py: the multi-GPU benchmark driver, run for real on CPU (gloo, 2 ranks, tiny model)."""
from __future__ import annotations

import argparse
import json
import sys

from spawn import run_checked

sys.path.insert(0, "tools")
import bench_dist  # noqa: E402


def test_engines_and_optimizers_table(tmp_path, corpus):
    """One launch per (engine, optimizer): rows with times, memory and every rank's state; APOLLO-Mini's
    state is below AdamW's under both engines; ratios are against AdamW of the same engine."""
    out = tmp_path / "b.json"
    proc = run_checked([sys.executable, "tools/bench_dist.py", "--world", "2", "--model", "tiny", "--engines", "zero3,fsdp2",
                        "--optimizers", "adamw,apollo-mini", "--micro-batch", "2", "--seq-len", "32", "--steps", "3",
                        "--warmup", "1", "--json", str(out)], timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["optimizer"]) for r in rows] == [("zero3", "adamw"), ("zero3", "apollo-mini"), ("fsdp2", "adamw"), ("fsdp2", "apollo-mini")]
    for r in rows:
        assert r["full_step_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["state_bytes_per_rank"]) == 2
    for engine in ("zero3", "fsdp2"):
        adamw, mini = (next(r for r in rows if r["engine"] == engine and r["optimizer"] == o) for o in ("adamw", "apollo-mini"))
        assert max(mini["state_bytes_per_rank"]) < min(adamw["state_bytes_per_rank"])
    assert "| zero3 | apollo-mini | 2 | 2 |" in proc.stdout and "1.000x" in proc.stdout


def test_max_batch_search_doubles_then_bisects(monkeypatch):
    """The largest micro-batch that fits, found with few launches (out of memory above 5 here)."""
    tried = []

    def fake_run(engine, optimizer, mb, steps, args, workdir):
        tried.append(mb)
        return None if mb > 5 else {"rows": [], "command": ""}

    monkeypatch.setattr(bench_dist, "run_once", fake_run)
    args = argparse.Namespace(max_batch_limit=256, search_steps=2)
    mb, run = bench_dist.max_micro_batch("zero3", "adamw", args, "/tmp")
    assert mb == 5 and run is not None
    assert tried == [1, 2, 4, 8, 6, 5]
    tried.clear()
    assert bench_dist.max_micro_batch("zero3", "adamw", argparse.Namespace(max_batch_limit=3, search_steps=2), "/tmp")[0] == 2


def test_bad_arguments_name_the_value():
    proc = run_checked([sys.executable, "tools/bench_dist.py", "--engines", "zero4"], check=False)
    assert proc.returncode == 2 and "zero4" in proc.stderr
    proc = run_checked([sys.executable, "tools/bench_dist.py", "--optimizers", "sgd"], check=False)
    assert proc.returncode == 2 and "sgd" in proc.stderr
