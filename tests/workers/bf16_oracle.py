"""Worker (``torchrun --nproc_per_node W``, gloo on CPU): launch/train.py's engines in bf16 against
one-process references, several runs per launch (start-up paid once).

Each engine run is exactly what ``launch/train.py --dtype bf16`` builds (its flag parsing, its
DeepSpeed config, ``engines.make_engine``, its data stream and loss), for ``--engine fsdp2``
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)) and DeepSpeed ZeRO-2 / ZeRO-3
(``bf16: {enabled: true}``), with torch AdamW, APOLLO and APOLLO-Mini.

The one-process reference (``reference_losses``) computes the way these engines do: fp32 master
weights held by the optimizer, and a bf16 copy of the parameters (buffers, i.e. the rotary frequencies,
left fp32 as FSDP2's policy leaves them) that runs forward and backward on the whole global batch; its
bf16 gradients are cast to fp32 for clipping and the step, and the updated masters are rounded into the
bf16 copy. So an engine differs from it only by what data parallelism changes: each rank's bf16
backward over its own rows and the reduction of those gradients (fp32 under FSDP2, bf16 under
DeepSpeed). The references are torch AdamW and apollo-torch 1.0.3 (APOLLOAdamW) on the same groups;
rank r runs reference r (they are independent), and every rank gets every reference's losses.

Rank 0 writes ``{"engine/optimizer": [loss per step], "reference/optimizer/splitK": [...], "seconds/...": s}``.

``--param-dtype-bf16`` (plain ``python``, one process): train.py's ``--engine single --param-dtype bf16``
stepped by its APOLLO and by apollo-torch in the ways ``param_dtype_losses`` lists.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

oracle.stub_bitsandbytes()
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

# As in ds_equivalence.py: gloo does every collective; no JIT build of DeepSpeed's shared-memory op.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from launch import data, engines, train  # noqa: E402
from launch.model import llama_config, materialize, meta_model, token_losses  # noqa: E402
from tools.train_reference import build_reference  # noqa: E402

TRAIN_BUILD = engines.build_optimizer  # train.py's own (param_dtype_losses patches the module's name)

# The setting of the test (train.py flags): tiny LLaMA, a stable lr (1e-3; at 1e-2 a tiny model is
# chaotic and two bf16 runs part by percents), a projection refresh inside the run, clipping at 1.0
# (the JSON's), warm-up 3 steps then cosine.
STEPS = 30
COMMON = [
    "--model",
    "tiny",
    "--steps",
    str(STEPS),
    "--global-batch-size",
    "6",
    "--micro-batch-size",
    "2",
    "--seq-len",
    "64",
    "--rank",
    "16",
    "--update-proj-gap",
    "10",
    "--lr",
    "1e-3",
    "--dtype",
    "bf16",
    "--no-progress",
]
EXTRA: list[str] = []  # --flags: more train.py flags (measurements: --dtype fp32, --seed 1)
ENGINE_FLAGS = {
    "fsdp2": ["--engine", "fsdp2"],
    "zero2": ["--deepspeed", "ds_configs/apollo.json"],
    "zero3": ["--deepspeed", "ds_configs/apollo_zero3.json"],
}


def settings(engine: str, optimizer: str) -> tuple:
    """train.py's resolved settings for ``engine`` and ``optimizer`` (its own parsing and checks)."""
    args = train.parse_args([*COMMON, *ENGINE_FLAGS[engine], "--optimizer", optimizer, *EXTRA])
    return train.validate(args)


def engine_losses(engine_name: str, optimizer: str, d: engines.Dist) -> list[float]:
    """launch/train.py's run under ``engine_name``: the mean loss over ranks of steps 1..STEPS."""
    run, hp, ds_cfg, tokenizer, split = settings(engine_name, optimizer)
    model = meta_model(llama_config(run.model, tokenizer.vocab_size, run.seq_len))
    ds_full = train.deepspeed_config(ds_cfg, hp, run) if run.engine == "deepspeed" else None
    engine = engines.make_engine(run.engine, model, hp, run, d, ds_full)
    out = []
    for step in range(1, run.steps + 1):
        batches = data.train_micro_batches(
            split, run.seq_len, run.seed, step, run.global_batch_size, d.rank, d.world, run.micro_batch_size, d.device
        )
        out.append(float(d.all_sum(engine.train_step(batches).float().reshape(1)) / d.world))
    if run.engine == "deepspeed":
        engine.model.destroy()
    return out


