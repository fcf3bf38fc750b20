"""Worker (launched by ``deepspeed --num_gpus W`` with DS_ACCELERATOR=cpu, gloo): APOLLO through
``apollo_dist.deepspeed.initialize`` vs the apollo-torch oracle, several engines per process.

Parts (``--parts``, comma separated):
  equivalence  ZeRO stages 1, 2, 3 x APOLLO, APOLLO-Mini, fp32, tiny buckets (params cut mid-row):
               parameters after 30 steps vs the oracle on the same global batch, and per-rank state
               bytes with the bounds of the issue;
  extras       ZeRO 1, 2, 3, gradient accumulation 2, gradient clipping 1.0, WarmupLR from the JSON, optimizer
               built from the JSON's {"type": "APOLLO"} block, vs the oracle run with the same features;
  checkpoint   ZeRO 1, 2, 3 (extras config): 6 steps, save_checkpoint, 6 more; a fresh engine
               load_checkpoint-s and runs the same 6: parameters and APOLLO state must be identical;
  fp16         ZeRO 2 and 3, fp16 with dynamic loss scaling: an inf in the loss makes DeepSpeed skip
               the step; APOLLO's step counts, moments, limiter norms and fp32 master weights must
               not change; the next step runs;
  bf16         ZeRO-1 with fp32 grad accumulation (BF16_Optimizer) and ZeRO-2 bf16: runs, close to the oracle;
  zero_init    ZeRO-3 with the model built under deepspeed.zero.Init, optimizer from the JSON: vs the oracle;
  subgroups    ZeRO-3 with sub_group_size below a group's size: clear error.
Rank 0 writes a JSON report to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")

import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

oracle.stub_bitsandbytes()
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (45-100 s on 2 cores, and
# rebuilt whenever another checkout's build flags differ). gloo does every collective here without it.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from deepspeed.runtime.lr_schedules import WarmupLR  # noqa: E402

import apollo_dist.deepspeed as ads  # noqa: E402
from apollo_dist import APOLLO  # noqa: E402
from apollo_dist.core import LowRankBucket  # noqa: E402
from apollo_dist.runtime import shutdown  # noqa: E402

GLOBAL_BATCH = 12  # oracle.batch rows; divisible by W = 2, 3 (and by W * 2 micro-batches at W = 2)
STEPS = 30
WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": oracle.HPARAMS["lr"], "warmup_num_steps": 5, "warmup_type": "linear"}


def base_config(stage: int, micro: int, accum: int = 1, clip: float = 0.0) -> dict:
    """Tiny buckets so ZeRO cuts parameters anywhere; DeepSpeed clips at 1.0 unless told otherwise."""
    zero = {"stage": stage, "reduce_bucket_size": 50, "allgather_bucket_size": 50}
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50, stage3_max_live_parameters=100
        )
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": "auto",
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def local_rows(t: int, micro_index: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of global batch ``t`` for micro-step ``micro_index`` (rank-major slices)."""
    x, y = oracle.batch(t, size=GLOBAL_BATCH)
    W, r = dist.get_world_size(), dist.get_rank()
    per_rank = GLOBAL_BATCH // W
    lo = r * per_rank + micro_index * micro
    return x[lo : lo + micro], y[lo : lo + micro]


def train(engine, steps: int, start: int = 0, accum: int = 1, inject_inf_at: int = -1) -> None:
    micro = GLOBAL_BATCH // dist.get_world_size() // accum
    for t in range(start, start + steps):
        for k in range(accum):
            x, y = local_rows(t, k, micro)
            loss = oracle.loss_fn(engine, x, y)
            if t == inject_inf_at:
                loss = loss * float("inf")  # overflowing gradients: DeepSpeed must skip this step
            engine.backward(loss)
            engine.step()


