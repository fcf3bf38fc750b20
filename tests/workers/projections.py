"""Worker (launched by ``deepspeed --num_gpus W`` with DS_ACCELERATOR=cpu, gloo): proj="svd" and proj="dct"
under FSDP2 and plain ``deepspeed.initialize`` (ZeRO-2, ZeRO-3), and resumes at another W.

Parts (``--parts``, comma separated; each for APOLLO and APOLLO-Mini):
  fsdp2_svd, zero3_svd  30 steps (gap 7: refreshes at 0, 7, 14, 21, 28) vs the apollo-torch oracle's svd;
  fsdp2_layerwise_svd   FSDP2 with layer-wise updates (each weight refreshes inside its hook; rank
           position % W decomposes it) vs the oracle;
  fsdp2_dct, zero2_dct  the same vs one process (APOLLO, proj="dct", the same global batches);
  resume   dct: one process 10 steps -> canonical checkpoint -> FSDP2 at W, 20 more steps; svd: ZeRO-3 at W
           10 steps -> DeepSpeed native checkpoint -> one process (load_checkpoint), 20 more steps; each vs
           its uninterrupted run (refreshes at 14, 21, 28 after the resume);
  dcp      FSDP2 at W -> DCP (get_state_dict): svd resumed by FSDP2 at W (set_state_dict), dct by one process
           (load_checkpoint), each vs its uninterrupted run;
  ds_native  ZeRO-2 dct and ZeRO-3 svd: DeepSpeed's own save_checkpoint / load_checkpoint at W, likewise.
Rank 0 writes a JSON report to ``--out``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: E402
import ds_equivalence as dse  # noqa: E402  (stubs bitsandbytes, imports deepspeed for CPU)
import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from apollo_dist import APOLLO  # noqa: E402

STEPS, GAP, SPLIT = 30, 7, 10
PRESETS = ["apollo", "apollo-mini"]  # --presets narrows it


def proj_groups(model, preset: str, proj: str) -> list[dict]:
    gs = oracle.groups(model, preset, gap=GAP)
    for g in gs:
        if "rank" in g:
            g["proj"] = proj
    return gs


def one_process(opt_cls, preset: str, proj: str, steps: int = STEPS, model=None, opt=None, start: int = 0):
    """``opt_cls`` in this process on the full global batches ``start`` .. ``start + steps`` (no collective)."""
    if model is None:
        model = oracle.make_model(0)
        opt = opt_cls(proj_groups(model, preset, proj), **oracle.HPARAMS)
    for t in range(start, start + steps):
        oracle.loss_fn(model, *oracle.batch(t, size=dse.GLOBAL_BATCH)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def fsdp2(preset: str, proj: str, **kw):
    """TinyNet fully_shard-ed per block, APOLLO on its DTensors (``kw``: e.g. layerwise=True)."""
    from torch.distributed.fsdp import fully_shard

    model = oracle.make_model(0)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, APOLLO(proj_groups(model, preset, proj), **oracle.HPARAMS, **kw)


def fsdp2_train(model, opt, steps: int, start: int = 0) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for t in range(start, start + steps):
        x, y = oracle.batch(t, size=dse.GLOBAL_BATCH)
        oracle.loss_fn(model, x[rank::world], y[rank::world]).backward()
        opt.step()
        opt.zero_grad()


def fsdp2_full(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def zero(stage: int, preset: str, proj: str):
    """Plain deepspeed.initialize with APOLLO as client optimizer (tiny buckets: params cut mid-row)."""
    model = oracle.make_model(0)
    opt = APOLLO(proj_groups(model, preset, proj), **oracle.HPARAMS)
    cfg = dse.plain_config(dse.base_config(stage, dse.GLOBAL_BATCH // dist.get_world_size()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, model, opt


def projections(opt) -> dict[int, list]:
    """Each low-rank param's projection state by position (the whole P / the indices: the same on every rank)."""
    return {i: st["projection"].tolist() for i, st in opt.state_dict()["state"].items() if "projection" in st}


def compare(report: dict, key: str, full: dict, opt, preset: str, proj: str) -> None:
    """Rank 0: the max relative difference to the oracle (svd) or to one process (dct), and for dct whether
    every weight selected the same basis vectors at the last refresh."""
    state = projections(opt)
    if dist.get_rank() == 0:
        ref, ref_opt = one_process(oracle.oracle_class() if proj == "svd" else APOLLO, preset, proj)
        report[key] = dse.rel_diff(full, ref)
        if proj == "dct":
            report[f"{key}/same_indices"] = state == projections(ref_opt) and len(state) == 8


def part_fsdp2(report: dict, proj: str, layerwise: bool = False) -> None:
    for preset in PRESETS:
        model, opt = fsdp2(preset, proj, layerwise=layerwise)
        fsdp2_train(model, opt, STEPS)
        name = f"fsdp2{'_layerwise' if layerwise else ''}_{proj}/{preset}"
        compare(report, name, fsdp2_full(model), opt, preset, proj)


def part_zero(report: dict, stage: int, proj: str) -> None:
    for preset in PRESETS:
        engine, model, opt = zero(stage, preset, proj)
        dse.train(engine, STEPS)
        full = dse.full_params(engine, model)
        compare(report, f"zero{stage}_{proj}/{preset}", full, opt, preset, proj)
        engine.destroy()


