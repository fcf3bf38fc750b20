"""Run a worker script under a real launcher (torchrun / deepspeed / mpirun) on CPU and read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launch.launchers import launcher

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def worker_env(**extra: str) -> dict[str, str]:
    """One thread per rank (CI has 2 cores), the venv's launchers on PATH and the repo importable; CPU
    only (GPUs hidden, DeepSpeed's CPU accelerator) unless ``extra`` says DS_ACCELERATOR="cuda"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    if env["DS_ACCELERATOR"] == "cpu":  # a CPU test on a GPU machine must not put rank 1 on cuda:1
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_checked(cmd: list[str], timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo; with ``check``, raise on failure with the tail of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc script args`` (gloo on CPU), ``env`` added."""
    return run_checked(
        [launcher("torchrun"), "--standalone", f"--nproc_per_node={nproc}", script, *args], timeout, **env
    )


def report(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def deepspeed_workers(worker: str, world: int, out: Path, *args: str) -> dict:
    """``deepspeed --num_gpus world worker --out out args`` on CPU: the worker's report, after checking that no
    DeepSpeed shared-memory segment was left behind and that no part of the worker failed."""
    from apollo_dist.runtime import free_port

    port = free_port()
    cmd = [launcher("deepspeed"), "--num_gpus", str(world), "--master_port", str(port), worker, "--out", str(out)]
    run_checked([*cmd, *args], timeout=600)
    # engines.shutdown unlinks DeepSpeed's CPU all-reduce segments (66 MB of RAM per rank otherwise)
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not left, f"shared-memory segments left behind: {left}"
    r = report(out)
    errors = {k: v for k, v in r.items() if k.startswith("error/")}
    assert not errors, "\n".join(errors.values())
    return r
