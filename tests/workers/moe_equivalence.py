"""Worker (``deepspeed --num_gpus W`` on CPU, gloo): the fused-expert model of tests/moe.py under FSDP2 and
under plain ``deepspeed.initialize`` ZeRO-2 / ZeRO-3 vs apollo-torch on the unfused model (one nn.Linear per
expert), 30 steps, both presets.

Parts (``--parts``): fsdp2 (fully_shard per block: Shard(0) over the 8 experts, W = 3 holds 3, 3, 2 whole
experts), zero1, zero2, zero3 (tiny buckets: flat partitions cut through experts, mid-row); fsdp2_few (E = 2 < W),
hsdp; save / dcp_save and resume_* (checkpoints at another W). Per part and preset: the
max relative difference of the weights and of the per-step losses, the state bytes per rank against the
reference's. Rank 0 writes the report to ``--out``.
"""

from __future__ import annotations

import argparse

import moe
import oracle
import torch
import torch.distributed as dist
from core_equivalence import state_bytes
from ds_equivalence import GLOBAL_BATCH, base_config, deepspeed, full_params, gather_list, plain_config, run_parts

from apollo_dist import APOLLO

STEPS = 30


def reference(preset: str) -> tuple[moe.MoENet, list[float], int]:
    """apollo-torch on the unfused model, full global batch: the model, its losses and its state bytes."""
    model = moe.make_model(fused=False)
    opt = oracle.oracle_class()(oracle.groups(model, preset), **oracle.HPARAMS)
    losses = []
    for t in range(STEPS):
        loss = oracle.loss_fn(model, *moe.batch(t))
        loss.backward()
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    nbytes = sum(
        v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg")
    )
    return model, losses, nbytes


def local_batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = moe.batch(t)
    per = GLOBAL_BATCH // dist.get_world_size()
    lo = dist.get_rank() * per
    return x[lo : lo + per], y[lo : lo + per]


def global_loss(loss: torch.Tensor) -> float:
    """The mean of the ranks' mean losses (equal shares): the global batch's loss."""
    x = loss.detach().reshape(1).clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def record(report: dict, key: str, weights: dict, losses: list[float], opt: APOLLO, ref: tuple) -> None:
    """``losses``: of the last len(losses) steps."""
    model, ref_losses, ref_bytes = ref
    ref_losses = ref_losses[len(ref_losses) - len(losses) :]
    mine = moe.fused_state(model)
    report[key] = {
        "max_rel_diff": max(float((weights[k] - v).abs().max() / v.abs().max()) for k, v in mine.items()),
        "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        "state_bytes": gather_list(state_bytes(opt)),
        "ref_state_bytes": ref_bytes,
        "experts_held": gather_list(
            [s.expert for b in opt.buckets for s in b.slots if s.expert is not None and s.numel]
        ),
    }


def part_fsdp2(report: dict, refs: dict) -> None:
    _train_fully_sharded(report, refs, "fsdp2", mesh=None)


def part_hsdp(report: dict, refs: dict) -> None:
    """HSDP on a (2, W / 2) (replicate, shard) mesh: (Replicate(), Shard(0)) experts, state sharded over the shard
    dim and identical on the replicas."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    _train_fully_sharded(report, refs, "hsdp", mesh=mesh)


def _steps(model: torch.nn.Module, opt, start: int, stop: int) -> list[float]:
    """Steps ``start`` .. ``stop`` - 1 on this rank's share of each batch; the global losses."""
    losses = []
    for t in range(start, stop):
        loss = oracle.loss_fn(model, *local_batch(t))
        loss.backward()
        losses.append(global_loss(loss))
        opt.step()
        opt.zero_grad()
    return losses


def _train_fully_sharded(report: dict, refs: dict, name: str, mesh) -> None:
    """STEPS steps of the model with each block and the root under fully_shard (``mesh``: HSDP's 2-D mesh)."""
    from torch.distributed.fsdp import fully_shard

    for preset, ref in refs.items():
        model = moe.make_model()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        losses = _steps(model, opt, 0, STEPS)
        weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        record(report, f"{name}/{preset}", weights, losses, opt, ref)


