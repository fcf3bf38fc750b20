"""The optimizer step on fused mixture-of-experts weights: APOLLO, APOLLO-Mini (apollo_dist, each expert slice a
weight of its own) and torch's fused AdamW on the same tensors; state bytes, step time, kernel launches per step.

    python tools/bench_moe.py                     # Mixtral-8x7B's expert shapes, 1 layer (needs ~30 GB of GPU)
    python tools/bench_moe.py --hidden 64 --inter 96 --steps 3 --device cpu     # a smoke run

The weights: per layer ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (transformers 5.x layout), fp32,
gradients random (every expert live). Times: median of ``--steps`` steps after 3 warm-up steps (projections
drawn, kernels compiled, the CUDA graph captured), CUDA events. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def weights(
    layers: int, experts: int, hidden: int, inter: int, device: torch.device, unfused: bool = False
) -> list[torch.nn.Parameter]:
    """Per layer the two fused expert weights, or (``unfused``) their 2 E expert slices as 2-D weights."""
    out = []
    for _ in range(layers):
        for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
            for s in [shape[1:]] * experts if unfused else [shape]:
                p = torch.nn.Parameter(torch.randn(s, device=device) * 0.02)
                p.grad = torch.randn(s, device=device) * 1e-3
                out.append(p)
    return out


def optimizer(name: str, params: list[torch.nn.Parameter], rank: int, cuda_graph: bool = True) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, fused=params[0].is_cuda)
    from apollo_dist import APOLLO, preset

    keys = preset(name)
    if name == "apollo":
        keys["rank"] = rank
    return APOLLO([{"params": params, **keys}], lr=1e-4, cuda_graph=cuda_graph)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)
    )


def launches(name: str, params: list[torch.nn.Parameter], rank: int) -> int:
    """CUDA kernels and copies of one eager step (torch.profiler; APOLLO with cuda_graph=False, so the graph does
    not hide them), after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    opt = optimizer(name, params, rank, cuda_graph=False)
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench(name: str, params: list[torch.nn.Parameter], rank: int, steps: int) -> dict:
    opt = optimizer(name, params, rank)
    cuda = params[0].is_cuda
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
    row = {"step_ms": round(statistics.median(times), 3), "state_bytes": state_bytes(opt)}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del opt
    if cuda:
        row["cuda_ops_per_eager_step"] = launches(name, params, rank)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--optimizers", default="adamw,apollo-mini,apollo")
    ap.add_argument("--unfused", action="store_true", help="the expert slices as 2-D weights (one per expert)")
    args = ap.parse_args()
    device = torch.device(args.device)
    params = weights(args.layers, args.experts, args.hidden, args.inter, device, args.unfused)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": sorted({tuple(p.shape) for p in params}),
        "tensors": len(params),
        "params": sum(p.numel() for p in params),
    }
    for name in args.optimizers.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out[name] = bench(name, params, args.rank, args.steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
