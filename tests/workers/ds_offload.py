"""Worker (``deepspeed --num_gpus W`` with DS_ACCELERATOR=cpu, gloo): ZeRO-Offload / ZeRO-Infinity (CPU) with
APOLLO against the same run without offload. Engines and helpers are ds_equivalence's.

Parts (``--parts``, comma separated; ``--cells`` picks the equality cells, e.g. "2/apollo/opt,3/apollo-mini/param"):
  adamw   torch AdamW (zero_force_ds_cpu_optimizer false) with and without offload_optimizer, ZeRO-2 and ZeRO-3:
          DeepSpeed's offload path itself on CPU (the bar the APOLLO cells are compared with);
  equal   per cell stage/preset/kind (kind: "opt" = offload_optimizer cpu, "param" = offload_optimizer and
          offload_param cpu, ZeRO-3), 30 steps, fp32, tiny buckets, 2 micro-batches (no clipping: see CLIP):
          plain deepspeed.initialize with offload vs the adapter without, parameters and APOLLO's state;
  idle    a param without gradient every third step under offload (ZeRO-2, ZeRO-3): equal to the run without;
  resume  ZeRO-3, 6 steps offloaded, save, resume without offload for 6 more (and the reverse), vs the
          uninterrupted run without offload (DeepSpeed's own load);
  resume_any  the same across stages (ZeRO-2 offloaded <-> ZeRO-3 not): APOLLO's any-W loader;
  load    ``--load-dir`` (written by another launch, at another W) into ZeRO-3 offloaded, vs uninterrupted here.
Rank 0 writes a JSON report to ``--out``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ds_equivalence as dse  # noqa: E402  (stubs bitsandbytes, switches off DeepSpeed's shm all-reduce op)
import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import apollo_dist.deepspeed as ads  # noqa: E402
from apollo_dist import APOLLO  # noqa: E402

deepspeed = dse.deepspeed
STEPS = dse.STEPS


# gradient_clipping of the engines (--clip; default off). With clipping, DeepSpeed's offload path sums the global
# gradient norm from per-param norms, in another order than without offload: the clip factor differs in its last
# bits (APOLLO-Mini, whose eps-sensitive rank-1 Adam shows it: 1.7e-6 after 30 steps at W=2; 0 without clipping).
CLIP = [0.0]


def config(stage: int, kind: str = "none", accum: int = 2, clip: float | None = None) -> dict:
    """ds_equivalence's tiny-bucket config for plain deepspeed.initialize, with offload ``kind``: "none", "opt"
    (offload_optimizer cpu) or "param" (offload_optimizer and offload_param cpu, ZeRO-3)."""
    W = dist.get_world_size()
    clip = CLIP[0] if clip is None else clip
    cfg = dse.plain_config(dse.base_config(stage, dse.GLOBAL_BATCH // W // accum, accum=accum, clip=clip))
    zero = cfg["zero_optimization"]
    if kind in ("opt", "param"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if kind == "param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return cfg


def run(stage: int, kind: str, preset: str, how: str = "plain", steps: int = STEPS, accum: int = 2):
    """(engine, model, APOLLO) after ``steps`` steps."""
    model = oracle.make_model(0)
    opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
    init = ads.initialize if how == "adapter" else deepspeed.initialize
    engine, *_ = init(model=model, optimizer=opt, config=config(stage, kind, accum))
    dse.train(engine, steps, accum=accum)
    return engine, model, opt


def rel(a: dict, b: dict) -> float:
    """Max over params of max |a - b| / max |b|."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)


def part_adamw(report: dict) -> None:
    for stage in (2, 3):
        finals = {}
        for kind in ("none", "opt") if stage == 2 else ("none", "opt", "param"):
            model = oracle.make_model(0)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            engine, ds_opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, kind, clip=1.0))
            dse.train(engine, STEPS, accum=2)
            finals[kind] = dse.full_params(engine, model)
            report[f"adamw/stage{stage}/{kind}/offloaded"] = _offloaded(ds_opt)
            engine.destroy()
        report[f"adamw/stage{stage}"] = {"rel_diff": rel(finals["opt"], finals["none"])}
        if "param" in finals:
            report[f"adamw/stage{stage}/param"] = {"rel_diff": rel(finals["param"], finals["none"])}


