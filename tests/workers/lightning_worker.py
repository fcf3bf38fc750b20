"""Worker (launched by ``torchrun --standalone --nproc_per_node 2``, CPU, gloo): ``apollo_dist.APOLLO``
returned from a LightningModule's ``configure_optimizers`` and trained by a real
``lightning.pytorch.Trainer`` (accelerator="cpu", devices=2, precision="32-true", max_steps=30, no
clipping), against the apollo-torch oracle trained on the full global batch in one process.

Lightning picks the processes up from torchrun's environment (TorchElasticEnvironment: it spawns none).
Each rank's DataLoader (``use_distributed_sampler=False``, batch_size 6, no shuffling) yields its own
rank-major half of ``oracle.batch(t, size=12)`` at step t: rank r gets rows [6r, 6r + 6).

``--strategy``:
  deepspeed  first ``Trainer(strategy=DeepSpeedStrategy(stage=2), accelerator="cpu")`` exactly as shipped:
             Lightning refuses it (the error is reported); then ZeRO stages 2 and 3 with
             ``CPUDeepSpeedStrategy``, Lightning's DeepSpeedStrategy with only its two CUDA-only guards
             lifted (see the class), for each preset;
  fsdp2      ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``; ``configure_model``
             calls ``fully_shard`` on every block and on the LightningModule itself with
             ``self.device_mesh["data_parallel"]``, for each preset.
Full parameters are gathered in ``on_train_end`` (ZeRO-3: ``deepspeed.zero.GatheredParameters``; FSDP2:
``DTensor.full_tensor``). Rank 0 writes a JSON report to ``--out``: per case ``max_rel_diff`` vs the
oracle, ``steps`` (``APOLLO.steps_taken``), ``global_step`` (Lightning's), the optimizer wrapper's class.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import oracle  # noqa: E402

oracle.stub_bitsandbytes()

import lightning.pytorch as pl  # noqa: E402

from apollo_dist import APOLLO  # noqa: E402

GLOBAL_BATCH = 12
WORLD = 2
LOCAL_BATCH = GLOBAL_BATCH // WORLD
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
        strategy=strategy, accelerator="cpu", devices=WORLD, num_nodes=1, precision="32-true", max_steps=STEPS,
        gradient_clip_val=None, use_distributed_sampler=False, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


def oracle_run(preset: str) -> torch.nn.Module:
    """apollo-torch on the full 12-row batch of each step, one process."""
    model = oracle.make_model(0)
    opt = oracle.oracle_class()(oracle.groups(model, preset), **oracle.HPARAMS)
    for t in range(STEPS):
        x, y = oracle.batch(t, size=GLOBAL_BATCH)
        oracle.loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return model


def rel_diff(got: dict[str, torch.Tensor], ref: torch.nn.Module) -> float:
    """max over params of ||got - ref||_inf / ||ref||_inf."""
    return max(float((got[n] - q.detach()).abs().max() / q.detach().abs().max()) for n, q in ref.named_parameters())


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
        "config": getattr(t.strategy, "config", None) and {k: t.strategy.config.get(k) for k in ("zero_optimization", "gradient_clipping",
                                                                                                    "train_micro_batch_size_per_gpu")},
    }


# -- DeepSpeed ------------------------------------------------------------------------------------
def deepspeed_cases(report: dict) -> None:
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init; gloo does it all without.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from lightning.fabric.strategies.deepspeed import _validate_device_index_selection  # noqa: F401 (exists: lifted below)
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy with its two CUDA-only guards lifted, nothing else changed:
        ``setup_environment`` without the ``isinstance(self.accelerator, CUDAAccelerator)`` check
        (lightning/pytorch/strategies/deepspeed.py:342) and ``setup_distributed`` without
        ``_validate_device_index_selection`` (lightning/fabric/strategies/deepspeed.py:877, which needs
        device indices 0..W-1; CPU devices have index None)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy.setup_environment calls after its check

        def setup_distributed(self) -> None:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    # 1. As shipped: refused on CPU.
    try:
        trainer(DeepSpeedStrategy(stage=2)).fit(ApolloModule("apollo"))
        report["deepspeed/as_shipped"] = {"refused": None}
    except Exception as e:  # noqa: BLE001 - what Lightning raises is the result
        tb = traceback.extract_tb(e.__traceback__)[-1]
        report["deepspeed/as_shipped"] = {"refused": f"{type(e).__name__}: {e}", "where": f"{tb.filename}:{tb.lineno}"}
    # 2. Guards lifted: ZeRO 2 and 3, both presets.
    for stage in (2, 3):
        for preset in PRESETS:
            run_case(report, f"deepspeed/stage{stage}/{preset}", lambda: fit_case(CPUDeepSpeedStrategy(stage=stage), preset))


# -- FSDP2 ----------------------------------------------------------------------------------------
def fsdp2_cases(report: dict) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    for preset in PRESETS:
        run_case(report, f"fsdp2/{preset}", lambda: fit_case(ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1), preset, fsdp2=True))


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
    ap.add_argument("--strategy", choices=["deepspeed", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    report: dict = {}
    {"deepspeed": deepspeed_cases, "fsdp2": fsdp2_cases}[args.strategy](report)
    if dist.is_initialized():
        report["world"] = dist.get_world_size()
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        from launch.engines import shutdown  # barrier, then leave without gloo's teardown

        shutdown()
    elif int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
