"""Worker (torchrun, gloo on CPU): layer-wise APOLLO under FSDP2 vs the ordinary step under FSDP2.

For each preset, two copies of the same TinyNet are fully_shard-ed (each block, then the root); one is
trained by APOLLO's ordinary step, the other by APOLLO(layerwise=True), whose updates run in the hooks
FSDP2 calls after each reduce-scatter. A probe hook registered before the optimizer's (so it runs first)
records the elements of sharded gradients alive on this rank whenever a gradient completes.
Rank 0 writes a JSON report: max relative difference per preset, live and total gradient elements per rank.
"grouped": layer-wise with one bucket per block (param_names), apollo preset.
"poisoned": the last rank's shard of a wide weight's and the head's gradient made NaN at steps 2 and 6 (a probe
hook on that rank only, before the optimizer's): layer-wise ("skip") must leave those params out on every rank,
as the ordinary step does when every rank sees their gradient None; report: difference and step counts.
"""

from __future__ import annotations

import argparse
import json

import oracle
import torch
import torch.distributed as dist

from apollo_dist import APOLLO
from apollo_dist.runtime import shutdown


def sharded_model(seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = oracle.make_model(seed)
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


BAD_STEPS = (2, 6)


def train(
    preset: str, steps: int, rank: int, world: int, layerwise: bool, poison: bool = False, names: bool = False
) -> tuple[dict, int, int, list[int]]:
    """Full parameters after ``steps``, (max live, total) sharded-gradient elements on this rank, and every
    param's step count."""
    model = sharded_model()
    params = list(model.parameters())
    live = [0]
    targets = [model.blocks[0].mlp["down"].weight, model.head.weight] if poison else []
    bad = [False]

    def nan_here(p):  # one rank's shard only: the decision must still be every rank's
        if bad[0] and rank == world - 1:
            p.grad._local_tensor.fill_(float("nan"))

    for p in targets if layerwise else []:
        p.register_post_accumulate_grad_hook(nan_here)

    def probe(_p):
        live[0] = max(live[0], sum(q.grad._local_tensor.numel() for q in params if q.grad is not None))

    for p in params:  # before the optimizer's hooks: sees the gradient that just completed
        p.register_post_accumulate_grad_hook(probe)
    groups = (oracle.named_groups if names else oracle.groups)(model, preset)  # names: one bucket per block
    opt = APOLLO(groups, **oracle.HPARAMS, layerwise=layerwise, nonfinite="skip" if poison else None)
    for t in range(steps):
        bad[0] = t in BAD_STEPS
        x, y = oracle.batch(t)
        oracle.loss_fn(model, x[rank::world], y[rank::world]).backward()
        if not layerwise:
            probe(None)  # the ordinary step: every gradient is alive when it runs
            for p in targets if bad[0] else []:
                p.grad = None  # on every rank: the ordinary step leaves the param out
        opt.step()
        opt.zero_grad()
    opt.steps_taken  # noqa: B018  (settles the last step's decisions)
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    counts = [int(opt.state[p]["step"]) for p in params]
    return full, live[0], sum(p._local_tensor.numel() for p in params), counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {
        "world": world,
        "max_rel_diff": {},
        "max_abs_diff": {},
        "live_grad_numel": {},
        "ordinary_grad_numel": {},
        "total_numel": 0,
    }
    ref, _, _, ref_counts = train("apollo", 8, rank, world, layerwise=False, poison=True)
    ours, _, _, counts = train("apollo", 8, rank, world, layerwise=True, poison=True)
    report["poisoned"] = {
        "max_rel_diff": max(float((ours[n] - q).abs().max() / q.abs().max().clamp_min(1e-12)) for n, q in ref.items()),
        "counts": counts,
        "ref_counts": ref_counts,
    }
    for preset in ("apollo", "apollo-mini"):
        ref, ordinary_live, total, _ = train(preset, args.steps, rank, world, layerwise=False)
        ours, live, _, _ = train(preset, args.steps, rank, world, layerwise=True)
        if preset == "apollo":  # one bucket per block (param_names): the shared channels' collectives per block
            grouped, _, _, _ = train(preset, args.steps, rank, world, layerwise=True, names=True)
            report["max_rel_diff"]["grouped"] = max(
                float((grouped[n] - q).abs().max() / q.abs().max().clamp_min(1e-12)) for n, q in ref.items()
            )
        report["max_rel_diff"][preset] = max(
            float((ours[n] - q).abs().max() / q.abs().max().clamp_min(1e-12)) for n, q in ref.items()
        )
        report["max_abs_diff"][preset] = max(float((ours[n] - q).abs().max()) for n, q in ref.items())
        every = [torch.zeros(3, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(every, torch.tensor([live, ordinary_live, total]))
        report["live_grad_numel"][preset] = [int(e[0]) for e in every]
        report["ordinary_grad_numel"][preset] = [int(e[1]) for e in every]
        report["total_numel"] = [int(e[2]) for e in every]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
