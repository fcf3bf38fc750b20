"""Worker (torchrun, gloo on CPU): layer-wise APOLLO under FSDP2 resumed at another world size.

``--part save`` (run at W=2): the uninterrupted layer-wise run of STEPS steps (its final weights saved as the
reference), and a run stopped at SAVED_AT with DCP's get_state_dict saved by dcp.save. ``--part load`` (another W):
a fresh layer-wise model and optimizer, other initial weights, load_checkpoint (apollo_dist's any-W loader) of that
DCP checkpoint, steps SAVED_AT..STEPS (projection refreshes on both sides), weights and step counts compared with
the reference. Rank 0 writes a JSON report.
"""

from __future__ import annotations

import argparse
import json

import oracle
import torch
import torch.distributed as dist
from layerwise_fsdp2 import sharded_model

from apollo_dist import APOLLO
from apollo_dist.runtime import shutdown

STEPS, SAVED_AT = 12, 5


def steps(model, opt, first: int, last: int, rank: int, world: int) -> None:
    for t in range(first, last):
        x, y = oracle.batch(t)
        oracle.loss_fn(model, x[rank::world], y[rank::world]).backward()
        opt.step()
        opt.zero_grad()
    opt.steps_taken  # noqa: B018  (settles the last step's decisions)


def main() -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from apollo_dist.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["save", "load"], required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"world": world}
    for preset in ("apollo", "apollo-mini"):
        if args.part == "save":
            model = sharded_model(0)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS, layerwise=True)
            steps(model, opt, 0, STEPS, rank, world)
            full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
            if rank == 0:
                torch.save(full, f"{args.dir}/{preset}-reference.pt")
            model = sharded_model(0)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS, layerwise=True)
            steps(model, opt, 0, SAVED_AT, rank, world)
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{args.dir}/{preset}-dcp")
            continue
        model = sharded_model(1)
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS, layerwise=True)
        load_checkpoint(f"{args.dir}/{preset}-dcp", opt, model)
        steps(model, opt, SAVED_AT, STEPS, rank, world)
        ref = torch.load(f"{args.dir}/{preset}-reference.pt")
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        report[preset] = {
            "max_rel_diff": max(
                float((full[n] - q).abs().max() / q.abs().max().clamp_min(1e-12)) for n, q in ref.items()
            ),
            "steps": sorted({int(opt.state[p]["step"]) for p in model.parameters()}),
        }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