def reference_losses(optimizer: str, split: int = 1) -> list[float]:
    """One process, fp32 masters stepped by torch AdamW / apollo-torch, forward and backward by a bf16
    copy of the parameters on the whole global batch (see the module docstring). ``split`` > 1: the batch
    is cut into ``split`` row groups, each group's bf16 gradient cast to fp32 and averaged (what FSDP2's
    fp32 reduction of ``split`` ranks' bf16 gradients does): the same optimizer under the perturbation
    data parallelism brings, in one process."""
    run, hp, _, tokenizer, rows = settings("fsdp2", optimizer)
    run = dataclasses.replace(run, engine="single", world=1)
    device = torch.device("cpu")
    master = materialize(meta_model(llama_config(run.model, tokenizer.vocab_size, run.seq_len)), run.seed, device)
    compute = copy.deepcopy(master)
    for p in compute.parameters():  # parameters only: the rotary frequencies stay fp32
        p.data = p.data.to(torch.bfloat16 if run.dtype == "bf16" else torch.float32)
    opt = build_reference(master, hp)  # torch AdamW, or apollo-torch on train.py's APOLLO groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engines.cosine_schedule(run.warmup_steps, run.steps))
    pairs = list(zip(master.parameters(), compute.parameters()))
    out = []
    for step in range(1, run.steps + 1):
        (x, y), *rest = data.train_micro_batches(
            rows, run.seq_len, run.seed, step, run.global_batch_size, 0, 1, run.global_batch_size, device
        )
        assert not rest
        losses = []
        for xs, ys in zip(x.chunk(split), y.chunk(split)):
            loss = token_losses(compute, xs, ys).mean()
            loss.backward()
            losses.append(float(loss.detach()))
            for p, q in pairs:
                g = q.grad.float() / split
                p.grad = g if p.grad is None else p.grad + g
                q.grad = None
        if run.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(master.parameters(), run.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, q in pairs:
                q.copy_(p)
        out.append(sum(losses) / split)
    return out


class ShadowOracle(torch.optim.Optimizer):
    """apollo-torch stepping fp32 copies of bf16 parameters: each step the bf16 gradients are cast to fp32,
    apollo-torch updates the copies with fp32 moments and fp32 arithmetic, and the copies are rounded
    (to nearest) into the bf16 parameters and then set to the rounded values, so the next step starts from
    the bf16 weights the model holds. One rounding per step, fp32 state: the arithmetic apollo_dist
    states for --param-dtype bf16 (DESIGN.md 2.4), with the reference's own step in between.

    ``grad_scale`` = 1 + 2^-22 gives the noise floor of that arithmetic: APOLLO's step is invariant to
    the gradients' scale but for rounding (and eps), so the run differs from the unscaled one only by
    fp32 rounding differences (a few ulps) in each update, which bf16 rounding then amplifies, as an
    implementation's other order of fp32 operations does."""

    def __init__(self, model: torch.nn.Module, hp, grad_scale: float = 1.0):
        self.grad_scale = grad_scale
        self.pairs = []
        shadow_of = {}
        for p in model.parameters():
            shadow_of[p] = p.detach().float().clone().requires_grad_(p.requires_grad)
            self.pairs.append((p, shadow_of[p]))
        apollo = TRAIN_BUILD(model, hp)  # train.py's groups (its APOLLO, never stepped) ...
        groups = [
            {**{k: v for k, v in g.items() if k != "param_names"}, "params": [shadow_of[p] for p in g["params"]]}
            for g in apollo.param_groups
        ]  # ... over the fp32 copies, in the same order (apollo-torch's seeds are positions)
        inner = oracle.oracle_class()(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        self.inner = inner
        self.defaults, self.state, self.param_groups = inner.defaults, inner.state, inner.param_groups
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @torch.no_grad()
    def step(self, closure=None):
        for p, s in self.pairs:
            s.grad = None if p.grad is None else p.grad.float() * self.grad_scale
        self.inner.step()
        for p, s in self.pairs:
            p.copy_(s)  # round to nearest bf16
            s.copy_(p)

    def zero_grad(self, set_to_none: bool = True):
        for p, s in self.pairs:
            p.grad = s.grad = None


def param_dtype_losses(optimizer: str, kind: str) -> list[float]:
    """launch/train.py --engine single --param-dtype bf16 (bf16 parameters, no fp32 master); the model is
    stepped by ``kind``: "ours" (train.py's APOLLO), "oracle-bf16" (apollo-torch on the bf16 parameters:
    its moments and arithmetic in bf16), "oracle-shadow" (ShadowOracle) or "oracle-shadow-perturbed"
    (ShadowOracle with gradients scaled by 1 + 2^-22: its noise floor)."""
    args = train.parse_args([*COMMON, "--engine", "single", "--param-dtype", "bf16", "--optimizer", optimizer, *EXTRA])
    run, hp, _, tokenizer, split = train.validate(args)
    d = engines.Dist(0, 1, 0, torch.device("cpu"))
    model = meta_model(llama_config(run.model, tokenizer.vocab_size, run.seq_len))
    build = {
        "ours": engines.build_optimizer,
        "oracle-bf16": build_reference,
        "oracle-shadow": lambda m, hp, layerwise=False: ShadowOracle(m, hp),
        "oracle-shadow-perturbed": lambda m, hp, layerwise=False: ShadowOracle(m, hp, 1 + 2**-22),
    }[kind]
    saved, engines.build_optimizer = engines.build_optimizer, build
    try:
        engine = engines.make_engine("single", model, hp, run, d, None)
    finally:
        engines.build_optimizer = saved
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    out = []
    for step in range(1, run.steps + 1):
        batches = data.train_micro_batches(
            split, run.seq_len, run.seed, step, run.global_batch_size, 0, 1, run.micro_batch_size, d.device
        )
        out.append(float(engine.train_step(batches)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="fsdp2,zero2,zero3")
    ap.add_argument("--optimizers", default="adamw,apollo,apollo-mini")
    ap.add_argument("--splits", default="1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--param-dtype-bf16", action="store_true", help="one process: --param-dtype bf16 runs only")
    ap.add_argument("--flags", default="", help="more train.py flags, space separated")
    args = ap.parse_args()
    EXTRA.extend(args.flags.split())
    if args.param_dtype_bf16:
        torch.set_num_threads(1)
        report = {}
        for o in args.optimizers.split(","):
            for kind in ("ours", "oracle-shadow", "oracle-shadow-perturbed", "oracle-bf16"):
                t0 = time.time()
                report[f"params_bf16/{o}/{kind}"] = param_dtype_losses(o, kind)
                report[f"seconds/params_bf16/{o}/{kind}"] = round(time.time() - t0, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        return
    torch.set_num_threads(1)
    d = engines.init_distributed("deepspeed")  # gloo; FSDP2 runs on the same default group
    report: dict = {"world": d.world}
    optimizers = args.optimizers.split(",")

    t0 = time.time()
    refs = [(o, s) for s in map(int, filter(None, args.splits.split(","))) for o in optimizers]
    mine = {f"{o}/split{s}": reference_losses(o, s) for i, (o, s) in enumerate(refs) if i % d.world == d.rank}
    every = [None] * d.world
    dist.all_gather_object(every, mine)
    for part in every:
        report.update({f"reference/{o}": v for o, v in part.items()})
    report["seconds/reference"] = round(time.time() - t0, 1)

    for name in filter(None, args.engines.split(",")):
        for o in optimizers:
            t0 = time.time()
            report[f"{name}/{o}"] = engine_losses(name, o, d)
            report[f"seconds/{name}/{o}"] = round(time.time() - t0, 1)
    if d.rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    from apollo_dist.runtime import shutdown

    shutdown()


if __name__ == "__main__":
    main()
