"""Worker: a tiny LLaMA trained by ``transformers.Trainer`` (CPU, gloo), per-step losses to ``--out``.

--mode reference   one process, transformers' own ``optim="apollo_adamw"`` (apollo-torch, the oracle)
--mode apollo_dist ``apollo_dist.hf.APOLLOTrainer`` under the launcher it is started with (torchrun),
                   with ``--stage N`` as the Trainer's ``deepspeed=`` ZeRO stage (0: no DeepSpeed)
The global batch is the same for every world size (sequential sampling, ``GLOBAL`` rows per step).
``--save-steps K`` writes Trainer checkpoints; ``--resume DIR`` continues from one (at any W: keep
``--global-batch`` the same). ``--global-batch`` (default 4) rows per step, split evenly over the ranks;
``--optim-args`` replaces the APOLLO optim_args (default ``OPTIM_ARGS``).
``--defaults``: TrainingArguments' own betas, adam_epsilon (1e-8) and weight_decay (0) instead of the pinned
adam_epsilon 1e-6; ``--match-transformers``: ``match_transformers=true`` in optim_args (both modes:
transformers ignores the key). The report holds each param's (betas, eps, weight_decay) by position.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import oracle  # noqa: E402
import torch  # noqa: E402

oracle.stub_bitsandbytes()
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

GLOBAL = 4  # rows per optimizer step
SEQ = 16
OPTIM_ARGS = "rank=4,update_proj_gap=5"  # projection refreshes at steps 5, 10, 15


def make_model(mixtral: bool = False) -> torch.nn.Module:
    """2 layers, GQA (4 heads, 2 KV heads), an MLP of 44 (tall and wide weights not divisible by 3); ``mixtral``:
    the same as transformers' Mixtral with 4 experts (top 2), fused as [E, 2 x 44, 32] and [E, 32, 44]."""
    torch.manual_seed(0)
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    if mixtral:
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2))
    return LlamaForCausalLM(LlamaConfig(**shape))


def dataset(steps: int, global_batch: int = GLOBAL) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 64, (steps * global_batch, SEQ), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


class Sequential:
    """Rows in dataset order (every transformers version; newer ones also have train_sampling_strategy)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["reference", "apollo_dist"], required=True)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--fsdp2", action="store_true", help="fsdp_config={'fsdp_version': 2} (accelerate's FSDP2)")
    ap.add_argument("--gpu", action="store_true", help="CUDA + NCCL (default: CPU + gloo)")
    ap.add_argument("--defaults", action="store_true", help="TrainingArguments' default betas, eps, weight decay")
    ap.add_argument("--match-transformers", action="store_true", help="optim_args match_transformers=true")
    ap.add_argument("--global-batch", type=int, default=GLOBAL, help="rows per optimizer step (all ranks)")
    ap.add_argument("--optim-args", default=OPTIM_ARGS, help="APOLLO optim_args")
    ap.add_argument("--offload", action="store_true", help="DeepSpeed offload_optimizer cpu (and offload_param at 3)")
    ap.add_argument("--mixtral", action="store_true", help="a tiny Mixtral (fused 3-D expert weights)")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} does not split over {world} ranks")
    gpu = a.gpu
    ds_config = None
    if a.stage and not gpu:
        import deepspeed.ops

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at init (minutes on 2 cores): gloo does it all.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # accelerate picks a process-group backend only for accelerators; on CPU, configure its state with
        # gloo first and tell TrainingArguments to use it (accelerate's documented use_configured_state).
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    if a.stage:
        ds_config = {
            "zero_optimization": {"stage": a.stage},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
        if a.offload:  # no zero_force_ds_cpu_optimizer: APOLLOTrainer sets it, so accelerate keeps APOLLO
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            if a.stage == 3:
                ds_config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    args = TrainingArguments(
        output_dir=a.dir,
        per_device_train_batch_size=a.global_batch // world,
        max_steps=a.steps,
        learning_rate=1e-2,
        # transformers' apollo_adamw gives only the low-rank group adam_epsilon (others: APOLLOAdamW's 1e-6), and
        # APOLLOTrainer gives it to every group: pinned to 1e-6 they agree; --defaults leaves 1e-8 (apollo_dist.hf)
        **({} if a.defaults else {"adam_epsilon": 1e-6}),
        logging_steps=1,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        save_only_model=False,
        optim="apollo_adamw",
        optim_target_modules=["attn", "mlp"],
        optim_args=a.optim_args + (",match_transformers=true" if a.match_transformers else ""),
        deepspeed=ds_config,
        ddp_backend="gloo" if world > 1 and not gpu else None,
        use_cpu=ds_config is None and not gpu,
        accelerator_config={"use_configured_state": bool(ds_config) and not gpu},
        **(
            {
                "fsdp": "full_shard",
                "fsdp_config": {
                    "fsdp_version": 2,
                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                    "reshard_after_forward": True,
                },
            }
            if a.fsdp2
            else {}
        ),
    )
    if a.mode == "reference":
        base = Trainer
    else:
        from apollo_dist.hf import APOLLOTrainer as base
    trainer = type("SequentialTrainer", (Sequential, base), {})(
        model=make_model(a.mixtral), args=args, train_dataset=dataset(a.steps, a.global_batch)
    )
    trainer.train(resume_from_checkpoint=a.resume)
    losses = {int(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    inner = getattr(inner, "optimizer", inner)  # AcceleratedOptimizer -> DeepSpeed's wrapper -> APOLLO
    # what the engine's load_checkpoint is: a functools.partial of apollo_dist.deepspeed.load_checkpoint when routed
    routed = getattr(getattr(trainer.model_wrapped, "load_checkpoint", None), "func", None)
    if trainer.args.process_index == 0:
        with open(a.out, "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "world": world,
                    "global_step": trainer.state.global_step,
                    "load_checkpoint": f"{routed.__module__}.{routed.__qualname__}" if routed else None,
                    "optimizer": type(inner).__name__,
                    "offloaded": bool(
                        getattr(getattr(opt, "optimizer", None), "cpu_offload", False)
                        or getattr(getattr(opt, "optimizer", None), "offload_optimizer", False)
                    ),
                    "steps_taken": getattr(inner, "steps_taken", None),
                    # fused expert weights with low-rank state: each expert slice a slot of its own
                    "expert_slots": sum(s.expert is not None for b in getattr(inner, "buckets", []) for s in b.slots),
                    "hparams": [  # per param, in position order (the order the projections' seeds follow)
                        [list(g["betas"]), g["eps"], g["weight_decay"], g.get("rank")]
                        for g in inner.param_groups
                        for _ in g["params"]
                    ],
                },
                f,
            )


if __name__ == "__main__":
    main()
    from apollo_dist.runtime import shutdown

    shutdown()  # torch 2.13's gloo teardown can abort a finished run ("terminate called without an active exception")
