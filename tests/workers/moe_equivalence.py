"""Worker (``deepspeed --num_gpus W`` on CPU, gloo): the fused-expert model of tests/moe.py under FSDP2 and
under plain ``deepspeed.initialize`` ZeRO-2 / ZeRO-3 vs apollo-torch on the unfused model (one nn.Linear per
expert), 30 steps, both presets.

Parts (``--parts``): fsdp2 (fully_shard per block: Shard(0) over the 8 experts, W = 3 holds 3, 3, 2 whole
experts), zero2, zero3 (tiny buckets: flat partitions cut through experts, mid-row). Per part and preset: the
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
    model, ref_losses, ref_bytes = ref
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
    from torch.distributed.fsdp import fully_shard

    for preset, ref in refs.items():
        model = moe.make_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        losses = []
        for t in range(STEPS):
            loss = oracle.loss_fn(model, *local_batch(t))
            loss.backward()
            losses.append(global_loss(loss))
            opt.step()
            opt.zero_grad()
        weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        record(report, f"fsdp2/{preset}", weights, losses, opt, ref)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="fsdp2,zero2,zero3")
    ap.add_argument("--presets", default="apollo,apollo-mini")
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    refs = {p: reference(p) for p in args.presets.split(",")}
    report: dict = {"world": dist.get_world_size()}
    parts = {
        "fsdp2": lambda: part_fsdp2(report, refs),
        "zero2": lambda: part_zero(report, refs, 2),
        "zero3": lambda: part_zero(report, refs, 3),
    }
    run_parts(report, [(name, parts[name]) for name in args.parts.split(",")], args.out)


if __name__ == "__main__":
    main()
