"""Worker (launched by torchrun, gloo on CPU): APOLLO under a sharded layout vs the apollo-torch oracle.

--layout fsdp2: the model is fully_shard-ed (Shard(0) DTensors, uneven last shard); APOLLO reads the
                layout from the DTensors.
--layout repointed: APOLLO is built on the unsharded model, state_dict()/load_state_dict() are called, the
                model is fully_shard-ed and each group's "params" list is re-pointed to the DTensors (same
                group dicts, state untouched): exactly what accelerate's FSDP2 prepare does.
--layout accelerate: the real thing: accelerate.Accelerator(FSDP2 plugin).prepare(model, optimizer).
--layout flat:  every rank keeps a full replica and computes full-batch gradients, but binds only the
                elements of a ZeRO-1/2-like flat partition (all params concatenated, cut into W equal
                pieces, so params are split mid-row); after each step the pieces are all-gathered.
Rank 0 writes a JSON report: max relative difference to the oracle, state bytes per rank, collectives
per step.
"""

from __future__ import annotations

import argparse
import json

import oracle
import torch
import torch.distributed as dist

from apollo_dist import APOLLO, Slot
from apollo_dist.runtime import shutdown


class CollectiveCounter:
    """Counts calls of the collectives APOLLO uses (patched on torch.distributed while stepping)."""

    NAMES = (
        "reduce_scatter_tensor",
        "all_gather_into_tensor",
        "all_reduce",
        "all_gather",
        "broadcast",
        "reduce_scatter",
    )

    def __init__(self):
        self.count = 0
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(dist, name)
            self.saved[name] = fn

            def wrapped(*a, _fn=fn, **k):
                self.count += 1
                self.seen(k)
                return _fn(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def seen(self, kwargs: dict) -> None:
        """Each counted call's keyword arguments (subclasses look at more than the count)."""

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def flat_partition_slots(model: torch.nn.Module, params: list[torch.Tensor], rank: int, world: int) -> list[Slot]:
    """ZeRO-1/2-like: all params laid end to end, cut into W equal pieces (mid-param, mid-row)."""
    total = sum(p.numel() for p in params)
    piece = -(-total // world)
    lo, hi = rank * piece, min(total, (rank + 1) * piece)
    slots, off = [], 0
    for idx, p in enumerate(params):
        a, b = max(lo - off, 0), min(hi - off, p.numel())
        a, b = (a, b) if a < b else (0, 0)
        grad = lambda p=p, a=a, b=b: p.grad.view(-1)[a:b]
        slots.append(Slot(p, idx, tuple(p.shape), a, b, p.data.view(-1)[a:b], grad))
        off += p.numel()
    return slots, lo, hi


def sync_replicas(params: list[torch.Tensor], world: int) -> None:
    """After a flat-partition step every rank updated only its piece: all-gather the pieces."""
    flat = torch.cat([p.data.view(-1) for p in params])
    piece = -(-flat.numel() // world)
    padded = torch.zeros(piece * world)
    padded[: flat.numel()] = flat
    rank = dist.get_rank()
    out = torch.empty_like(padded)
    dist.all_gather_into_tensor(out, padded[rank * piece : (rank + 1) * piece].clone())
    off = 0
    for p in params:
        p.data.view(-1).copy_(out[off : off + p.numel()])
        off += p.numel()


def state_bytes(opt: APOLLO) -> int:
    """Bytes of Adam moments this rank holds (low-rank and plain)."""
    total = 0
    for b in opt.buckets:
        moments = [b.exp_avg, b.exp_avg_sq] if isinstance(b.exp_avg, torch.Tensor) else b.exp_avg + b.exp_avg_sq
        total += sum(t.numel() * t.element_size() for t in moments)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["fsdp2", "repointed", "accelerate", "flat"], required=True)
    ap.add_argument("--preset", default="apollo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nan-step", type=int, default=-1, help="put a NaN into one gradient at this step...")
    ap.add_argument("--nan-rank", type=int, default=0, help="...on this rank only")
    ap.add_argument("--nonfinite", default="skip")
    ap.add_argument("--idle", action="store_true", help="the last block's MLP sits out every third step (grad None)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = oracle.TinyNet(layers=args.layers)
    ref = oracle.TinyNet(layers=args.layers)
    ref.load_state_dict(model.state_dict())

    if args.layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = APOLLO(oracle.groups(model, args.preset), **oracle.HPARAMS, nonfinite=args.nonfinite)
    elif args.layout == "repointed":
        from torch.distributed.fsdp import fully_shard

        opt = APOLLO(oracle.groups(model, args.preset), **oracle.HPARAMS, nonfinite=args.nonfinite)
        opt.load_state_dict(opt.state_dict())  # accelerate's AcceleratedOptimizer moves state this way
        name_of = {id(p): n for n, p in model.named_parameters()}
        names = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        for g, ns in zip(opt.param_groups, names):
            g["params"] = [sharded[n] for n in ns]
    elif args.layout == "accelerate":
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        opt = APOLLO(oracle.groups(model, args.preset), **oracle.HPARAMS, nonfinite=args.nonfinite)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
            reshard_after_forward=True,
        )
        accelerator = Accelerator(fsdp_plugin=plugin)
        model, opt = accelerator.prepare(model, opt)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters()), accelerator.distributed_type
        args.layout = "fsdp2"  # from here on the same as a hand-sharded model
    else:
        opt = APOLLO(oracle.groups(model, args.preset), **oracle.HPARAMS, nonfinite=args.nonfinite)
        order = [p for g in opt.param_groups for p in g["params"]]
        slots, _, _ = flat_partition_slots(model, order, rank, world)
        opt.bind(slots, dist.group.WORLD)

    counts, raised = [], []
    for t in range(args.steps):
        x, y = oracle.batch(t)
        oracle.set_idle(model, t, oracle.IDLE_EVERY if args.idle else 0)
        if args.layout in ("fsdp2", "repointed"):  # each rank its slice of the global batch; FSDP2 averages grads
            x, y = x[rank::world], y[rank::world]
        oracle.loss_fn(model, x, y).backward()
        if t == args.nan_step and rank == args.nan_rank:
            g = model.blocks[0].mlp["up"].weight.grad
            (g._local_tensor if hasattr(g, "_local_tensor") else g).view(-1)[0] = float("nan")
        with CollectiveCounter() as cc:
            try:
                opt.step()
            except FloatingPointError:
                raised.append(t)
        counts.append(cc.count)
        opt.zero_grad()
        if args.layout == "flat":
            sync_replicas(order, world)

    if args.layout in ("fsdp2", "repointed"):
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
    else:
        full = {n: p.detach() for n, p in model.named_parameters()}
    flags = torch.tensor([len(raised), opt.skipped_steps])
    every_flags = [torch.zeros(2, dtype=flags.dtype) for _ in range(world)]
    dist.all_gather(every_flags, flags)
    sb = torch.tensor([state_bytes(opt)])
    every = [torch.zeros(1, dtype=sb.dtype) for _ in range(world)]
    dist.all_gather(every, sb)
    if rank == 0:
        ref_opt = oracle.oracle_class()(oracle.groups(ref, args.preset), **oracle.HPARAMS)
        for t in range(args.steps):
            x, y = oracle.batch(t)
            oracle.set_idle(ref, t, oracle.IDLE_EVERY if args.idle else 0)
            oracle.loss_fn(ref, x, y).backward()
            if t != args.nan_step:  # a non-finite step is skipped (or raised) everywhere
                ref_opt.step()
            ref_opt.zero_grad()
        ref_bytes = sum(
            v.numel() * v.element_size()
            for st in ref_opt.state.values()
            for k, v in st.items()
            if k in ("exp_avg", "exp_avg_sq")
        )
        worst = max(
            float((full[n].detach() - q.detach()).abs().max() / q.abs().max().clamp_min(1e-12))
            for n, q in ref.named_parameters()
        )
        lowrank = [
            (tuple(p.shape), g["rank"]) for g in oracle.groups(ref, args.preset) if "rank" in g for p in g["params"]
        ]
        report = {
            "world": world,
            "max_rel_diff": worst,
            "state_bytes": [int(e) for e in every],
            "ref_state_bytes": ref_bytes,
            "lowrank_shapes": lowrank,
            "nparams": sum(1 for _ in ref.parameters()),
            "collectives_per_step": counts,
            "raised_per_rank": [int(f[0]) for f in every_flags],
            "skipped_per_rank": [int(f[1]) for f in every_flags],
        }
        with open(args.out, "w") as f:
            json.dump(report, f)
    shutdown()  # no rank leaves while rank 0 still computes the oracle


if __name__ == "__main__":
    main()
