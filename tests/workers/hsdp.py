"""Worker (torchrun; gloo on CPU, or NCCL with --device cuda): APOLLO under FSDP2 on 2-D (replicate, shard)
meshes vs the oracle (on the same device type: CPU and CUDA generators draw different projections).

One launch runs every (mesh, preset) pair given, one after another in the same process group (a
launch costs more than a run on 2 cores): the model is fully_shard-ed per block and at the root on
``init_device_mesh(device, (R, S), mesh_dim_names=("replicate", "shard"))`` (HSDP: (Replicate(),
Shard(0)) DTensors), each rank trains on its slice of the global batch, and rank 0 reports per run:
(also: half the steps on one mesh, a DCP checkpoint, the other half on another mesh: "FROM:TO/preset";
and that checkpoint converted to the canonical form and loaded on the first mesh: "FROM:canonical:FROM/preset")
max relative difference to the oracle, Adam-moment bytes per rank, APOLLO's collectives per step
(all, and those on another group than the shard sub-mesh's), the replicas' agreement on the state.
"""

from __future__ import annotations

import argparse
import json
import os

import oracle
import torch
import torch.distributed as dist
from core_equivalence import CollectiveCounter, state_bytes  # the worker beside this one

from apollo_dist import APOLLO
from apollo_dist.core import LowRankBucket
from apollo_dist.runtime import shutdown

DEVICE = torch.device("cpu")  # --device cuda: this rank's GPU (NCCL)
PROJ = "random"  # --proj: the low-rank group's projection (the oracle runs the same)


def ranks_of(group) -> list[int]:
    """The global ranks of a process group (None: the world)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


class GroupCounter(CollectiveCounter):
    """CollectiveCounter that also counts calls on another process group than ``group``."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        self.group, self.elsewhere = group, 0

    def seen(self, kwargs: dict) -> None:
        self.elsewhere += ranks_of(kwargs.get("group")) != ranks_of(self.group)


def dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


TP_DIMS = {
    "d": 12,
    "h": 24,
    "vocab": 40,
}  # tensor parallel needs dims divisible by the TP size (DTensor's row-wise input)
TP_PLAN = {"attn.q": "colwise", "attn.o": "rowwise", "mlp.up": "colwise", "mlp.down": "rowwise"}


def batch(t: int, tp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of step ``t`` on this rank's device (tokens of the TP model's vocabulary)."""
    return tuple(v.to(DEVICE) for v in oracle.batch(t, vocab=TP_DIMS["vocab"] if tp else 37))


def build(mesh_shape: tuple[int, int], layers: int, tp: bool):
    """The sharded model and its mesh. HSDP: (replicate, shard) mesh, fully_shard on it. TP (torchtitan's
    order and plan): (dp, tp) mesh, the embedding vocab-parallel (row-wise), each block's linears column-/
    row-wise and the head column-wise on "tp", then fully_shard on "dp" (norms: dp only)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(DEVICE.type, mesh_shape, mesh_dim_names=("dp", "tp") if tp else ("replicate", "shard"))
    torch.manual_seed(0)
    model = oracle.TinyNet(layers=layers, **(TP_DIMS if tp else {})).to(DEVICE)
    if tp:
        parallelize_module(
            model,
            mesh["tp"],
            {
                "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                "head": ColwiseParallel(output_layouts=Replicate()),
            },
        )
    for block in model.blocks:
        if tp:
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            parallelize_module(block, mesh["tp"], {k: styles[v]() for k, v in TP_PLAN.items()})
        fully_shard(block, mesh=mesh["dp"] if tp else mesh)
    fully_shard(model, mesh=mesh["dp"] if tp else mesh)
    return model, mesh


