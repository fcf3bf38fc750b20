"""Multi-GPU benchmark: the real training job (launch/train.py) under ZeRO-2, ZeRO-3 and FSDP2, for
fused AdamW, APOLLO and APOLLO-Mini, on the same W GPUs in one run.

    python tools/bench_dist.py --world 2 --model 1b --micro-batch 4 --json bench_w2.json
    python tools/bench_dist.py --world 2 --model 7b --engines zero3 --optimizers adamw,apollo-mini --max-batch

Each (engine, optimizer) is one launch of launch/train.py (deepspeed / torchrun, the launch scripts'
commands) on random-order corpus batches of --seq-len tokens. From its metrics it reports: the full
training step (median over the steps after --warmup), tokens/s, peak GPU memory of rank 0 and the
optimizer state bytes of every rank. ``--max-batch``: the largest micro-batch that runs and the tokens/s at
it, from one launch per (engine, optimizer) that tries the sizes of a ladder (1, 2, 3, 4, 6, 8, 12, ...: steps
of at most 1.5x) in turn until one runs out of memory (launch/train.py --probe-micro-batches): start-up is paid
once, not once per try. Prints a markdown
table (ratios against AdamW under the same engine) and writes JSON. Without CUDA it runs on CPU (gloo),
which is how the tests check it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from launch.launchers import launcher
from tools.compare_runs import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "zero1": "ds_configs/apollo_zero1.json",
    "zero2": "ds_configs/apollo.json",
    "zero3": "ds_configs/apollo_zero3.json",
}
ENGINES = ("zero2", "zero3", "fsdp2")
OPTIMIZERS = ("adamw", "apollo", "apollo-mini")
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUDA error: out of memory")


class LaunchError(RuntimeError):
    """A launch that failed for another reason than running out of memory."""


def launch_command(engine: str, world: int, config: str | None) -> list[str]:
    """The launcher line of launch/*.sh for ``engine`` on ``world`` local processes."""
    if engine == "fsdp2":
        return [
            launcher("torchrun"),
            "--standalone",
            f"--nproc_per_node={world}",
            "launch/train.py",
            "--engine",
            "fsdp2",
        ]
    port = str(29500 + os.getpid() % 1000)
    return [
        launcher("deepspeed"),
        "--num_gpus",
        str(world),
        "--master_port",
        port,
        "launch/train.py",
        "--deepspeed",
        config,
    ]


def derived_config(engine: str, tf32: bool, workdir: str) -> str | None:
    """The engine's DeepSpeed JSON, with ``projection_tf32`` set when asked (written under ``workdir``)."""
    if engine == "fsdp2":
        return None
    if not tf32:
        return CONFIGS[engine]
    with open(os.path.join(ROOT, CONFIGS[engine])) as f:
        cfg = json.load(f)
    cfg["optimizer"]["params"]["projection_tf32"] = True
    path = os.path.join(workdir, f"{engine}_tf32.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def run_once(
    engine: str, optimizer: str, micro_batch: int, steps: int, args, workdir: str, probe: list[int] | None = None
) -> dict | None:
    """One training launch; its metrics rows, or None if it ran out of memory. With ``probe`` (sizes), the
    launch tries each in turn and out-of-memory ends it: the rows written until then are returned."""
    tf32 = optimizer.endswith("(tf32)")
    opt = optimizer.replace(" (tf32)", "")
    metrics = os.path.join(workdir, f"{engine}_{opt}{'_tf32' if tf32 else ''}_mb{micro_batch}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = launch_command(engine, args.world, derived_config(engine, tf32, workdir)) + [
        "--model",
        args.model,
        "--optimizer",
        opt,
        "--steps",
        str(steps),
        "--seq-len",
        str(args.seq_len),
        "--micro-batch-size",
        str(micro_batch),
        "--global-batch-size",
        str(micro_batch * args.world),
        "--warmup-steps",
        "1",
        "--eval-every",
        str(10**9),
        "--eval-samples",
        "1",
        "--metrics-file",
        metrics,
        "--no-progress",
    ]
    if args.data:
        cmd += ["--data", args.data]
    if probe:
        cmd += ["--probe-micro-batches", ",".join(map(str, probe))]
    if args.activation_checkpointing:
        cmd += ["--activation-checkpointing"]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if not any(m in out for m in OOM_MARKERS):
            raise LaunchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
        if not (probe and os.path.exists(metrics)):  # a probe's rows until the OOM are its result
            return None
    return {"rows": read_metrics(metrics), "command": " ".join(cmd), "launched": launched}


def summarize(engine: str, optimizer: str, micro_batch: int, run: dict, warmup: int, world: int, seq_len: int) -> dict:
    steps = [r for r in run["rows"] if "tokens_per_s" in r]
    timed = steps[warmup:] or steps[-1:]
    # step 1 of the launch (a --max-batch search times the rows of one size, not the first ones)
    first = next((r for r in run.get("all_rows", run["rows"]) if "tokens_per_s" in r), {})
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    state = next(
        (
            r["optimizer_state_bytes_per_rank"]
            for r in run.get("all_rows", steps)
            if "optimizer_state_bytes_per_rank" in r
        ),
        None,
    )
    return {
        "engine": engine,
        "optimizer": optimizer,
        "world": world,
        "micro_batch": micro_batch,
        "full_step_ms": 1e3 * micro_batch * world * seq_len / tok_s,
        "tokens_per_s": tok_s,
        "peak_mem_gib_rank0": max(r["peak_mem_gib"] for r in steps),
        "state_bytes_per_rank": state,
        "final_loss": steps[-1]["loss"],
        "command": run["command"],
        # launch to the end of the first step (start-up: processes, model built, optimizer, first step)
        "launch_to_first_step_s": first["wall_time"] - run["launched"] if "wall_time" in first else None,
        "host_rss_model_built_gib": next(
            (
                r["host_rss_model_built_gib"]
                for r in run.get("all_rows", run["rows"])
                if "host_rss_model_built_gib" in r
            ),
            None,
        ),  # step 0's row, or a probe's first
    }


def ladder(limit: int) -> list[int]:
    """Micro-batch sizes to try, increasing by at most 1.5x: 1, 2, 3, 4, 6, 8, 12, 16, ... <= limit."""
    sizes, k = [], 1
    while k <= limit:
        sizes += [k] + ([3 * k // 2] if k > 1 and 3 * k // 2 <= limit else [])
        k *= 2
    return sizes


def max_micro_batch(engine: str, optimizer: str, args, workdir: str) -> tuple[int, dict | None]:
    """Largest micro-batch of the ladder (<= --max-batch-limit) that runs --search-steps steps, found by one
    launch that tries them in turn; its rows are those of that size. (0, None) if even 1 does not fit."""
    run = run_once(engine, optimizer, 1, args.search_steps, args, workdir, probe=ladder(args.max_batch_limit))
    done = [r for r in (run or {"rows": []})["rows"] if "micro_batch" in r]
    fits = [
        mb
        for mb in sorted({r["micro_batch"] for r in done})
        if sum(r["micro_batch"] == mb for r in done) == args.search_steps
    ]
    if not fits:
        return 0, None
    return fits[-1], {**run, "rows": [r for r in done if r["micro_batch"] == fits[-1]], "all_rows": done}


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | optimizer | W | micro-batch | full step ms | vs AdamW | tokens/s | vs AdamW | peak GiB (rank 0) | state MiB per rank | launch to step 1 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["engine"] == r["engine"] and b["optimizer"] == "adamw"), None)
        step_ratio = f"{r['full_step_ms'] / base['full_step_ms']:.3f}x" if base else "-"
        tok_ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        state = ", ".join(f"{b / 2**20:.1f}" for b in r["state_bytes_per_rank"] or [])
        lines.append(
            f"| {r['engine']} | {r['optimizer']} | {r['world']} | {r['micro_batch']} | {r['full_step_ms']:.1f} | {step_ratio} | "
            f"{r['tokens_per_s']:.0f} | {tok_ratio} | {r['peak_mem_gib_rank0']:.2f} | {state} | "
            + (f"{r['launch_to_first_step_s']:.1f} |" if r.get("launch_to_first_step_s") is not None else "- |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="processes (GPUs) per launch")
    ap.add_argument("--model", default="1b", help="launch/train.py --model")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"some of {', '.join(ENGINES)}, zero1")
    ap.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="adamw, apollo, apollo-mini; a ' (tf32)' suffix: TF32 projections",
    )
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per rank (without --max-batch)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--max-batch", action="store_true", help="search the largest micro-batch per optimizer instead")
    ap.add_argument("--max-batch-limit", type=int, default=256)
    ap.add_argument(
        "--search-steps", type=int, default=4, help="steps at each size (--warmup of them left out of the times)"
    )
    ap.add_argument(
        "--activation-checkpointing", action="store_true", help="launch/train.py --activation-checkpointing"
    )
    ap.add_argument("--data", default=None, help="launch/train.py --data (default: the bundled corpus)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per launch")
    ap.add_argument("--json", default="bench_dist.json")
    args = ap.parse_args(argv)
    engines = args.engines.split(",")
    bad = [e for e in engines if e not in (*ENGINES, "zero1")]
    if bad:
        ap.error(f"--engines: unknown {bad}; expected some of {', '.join(ENGINES)}, zero1")
    optimizers = args.optimizers.split(",")
    bad = [o for o in optimizers if o.replace(" (tf32)", "") not in OPTIMIZERS]
    if bad:
        ap.error(f"--optimizers: unknown {bad}; expected some of {', '.join(OPTIMIZERS)}")
    workdir = tempfile.mkdtemp(prefix="bench_dist_")
    rows = []
    try:
        for engine in engines:
            for opt in optimizers:
                t0 = time.time()
                if args.max_batch:
                    mb, run = max_micro_batch(engine, opt, args, workdir)
                    if run is None:
                        print(f"{engine} {opt}: even micro-batch 1 runs out of memory", flush=True)
                        continue
                else:
                    mb, run = args.micro_batch, run_once(engine, opt, args.micro_batch, args.steps, args, workdir)
                    if run is None:
                        print(f"{engine} {opt}: out of memory at micro-batch {mb}", flush=True)
                        continue
                rows.append(summarize(engine, opt, mb, run, args.warmup, args.world, args.seq_len))
                print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "model": args.model,
        "world": args.world,
        "seq_len": args.seq_len,
        "max_batch": args.max_batch,
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    import torch  # only for the record: the launches do the work

    meta.update(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