def part_resume(report: dict, ckpt_dir: str) -> None:
    from apollo_dist.checkpoint import LiveSource, load_checkpoint, save_canonical

    rank = dist.get_rank()
    for preset in PRESETS:
        # dct: one process -> canonical -> FSDP2 at W
        path = os.path.join(ckpt_dir, f"dct_{preset}")
        if rank == 0:
            model, opt = one_process(APOLLO, preset, "dct", SPLIT)
            save_canonical(LiveSource(opt, model), path)
        dist.barrier()
        model, opt = fsdp2(preset, "dct")
        load_checkpoint(path, opt, model)
        fsdp2_train(model, opt, STEPS - SPLIT, start=SPLIT)
        full = fsdp2_full(model)
        if rank == 0:
            ref, _ = one_process(APOLLO, preset, "dct")
            report[f"resume/dct/one->fsdp2/{preset}"] = dse.rel_diff(full, ref)
        # svd: ZeRO-3 at W -> DeepSpeed's native checkpoint -> one process
        engine, model, opt = zero(3, preset, "svd")
        dse.train(engine, SPLIT)
        engine.save_checkpoint(os.path.join(ckpt_dir, f"svd_{preset}"), tag="t")
        engine.destroy()
        dist.barrier()
        if rank == 0:
            model = oracle.make_model(0)
            opt = APOLLO(proj_groups(model, preset, "svd"), **oracle.HPARAMS)
            load_checkpoint(os.path.join(ckpt_dir, f"svd_{preset}"), opt, model, tag="t")
            one_process(APOLLO, preset, "svd", STEPS - SPLIT, model, opt, start=SPLIT)
            ref, _ = one_process(oracle.oracle_class(), preset, "svd")
            report[f"resume/svd/zero3->one/{preset}"] = dse.rel_diff(dict(model.named_parameters()), ref)
        dist.barrier()


def part_dcp(report: dict, ckpt_dir: str) -> None:
    """FSDP2 at W, 10 steps, DCP save (get_state_dict); svd: a fresh FSDP2 run at W loads it (set_state_dict);
    dct: one process loads it (load_checkpoint's DCP reader); 20 more steps each, vs the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from apollo_dist.checkpoint import load_checkpoint

    rank = dist.get_rank()
    for preset in PRESETS:
        for proj in ("svd", "dct"):
            path = os.path.join(ckpt_dir, f"dcp_{proj}_{preset}")
            model, opt = fsdp2(preset, proj)
            fsdp2_train(model, opt, SPLIT)
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            ref_cls = oracle.oracle_class() if proj == "svd" else APOLLO
            if proj == "svd":  # same W, native: torch's own loader
                model, opt = fsdp2(preset, proj)
                msd, osd = get_state_dict(model, opt)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=path)
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                fsdp2_train(model, opt, STEPS - SPLIT, start=SPLIT)
                full = fsdp2_full(model)
                if rank == 0:
                    report[f"dcp/svd/fsdp2->fsdp2/{preset}"] = dse.rel_diff(full, one_process(ref_cls, preset, proj)[0])
            elif rank == 0:  # another W: apollo_dist's loader reads the DCP files
                model = oracle.make_model(0)
                opt = APOLLO(proj_groups(model, preset, proj), **oracle.HPARAMS)
                load_checkpoint(path, opt, model)
                one_process(APOLLO, preset, proj, STEPS - SPLIT, model, opt, start=SPLIT)
                ref, _ = one_process(ref_cls, preset, proj)
                report[f"dcp/dct/fsdp2->one/{preset}"] = dse.rel_diff(dict(model.named_parameters()), ref)
            dist.barrier()


def part_ds_native(report: dict, ckpt_dir: str) -> None:
    """ZeRO-2 (dct) and ZeRO-3 (svd) at W: 10 steps, engine.save_checkpoint, a fresh engine's
    load_checkpoint (DeepSpeed's own, same W), 20 more steps: vs the uninterrupted run."""
    for preset in PRESETS:
        for stage, proj in ((2, "dct"), (3, "svd")):
            path = os.path.join(ckpt_dir, f"ds_{proj}_{preset}")
            engine, _, _ = zero(stage, preset, proj)
            dse.train(engine, SPLIT)
            engine.save_checkpoint(path, tag="t")
            engine.destroy()
            engine, model, opt = zero(stage, preset, proj)
            engine.load_checkpoint(path, tag="t")
            dse.train(engine, STEPS - SPLIT, start=SPLIT)
            compare(report, f"ds_native/zero{stage}_{proj}/{preset}", dse.full_params(engine, model), opt, preset, proj)
            engine.destroy()
            dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="fsdp2_svd,zero3_svd,fsdp2_dct,zero2_dct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    PRESETS[:] = args.presets.split(",")
    deepspeed.init_distributed(dist_backend="gloo")
    report: dict = {"world": dist.get_world_size()}
    parts = {
        "fsdp2_svd": lambda: part_fsdp2(report, "svd"),
        "fsdp2_dct": lambda: part_fsdp2(report, "dct"),
        "fsdp2_layerwise_svd": lambda: part_fsdp2(report, "svd", layerwise=True),
        "zero3_svd": lambda: part_zero(report, 3, "svd"),
        "zero2_dct": lambda: part_zero(report, 2, "dct"),
        "zero3_dct": lambda: part_zero(report, 3, "dct"),
        "zero2_svd": lambda: part_zero(report, 2, "svd"),
        "zero1_svd": lambda: part_zero(report, 1, "svd"),
        "resume": lambda: part_resume(report, args.ckpt_dir),
        "dcp": lambda: part_dcp(report, args.ckpt_dir),
        "ds_native": lambda: part_ds_native(report, args.ckpt_dir),
    }
    dse.run_parts(report, [(name, parts[name]) for name in args.parts.split(",")], args.out)


if __name__ == "__main__":
    main()