def full_params(engine, model) -> dict[str, torch.Tensor]:
    """Every parameter in full and fp32 (gathered under ZeRO-3)."""
    params = list(model.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def rel_diff(got: dict[str, torch.Tensor], ref: torch.nn.Module) -> float:
    return max(float((got[n] - q.detach()).abs().max() / q.detach().abs().max()) for n, q in ref.named_parameters())


def oracle_run(
    preset: str, steps: int = STEPS, clip: float = 0.0, warmup: bool = False
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """apollo-torch in this process on the full global batch, with DeepSpeed's clipping and schedule."""
    model = oracle.make_model(0)
    opt = oracle.oracle_class()(oracle.groups(model, preset), **oracle.HPARAMS)
    sched = WarmupLR(opt, **WARMUP) if warmup else None
    for t in range(steps):
        x, y = oracle.batch(t, size=GLOBAL_BATCH)
        oracle.loss_fn(model, x, y).backward()
        if clip > 0:
            # DeepSpeed: g / max(1, (||g|| + 1e-6) / clip)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
            factor = max(1.0, (float(norm) + 1e-6) / clip)
            for p in model.parameters():
                p.grad.div_(factor)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return model, opt


def state_bytes(opt) -> int:
    """Bytes of Adam moments this rank holds (exp_avg + exp_avg_sq), the quantity the reference stores."""
    total = 0
    for b in opt.buckets:
        for s in b.slots:
            st = opt.state[s.param]
            total += sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    return total


def state_bounds(opt, stage: int, ref_total: int) -> float:
    """The issue's per-rank bound. ZeRO-3: reference / W + one channel per param. ZeRO-1/2: the
    reference's state for the elements this rank holds + one channel per param cut at its edges."""
    W = dist.get_world_size()
    bound = ref_total / W if stage == 3 else 0.0
    for b in opt.buckets:
        low = isinstance(b, LowRankBucket)
        for s in b.slots:
            numel = math.prod(s.shape)
            channel = 8 * b.r if low else 8  # both moments of one channel (one element for Adam)
            if stage == 3:
                bound += channel
                continue
            if s.numel == 0:
                continue
            per_element = 8 * b.r * max(s.shape) / numel if low else 8
            cut = s.start > 0 or s.end < numel
            bound += per_element * s.numel + (channel if cut else 0)
    return bound


def gather_list(x) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def part_equivalence(report: dict) -> None:
    refs = {p: oracle_run(p) for p in ("apollo", "apollo-mini")}
    for stage in (1, 2, 3):
        for preset, (ref, ref_opt) in refs.items():
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
            engine, *_ = ads.initialize(
                model=model, optimizer=opt, config=base_config(stage, GLOBAL_BATCH // dist.get_world_size())
            )
            train(engine, STEPS)
            ref_total = sum(
                v.numel() * v.element_size()
                for st in ref_opt.state.values()
                for k, v in st.items()
                if k in ("exp_avg", "exp_avg_sq")
            )
            report[f"eq/stage{stage}/{preset}"] = {
                "max_rel_diff": rel_diff(full_params(engine, model), ref),
                "state_bytes": gather_list(state_bytes(opt)),
                "state_bound": gather_list(state_bounds(opt, stage, ref_total)),
                "ref_state_bytes": ref_total,
                "steps": opt.steps_taken,
            }
            engine.destroy()


def part_zero_init(report: dict) -> None:
    """ZeRO-3 with the model built under deepspeed.zero.Init (params partitioned from birth, shapes in
    ds_shape): the optimizer comes from the JSON block, so APOLLO's groups are found on partitioned params."""
    ref, _ = oracle_run("apollo")
    cfg = base_config(3, GLOBAL_BATCH // dist.get_world_size())
    hp = oracle.HPARAMS
    cfg["optimizer"] = {
        "type": "APOLLO",
        "params": {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "rank": 5, "update_proj_gap": 7},
    }
    init_cfg = {k: v for k, v in cfg.items() if v != "auto"}  # zero.Init reads the config without the adapter
    with deepspeed.zero.Init(config_dict_or_path=init_cfg):
        model = oracle.make_model(0)
    engine, opt, _, _ = ads.initialize(model=model, config=cfg)
    train(engine, STEPS)
    report["zero_init/stage3"] = {
        "max_rel_diff": rel_diff(full_params(engine, model), ref),
        "lowrank_params": sum(len(b.slots) for b in engine.optimizer.optimizer.buckets if isinstance(b, LowRankBucket)),
    }
    engine.destroy()


def extras_config(stage: int) -> dict:
    """Accumulation 2, clipping 1.0, WarmupLR, overlapped reduction, and APOLLO built from the JSON block."""
    W = dist.get_world_size()
    cfg = base_config(stage, GLOBAL_BATCH // W // 2, accum=2, clip=1.0)
    cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)  # the GPU configs' settings
    hp = oracle.HPARAMS
    cfg["optimizer"] = {
        "type": "APOLLO",
        "params": {
            "lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            "betas": list(hp["betas"]),
            "rank": 5,
            "update_proj_gap": 7,
            "target_modules": ["attn", "mlp"],
        },
    }
    cfg["scheduler"] = {"type": "WarmupLR", "params": WARMUP}
    return cfg


def part_extras(report: dict) -> None:
    ref, _ = oracle_run("apollo", clip=1.0, warmup=True)
    for stage in (1, 2, 3):
        model = oracle.make_model(0)
        engine, opt, _, sched = ads.initialize(model=model, config=extras_config(stage))
        train(engine, STEPS, accum=2)
        report[f"extras/stage{stage}"] = {
            "max_rel_diff": rel_diff(full_params(engine, model), ref),
            "lr": opt.param_groups[0]["lr"],
            "steps": engine.optimizer.optimizer.steps_taken,
        }
        engine.destroy()
    # A torch LR scheduler handed to initialize (built before the adapter binds the layout).
    ref, _ = oracle_run("apollo")
    model = oracle.make_model(0)
    cfg = extras_config(2)
    cfg.pop("scheduler")
    cfg.update(gradient_clipping=0.0)
    engine, opt, _, sched = ads.initialize(
        model=model, config=cfg, lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0)
    )
    train(engine, STEPS, accum=2)
    report["extras/client_scheduler"] = {
        "max_rel_diff": rel_diff(full_params(engine, model), ref),
        "steps": engine.optimizer.optimizer.steps_taken,
    }
    engine.destroy()


def apollo_snapshot(apollo) -> dict[str, torch.Tensor]:
    """Every state tensor of the buckets and the fp32 master elements, cloned."""
    snap = {}
    for i, b in enumerate(apollo.buckets):
        snap[f"{i}/step"] = b.step_count.clone()
        for k in ("exp_avg", "exp_avg_sq", "limiter_norm"):
            v = getattr(b, k, None)
            if isinstance(v, list):
                for j, t in enumerate(v):
                    snap[f"{i}/{k}/{j}"] = t.clone()
            elif v is not None:
                snap[f"{i}/{k}"] = v.clone()
        for j, s in enumerate(b.slots):
            snap[f"{i}/master/{j}"] = s.data.clone()
    return snap


def same(a: dict, b: dict) -> float:
    """Max abs difference over matching tensors (inf if the keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0) for k in a)


def part_checkpoint(report: dict, ckpt_dir: str) -> None:
    for stage in (1, 2, 3):
        path = os.path.join(ckpt_dir, f"stage{stage}")
        model = oracle.make_model(0)
        engine, opt, _, _ = ads.initialize(model=model, config=extras_config(stage))
        train(engine, 6, accum=2)
        engine.save_checkpoint(path, tag="t6")
        train(engine, 6, start=6, accum=2)
        want_params, want_state = full_params(engine, model), apollo_snapshot(engine.optimizer.optimizer)
        want_lr = opt.param_groups[0]["lr"]
        engine.destroy()

        model2 = oracle.make_model(1)  # other initial weights: everything must come from the checkpoint
        engine2, opt2, _, _ = ads.initialize(model=model2, config=extras_config(stage))
        engine2.load_checkpoint(path, tag="t6")
        loaded_steps = engine2.optimizer.optimizer.steps_taken
        train(engine2, 6, start=6, accum=2)
        got_params, got_state = full_params(engine2, model2), apollo_snapshot(engine2.optimizer.optimizer)
        report[f"ckpt/stage{stage}"] = {
            "param_diff": max(float((got_params[n] - want_params[n]).abs().max()) for n in want_params),
            "state_diff": gather_list(same(got_state, want_state)),
            "loaded_steps": loaded_steps,
            "lr_diff": abs(opt2.param_groups[0]["lr"] - want_lr),
        }
        engine2.destroy()


def part_fp16(report: dict) -> None:
    # DeepSpeed's CPU accelerator reports fp16 only where oneDNN has fp16 kernels; torch's CPU fp16 ops
    # are enough for this tiny model, and what is under test is DeepSpeed's overflow/skip path.
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    accel.is_fp16_supported = lambda: True
    accel.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
    for stage in (2, 3):
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        cfg = base_config(stage, GLOBAL_BATCH // dist.get_world_size(), clip=1.0)
        cfg["fp16"] = {
            "enabled": True,
            "initial_scale_power": 8,
            "loss_scale_window": 1000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        }
        engine, *_ = ads.initialize(model=model, optimizer=opt, config=cfg)
        train(engine, 3)
        before, skipped, scale = apollo_snapshot(opt), engine.skipped_steps, engine.optimizer.loss_scale
        train(engine, 1, start=3, inject_inf_at=3)
        after = apollo_snapshot(opt)
        skipped_after, scale_after = engine.skipped_steps, engine.optimizer.loss_scale
        train(engine, 1, start=4)
        report[f"fp16/stage{stage}"] = {
            "state_diff_on_overflow": gather_list(same(after, before)),
            "skipped": skipped_after - skipped,
            "loss_scale": [float(scale), float(scale_after)],
            "steps_before": int(before[f"{len(opt.buckets) - 1}/step"].max()),
            "steps_after_overflow": int(after[f"{len(opt.buckets) - 1}/step"].max()),
            "steps_after_next": opt.steps_taken,
            "finite": all(bool(torch.isfinite(v).all()) for v in full_params(engine, model).values()),
        }
        engine.destroy()


def part_bf16(report: dict) -> None:
    ref, _ = oracle_run("apollo", steps=10)
    for stage, accum_dtype in ((1, "fp32"), (2, None)):
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        cfg = base_config(stage, GLOBAL_BATCH // dist.get_world_size())
        cfg["bf16"] = {"enabled": True}
        if accum_dtype:
            cfg["data_types"] = {"grad_accum_dtype": accum_dtype}
        engine, *_ = ads.initialize(model=model, optimizer=opt, config=cfg)
        train(engine, 10)
        report[f"bf16/stage{stage}"] = {
            "wrapper": type(engine.optimizer).__name__,
            "max_rel_diff": rel_diff(full_params(engine, model), ref),
            "steps": opt.steps_taken,
        }
        engine.destroy()


def part_subgroups(report: dict) -> None:
    """ZeRO-3 with sub_group_size below a group's size: DeepSpeed steps each sub-group on its own."""
    ref, _ = oracle_run("apollo")
    for how in ("adapter", "plain"):
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        cfg = plain_config(base_config(3, GLOBAL_BATCH // dist.get_world_size()))
        cfg["zero_optimization"]["sub_group_size"] = 100
        engine, *_ = (ads.initialize if how == "adapter" else deepspeed.initialize)(
            model=model, optimizer=opt, config=cfg
        )
        train(engine, STEPS)
        report[f"subgroups/{how}"] = {
            "max_rel_diff": rel_diff(full_params(engine, model), ref),
            "buckets": len(opt.buckets),
            "sub_groups": len(engine.optimizer.fp16_groups),
            "steps": opt.steps_taken,
        }
        engine.destroy()


def plain_config(cfg: dict) -> dict:
    """A config for plain deepspeed.initialize: no "auto" values; a client optimizer under ZeRO needs
    zero_allow_untested_optimizer (what Lightning, accelerate and the Trainer set)."""
    cfg = {k: v for k, v in cfg.items() if v != "auto"}
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def part_plain(report: dict) -> None:
    """APOLLO handed to plain deepspeed.initialize (no apollo_dist adapter), as Lightning's
    DeepSpeedStrategy, accelerate and the Trainer do: fp32, 2 micro-batches, clipping 1.0, vs the oracle."""
    W = dist.get_world_size()
    for preset in ("apollo", "apollo-mini"):
        ref, _ = oracle_run(preset, clip=1.0)
        for stage in (1, 2, 3):
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, preset), **oracle.HPARAMS)
            engine, ds_opt, _, _ = deepspeed.initialize(
                model=model,
                optimizer=opt,
                config=plain_config(base_config(stage, GLOBAL_BATCH // W // 2, accum=2, clip=1.0)),
            )
            train(engine, STEPS, accum=2)
            report[f"plain/stage{stage}/{preset}"] = {
                "max_rel_diff": rel_diff(full_params(engine, model), ref),
                "steps": opt.steps_taken,
                "wrapper": type(ds_opt).__name__,
            }
            engine.destroy()


def part_idle(report: dict) -> None:
    """A param without gradient under plain deepspeed.initialize, ZeRO-2 and ZeRO-3 (the last block's MLP
    idle every third step): ZeRO-1/2 fill an unused param's gradient with zeros before the optimizer sees it
    (stage_1_and_2 ``set_none_gradients_to_zero``); ZeRO-3 would hand it its last gradient again (its
    reduced-gradient store is never cleared), which APOLLO's binding zeroes after each step. So APOLLO, like
    DeepSpeed's own Adam under ZeRO-1/2, steps it with a zero gradient. Compared with apollo-torch given zero
    gradients (that rule) and with apollo-torch skipping them (the one-process rule, which ZeRO cannot see)."""
    W = dist.get_world_size()
    for preset in ("apollo", "apollo-mini"):
        zeros = oracle.train_idle(oracle.oracle_class(), preset, zeros=True)
        skipped = oracle.train_idle(oracle.oracle_class(), preset)
        for stage in (2, 3):
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, preset), **{**oracle.HPARAMS, "weight_decay": 0.01})
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, config=plain_config(base_config(stage, GLOBAL_BATCH // W))
            )
            for t in range(12):
                oracle.set_idle(model, t)
                engine.backward(oracle.loss_fn(engine, *local_rows(t, 0, GLOBAL_BATCH // W)))
                engine.step()
            got = full_params(engine, model)
            report[f"idle/stage{stage}/{preset}"] = {"zeros": rel_diff(got, zeros), "skipped": rel_diff(got, skipped)}
            engine.destroy()


def part_plain_errors(report: dict) -> None:
    """Layouts APOLLO cannot step, reached through plain deepspeed.initialize: the first step (or
    state_dict) must raise a clear error, never step the wrong tensors."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()  # as in part_fp16: torch's CPU fp16 ops suffice for this model
    accel.is_fp16_supported = lambda: True
    accel.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
    W = dist.get_world_size()
    cases = {
        "bf16_stage0": {"bf16": {"enabled": True}},  # FP16_UnfusedOptimizer: fp32 copies, a zero-grad step at init
    }
    for name, extra in cases.items():
        model = oracle.make_model(0)
        opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
        cfg = plain_config(base_config(0, GLOBAL_BATCH // W))
        cfg.update(extra)
        try:
            engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            train(engine, 10)
            report[f"plain_errors/{name}"] = {
                "error": None,
                "wrapper": type(ds_opt).__name__,
                "binding": opt._binding.kind,
                "steps": opt.steps_taken,
                "skipped": engine.skipped_steps,
                "max_rel_diff": rel_diff(full_params(engine, model), oracle_run("apollo", steps=10)[0]),
            }
        except (ValueError, NotImplementedError) as e:
            report[f"plain_errors/{name}"] = {"error": f"{type(e).__name__}: {e}"}


def part_plain_bf16(report: dict) -> None:
    """bf16 (ZeRO-1 with fp32 accumulation = BF16_Optimizer, ZeRO-2, ZeRO-3), plain deepspeed.initialize vs
    the adapter's engine on the same config (bf16 forward/backward differs from an fp32 oracle by ~1e-2)."""
    W = dist.get_world_size()
    ref, _ = oracle_run("apollo", steps=10)
    for stage in (1, 2, 3):
        finals = {}
        for how in ("adapter", "plain"):
            model = oracle.make_model(0)
            opt = APOLLO(oracle.groups(model, "apollo"), **oracle.HPARAMS)
            cfg = plain_config(base_config(stage, GLOBAL_BATCH // W // 2, accum=2, clip=1.0))
            cfg["bf16"] = {"enabled": True}
            if stage == 1:
                cfg["data_types"] = {"grad_accum_dtype": "fp32"}
            engine, ds_opt, _, _ = (ads.initialize if how == "adapter" else deepspeed.initialize)(
                model=model, optimizer=opt, config=cfg
            )
            train(engine, 10, accum=2)
            finals[how] = full_params(engine, model)
            wrapper, steps = type(ds_opt).__name__, opt.steps_taken
            engine.destroy()
        report[f"plain_bf16/stage{stage}"] = {
            "diff_vs_adapter": max(
                float((finals["plain"][n] - finals["adapter"][n]).abs().max() / finals["adapter"][n].abs().max())
                for n in finals["plain"]
            ),
            "max_rel_diff_vs_fp32_oracle": rel_diff(finals["plain"], ref),
            "wrapper": wrapper,
            "steps": steps,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="equivalence")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    report: dict = {"world": dist.get_world_size()}
    parts = {
        "equivalence": part_equivalence,
        "extras": part_extras,
        "fp16": part_fp16,
        "bf16": part_bf16,
        "subgroups": part_subgroups,
        "zero_init": part_zero_init,
        "plain": part_plain,
        "plain_bf16": part_plain_bf16,
        "plain_errors": part_plain_errors,
        "idle": part_idle,
        "checkpoint": lambda r: part_checkpoint(r, args.ckpt_dir),
    }
    run_parts(report, [(name, lambda fn=parts[name]: fn(report)) for name in args.parts.split(",")], args.out)


def run_parts(report: dict, parts: list, out: str) -> None:
    """Run (name, fn) parts in order, each timed; a failing part is reported (``error/<name>``) and the others
    still run; rank 0 writes the report to ``out``; then every rank leaves through runtime.shutdown."""
    for name, fn in parts:
        t0 = time.time()
        try:
            fn()
        except Exception:  # report it and go on: one broken part must not hide the others
            report[f"error/{name}"] = traceback.format_exc()[-3000:]
            if dist.get_rank() == 0:
                print(report[f"error/{name}"], file=sys.stderr, flush=True)
        report[f"seconds/{name}"] = round(time.time() - t0, 1)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