def run(
    mesh_shape: tuple[int, int],
    preset: str,
    steps: int,
    layers: int,
    start: int = 0,
    load: str | None = None,
    save: str | None = None,
    canonical: str | None = None,
    nan: tuple[int, int] | None = None,
    tp: bool = False,
) -> dict:
    """Train steps [start, steps) on an (R, S) HSDP mesh, or with ``tp`` on a (D, T) FSDP2 x TP mesh; this
    rank's results (full params gathered). ``load``: a DCP checkpoint to start from (written on another
    mesh: DCP reshards), ``canonical``: a canonical one (apollo_dist.checkpoint.load_canonical); ``save``:
    where to write a DCP one at the end; ``nan`` = (step, rank): that rank's loss is NaN at that step
    (before FSDP2 reduces the gradients)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model, mesh = build(mesh_shape, layers, tp)
    placements = {tuple(map(str, p.placements)) for n, p in model.named_parameters() if "blocks" in n and p.dim() == 2}
    opt = APOLLO(oracle.groups(model, preset, proj=PROJ), **oracle.HPARAMS)
    # APOLLO's group: HSDP's shard sub-mesh; FSDP2 x TP: every rank (dp and tp flattened)
    group_ranks = list(range(world)) if tp else ranks_of(mesh.get_group("shard"))
    assert ranks_of(opt.process_group) == group_ranks, (ranks_of(opt.process_group), group_ranks)
    if load:
        state = dcp_state(model, opt)
        dcp.load(state, checkpoint_id=load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert opt.steps_taken == start, (opt.steps_taken, start)
    if canonical:
        from apollo_dist.checkpoint import load_canonical

        load_canonical(canonical, opt, model)
        assert opt.steps_taken == start, (opt.steps_taken, start)
    counts, elsewhere = [], []
    for t in range(start, steps):
        x, y = batch(t, tp)
        # data parallel over all R x S ranks (HSDP), over the D dp ranks (TP: the tp ranks see the same batch)
        d, D = (mesh.get_coordinate()[0], mesh_shape[0]) if tp else (rank, world)
        x, y = x[d::D], y[d::D]
        loss = oracle.loss_fn(model, x, y)
        if nan == (t, rank):
            loss = loss * float("nan")
        loss.backward()
        with GroupCounter(opt.process_group) as cc:
            opt.step()
        counts.append(cc.count)
        elsewhere.append(cc.elsewhere)
        opt.zero_grad()
    if save:
        dcp.save(dcp_state(model, opt), checkpoint_id=save)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    # the replicas of a shard hold the same state: compare the local moments across the replicate group
    local = torch.cat(
        [
            getattr(v, "_local_tensor", v).reshape(-1)
            for st in opt.state.values()
            for k, v in sorted(st.items())
            if k in ("exp_avg", "exp_avg_sq", "limiter_norm")
        ]
    )
    replicas_equal = True
    if not tp:
        copies = [torch.zeros_like(local) for _ in range(mesh_shape[0])]
        dist.all_gather(copies, local, group=mesh.get_group("replicate"))
        replicas_equal = all(torch.equal(c, copies[0]) for c in copies)
    moment_placements = {
        tuple(map(str, v.placements)) for st in opt.state.values() for k, v in st.items() if k == "exp_avg"
    }
    sb = torch.tensor([state_bytes(opt), lowrank_state_bytes(opt)], device=DEVICE)
    every = [torch.zeros(2, dtype=sb.dtype, device=DEVICE) for _ in range(world)]
    dist.all_gather(every, sb)
    skipped = [torch.zeros(1, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    dist.all_gather(skipped, torch.tensor([opt.skipped_steps], device=DEVICE))
    return {
        "skipped_per_rank": [int(v) for v in skipped],
        "full": full,
        "collectives_per_step": counts,
        "collectives_elsewhere": elsewhere,
        "replicas_equal": replicas_equal,
        "state_bytes": [int(e[0]) for e in every],
        "lowrank_state_bytes": [int(e[1]) for e in every],
        "shard_size": world if tp else mesh_shape[1],
        "param_placements": sorted(placements),
        "moment_placements": sorted(moment_placements),
        "tp": tp,
    }


def chunk(size: int, parts: int, k: int) -> tuple[int, int]:
    """Part k of [0, size) cut by torch.chunk's rule (ceil(size / parts) each, the last ones short or empty)."""
    step = -(-size // parts)
    return min(size, k * step), min(size, (k + 1) * step)


def grid_run(grid: tuple[int, int], preset: str, steps: int, start: int = 0, canonical: str | None = None) -> dict:
    """Tensor-parallel-like layout through ``APOLLO.bind``: rank w holds block (w // C, w % C) of a
    (R x C) grid of every 2-D param (rows and columns cut by torch.chunk's rule), a flat piece of every
    1-D one. Every rank keeps a full replica and full-batch gradients; after each step the held pieces
    are summed into every replica (each element is held by one rank). ``canonical``: a canonical checkpoint
    of step ``start`` to load first (each rank reads its blocks and owned channels)."""
    from apollo_dist import Slot

    rank, world = dist.get_rank(), dist.get_world_size()
    gr, gc = grid
    torch.manual_seed(0)
    model = oracle.TinyNet(layers=2).to(DEVICE)
    opt = APOLLO(oracle.groups(model, preset, proj=PROJ), **oracle.HPARAMS)
    order = [p for g in opt.param_groups for p in g["params"]]
    slots, held = [], []
    for idx, p in enumerate(order):
        if p.dim() == 2:
            (r0, r1), (c0, c1) = chunk(p.shape[0], gr, rank // gc), chunk(p.shape[1], gc, rank % gc)
            cut = (slice(r0, r1), slice(c0, c1))
            data = p.data[cut].contiguous().view(-1)  # the engine's own buffer: a block is not a view of the param
            grad = lambda p=p, cut=cut: p.grad[cut].reshape(-1)
            slots.append(Slot(p, idx, tuple(p.shape), 0, 0, data, grad, block=(r0, r1, c0, c1)))
        else:
            a, b = chunk(p.numel(), world, rank)
            cut = (slice(a, b),)
            data = p.data.view(-1)[a:b]
            slots.append(Slot(p, idx, tuple(p.shape), a, b, data, lambda p=p, a=a, b=b: p.grad.view(-1)[a:b]))
        held.append((p, cut, data))
    opt.bind(slots, dist.group.WORLD)

    def sync() -> None:
        with torch.no_grad():
            for p, cut, data in held:
                mine = torch.zeros_like(p)
                mine[cut] = data.view(mine[cut].shape)
                dist.all_reduce(mine)
                p.copy_(mine)

    if canonical:
        from apollo_dist.checkpoint import load_canonical

        load_canonical(canonical, opt, model)
        assert opt.steps_taken == start, (opt.steps_taken, start)
        sync()  # the replicas take the loaded master weights
    counts = []
    for t in range(start, steps):
        oracle.loss_fn(model, *batch(t, False)).backward()
        with CollectiveCounter() as cc:
            opt.step()
        counts.append(cc.count)
        opt.zero_grad()
        sync()
    sb = torch.tensor([state_bytes(opt), lowrank_state_bytes(opt)], device=DEVICE)
    every = [torch.zeros(2, dtype=sb.dtype, device=DEVICE) for _ in range(world)]
    dist.all_gather(every, sb)
    return {
        "full": {n: p.detach() for n, p in model.named_parameters()},
        "collectives_per_step": counts,
        "collectives_elsewhere": [0] * len(counts),
        "state_bytes": [int(e[0]) for e in every],
        "lowrank_state_bytes": [int(e[1]) for e in every],
        "shard_size": world,
        "replicas_equal": True,
    }


def lowrank_state_bytes(opt: APOLLO) -> int:
    """Bytes of the low-rank moments this rank holds (the channels it owns)."""
    return sum(
        t.numel() * t.element_size()
        for b in opt.buckets
        if isinstance(b, LowRankBucket)
        for t in (b.exp_avg, b.exp_avg_sq)
    )


def oracle_run(preset: str, tp: bool, skip: int, steps: int) -> tuple:
    """apollo-torch on the whole model, ``steps`` steps (step ``skip`` not taken): (model, Adam-moment
    bytes (all, low-rank params'), [(shape, rank)] of the low-rank params)."""
    torch.manual_seed(0)
    ref = oracle.TinyNet(**(TP_DIMS if tp else {})).to(DEVICE)
    ref_opt = oracle.oracle_class()(oracle.groups(ref, preset, proj=PROJ), **oracle.HPARAMS)
    for t in range(steps):
        oracle.loss_fn(ref, *batch(t, tp)).backward()
        if t != skip:
            ref_opt.step()
        ref_opt.zero_grad()
    lowrank_params = {id(q) for g in ref_opt.param_groups if "rank" in g for q in g["params"]}
    moments = [(id(q), v) for q, st in ref_opt.state.items() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    ref_bytes = (
        sum(v.numel() * v.element_size() for _, v in moments),
        sum(v.numel() * v.element_size() for q, v in moments if q in lowrank_params),
    )
    lowrank = [
        (tuple(q.shape), g["rank"]) for g in oracle.groups(ref, preset, proj=PROJ) if "rank" in g for q in g["params"]
    ]
    return ref, ref_bytes, lowrank


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshes", default="2x2,1x4,4x1", help="comma-separated RxS")
    ap.add_argument("--presets", default="apollo,apollo-mini")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--count-layers", type=int, default=5, help="also a few steps of a deeper model on the first mesh")
    ap.add_argument(
        "--dcp-resume",
        default="2x2:1x4",
        help="FROM:TO meshes: half the steps on FROM, DCP save, load on TO, the other half (first preset); empty: none",
    )
    ap.add_argument("--tp-meshes", default="", help="comma-separated DxT: FSDP2 x TP runs (12/24-wide model)")
    ap.add_argument("--tp-resume", default="", help="FROM:TO TP meshes, like --dcp-resume")
    ap.add_argument(
        "--grids", default="", help="comma-separated RxC: also the block layout of `grid_run` (R x C = W), first preset"
    )
    ap.add_argument(
        "--nan-step",
        type=int,
        default=-1,
        help="also a run on the first mesh whose --nan-rank's loss is NaN at this step (-1: none)",
    )
    ap.add_argument("--nan-rank", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--proj", default="random", help="random | svd (the oracle has svd too)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    global DEVICE, PROJ
    PROJ = args.proj
    if args.device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    rank = dist.get_rank()
    meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]
    presets = args.presets.split(",")
    results = {f"{r}x{s}/{p}": run((r, s), p, args.steps, 2) for r, s in meshes for p in presets}
    deep = run(meshes[0], presets[0], 4, args.count_layers) if args.count_layers else None
    tp_meshes = [tuple(int(v) for v in m.split("x")) for m in filter(None, args.tp_meshes.split(","))]
    deep_tp = run(tp_meshes[0], presets[0], 4, args.count_layers, tp=True) if args.count_layers and tp_meshes else None
    half = args.steps // 2
    for spec, tp in ((args.dcp_resume, False), (args.tp_resume, True)):
        if not spec:
            continue
        # half the steps on FROM, a DCP checkpoint, the other half on TO (DCP reshards); the same checkpoint
        # converted to the canonical form (offline, rank 0) and loaded on FROM
        src, dst = (tuple(int(v) for v in m.split("x")) for m in spec.split(":"))
        name = spec.split(":")[0]
        path = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"{'tp' if tp else 'hsdp'}-dcp")
        tag = "tp" if tp else ""
        run(src, presets[0], half, 2, save=path, tp=tp)
        results[f"{tag}{spec}/{presets[0]}"] = run(dst, presets[0], args.steps, 2, start=half, load=path, tp=tp)
        if rank == 0:
            from apollo_dist.convert import convert

            convert(path, path + ".canonical")
        dist.barrier()
        results[f"{tag}{name}:canonical:{tag}{name}/{presets[0]}"] = run(
            src, presets[0], args.steps, 2, start=half, canonical=path + ".canonical", tp=tp
        )
        for g in filter(None, args.grids.split(",")[:1]) if not tp else ():  # and into the first block layout
            results[f"{name}:canonical:grid{g}/{presets[0]}"] = grid_run(
                tuple(int(v) for v in g.split("x")), presets[0], args.steps, start=half, canonical=path + ".canonical"
            )

    for g in filter(None, args.grids.split(",")):
        results[f"grid{g}/{presets[0]}"] = grid_run(tuple(int(v) for v in g.split("x")), presets[0], args.steps)
    for m in filter(None, args.tp_meshes.split(",")):
        for p in presets:
            results[f"tp{m}/{p}"] = run(tuple(int(v) for v in m.split("x")), p, args.steps, 2, tp=True)
    if args.nan_step >= 0:  # one rank's loss NaN: every replica group must skip that step (first mesh, preset)
        r, s = meshes[0]
        results[f"{r}x{s}:nan/{presets[0]}"] = run(
            meshes[0], presets[0], args.steps, 2, nan=(args.nan_step, args.nan_rank)
        )

    if rank == 0:
        report, refs = {}, {}
        for key, res in results.items():
            p, tp, skip = key.rsplit("/", 1)[1], bool(res.get("tp")), args.nan_step if ":nan" in key else -1
            if (p, tp, skip) not in refs:
                refs[(p, tp, skip)] = oracle_run(p, tp, skip, args.steps)
            ref, ref_bytes, lowrank = refs[(p, tp, skip)]
            worst = max(
                float((res["full"][n] - q.detach()).abs().max() / q.abs().max().clamp_min(1e-12))
                for n, q in ref.named_parameters()
            )
            report[key] = {
                **{k: v for k, v in res.items() if k != "full"},
                "max_rel_diff": worst,
                "ref_state_bytes": ref_bytes[0],
                "ref_lowrank_state_bytes": ref_bytes[1],
                "lowrank_shapes": lowrank,
            }
        for key, d in (("deep", deep), ("deep-tp", deep_tp)):
            if d is not None:
                report[key] = {
                    "layers": args.count_layers,
                    "collectives_per_step": d["collectives_per_step"],
                    "collectives_elsewhere": d["collectives_elsewhere"],
                }
        with open(args.out, "w") as f:
            json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
