"""Engines of launch/train.py behind one small interface: one process, FSDP2, DeepSpeed ZeRO.

An engine owns the model, the optimizer and the lr schedule. The training loop only calls
``train_step(micro_batches, step)``, ``token_losses(x, y)``, ``lr()``, ``optimizer_state_bytes()``,
``skipped_steps()`` and the checkpoint hooks ``save_checkpoint(step)`` / ``load_checkpoint(dir)``, which use
each engine's native mechanism (torch.save; torch.distributed.checkpoint; DeepSpeed's save/load_checkpoint)
for a checkpoint of the same engine and world size, and ``load_any_checkpoint(dir)`` for one written at another
world size or by the other engine (FSDP2 <-> DeepSpeed ZeRO-1/2/3) or a canonical one: apollo_dist's loader,
each rank reading only what it holds, with no conversion.
A save that fills the file system removes its partial step directory and raises DiskFullError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from apollo_dist import APOLLO, param_groups
from apollo_dist.checkpoint.streaming import DiskFullError, free_bytes, is_disk_full, partial_bytes
from apollo_dist.deepspeed import offloads
from apollo_dist.groups import LOW_RANK_KEYS
from apollo_dist.native_checkpoints import TRAINER_FILE
from apollo_dist.runtime import free_port, host_peak_rss_gib, state_bytes, unwrap
from launch.config import OptimizerConfig, RunConfig
from launch.model import HFWeights, fill_zero3, materialize, token_losses

CHECKPOINT_FORMAT = "apollo_dist.train/1"
META_FILE = TRAINER_FILE  # written last: a step directory without it is incomplete


# -- processes (the launcher environment, shutdown: apollo_dist.runtime) ---------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tp: int = 1  # tensor-parallel size (FSDP2 --tp): the tp consecutive ranks of a data shard see the same batch

    @property
    def data_rank(self) -> int:
        """This rank's shard of the data (ranks differing only in their tp coordinate share one)."""
        return self.rank // self.tp

    @property
    def data_world(self) -> int:
        """Data-parallel shards: W / tp."""
        return self.world // self.tp

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (gloo has no AVG)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def all_gather_int(self, value: int) -> list[int]:
        return [int(v) for v in self._all_gather(value, torch.int64)]

    def all_gather_float(self, value: float) -> list[float]:
        return [float(v) for v in self._all_gather(value, torch.float64)]

    def _all_gather(self, value, dtype: torch.dtype) -> list:
        if self.world == 1:
            return [value]
        t = torch.tensor([value], dtype=dtype, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.item() for o in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def pretrained(run: RunConfig) -> Optional[HFWeights]:
    """The --init-from checkpoint's weights, or None (random init from the seed)."""
    return HFWeights(run.init_from) if run.init_from else None


class TooManyRanks(ValueError):
    """More ranks on this node than visible GPUs."""


def check_gpus_per_node(local_rank: int) -> None:
    """TooManyRanks (one line: both numbers, both ways out) when this node runs more ranks than it sees
    GPUs; called before any process group exists. Without a visible GPU every rank runs on the CPU."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = max(
        [local_rank + 1] + [int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if os.environ.get(k)]
    )
    if visible and local > visible:
        raise TooManyRanks(
            f"{local} ranks on this node but {visible} visible GPU(s): launch at most {visible} "
            f'(--nproc_per_node / --num_gpus {visible}), or run on the CPU with CUDA_VISIBLE_DEVICES=""'
        )


def init_distributed(engine: str, timeout_s: float = 600) -> Dist:
    """Pick the device (cuda:LOCAL_RANK when CUDA is available and DS_ACCELERATOR is not "cpu", else CPU)
    and start the process group
    (NCCL / gloo) when there is more than one rank or DeepSpeed runs (it always wants one).

    ``timeout_s`` bounds every collective: a rank whose peer is stuck (stopped, deadlocked, waiting on a
    failed file system) raises after it instead of waiting for gloo's default 30 minutes."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # DS_ACCELERATOR=cpu asks for CPU ranks even where GPUs are visible (DeepSpeed's launcher re-exposes them)
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "").lower() != "cpu"
    if cuda:
        check_gpus_per_node(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if engine != "single":
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)  # plain `python train.py --engine fsdp2|deepspeed`: a world of one
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    elif engine == "fsdp2":
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, local_rank, device)


