"""Worker (launched by ``torchrun --standalone --nproc_per_node 2``, CPU, gloo): ``apollo_dist.APOLLO``
returned from a LightningModule's ``configure_optimizers`` and trained by a real
``lightning.pytorch.Trainer`` (accelerator="cpu", devices=2, precision="32-true", max_steps=30, no
clipping), against the apollo-torch oracle trained on the full global batch in one process.

Lightning picks the processes up from torchrun's environment (TorchElasticEnvironment: it spawns none).
Each rank's DataLoader (``use_distributed_sampler=False``, batch_size 6, no shuffling) yields its own
rank-major half of ``oracle.batch(t, size=12)`` at step t: rank r gets rows [6r, 6r + 6).

``--strategy``:
  deepspeed  ``Trainer(strategy=DeepSpeedStrategy(stage=2), accelerator="cpu")`` exactly as shipped: Lightning
             refuses it (reported); ``CPUDeepSpeedStrategy`` (the shipped class with only its CUDA-only
             guard lifted) on Lightning's own CPU devices: refused next (reported); then
             ``CPUDeepSpeedStrategy(stage=2|3, parallel_devices=[cpu:0, cpu:1])`` trains, both presets;
  fsdp2      ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` as shipped;
             ``configure_model`` calls ``fully_shard`` on every block and on the LightningModule itself
             with ``self.device_mesh["data_parallel"]``; both presets.
  deepspeed-resume  ``CPUDeepSpeedStrategy(stage=--stage)``, APOLLO, 10 steps; ``--phase full`` saves after
             step 5 into ``--ckpt-dir`` (ModelCheckpoint); ``--phase resume`` (any W: torchrun's) fits from that
             checkpoint, first without ``apollo_dist.lightning.AnyWorldSizeResume`` (the error, reported as
             ``unrouted``), then with it; per-step losses (mean over ranks), global step, final parameters.
Full parameters are gathered in ``on_train_end`` (ZeRO-3: ``deepspeed.zero.GatheredParameters``; FSDP2:
``DTensor.full_tensor``). Rank 0 writes a JSON report to ``--out``: per case ``max_rel_diff`` vs the
oracle, ``steps`` (``APOLLO.steps_taken``), ``global_step`` (Lightning's), the optimizer Lightning steps,
the elements APOLLO holds on each rank; per refusal the error and the file:line that raised it.
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

oracle.stub_bitsandbytes()

import lightning.pytorch as pl  # noqa: E402

from apollo_dist import APOLLO  # noqa: E402

GLOBAL_BATCH = 12
WORLD = int(os.environ.get("WORLD_SIZE", "2"))
LOCAL_BATCH = GLOBAL_BATCH // WORLD
GPU = "--gpu" in sys.argv  # CUDA + NCCL: the shipped strategies, the oracle on the GPU too (CUDA draws other P)
STEPS = 30
PRESETS = ("apollo", "apollo-mini")


class ApolloModule(pl.LightningModule):
    """TinyNet (seed 0) trained with APOLLO from ``configure_optimizers``; ``fsdp2`` shards it in
    ``configure_model``. After training ``self.final`` holds every parameter in full (all ranks)."""

    def __init__(self, preset: str, fsdp2: bool = False):
        super().__init__()
        self.preset, self.fsdp2 = preset, fsdp2
        self.net = oracle.make_model(0)
        self.apollo: APOLLO | None = None
        self.final: dict[str, torch.Tensor] | None = None

    def configure_model(self) -> None:
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the root: embed and head; training_step goes through self(...)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        self.apollo = APOLLO(oracle.groups(self.net, self.preset), **oracle.HPARAMS)
        return self.apollo

    def train_dataloader(self) -> DataLoader:
        r = self.global_rank
        xs, ys = zip(*(oracle.batch(t, size=GLOBAL_BATCH) for t in range(STEPS)))
        x = torch.cat([b[LOCAL_BATCH * r : LOCAL_BATCH * (r + 1)] for b in xs])
        y = torch.cat([b[LOCAL_BATCH * r : LOCAL_BATCH * (r + 1)] for b in ys])
        return DataLoader(TensorDataset(x, y), batch_size=LOCAL_BATCH, shuffle=False)

    def on_train_end(self) -> None:
        params = list(self.net.parameters())
        # What APOLLO holds on each rank (elements, and params it holds only part of): proof of sharding.
        slots = [s for b in self.apollo.buckets for s in b.slots]
        mine = (sum(s.numel for s in slots), sum(0 < s.numel < math.prod(s.shape) for s in slots))
        self.held = [None] * dist.get_world_size()
        dist.all_gather_object(self.held, mine)
        self.dtensors = sum(type(p).__name__ == "DTensor" for p in params)
        if self.fsdp2:
            self.final = {n: p.full_tensor().detach().float().clone() for n, p in self.net.named_parameters()}
        elif any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: partitioned, gather them
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                self.final = {n: p.detach().float().clone() for n, p in self.net.named_parameters()}
        else:
            self.final = {n: p.detach().float().clone() for n, p in self.net.named_parameters()}


def trainer(strategy) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator="gpu" if GPU else "cpu",
        devices=WORLD,
        num_nodes=1,
        precision="32-true",
        max_steps=STEPS,
        gradient_clip_val=None,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def oracle_run(preset: str) -> torch.nn.Module:
    """apollo-torch on the full 12-row batch of each step, one process."""
    device = torch.device("cuda") if GPU else torch.device("cpu")
    model = oracle.make_model(0).to(device)
    opt = oracle.oracle_class()(oracle.groups(model, preset), **oracle.HPARAMS)
    for t in range(STEPS):
        x, y = oracle.batch(t, size=GLOBAL_BATCH)
        oracle.loss_fn(model, x.to(device), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    return model


def rel_diff(got: dict[str, torch.Tensor], ref: torch.nn.Module) -> float:
    """max over params of ||got - ref||_inf / ||ref||_inf."""
    return max(
        float((got[n].to(q.device) - q.detach()).abs().max() / q.detach().abs().max())
        for n, q in ref.named_parameters()
    )


def fit_case(strategy, preset: str, fsdp2: bool = False) -> dict:
    module = ApolloModule(preset, fsdp2=fsdp2)
    t = trainer(strategy)
    t.fit(module)
    wrapper = t.strategy.optimizers[0]
    return {
        "max_rel_diff": rel_diff(module.final, oracle_run(preset)),
        "steps": module.apollo.steps_taken,
        "global_step": t.global_step,
        "optimizer": type(wrapper).__name__,
        "held_elements": [h[0] for h in module.held],
        "partly_held_params": [h[1] for h in module.held],
        "total_elements": sum(p.numel() for p in oracle.make_model(0).parameters()),
        "dtensor_params": module.dtensors,
        "ds_config": {
            k: t.strategy.config.get(k)
            for k in ("zero_optimization", "gradient_clipping", "train_micro_batch_size_per_gpu")
        }
        if hasattr(t.strategy, "config")
        else None,
    }


# -- DeepSpeed ------------------------------------------------------------------------------------
def deepspeed_cases(report: dict) -> None:
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init; gloo does it all without.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy with its CUDA-only guard lifted and nothing else changed:
        ``setup_environment`` without the ``isinstance(self.accelerator, CUDAAccelerator)`` check
        (lightning/pytorch/strategies/deepspeed.py:342-346); what follows the check is
        DDPStrategy.setup_environment, as in the original."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

    def indexed_cpus() -> list[torch.device]:
        """cpu:0 .. cpu:W-1 (torch accepts the index; tensors moved there land on the CPU). Lightning's
        DeepSpeedStrategy needs device indices 0..W-1: it checks them (_validate_device_index_selection,
        lightning/fabric/strategies/deepspeed.py:880) and hands root_device.index to DeepSpeed as
        device_rank (lightning/pytorch/strategies/deepspeed.py:448), where None fails
        (deepspeed/runtime/engine.py:1942)."""
        return [torch.device("cpu", i) for i in range(WORLD)]

    def refusal(strategy) -> dict:
        try:
            trainer(strategy).fit(ApolloModule("apollo"))
            return {"refused": None}
        except Exception as e:  # noqa: BLE001 - what Lightning raises is the result
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return {"refused": f"{type(e).__name__}: {e}", "where": f"{tb.filename}:{tb.lineno}"}

    def zero_cases(make_strategy) -> None:
        """ZeRO 2 and 3, both presets. Buckets of 50 elements (the strategy's own arguments) so that this tiny
        model's gradients are reduced in many buckets, as a real model's are with the defaults."""
        for stage in (2, 3):
            for preset in PRESETS:
                buckets = {"allgather_bucket_size": 50, "reduce_bucket_size": 50}
                # run_case calls the lambda at once: stage and preset are this iteration's
                run_case(
                    report,
                    f"deepspeed/stage{stage}/{preset}",
                    lambda: fit_case(make_strategy(stage=stage, **buckets), preset),
                )

    if GPU:  # the shipped strategy, as users run it
        zero_cases(DeepSpeedStrategy)
        return
    # As shipped: refused on CPU; with the CUDA guard lifted but Lightning's own CPU devices (index None):
    # refused next (both before any process group exists).
    report["deepspeed/refused/as_shipped"] = refusal(DeepSpeedStrategy(stage=2))
    report["deepspeed/refused/cuda_guard_lifted"] = refusal(CPUDeepSpeedStrategy(stage=2))
    # CUDA guard lifted, indexed CPU devices.
    zero_cases(lambda **kw: CPUDeepSpeedStrategy(parallel_devices=indexed_cpus(), **kw))


# -- DeepSpeed: fit(ckpt_path=...) at another world size --------------------------------------------
RESUME_STEPS, SAVE_STEP, RESUME_GAP = 10, 5, 3  # one epoch of 10 steps, a checkpoint after step 5


class ResumeModule(ApolloModule):
    """ApolloModule with update_proj_gap 3 (projection refreshes on both sides of step 5), this rank's rows of
    ``oracle.batch(t, 12)`` at step t, and every step's loss averaged over the ranks in ``self.losses`` (1-based
    steps, as Lightning's global_step after the step). A plain DataLoader is not resumable mid-epoch in Lightning
    (it restarts it from the epoch's start, with a warning): ``train_dataloader``, which Lightning calls after
    restoring the checkpoint, starts at the restored ``global_step``, as a streaming loader would."""

    def __init__(self, preset: str):
        super().__init__(preset)
        self.step_losses: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def configure_optimizers(self):
        self.apollo = APOLLO(oracle.groups(self.net, self.preset, gap=RESUME_GAP), **oracle.HPARAMS)
        return self.apollo

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses[self.global_step + 1] = float(loss.detach())
        return loss

    def train_dataloader(self) -> DataLoader:
        r = self.global_rank
        xs, ys = zip(*(oracle.batch(t, size=GLOBAL_BATCH) for t in range(self.trainer.global_step, RESUME_STEPS)))
        x = torch.cat([b[LOCAL_BATCH * r : LOCAL_BATCH * (r + 1)] for b in xs])  # step-major rows
        y = torch.cat([b[LOCAL_BATCH * r : LOCAL_BATCH * (r + 1)] for b in ys])
        return DataLoader(TensorDataset(x, y), batch_size=LOCAL_BATCH, shuffle=False)

    def on_train_end(self) -> None:
        super().on_train_end()
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, self.step_losses)
        self.losses = {t: sum(d[t] for d in every) / len(every) for t in sorted(self.step_losses)}


def resume_case(make_strategy, phase: str, ckpt_dir: str, route: bool) -> dict:
    """``phase`` "full": 10 steps, a checkpoint after step 5; "resume": ``fit(ckpt_path=<that checkpoint>)``.
    ``route``: with apollo_dist.lightning.AnyWorldSizeResume in the callbacks (the user's one-line change)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from apollo_dist.lightning import AnyWorldSizeResume

    module = ResumeModule("apollo")
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_STEP, save_top_k=-1)
    callbacks = [saver] if phase == "full" else []
    t = pl.Trainer(
        strategy=make_strategy(),
        accelerator="cpu",
        devices=WORLD,
        num_nodes=1,
        precision="32-true",
        max_steps=RESUME_STEPS,
        gradient_clip_val=None,
        use_distributed_sampler=False,
        callbacks=callbacks + ([AnyWorldSizeResume()] if route else []),
        enable_checkpointing=phase == "full",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    ckpt = os.path.join(ckpt_dir, f"epoch=0-step={SAVE_STEP}.ckpt") if phase == "resume" else None
    t.fit(module, ckpt_path=ckpt)
    routed = getattr(t.strategy.model.load_checkpoint, "func", None)  # a functools.partial when routed
    return {
        "losses": module.losses,
        "global_step": t.global_step,
        "current_epoch": t.current_epoch,
        "steps": module.apollo.steps_taken,
        "final": {n: p.flatten().tolist() for n, p in module.final.items()},
        "load_checkpoint": f"{routed.__module__}.{routed.__qualname__}" if routed else None,
    }


def deepspeed_resume_cases(report: dict, stage: int, phase: str, ckpt_dir: str) -> None:
    """CPUDeepSpeedStrategy (as in deepspeed_cases) at ZeRO ``stage``. At W=3 resuming W=2's checkpoint, first
    without the callback (DeepSpeed's refusal, reported), then with it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:  # the CUDA-only guard lifted (see deepspeed_cases)
            DDPStrategy.setup_environment(self)

    def make():
        return CPUDeepSpeedStrategy(stage=stage, parallel_devices=[torch.device("cpu", i) for i in range(WORLD)])

    if phase == "resume":
        try:
            resume_case(make, phase, ckpt_dir, route=False)
            report["unrouted"] = {"refused": None}
        except Exception as e:  # noqa: BLE001 - DeepSpeed's refusal is the result
            report["unrouted"] = {"refused": f"{type(e).__name__}: {e}"}
    run_case(report, f"resume/{phase}", lambda: resume_case(make, phase, ckpt_dir, route=True))


# -- FSDP2 ----------------------------------------------------------------------------------------
def fsdp2_cases(report: dict) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    for preset in PRESETS:
        run_case(
            report,
            f"fsdp2/{preset}",
            lambda: fit_case(
                ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1), preset, fsdp2=True
            ),
        )


def run_case(report: dict, name: str, fn) -> None:
    t0 = time.time()
    try:
        report[name] = fn()
    except Exception:  # report it and go on: one broken case must not hide the others
        report[f"error/{name}"] = traceback.format_exc()[-4000:]
        print(report[f"error/{name}"], file=sys.stderr, flush=True)
    report[f"seconds/{name}"] = round(time.time() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["deepspeed", "fsdp2", "deepspeed-resume"], required=True)
    ap.add_argument("--stage", type=int, default=2, help="deepspeed-resume: the ZeRO stage")
    ap.add_argument("--phase", choices=["full", "resume"], default="full", help="deepspeed-resume: which run")
    ap.add_argument("--ckpt-dir", default=None, help="deepspeed-resume: where the full run's checkpoints go")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpu", action="store_true", help="accelerator='gpu' (NCCL), the shipped strategies")
    args = ap.parse_args()
    report: dict = {}
    if args.strategy == "deepspeed-resume":
        deepspeed_resume_cases(report, args.stage, args.phase, args.ckpt_dir)
    else:
        {"deepspeed": deepspeed_cases, "fsdp2": fsdp2_cases}[args.strategy](report)
    if dist.is_initialized():
        report["world"] = dist.get_world_size()
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        from apollo_dist.runtime import shutdown  # barrier, then leave without gloo's teardown (it can abort at exit)

        shutdown()
    elif int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
