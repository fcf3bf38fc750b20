"""Benchmark: fused AdamW vs apollo-torch vs apollo_dist, on the same GPU in one run.

    python tools/bench.py --models 350m,1b --json bench.json

For each LLaMA size and optimizer it measures: optimizer step time (grads fixed, median of --steps
steady-state steps, CUDA events; the projection-refresh step separately), the host time of a step
(wall time of the ``step()`` call from an idle GPU: what the CPU spends issuing it), the full training step
(forward + backward in bf16 autocast with fp32 params + step) and its tokens/s, peak GPU memory, and
optimizer state bytes. Prints a markdown table and writes JSON. Ratios are against fused AdamW of
the same run. ``--profile`` adds a torch.profiler summary of 3 optimizer steps per row: kernel
launches and kernel time per step, host time per step, the top host-side ops.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from apollo_dist import APOLLO, param_groups
from apollo_dist.runtime import state_bytes
from launch.model import build_model, llama_config

VOCAB = 32000  # LLaMA tokenizer size used by the APOLLO paper's configs
# A small model where the step is bound by the host: 4 layers, grouped-query attention, ~110 M params.
EXTRA_SIZES = {
    "4l-gqa": dict(
        hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=4
    )
}
OPTIMIZERS = ("adamw", "apollo-torch", "apollo-torch-mini", "apollo", "apollo-mini")
# Any APOLLO name may end in -svd or -dct (the projection; apollo-torch has svd): e.g. apollo-svd, apollo-torch-svd.
PROJ_SUFFIXES = ("-svd", "-dct")


def make_optimizer(
    name: str, model: torch.nn.Module, lr: float, tf32: bool, cuda_graph: bool = True, gap: int | None = None
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    proj = next((s[1:] for s in PROJ_SUFFIXES if name.endswith(s)), "random")
    preset = "apollo-mini" if "mini" in name else "apollo"
    groups = param_groups(model, preset=preset, proj=proj, update_proj_gap=gap)
    if name.startswith("apollo-torch"):
        from tools.reference import oracle_class  # apollo-torch (CC-BY-NC): measured, never imported by the library

        for g in groups:
            g.pop("param_names", None)
        return oracle_class()(groups, lr=lr)
    return APOLLO(groups, lr=lr, projection_tf32=tf32, cuda_graph=cuda_graph)


def config_of(name: str, seq_len: int):
    """A paper size (launch/model.py SIZES) or one of EXTRA_SIZES."""
    if name in EXTRA_SIZES:
        cfg = llama_config("60m", VOCAB, seq_len)
        for k, v in EXTRA_SIZES[name].items():
            setattr(cfg, k, v)
        return cfg
    return llama_config(name, VOCAB, seq_len)


def host_ms(fn, n: int) -> list[float]:
    """Wall time of ``fn()`` from an idle GPU to its return (the CPU's share; kernels may still run)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return times


def profile_summary(fn, n: int = 3) -> dict:
    """torch.profiler over ``n`` calls of ``fn``: per call, kernel launches, kernel time (ms), host time
    of the profiled region (ms), and the 8 host-side ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / n
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu_ops = sorted(
        (e for e in events if e.device_type == torch.autograd.DeviceType.CPU), key=lambda e: -e.self_cpu_time_total
    )
    api = [e for e in events if "LaunchKernel" in e.key or "GraphLaunch" in e.key]
    return {
        "kernel_launches": sum(e.count for e in kernels) / n,
        "host_launch_calls": sum(e.count for e in api) / n,  # kernel and graph launches the host issued
        "kernel_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / n,
        "host_ms_profiled": host,
        "top_host_ops": [(e.key, e.count // n, round(e.self_cpu_time_total / 1e3 / n, 3)) for e in cpu_ops[:8]],
        "top_kernels": [
            (e.key[:60], e.count // n, round(e.self_device_time_total / 1e3 / n, 3))
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
        ],
    }


def cuda_ms(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def bench_one(model: torch.nn.Module, model_name: str, opt_name: str, args) -> dict:
    nparams = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(
        opt_name,
        model,
        args.lr,
        args.tf32 and not opt_name.startswith("apollo-torch") and opt_name != "adamw",
        cuda_graph=not args.eager,
        gap=_steps_before_refresh(args) if args.refresh_after else None,
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    torch.cuda.synchronize()
    first = cuda_ms(opt.step, 1)[0]  # one-time set-up (layout, kernels' JIT) + drawing projections
    cuda_ms(opt.step, 2)
    steps = cuda_ms(opt.step, args.steps)
    opt_ms = statistics.median(steps)
    host = statistics.median(host_ms(opt.step, args.steps))
    prof = profile_summary(opt.step) if args.profile else None
    done = _steps_before_refresh(args)
    if args.refresh:  # run on to step 200 (or, --refresh-after, none), where every APOLLO variant refreshes
        for _ in range((done if args.refresh_after else 200) - done):
            opt.step()
        refresh = cuda_ms(opt.step, 1)[0]
    else:
        refresh = None

    # Full training step: forward + backward (bf16 autocast, fp32 params) + optimizer step.
    x = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1), device="cuda", generator=gen)
    inputs, targets = x[:, :-1], x[:, 1:]

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    full_ms = None
    peak = None
    if not args.skip_full:
        try:
            cuda_ms(train_step, 2)
            torch.cuda.reset_peak_memory_stats()
            full_ms = statistics.median(cuda_ms(train_step, args.full_steps))
            peak = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:
            full_ms, peak = None, "OOM"
    out = {
        "model": model_name,
        "params": nparams,
        "optimizer": opt_name,
        "tf32": bool(args.tf32 and opt_name in ("apollo", "apollo-mini")),
        "eager": bool(args.eager and opt_name in ("apollo", "apollo-mini")),
        "opt_step_ms": opt_ms,
        "host_ms": host,
        "profile": prof,
        "first_step_ms": first,
        "refresh_step_ms": refresh,
        "full_step_ms": full_ms,
        "tokens_per_s": (args.batch * args.seq_len / (full_ms / 1e3)) if full_ms else None,
        "peak_mem_gib": peak,
        "state_bytes": state_bytes(opt),
    }
    for p in model.parameters():
        p.grad = None
    opt = train_step = None  # drop the optimizer state before empty_cache
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _steps_before_refresh(args) -> int:
    """The optimizer steps `bench_one` takes before its refresh step (first, warm-up, timed, host, profiled)."""
    return 3 + 2 * args.steps + (3 if args.profile else 0)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | optimizer | opt step ms | vs AdamW | host ms | refresh ms | full step ms | vs AdamW | tokens/s | peak GiB | state GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # Without an AdamW row for the model (e.g. a projections-only run) the ratio columns say None.
        base = next((b for b in rows if b["model"] == r["model"] and b["optimizer"] == "adamw"), None)
        fmt = lambda v, f="{:.2f}": f.format(v) if isinstance(v, (int, float)) else str(v)
        full_ratio = (
            r["full_step_ms"] / base["full_step_ms"] if base and r["full_step_ms"] and base["full_step_ms"] else None
        )
        step_ratio = r["opt_step_ms"] / base["opt_step_ms"] if base else None
        name = r["optimizer"] + (" (tf32)" if r["tf32"] else "") + (" (eager)" if r.get("eager") else "")
        lines.append(
            f"| {r['model']} | {name} | {fmt(r['opt_step_ms'])} | {fmt(step_ratio, '{:.2f}x')} | "
            f"{fmt(r['host_ms'])} | {fmt(r['refresh_step_ms'])} | {fmt(r['full_step_ms'])} | {fmt(full_ratio, '{:.3f}x')} | {fmt(r['tokens_per_s'], '{:.0f}')} | "
            f"{fmt(r['peak_mem_gib'])} | {r['state_bytes'] / 2**30:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="60m,130m,350m,1b", help="paper sizes and/or " + ",".join(EXTRA_SIZES))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (median reported)")
    ap.add_argument("--full-steps", type=int, default=5, help="timed full training steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tf32", action="store_true", help="also run apollo_dist with TF32 projections")
    ap.add_argument(
        "--eager", action="store_true", help="also run apollo_dist without the CUDA graph (cuda_graph=False)"
    )
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--refresh", action="store_true", help="also time step 200 (projection refresh)")
    ap.add_argument(
        "--refresh-after",
        action="store_true",
        help="with --refresh: update_proj_gap = the steps taken before it, so the refresh is the step right after "
        "the timed ones (no run to step 200; an SVD refresh costs seconds at 1b)",
    )
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler summary of 3 optimizer steps per row")
    ap.add_argument("--json", default="bench.json")
    args = ap.parse_args()
    rows = []
    for m in args.models.split(","):
        model = build_model(config_of(m, args.seq_len), seed=0).cuda()
        for o in args.optimizers.split(","):
            ours = o in ("apollo", "apollo-mini")
            variants = [(tf32, eager) for tf32 in (False, True) for eager in (False, True)]
            variants = [
                (t, e) for t, e in variants if (not t or (args.tf32 and ours)) and (not e or (args.eager and ours))
            ]
            for tf32, eager in variants:
                a = argparse.Namespace(**{**vars(args), "tf32": tf32, "eager": eager})
                t0 = time.time()
                rows.append(bench_one(model, m, o, a))
                print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "seq_len": args.seq_len,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta}\n\n{table(rows)}")
    for r in rows:
        if r["profile"]:
            print(
                r["model"],
                r["optimizer"],
                "tf32" if r["tf32"] else "",
                "eager" if r.get("eager") else "",
                json.dumps(r["profile"]),
            )


if __name__ == "__main__":
    main()