def part_zero(report: dict, refs: dict, stage: int) -> None:
    for preset, ref in refs.items():
        model = moe.make_model()
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        cfg = plain_config(base_config(stage, GLOBAL_BATCH // dist.get_world_size()))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        losses = []
        for t in range(STEPS):
            loss = oracle.loss_fn(engine, *local_batch(t))
            engine.backward(loss)
            engine.step()
            losses.append(global_loss(loss))
        record(report, f"zero{stage}/{preset}", full_params(engine, model), losses, opt, ref)
        engine.destroy()


SAVED_AT = 12  # steps before the checkpoint (past the refreshes at 7: the seeds' chain has advanced)


def part_save(ckpt: str, refs: dict) -> None:
    """ZeRO-2 (partitions cut through experts): SAVED_AT steps, a native checkpoint per preset in ``ckpt``/preset."""
    for preset in refs:
        model = moe.make_model()
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        cfg = plain_config(base_config(2, GLOBAL_BATCH // dist.get_world_size()))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        for t in range(SAVED_AT):
            engine.backward(oracle.loss_fn(engine, *local_batch(t)))
            engine.step()
        engine.save_checkpoint(f"{ckpt}/{preset}", tag="moe")
        if dist.get_rank() == 0:  # the canonical form: one entry per expert slice
            from apollo_dist.checkpoint import open_checkpoint, save_canonical

            save_canonical(open_checkpoint(f"{ckpt}/{preset}", tag="moe").source, f"{ckpt}/{preset}-canonical")
        dist.barrier()
        engine.destroy()


def part_resume(report: dict, ckpt: str, refs: dict, engine_kind: str) -> None:
    """The ZeRO-2 checkpoint resumed under ZeRO-2 or ZeRO-3 (apollo_dist.deepspeed.load_checkpoint: at the same W
    and stage DeepSpeed's own load, else the any-W loader) or FSDP2 (the canonical form,
    apollo_dist.checkpoint.load_checkpoint); the remaining steps; vs the reference."""
    import apollo_dist.deepspeed as ads
    from apollo_dist.checkpoint import load_checkpoint

    for preset, ref in refs.items():
        model = moe.make_model(seed=1)  # other initial weights: they must come from the checkpoint
        losses = []
        if engine_kind in ("zero2", "zero3"):
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
            cfg = plain_config(base_config(int(engine_kind[-1]), GLOBAL_BATCH // dist.get_world_size()))
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            ads.load_checkpoint(engine, f"{ckpt}/{preset}", tag="moe")
            for t in range(SAVED_AT, STEPS):
                loss = oracle.loss_fn(engine, *local_batch(t))
                engine.backward(loss)
                engine.step()
                losses.append(global_loss(loss))
            weights = full_params(engine, model)
            engine.destroy()
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
            load_checkpoint(f"{ckpt}/{preset}-canonical", opt, model)
            losses += _steps(model, opt, SAVED_AT, STEPS)
            weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        record(report, f"resume-{engine_kind}/{preset}", weights, losses, opt, ref)


def few_groups(model: torch.nn.Module, preset: str) -> list[dict]:
    from apollo_dist import param_groups

    rank = 5 if preset == "apollo" else 1
    groups = param_groups(model, target_modules=["experts"], preset=preset, rank=rank, update_proj_gap=7)
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def part_fsdp2_few(report: dict, presets: list[str]) -> None:
    """E = 2 < W = 3 under FSDP2: rank 2 holds no expert (empty expert slots, no moments), vs the oracle."""
    from torch.distributed.fsdp import fully_shard

    for preset in presets:
        ref = moe.make_few(fused=False)
        ref_opt = oracle.oracle_class()(few_groups(ref, preset), **oracle.HPARAMS)
        model = fully_shard(moe.make_few())
        opt = APOLLO(few_groups(model, preset), **oracle.HPARAMS)
        for t in range(STEPS):
            oracle.loss_fn(ref, *moe.batch(t)).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            oracle.loss_fn(model, *local_batch(t)).backward()
            opt.step()
            opt.zero_grad()
        weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        mine = moe.fused_state(ref)
        report[f"fsdp2_few/{preset}"] = {
            "max_rel_diff": max(float((weights[k] - v).abs().max() / v.abs().max()) for k, v in mine.items()),
            "experts_held": gather_list(
                [s.expert for b in opt.buckets for s in b.slots if s.expert is not None and s.numel]
            ),
            "state_bytes": gather_list(state_bytes(opt)),
        }


def fsdp2_model(seed: int = 0) -> moe.MoENet:
    from torch.distributed.fsdp import fully_shard

    model = moe.make_model(seed=seed)
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def part_dcp_save(ckpt: str, refs: dict) -> None:
    """FSDP2 (experts sharded over W): SAVED_AT steps, then DCP's get_state_dict saved with dcp.save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for preset in refs:
        model = fsdp2_model()
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        for t in range(SAVED_AT):
            oracle.loss_fn(model, *local_batch(t)).backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{ckpt}/{preset}-dcp")


def part_resume_dcp(report: dict, ckpt: str, refs: dict) -> None:
    """The DCP checkpoint of another W: through DCP itself (set_state_dict: DCP reshards the (E, C, r) moments) and
    through apollo_dist.checkpoint.load_checkpoint (the DCP reader, one expert slice at a time); the rest; vs ref."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from apollo_dist.checkpoint import load_checkpoint

    for preset, ref in refs.items():
        for how in ("dcp", "loader"):
            model = fsdp2_model(seed=1)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
            if how == "dcp":
                msd, osd = get_state_dict(model, opt)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=f"{ckpt}/{preset}-dcp")
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:
                load_checkpoint(f"{ckpt}/{preset}-dcp", opt, model)
            losses = _steps(model, opt, SAVED_AT, STEPS)
            weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
            record(report, f"resume-{how}/{preset}", weights, losses, opt, ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="fsdp2,zero2,zero3")
    ap.add_argument("--presets", default="apollo,apollo-mini")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    refs = {p: reference(p) for p in args.presets.split(",")}
    report: dict = {"world": dist.get_world_size()}
    parts = {
        "fsdp2": lambda: part_fsdp2(report, refs),
        "zero1": lambda: part_zero(report, refs, 1),
        "zero2": lambda: part_zero(report, refs, 2),
        "zero3": lambda: part_zero(report, refs, 3),
        "fsdp2_few": lambda: part_fsdp2_few(report, list(refs)),
        "hsdp": lambda: part_hsdp(report, refs),
        "dcp_save": lambda: part_dcp_save(args.ckpt_dir, refs),
        "resume_dcp": lambda: part_resume_dcp(report, args.ckpt_dir, refs),
        "save": lambda: part_save(args.ckpt_dir, refs),
        "resume_zero2": lambda: part_resume(report, args.ckpt_dir, refs, "zero2"),
        "resume_zero3": lambda: part_resume(report, args.ckpt_dir, refs, "zero3"),
        "resume_fsdp2": lambda: part_resume(report, args.ckpt_dir, refs, "fsdp2"),
    }
    run_parts(report, [(name, parts[name]) for name in args.parts.split(",")], args.out)


if __name__ == "__main__":
    main()