# -- optimizer and schedule ---------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, hp: OptimizerConfig, layerwise: bool = False) -> torch.optim.Optimizer:
    """APOLLO / APOLLO-Mini on ``hp.target_modules`` (plain Adam elsewhere), or torch AdamW.
    ``layerwise``: APOLLO's layer-wise updates (inside backward; apollo_dist.layerwise)."""
    common = {"lr": hp.lr, "betas": tuple(hp.betas), "eps": hp.eps, "weight_decay": hp.weight_decay}
    if hp.optimizer == "adamw":
        if layerwise:
            raise ValueError("layer-wise updates are APOLLO's (apollo, apollo-mini), not AdamW's")
        return torch.optim.AdamW(model.parameters(), **common)
    given = hp.to_dict()
    low_rank = {k: given[k] for k in LOW_RANK_KEYS if k in given}
    groups = param_groups(model, hp.target_modules, preset=hp.optimizer, **low_rank)
    common.update({k: given[k] for k in ("correct_bias", "scale_front", "disable_nl", "projection_tf32") if k in given})
    return APOLLO(groups, **common, layerwise=layerwise)


def cosine_schedule(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """lr multiplier of optimizer step ``i`` (0-based): linear warm-up over ``warmup`` steps, then cosine
    decay to ``min_ratio`` at ``total`` (GaLore / APOLLO's pre-training schedule)."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- checkpoint directories ---------------------------------------------------------------------
def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def resolve_checkpoint(path: str) -> tuple[str, str, dict]:
    """(root, tag, meta) of ``path``: a step directory, or a save directory holding a `latest` file.
    ValueError with a one-line reason when it is not a complete checkpoint. A step directory whose
    rewrite stopped between the swap's two renames resolves to its complete step_N.new (complete_tag)."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        root, tag = os.path.split(os.path.normpath(path))
    elif os.path.isfile(os.path.join(path, "latest")):
        root = path
        with open(os.path.join(path, "latest")) as f:
            tag = f.read().strip()
    elif complete_tag(*os.path.split(os.path.normpath(path))) != os.path.basename(os.path.normpath(path)):
        root, tag = os.path.split(os.path.normpath(path))  # a step directory whose rewrite stopped mid-swap
    else:
        raise ValueError(f"--resume {path}: not a checkpoint (no {META_FILE}, no 'latest' file)")
    tag = complete_tag(root, tag)
    meta_path = os.path.join(root, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"--resume {path}: {os.path.join(root, tag)} is incomplete (no {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return root, tag, meta


# A rewrite of a complete step directory step_N (a resumed run redoing saved steps) goes to step_N.new;
# once every rank's files are there rank 0 swaps it in: step_N -> step_N.old, step_N.new -> step_N,
# `latest`, then step_N.old is removed. Under the name step_N there is always a complete checkpoint,
# the old or the new one, except between the two renames; then step_N.new is complete (trainer.json is
# written before the swap) and resolve_checkpoint takes it; the next save (of any step) renames it back
# and removes what an interrupted save left aside. A job dying is covered, not a power loss (no fsync).
def aside_tags(tag: str) -> tuple[str, str]:
    """(write-aside, trash) sibling names of step directory ``tag``."""
    return f"{tag}.new", f"{tag}.old"


def complete_tag(root: str, tag: str) -> str:
    """``tag``, or its write-aside sibling when that holds the complete checkpoint and ``tag`` does not (a
    swap stopped between its two renames)."""
    new = aside_tags(tag)[0]
    if not os.path.isfile(os.path.join(root, tag, META_FILE)) and os.path.isfile(os.path.join(root, new, META_FILE)):
        return new
    return tag


def _prepare_step_dir(root: str, tag: str) -> bool:
    """Rank 0, before saving ``tag``: for it and every step directory under ``root`` with a sibling left
    aside, finish a swap stopped between its renames and remove what an interrupted save or swap left.
    True when ``tag`` holds a complete checkpoint (the save then writes aside)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    for base in {tag} | {n.rsplit(".", 1)[0] for n in names if n.startswith("step_") and n.endswith((".new", ".old"))}:
        final = os.path.join(root, base)
        new, old = (os.path.join(root, t) for t in aside_tags(base))
        if complete_tag(root, base) != base:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(new, final)
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return os.path.isfile(os.path.join(root, tag, META_FILE))


def _swap_in(root: str, tag: str) -> None:
    """Rank 0, once the complete new checkpoint (trainer.json included) is in ``tag``.new: put it under
    ``tag`` with two directory renames (each atomic on POSIX); the old one is left as ``tag``.old."""
    final = os.path.join(root, tag)
    new, old = (os.path.join(root, t) for t in aside_tags(tag))
    os.rename(final, old)
    os.rename(new, final)


def _write_latest(root: str, tag: str) -> None:
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(tag)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))


def _kill_in_save_hook(step: int, rank: int) -> None:
    """Test hook (tests/test_faults.py): with APOLLO_DIST_KILL_IN_SAVE=STEP:RANK, rank RANK kills itself
    (SIGKILL) while saving STEP, after writing its own files and before trainer.json and `latest` (into
    step_N.new when the save rewrites a complete step_N)."""
    target = os.environ.get("APOLLO_DIST_KILL_IN_SAVE")
    if target and target == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _nonfinite_grad_hook(step: int, rank: int) -> bool:
    """Test hook (tests/test_reporting.py): with APOLLO_DIST_NONFINITE_GRAD_AT=STEP[:RANK],... the backward
    of each step STEP gives NaN gradients (on rank RANK only, else on every rank), as a diverging run would;
    the logged loss stays the true one."""
    for item in filter(None, os.environ.get("APOLLO_DIST_NONFINITE_GRAD_AT", "").split(",")):
        at, _, only = item.partition(":")
        if int(at) == step and (not only or int(only) == rank):
            return True
    return False


def _poison(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` whose gradient is NaN (the forward value unchanged)."""
    loss.register_hook(lambda g: torch.full_like(g, float("nan")))
    return loss


def _held_bytes(p: torch.Tensor) -> int:
    """Bytes of the part of parameter ``p`` this rank holds (ZeRO-3 partition, FSDP2 local shard, else all)."""
    t = getattr(p, "ds_tensor", None)
    t = getattr(p, "_local_tensor", p) if t is None else t
    return t.numel() * t.element_size()


# -- engines ------------------------------------------------------------------------------------
class Engine:
    """One process: the model on the device, autocast for bf16, accumulation by summing micro-grads."""

    name = "single"
    skipped_before = 0  # steps skipped before a native resume (its trainer.json's "skipped_steps")

    def __init__(self, model: torch.nn.Module, hp: OptimizerConfig, run: RunConfig, d: Dist):
        self.d, self.hp, self.run = d, hp, run
        self.bf16 = run.dtype == "bf16"
        if run.param_dtype == "bf16":  # still on the meta device: no fp32 copy is ever allocated
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)  # parameters only: the rotary frequencies stay fp32
        # Built on the meta device: shard first (FSDP2), then allocate and initialize only what this rank holds.
        self.model = materialize(self._wrap(model), run.seed, d.device, pretrained(run))
        if run.weight_quant == "int8":  # Q-APOLLO: target linears' weights as int8 + group scales
            from apollo_dist.quant import quantize_model

            quantize_model(self.model, hp.target_modules)
        self.host_rss_model_gib = host_peak_rss_gib()
        self.optimizer = build_optimizer(self.model, hp, layerwise=bool(run.layerwise))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(run.warmup_steps, run.steps))

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _sync_grads(self, last: bool) -> None:
        """Whether this micro-batch's backward communicates gradients (FSDP2: only the last)."""

    def _clip_grad_norm(self, max_norm: float) -> None:
        """Scale the gradients so that their global 2-norm is at most ``max_norm``."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0) -> torch.Tensor:
        """Forward/backward every micro-batch, then one optimizer step (training step ``step``); this rank's
        mean loss."""
        total = torch.zeros((), device=self.d.device)
        poison = _nonfinite_grad_hook(step, self.d.rank)
        for i, (x, y) in enumerate(micro_batches):
            self._sync_grads(i == len(micro_batches) - 1)
            with self._autocast():
                loss = token_losses(self.model, x, y).mean()
            if poison:
                loss = _poison(loss)
            (loss / len(micro_batches)).backward()  # mean over the step's micro-batches
            total += loss.detach()
        if self.run.grad_clip > 0:
            self._clip_grad_norm(self.run.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    @torch.no_grad()
    def token_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token validation losses (eval mode, no grad)."""
        self.model.eval()
        with self._autocast():
            out = token_losses(self.model, x, y)
        self.model.train()
        return out

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_state_bytes(self) -> int:
        return state_bytes(self.optimizer)

    def skipped_steps(self) -> int:
        """Steps of this run skipped for non-finite gradients, since step 1 (across native resumes): APOLLO's
        (``nonfinite="skip"``) and, under DeepSpeed, those its own overflow check skipped before APOLLO saw
        them. Every rank has the same count. Reading APOLLO's waits for its last step to finish on the
        device: read it where the job syncs anyway."""
        return self.skipped_before + int(getattr(unwrap(self.optimizer), "skipped_steps", 0))

    def checkpoint_bytes(self) -> int:
        """Bytes of the tensors this rank's checkpoint holds: its part of the parameters and its optimizer
        state (the files add headers; under ZeRO-1/2 rank 0 writes the whole model, every rank its fp32
        partition)."""
        return sum(_held_bytes(p) for p in self.model.parameters()) + state_bytes(self.optimizer)

    def describe(self) -> str:
        params = ", bf16 parameters" if self.run.param_dtype == "bf16" else ""
        return f"{self.name}, {self.run.dtype}{params}"

    # -- checkpoint hooks ---------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> str:
        """Save model, optimizer, lr schedule and data position (= step) under --save-dir; returns the dir.

        A step directory holding a complete checkpoint already is not written over: every rank writes
        into its sibling step_N.new, then rank 0 swaps it in (see aside_tags); `latest` follows the swap.
        A full file system: the rank that meets it removes the directory being written (never a complete
        one) and raises DiskFullError; `latest` still names the last complete step."""
        root, tag = self.run.save_dir, step_tag(step)
        final = os.path.join(root, tag)
        rewrite = int(_prepare_step_dir(root, tag)) if self.d.rank == 0 else 0
        rewrite = self.d.all_gather_int(rewrite)[0]  # rank 0's answer; no rank writes before its clean-up
        path = os.path.join(root, aside_tags(tag)[0]) if rewrite else final
        try:
            os.makedirs(path, exist_ok=True)
            self._save_native(path)
            _kill_in_save_hook(step, self.d.rank)
            self.d.barrier()
            if self.d.rank == 0:
                self._write_meta(path, step)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            self._raise_if_disk_full(e, root, path)
            raise
        if self.d.rank == 0:
            if rewrite:
                _swap_in(root, tag)
            _write_latest(root, tag)
            shutil.rmtree(os.path.join(root, aside_tags(tag)[1]), ignore_errors=True)
        self.d.barrier()
        return final

    def _raise_if_disk_full(self, exc: BaseException, root: str, path: str) -> None:
        """DiskFullError (from ``exc``) if ``exc`` is a full file system under ``path``, the step directory
        being written, after removing it: it is incomplete (no trainer.json, or a step_N.new aside)."""
        need = self.checkpoint_bytes()
        if not is_disk_full(exc, path, need):
            return
        free = free_bytes(root) + partial_bytes(path)  # counted before the removal: open files free later
        shutil.rmtree(path, ignore_errors=True)  # another rank may still write into it: best effort
        try:
            with open(os.path.join(root, "latest")) as f:
                latest = f"`latest` still names {f.read().strip()}"
        except FileNotFoundError:
            latest = "no complete checkpoint is there yet"
        raise DiskFullError(
            path,
            need,
            free,
            f"; the partial {os.path.basename(path)} was removed and {latest}: free space or pass another "
            f"--save-dir, then --resume {root}",
            what=" (model and optimizer state" + (", this rank's part)" if self.d.world > 1 else ")"),
        ) from exc

    def load_checkpoint(self, path: str) -> int:
        """Load a checkpoint written by this engine at this world size; returns its step."""
        root, tag, meta = resolve_checkpoint(path)
        self._load_native(os.path.join(root, tag))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.skipped_before = int(meta.get("skipped_steps", 0))  # absent in checkpoints of older versions
        return int(meta["step"])

    def load_any_checkpoint(self, path: str) -> int:
        """Load a checkpoint of another world size or engine (a launch/train.py save or step directory of
        FSDP2 or DeepSpeed ZeRO-1/2/3), or a canonical one, through `apollo_dist.checkpoint.resume_checkpoint`:
        fp32 master weights (the model's own copy follows; also in bf16 runs), APOLLO's state, per-param steps
        and seeds, each rank reading only the elements it holds, one param at a time. The lr schedule, the
        data position and the count of skipped steps come with it as with `load_checkpoint`; returns the step."""
        from apollo_dist.checkpoint import is_canonical, resume_checkpoint

        if not is_canonical(path):
            root, tag, _ = resolve_checkpoint(path)
            path = os.path.join(root, tag)  # the complete step directory (`latest`, a swap stopped mid-way)
        module = getattr(self.model, "module", self.model)  # the names the checkpoint uses (DeepSpeed wraps)
        trainer = resume_checkpoint(path, self.optimizer, module, self.scheduler)
        self.skipped_before = int((trainer.get("run") or {}).get("skipped_steps", 0))  # trainer.json's count
        return int(trainer["step"])

    def _save_native(self, path: str) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        tmp = os.path.join(path, "state.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, "state.pt"))  # atomic: no half-written state.pt

    def _load_native(self, path: str) -> None:
        state = torch.load(os.path.join(path, "state.pt"), map_location=self.d.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _write_meta(self, path: str, step: int) -> None:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "engine": self.name,
            "world_size": self.d.world,
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.skipped_steps(),  # APOLLO's own count is not in its state dict
            "hparams": self.hp.to_dict(),
            **self.run.saved(),  # RunConfig's saved fields (RUN_KEYS_SAVED)
        }
        tmp = os.path.join(path, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(path, META_FILE))


def llama_tp_plan() -> dict:
    """Tensor-parallel plan of one transformers LLaMA decoder layer (torchtitan's and transformers'
    base_model_tp_plan): q/k/v and gate/up column-wise, o and down row-wise; attention reshapes with -1
    heads, so each rank runs its heads. The embedding and head: `llama_vocab_tp_plan`; norms stay
    data-parallel only."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    return {
        **{k: ColwiseParallel() for k in col},
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def llama_vocab_tp_plan() -> dict:
    """Vocab-parallel embedding (row-wise: each rank looks up its rows, the partial outputs are summed) and
    column-wise head (logits gathered), as torchtitan shards them (without its sequence parallelism)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }


class FSDP2Engine(Engine):
    """FSDP2: ``fully_shard`` per decoder layer and the root; APOLLO reads the DTensor layout itself.
    bf16 = bf16 compute with fp32 sharded master weights and fp32 gradient reduction. ``run.mesh``
    = (R, S) runs HSDP: a 2-D (replicate, shard) mesh, params (Replicate(), Shard(0)). ``run.tp`` = T > 1
    adds tensor parallelism (torchtitan's order): each decoder layer's linears column-/row-wise on a "tp"
    mesh dim of size T (`llama_tp_plan`, `llama_vocab_tp_plan`), then fully_shard on the data-parallel dims."""

    name = "fsdp2"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        tp = self.run.tp
        if self.run.mesh:
            dp_shape, dp_names = tuple(self.run.mesh), ("replicate", "shard")
        else:
            dp_shape, dp_names = (self.d.world // tp,), ("dp",)
        if tp > 1:
            from torch.distributed.tensor.parallel import parallelize_module

            cfg = model.config
            for what, size in (
                ("num_attention_heads", cfg.num_attention_heads),
                ("num_key_value_heads", cfg.num_key_value_heads),
                ("intermediate_size", cfg.intermediate_size),
            ):
                if size % tp:
                    raise ValueError(f"--tp {tp}: the model's {what} = {size} is not divisible by it")
            full = init_device_mesh(self.d.device.type, dp_shape + (tp,), mesh_dim_names=dp_names + ("tp",))
            mesh = full[dp_names]
            if not cfg.tie_word_embeddings:  # vocab-parallel embedding and head (a tied pair would need one plan)
                parallelize_module(model, full["tp"], llama_vocab_tp_plan())
            for layer in model.model.layers:
                parallelize_module(layer, full["tp"], llama_tp_plan())
        elif self.run.mesh:  # fully_shard infers HSDP from a 2-D mesh
            mesh = init_device_mesh(self.d.device.type, dp_shape, mesh_dim_names=dp_names)
        else:
            mesh = init_device_mesh(self.d.device.type, (self.d.world,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.bf16
            else MixedPrecisionPolicy()
        )
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        return fully_shard(model, mesh=mesh, mp_policy=mp)

    def _autocast(self):
        return contextlib.nullcontext()  # the mixed-precision policy casts

    def describe(self) -> str:
        tp = f" x TP {self.run.tp}" if self.run.tp > 1 else ""
        if self.run.mesh:
            r, s = self.run.mesh
            return f"fsdp2 HSDP {r}x{s} (replicate x shard){tp}, {self.run.dtype}"
        return f"fsdp2{tp}, {self.run.dtype}"

    def _clip_grad_norm(self, max_norm: float) -> None:
        """torch's clipping, or with --tp (params on two meshes: the tensor-parallel ones on (dp, tp), the
        norms on dp, which torch's total norm cannot stack) each gradient's norm made whole first; the same
        coefficient, max_norm / (norm + 1e-6) capped at 1 (one host sync per step)."""
        if self.run.tp == 1:
            return super()._clip_grad_norm(max_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g) for g in grads]
        total = torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]).norm()
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)

    def _sync_grads(self, last: bool) -> None:
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once per step, not per micro-batch

    def _save_native(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def _load_native(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage from the JSON): APOLLO through ``apollo_dist.deepspeed.initialize``, AdamW as
    a client torch optimizer. DeepSpeed scales the loss for accumulation."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, hp: OptimizerConfig, run: RunConfig, d: Dist, ds_config: dict):
        from apollo_dist.deepspeed import initialize  # plain deepspeed.initialize when the config has no APOLLO

        self.d, self.hp, self.run = d, hp, run
        self.bf16 = run.dtype == "bf16"
        if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3:
            # Each rank allocates only its partitions: construction under zero.Init, then each partition filled.
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = type(model)(model.config)
            fill_zero3(model, run.seed, pretrained(run))
        else:  # ZeRO-1/2 keep a replica of the (low-precision) weights on every rank anyway
            model = materialize(model, run.seed, d.device, pretrained(run))
        self.host_rss_model_gib = host_peak_rss_gib()
        client = build_optimizer(model, hp) if hp.optimizer == "adamw" else None
        if client is not None and offloads(ds_config):
            client, ds_config = offload_adamw(model, hp, ds_config, d.rank)
        self.model, self.optimizer, _, _ = initialize(
            model=model, optimizer=client, model_parameters=model.parameters(), config=ds_config
        )
        # The schedule is built here, after initialize, on the optimizer DeepSpeed steps, and stepped by
        # train_step: torch's LRScheduler wraps optimizer.step when it is built, and a scheduler handed
        # to initialize would wrap APOLLO's step before the adapter specializes it for ZeRO.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            unwrap(self.optimizer), cosine_schedule(run.warmup_steps, run.steps)
        )
        self._ds_skipped_at_start = 0  # DeepSpeed's count when this process started stepping

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0) -> torch.Tensor:
        total = torch.zeros((), device=self.d.device)
        poison = _nonfinite_grad_hook(step, self.d.rank)
        for x, y in micro_batches:
            loss = token_losses(self.model, x, y).mean()
            if poison:
                loss = _poison(loss)
            self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            self.model.step()  # steps the optimizer at the accumulation boundary only
            total += loss.detach().float()
        self.scheduler.step()
        return total / len(micro_batches)

    def _autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts (bf16 config)

    def describe(self) -> str:
        zero = self.model.optimizer
        offload = [
            what
            for what, on in (
                ("optimizer", getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)),
                ("params", getattr(zero, "offload_param", False)),
            )
            if on
        ]
        where = f", {' and '.join(offload)} offloaded to CPU ({type(unwrap(zero)).__name__})" if offload else ""
        return f"deepspeed ZeRO-{self.model.zero_optimization_stage()}, {self.run.dtype}{where}"

    def skipped_steps(self) -> int:
        """APOLLO's count plus DeepSpeed's: ZeRO checks the gradient norm (fp32; bf16 with
        ``check_grad_overflow``, its default) and skips a non-finite step without calling the optimizer."""
        return super().skipped_steps() + self.model.skipped_steps - self._ds_skipped_at_start

    def _save_native(self, path: str) -> None:
        root, tag = os.path.split(path)
        # No DeepSpeed `latest` file: ours (the same name) is written after trainer.json, when every rank's
        # files are complete; DeepSpeed's would name this step while other ranks may still be writing.
        self.model.save_checkpoint(root, tag=tag, save_latest=False)

    def _load_native(self, path: str) -> None:
        root, tag = os.path.split(path)
        loaded, _ = self.model.load_checkpoint(root, tag=tag)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} under {root}")
        self._ds_skipped_at_start = self.model.skipped_steps  # restored from the checkpoint: in skipped_before