def _offloaded(ds_opt) -> bool:
    """Whether DeepSpeed's ZeRO optimizer runs its offload path (ZeRO-1/2: cpu_offload, ZeRO-3: offload_optimizer)."""
    return bool(getattr(ds_opt, "cpu_offload", False) or getattr(ds_opt, "offload_optimizer", False))


def _masters(ds_opt) -> torch.Tensor:
    """The first fp32 master partition of a ZeRO optimizer (where DeepSpeed keeps it: CPU under offload)."""
    flats = getattr(ds_opt, "fp32_partitioned_groups_flat", None) or ds_opt.single_partition_of_fp32_groups
    return flats[0]


def part_equal(report: dict, cells: list[str]) -> None:
    baselines: dict = {}
    for cell in cells:
        stage_s, preset, kind = cell.split("/")
        stage = int(stage_s)
        if (stage, preset) not in baselines:
            engine, model, opt = run(stage, "none", preset, how="adapter")
            with torch.no_grad():
                baselines[(stage, preset)] = (dse.full_params(engine, model), dse.apollo_snapshot(opt))
            engine.destroy()
        want, want_state = baselines[(stage, preset)]
        engine, model, opt = run(stage, kind, preset)
        with torch.no_grad():  # the slots are views made in no_grad (the step) of buffers DeepSpeed writes
            got_state = dse.apollo_snapshot(opt)
        report[f"equal/{cell}"] = {
            "rel_diff": rel(dse.full_params(engine, model), want),
            "state_diff": dse.gather_list(dse.same(got_state, want_state)),
            "steps": opt.steps_taken,
            "state_device": str(opt.device),
            "master_device": str(_masters(engine.optimizer).device),
            "offloaded": _offloaded(engine.optimizer),
            "params_offloaded": bool(getattr(engine.optimizer, "offload_param", False)),
            "generator_device": opt.run_settings()["generator_device"],
            "clear_grads": len(opt._clear_grads),
            "prepare_grads": len(opt._prepare_grads),
        }
        engine.destroy()


def _train_idle(engine, model, steps: int, idle) -> None:
    """``steps`` steps of 2 micro-batches, the last block's MLP left out of micro-batch k of step t when idle(t, k)."""
    micro = dse.GLOBAL_BATCH // dist.get_world_size() // 2
    for t in range(steps):
        for k in range(2):
            model.blocks[-1].mlp_idle = idle(t, k)
            engine.backward(oracle.loss_fn(engine, *dse.local_rows(t, k, micro)))
            engine.step()


def part_idle(report: dict) -> None:
    """The last block's MLP without gradient in every third step (both micro-batches): offload (which must zero
    the store where no gradient came) vs no offload. Then without gradient in one micro-batch of a step: DeepSpeed's
    offloaded accumulation gets that wrong, so APOLLO must refuse the step (the message, on every rank)."""
    for stage in (2, 3):
        finals = {}
        for kind in ("none", "opt"):
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, "apollo"), **{**oracle.HPARAMS, "weight_decay": 0.01})
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, kind, accum=2))
            _train_idle(engine, model, 12, lambda t, k: t % 3 == 2)
            finals[kind] = dse.full_params(engine, model)
            engine.destroy()
        report[f"idle/stage{stage}"] = {"rel_diff": rel(finals["opt"], finals["none"])}
        for first in (True, False):  # idle in the first micro-batch of step 2 only, or in the last only
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, "opt", accum=2))
            try:
                _train_idle(engine, model, 3, lambda t, k: t == 2 and k == (0 if first else 1))
                error = ""
            except RuntimeError as e:
                error = str(e)
            report[f"idle/stage{stage}/partial_{'first' if first else 'last'}"] = {
                "error": error,
                "steps": opt.steps_taken,
            }
            engine.destroy()


