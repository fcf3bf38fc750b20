"""Bytes APOLLO's own collectives move per step, per engine layout, next to the gradient reduce-scatter.

    python tools/comm_bytes.py --model 1b --world 2 --rank 256

Computed from the communication plan the optimizer builds (apollo_dist.layout), for the layouts
each engine gives: ZeRO-1/2 (each param group's params laid end to end, cut into W equal
partitions), ZeRO-3 (every param cut into W chunks of ceil(numel / W)), FSDP2 (dim-0 chunks, torch.chunk
rule, channel ownership "chunk"). No GPU or process group needed. Figures are what each rank sends
into the collective (the buffer size), fp32.
"""

from __future__ import annotations

import argparse

import torch

from apollo_dist.layout import ParamLayout, build_comm_plan, chunk_owners, position_owners
from launch.model import SIZES


def llama_low_rank_shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of every attention and MLP weight of a LLaMA size, in model order."""
    hidden, inter, _, layers = SIZES[model]
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
    return per_layer * layers


def ranges_for(engine: str, shapes: list[tuple[int, int]], world: int) -> list[list[tuple[int, int]]]:
    numels = [m * n for m, n in shapes]
    if engine == "zero2":
        total = sum(numels)
        part = -(-total // world)
        out, off = [], 0
        for k in numels:
            rs = []
            for w in range(world):
                a, b = max(w * part - off, 0), min((w + 1) * part - off, k)
                rs.append((a, b) if a < b else (0, 0))
            out.append(rs)
            off += k
        return out
    if engine == "zero3":
        return [[(min(k, w * -(-k // world)), min(k, (w + 1) * -(-k // world))) for w in range(world)] for k in numels]
    # fsdp2: dim-0 chunks
    out = []
    for m, n in shapes:
        rows = -(-m // world)
        out.append([(min(m, w * rows) * n, min(m, (w + 1) * rows) * n) for w in range(world)])
    return out


def apollo_bytes(engine: str, shapes: list[tuple[int, int]], world: int, rank: int, scale_type: str) -> dict[str, int]:
    layouts = []
    for (m, n), rs in zip(shapes, ranges_for(engine, shapes, world)):
        own = chunk_owners(m, n, world) if engine == "fsdp2" else position_owners(m, n, rs)
        layouts.append(ParamLayout(m, n, rs, own))
    plan = build_comm_plan(layouts, 0, world, torch.device("cpu"))
    rs_bytes = world * plan.seg * (rank + 1) * 4 if plan.seg else 0
    ag_bytes = world * plan.seg * 4 if plan.seg and scale_type == "channel" else 0
    ar_bytes = 3 * len(shapes) * 4 + 4  # per-param norms + the non-finite flag
    shared = int(sum(int(lay.shared_mask().sum()) for lay in layouts))
    return {"reduce_scatter": rs_bytes, "all_gather": ag_bytes, "all_reduce": ar_bytes, "shared_channels": shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", choices=list(SIZES))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--scale-type", default="channel", choices=["channel", "tensor"])
    args = ap.parse_args()
    shapes = llama_low_rank_shapes(args.model)
    grad_bytes = sum(m * n for m, n in shapes) * 4
    print(
        f"LLaMA-{args.model}, W={args.world}, rank {args.rank}, {args.scale_type} scaling; low-rank weights only "
        f"(their fp32 gradient reduce-scatter buffer: {grad_bytes / 2**20:.1f} MiB per rank)\n"
    )
    print(
        "| engine | shared channels | APOLLO reduce-scatter | all-gather | all-reduce | total vs grad reduce-scatter |"
    )
    print("|---|---|---|---|---|---|")
    for engine in ("zero2", "zero3", "fsdp2"):
        b = apollo_bytes(engine, shapes, args.world, args.rank, args.scale_type)
        total = b["reduce_scatter"] + b["all_gather"] + b["all_reduce"]
        print(
            f"| {engine} | {b['shared_channels']} | {b['reduce_scatter'] / 2**20:.3f} MiB | {b['all_gather'] / 2**10:.1f} KiB | "
            f"{b['all_reduce']} B | {100 * total / grad_bytes:.3f}% |"
        )


if __name__ == "__main__":
    main()