def offload_adamw(model: torch.nn.Module, hp: OptimizerConfig, ds_config: dict, rank: int) -> tuple:
    """AdamW under ZeRO-Offload: DeepSpeedCPUAdam (DeepSpeed's own pairing) when its C++ op builds here, else
    torch's AdamW on the CPU partitions (``zero_force_ds_cpu_optimizer`` false), said on stderr; torch's at once
    with APOLLO_DIST_TORCH_ADAMW_OFFLOAD=1 (benchmarks where the op failed to build). Returns (optimizer, config)."""
    import sys

    try:
        if os.environ.get("APOLLO_DIST_TORCH_ADAMW_OFFLOAD") == "1":
            raise RuntimeError("APOLLO_DIST_TORCH_ADAMW_OFFLOAD=1")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        common = {"lr": hp.lr, "betas": tuple(hp.betas), "eps": hp.eps, "weight_decay": hp.weight_decay}
        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **common), ds_config
    except Exception as e:  # the op is JIT-compiled: no compiler, no headers, ...
        if rank == 0:
            print(
                f"DeepSpeedCPUAdam unavailable ({type(e).__name__}: {str(e)[:300]}): torch.optim.AdamW steps the "
                "CPU partitions instead",
                file=sys.stderr,
                flush=True,
            )
        return build_optimizer(model, hp), {**ds_config, "zero_force_ds_cpu_optimizer": False}


def make_engine(
    name: str, model: torch.nn.Module, hp: OptimizerConfig, run: RunConfig, d: Dist, ds_config: Optional[dict]
) -> Engine:
    if name == "deepspeed":
        return DeepSpeedEngine(model, hp, run, d, ds_config)
    return (FSDP2Engine if name == "fsdp2" else Engine)(model, hp, run, d)