_UNINTERRUPTED: dict = {}  # (stage, preset) -> params after 12 steps without offload


def _resume(stage_a: int, kind_a: str, stage_b: int, kind_b: str, path: str, preset: str = "apollo") -> dict:
    """6 steps under (stage_a, kind_a), save (``stage_a`` None: ``path`` holds one already, e.g. written at
    another W); a fresh engine under (stage_b, kind_b) with other initial weights
    loads it (adapter engines: DeepSpeed's own load at the same stage and W, else APOLLO's loader) and runs 6
    more; vs the uninterrupted 12 steps under stage_b without offload."""
    if stage_a is not None:
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
        engine, *_ = ads.initialize(model=model, optimizer=opt, config=config(stage_a, kind_a))
        dse.train(engine, 6, accum=2)
        engine.save_checkpoint(path, tag="t6")
        engine.destroy()

    if (stage_b, preset) not in _UNINTERRUPTED:
        engine, model, opt = run(stage_b, "none", preset, how="adapter", steps=12)
        _UNINTERRUPTED[(stage_b, preset)] = dse.full_params(engine, model)
        engine.destroy()
    want = _UNINTERRUPTED[(stage_b, preset)]

    model = oracle.make_model(1)  # other initial weights: everything must come from the checkpoint
    opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
    engine, *_ = ads.initialize(model=model, optimizer=opt, config=config(stage_b, kind_b))
    engine.load_checkpoint(path, tag="t6")
    loaded = opt.steps_taken
    dse.train(engine, 6, start=6, accum=2)
    out = {"rel_diff": rel(dse.full_params(engine, model), want), "loaded_steps": loaded}
    engine.destroy()
    return out


def part_resume(report: dict, ckpt_dir: str) -> None:
    """ZeRO-3, same W: offloaded -> not offloaded, and not offloaded -> offloaded (optimizer and params)."""
    report["resume/stage3/opt->none"] = _resume(3, "opt", 3, "none", os.path.join(ckpt_dir, "a"))
    report["resume/stage3/none->param"] = _resume(3, "none", 3, "param", os.path.join(ckpt_dir, "b"))


def part_resume_any(report: dict, ckpt_dir: str) -> None:
    """Across stages (APOLLO's any-W loader): ZeRO-2 offloaded -> ZeRO-3 not offloaded, and ZeRO-3 not
    offloaded -> ZeRO-2 offloaded."""
    report["resume/stage2-opt->stage3-none"] = _resume(2, "opt", 3, "none", os.path.join(ckpt_dir, "c"))
    report["resume/stage3-none->stage2-opt"] = _resume(3, "none", 2, "opt", os.path.join(ckpt_dir, "d"))


def part_load(report: dict, load_dir: str) -> None:
    """A checkpoint another launch wrote (another W: ``resume``'s offloaded ZeRO-3 one) into ZeRO-3 with
    offload_optimizer and offload_param here, through engine.load_checkpoint (APOLLO's any-W loader)."""
    report["load/stage3/param"] = _resume(None, "", 3, "param", load_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="equal")
    ap.add_argument("--cells", default="2/apollo/opt,3/apollo-mini/param")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--load-dir", default=None, help="part load: a save directory with tag t6")
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    CLIP[0] = args.clip
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    report: dict = {"world": dist.get_world_size()}
    parts = {
        "adamw": lambda: part_adamw(report),
        "equal": lambda: part_equal(report, args.cells.split(",")),
        "idle": lambda: part_idle(report),
        "resume": lambda: part_resume(report, args.ckpt_dir),
        "resume_any": lambda: part_resume_any(report, args.ckpt_dir),
        "load": lambda: part_load(report, args.load_dir),
    }
    dse.run_parts(report, [(name, parts[name]) for name in args.parts.split(",")], args.out)


if __name__ == "__main__":
    main()
