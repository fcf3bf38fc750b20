"""Pre-train LLaMA with APOLLO on one process, FSDP2, DeepSpeed ZeRO or under mpirun.

    python launch/train.py --engine single --model tiny --steps 200
    torchrun --nproc_per_node 2 launch/train.py --engine fsdp2
    deepspeed launch/train.py --deepspeed ds_configs/apollo.json        (the launcher adds --local_rank)
    mpirun -np 2 python launch/train.py [--deepspeed CONFIG]            (ranks found through mpi4py)

--engine auto (the default) picks deepspeed when --deepspeed is given, else fsdp2 with more than one
rank (torchrun, mpirun), else single. The data stream is a function of (seed, step, global batch) only,
so every launch of the same flags trains on the same tokens and gives the same losses (fp32).

Optimizer flags and --grad-clip default to the DeepSpeed JSON's "optimizer" block and
"gradient_clipping" under DeepSpeed, and otherwise to ds_configs/apollo.json (apollo_mini.json for
--optimizer apollo-mini); flags given explicitly win. Under DeepSpeed the JSON also supplies the batch
sizes and bf16 unless flags say otherwise; train.py owns the lr schedule (a JSON "scheduler" block is
ignored) and writes its resolved values into the config it hands DeepSpeed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from typing import Any, Optional

from apollo_dist import runtime
from apollo_dist.groups import LOW_RANK_KEYS, TUNABLE_LOW_RANK_KEYS
from apollo_dist.projection import PROJECTIONS
from launch import data, engines
from launch.config import RUN_KEYS_SAVED, OptimizerConfig, RunConfig
from launch.model import check_model_arg

ROOT = data.ROOT
DEFAULT_CONFIGS = {
    "apollo": "ds_configs/apollo.json",
    "apollo-mini": "ds_configs/apollo_mini.json",
    "adamw": "ds_configs/apollo.json",
}
OPTIMIZER_TYPES = {
    "apollo": "apollo",
    "apollo-mini": "apollo-mini",
    "apollo_mini": "apollo-mini",
    "adamw": "adamw",
    "adam": "adamw",
}
COMMON_KEYS = ("lr", "betas", "eps", "weight_decay")
FALLBACK = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0, "target_modules": ["attn", "mlp"]}


class UsageError(ValueError):
    """Bad input, reported as one line before any process group work."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a("--engine", choices=["auto", "single", "fsdp2", "deepspeed"], default="auto", help="see the module doc")
    a("--deepspeed", metavar="CONFIG", help="DeepSpeed JSON (implies --engine deepspeed)")
    a(
        "--mesh",
        metavar="RxS",
        default=None,
        help="FSDP2 as HSDP: R replicas x S shards (R x S = W / tp); state is sharded "
        "over S, APOLLO communicates within a shard group only (default: 1xW, plain FSDP)",
    )
    a(
        "--tp",
        type=int,
        default=1,
        help="FSDP2 x tensor parallel of this size (torchtitan's plan: each decoder layer's "
        "q/k/v/gate/up column-wise, o/down row-wise); the tp ranks of a data shard see the same batch",
    )
    a(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # added by launchers; LOCAL_RANK wins
    a("--model", default="tiny", help="tiny|60m|130m|350m|1b|7b or a LlamaConfig JSON")
    a("--data", default=data.DEFAULT_CORPUS, help="text file, directory of .txt/.jsonl, tarball, or uint16 .bin")
    a("--tokenizer", default=None, help="local HF tokenizer directory (default: bytes)")
    a("--val-fraction", type=float, default=0.05, help="held-out tail of the corpus")
    a("--optimizer", choices=["apollo", "apollo-mini", "adamw"], default=None, help="default: the JSON's, else apollo")
    a("--rank", type=int, default=None)
    a("--scale", type=float, default=None)
    a("--scale-type", choices=["channel", "tensor"], default=None)
    a("--update-proj-gap", type=int, default=None)
    a("--proj", choices=list(PROJECTIONS), default=None, help="the projection: random (APOLLO's), svd, dct")
    a("--lr", type=float, default=None)
    a("--weight-decay", type=float, default=None)
    a("--warmup-steps", type=int, default=None, help="linear warm-up, then cosine to 10%% (default: steps/10)")
    a(
        "--grad-clip",
        type=float,
        default=None,
        help="max grad norm, 0 = off (default: the JSON's gradient_clipping, else 1.0)",
    )
    a("--steps", type=int, default=1000)
    a("--global-batch-size", type=int, default=None, help="sequences per step (default: the JSON's, else 32)")
    a("--micro-batch-size", type=int, default=None, help="per rank and forward (default: the JSON's, else global/W)")
    a("--seq-len", type=int, default=256)
    a("--seed", type=int, default=0)
    a(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="default: the JSON's bf16 flag, else bf16 on GPU, fp32 on CPU",
    )
    a(
        "--param-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: the model's parameters themselves in bf16, "
        "no fp32 copy (pure bf16 training, as the APOLLO paper's one-GPU 7B runs); --engine single only (FSDP2 and "
        "DeepSpeed keep fp32 master weights and compute in bf16 with --dtype bf16)",
    )
    a("--eval-every", type=int, default=50, help="validation every N steps (0: only at the end)")
    a("--eval-samples", type=int, default=64, help="validation windows per evaluation")
    a("--save-dir", default=None)
    a("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end, with --save-dir)")
    a(
        "--resume",
        default=None,
        help="a step directory or a --save-dir with a 'latest' file, or a canonical checkpoint; "
        "the run's settings (model, batch, sequence length, schedule, optimizer hyperparameters) come from it unless given",
    )
    a("--activation-checkpointing", action="store_true", help="recompute each decoder layer's activations in backward")
    a(
        "--layerwise",
        action="store_true",
        help="layer-wise APOLLO: each weight is updated inside backward as soon as its "
        "gradient is complete, and the gradient freed (saves the model's gradient memory); single and fsdp2 engines, "
        "no gradient accumulation, no --grad-clip (its default becomes 0)",
    )
    a(
        "--weight-quant",
        choices=["none", "int8"],
        default="none",
        help="int8: Q-APOLLO, the target linears' weights stored "
        "as int8 with one scale per 128 inputs, updated with stochastic rounding (needs --layerwise, --engine single; "
        "give it again with --resume)",
    )
    a(
        "--init-from",
        metavar="DIR",
        default=None,
        help="start from a local Hugging Face LLaMA checkpoint (config.json + "
        "safetensors, sharded or not; each rank reads what it holds); its tokenizer too unless --tokenizer is given",
    )
    a(
        "--probe-micro-batches",
        metavar="LIST",
        default=None,
        help="benchmark mode: run --steps steps at each "
        "micro-batch size of the increasing LIST (e.g. 1,2,4,8) in turn, in this one process (global batch = W x size, no "
        "accumulation, no eval or checkpoints), logging each step's tokens/s and peak memory with its size; the job ends "
        "at the first out-of-memory (tools/bench_dist.py --max-batch reads the rows)",
    )
    a(
        "--dist-timeout",
        type=float,
        default=600,
        help="seconds a collective waits for the other ranks before failing (a stuck or lost rank ends the job)",
    )
    a(
        "--time-optimizer",
        action="store_true",
        help="log optimizer_s (seconds inside the optimizer's own step, GPU synchronized before and after) and "
        "host_peak_rss_gib in every step row",
    )
    a("--metrics-file", default=None, help="JSON lines (default: runs/<engine>-<model>-<optimizer>/metrics.jsonl)")
    a("--no-progress", action="store_true", help="no tqdm bar (logs a line per eval instead)")
    a(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write the metrics as TensorBoard scalars (train/loss, train/lr, val/loss, ...) into DIR (rank 0)",
    )
    args = p.parse_args(argv)
    for action in p._actions:  # a second parse with no defaults tells which flags were given
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(p.parse_args(argv)))
    return args


# -- resolving flags (pure: no process group) ---------------------------------------------------
def load_json(path: str, flag: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object")
    return cfg


def optimizer_block(cfg: Optional[dict], where: str) -> tuple[Optional[str], dict]:
    """(optimizer name, params) of a DeepSpeed config's "optimizer" block, (None, {}) without one."""
    block = (cfg or {}).get("optimizer")
    if not block:
        return None, {}
    name = OPTIMIZER_TYPES.get(str(block.get("type", "")).lower())
    if name is None:
        raise UsageError(
            f"{where}: optimizer type {block.get('type')!r} not supported here (APOLLO, APOLLO-Mini, AdamW)"
        )
    return name, dict(block.get("params") or {})


def defaults_config(args: argparse.Namespace, ds_cfg: Optional[dict]) -> Optional[dict]:
    """The JSON whose optimizer block and gradient_clipping are the defaults: the --deepspeed one, else
    ds_configs/apollo.json (apollo_mini.json for --optimizer apollo-mini), if present."""
    if ds_cfg is not None and ds_cfg.get("optimizer"):
        return ds_cfg
    path = os.path.join(ROOT, DEFAULT_CONFIGS[args.optimizer or "apollo"])
    default = load_json(path, "default config") if os.path.isfile(path) else {}
    return {**default, **(ds_cfg or {})}  # a --deepspeed JSON without an optimizer block keeps its own keys


def resolve_hparams(args: argparse.Namespace, defaults: Optional[dict]) -> OptimizerConfig:
    """Optimizer hyperparameters: fallback < preset < the defaults JSON's optimizer block < explicit flags."""
    from apollo_dist import preset
    from apollo_dist.deepspeed import OPTIMIZER_KEYS, PARAM_KEYS  # the keys the DeepSpeed adapter accepts

    json_name, params = optimizer_block(defaults, args.deepspeed or "default config")
    unknown = sorted(set(params) - set(PARAM_KEYS)) if json_name in ("apollo", "apollo-mini") else []
    if unknown:  # a misspelt key would otherwise be dropped below and its default used silently
        raise UsageError(
            f"{args.deepspeed or 'default config'}: unknown keys {unknown} in the optimizer params: "
            f"expected some of {list(PARAM_KEYS)}"
        )
    name = args.optimizer or json_name or "apollo"
    hp: dict[str, Any] = {"optimizer": name, **FALLBACK}
    if name != "adamw":
        hp.update({k: v for k, v in preset(name).items() if k in TUNABLE_LOW_RANK_KEYS})
    for k, v in params.items():
        # Low-rank keys of another optimizer's block (e.g. APOLLO's rank 256 for --optimizer apollo-mini) don't apply.
        if k in COMMON_KEYS or k == "target_modules":
            hp[k] = v
        elif name != "adamw" and json_name == name and (k in OPTIMIZER_KEYS or k in LOW_RANK_KEYS):
            hp[k] = v  # e.g. scale_front, disable_nl, projection_tf32, proj_type: passed on, never dropped
    flags = {"lr": args.lr, "weight_decay": args.weight_decay}
    if name != "adamw":
        flags.update(rank=args.rank, scale=args.scale, scale_type=args.scale_type, update_proj_gap=args.update_proj_gap)
        flags.update(proj=args.proj)
    hp.update({k: v for k, v in flags.items() if v is not None})
    return OptimizerConfig.from_dict(hp)


def resolve_run(args: argparse.Namespace, ds_cfg: Optional[dict], defaults: dict, world: int) -> RunConfig:
    """Engine, batch geometry, dtype, schedule and output paths; UsageError on inconsistent input."""
    engine = args.engine
    if engine == "auto":
        engine = "deepspeed" if args.deepspeed else ("fsdp2" if world > 1 else "single")
    if args.deepspeed and engine != "deepspeed":
        raise UsageError(f"--deepspeed given with --engine {engine}: drop one")
    if engine == "deepspeed" and not args.deepspeed:
        raise UsageError("--engine deepspeed needs --deepspeed CONFIG (e.g. ds_configs/apollo.json)")
    if engine == "single" and world > 1:
        raise UsageError(f"--engine single runs one process, but the launcher started {world}: use fsdp2 or deepspeed")
    tp = check_tp(args, engine, world)
    dp = world // tp  # data-parallel ranks: each tp group of ranks sees one shard of the batch
    mesh = parse_mesh(args.mesh, engine, dp, tp) if args.mesh else None
    ds = ds_cfg or {}

    def from_json(key: str) -> Optional[int]:
        v = ds.get(key)
        return v if isinstance(v, int) else None  # "auto" and absent alike

    global_batch = args.global_batch_size or from_json("train_batch_size")
    micro_given = micro = args.micro_batch_size or from_json("train_micro_batch_size_per_gpu")
    if global_batch is None and micro is not None:
        global_batch = micro * dp * (from_json("gradient_accumulation_steps") or 1)
    global_batch = global_batch or 32
    micro = micro or max(1, global_batch // dp)
    if global_batch % (dp * micro):
        raise UsageError(
            f"--global-batch-size {global_batch} is not divisible by {'W' if tp == 1 else 'W / tp'} x micro-batch = "
            f"{dp} x {micro} = {dp * micro}"
            + batch_fix(
                global_batch, micro_given, tp, resumed="global_batch_size" not in args.explicit and bool(args.resume)
            )
        )
    if args.steps < 1 or args.seq_len < 1:
        raise UsageError("--steps and --seq-len must be >= 1")
    bf16_json = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"))
    if (ds.get("fp16") or {}).get("enabled") and args.dtype is None:
        raise UsageError(f"--deepspeed {args.deepspeed}: fp16 is not supported here; use bf16 or --dtype fp32")
    import torch

    dtype = args.dtype or ("bf16" if (bf16_json if args.deepspeed else torch.cuda.is_available()) else "fp32")
    grad_clip = (
        args.grad_clip if args.grad_clip is not None else float(defaults.get("gradient_clipping", 1.0))
    )  # DeepSpeed's default
    if args.layerwise:
        grad_clip = check_layerwise(args, engine, global_batch // (dp * micro))
    if args.param_dtype != "fp32" and engine != "single":
        raise UsageError(
            f"--param-dtype {args.param_dtype} runs in one process (--engine single), this run's engine is "
            f"{engine}: its master weights stay fp32, use --dtype bf16 for bf16 compute"
        )
    if args.weight_quant == "int8" and not (args.layerwise and engine == "single"):
        raise UsageError(
            f"--weight-quant int8 needs --layerwise and --engine single (int8 weights are updated in "
            f"backward, in one process), this run has engine {engine}{'' if args.layerwise else ', no --layerwise'}"
        )
    return RunConfig(
        engine=engine,
        world=world,
        global_batch_size=global_batch,
        micro_batch_size=micro,
        grad_accum=global_batch // (dp * micro),
        dtype=dtype,
        grad_clip=grad_clip,
        steps=args.steps,
        warmup_steps=args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
        seq_len=args.seq_len,
        seed=args.seed,
        model=args.model,
        data=args.data,
        save_dir=args.save_dir,
        metrics_file=args.metrics_file,
        activation_checkpointing=bool(args.activation_checkpointing),
        init_from=args.init_from,
        mesh=mesh,
        tp=tp,
        layerwise=bool(args.layerwise),
        weight_quant=args.weight_quant,
        param_dtype=args.param_dtype,
    )


def world_sizes_for(global_batch: int, micro: Optional[int], tp: int = 1) -> list[int]:
    """The world sizes W at which ``global_batch`` splits evenly: W / tp data-parallel ranks times ``micro``
    (given) or any micro-batch (``micro`` None: global / (W / tp)) divides it."""
    if micro and global_batch % micro:
        return []
    per = global_batch // micro if micro else global_batch
    return [n * tp for n in range(1, per + 1) if per % n == 0]


def batch_fix(global_batch: int, micro: Optional[int], tp: int, resumed: bool) -> str:
    """The rest of the not-divisible error: which world sizes would work (``micro``: a micro-batch the flags or
    the JSON fixed), and where the global batch came from (``resumed``: the checkpoint's)."""
    sizes = world_sizes_for(global_batch, micro, tp)
    shown = ", ".join(map(str, sizes[:16])) + (", ..." if len(sizes) > 16 else "")
    with_micro = f" with micro-batch {micro}" if micro else ""
    where = (
        f" ({global_batch}: the resumed checkpoint's global batch; another --global-batch-size changes the batches "
        "from the resumed step on)"
        if resumed
        else ""
    )
    if not sizes:
        return f"; no world size works{with_micro}: give a --micro-batch-size that divides {global_batch}{where}"
    return f"; it splits evenly over W = {shown}{with_micro}: launch one of those, or give another --global-batch-size{where}"


def check_layerwise(args: argparse.Namespace, engine: str, grad_accum: int) -> float:
    """--layerwise: UsageError for what cannot hold when each weight is updated inside backward; returns
    the gradient clipping (0: off, the default under --layerwise)."""
    if engine == "deepspeed":
        raise UsageError(
            "--layerwise does not run under DeepSpeed (ZeRO owns the gradients): use --engine single or fsdp2"
        )
    if grad_accum > 1:
        raise UsageError(
            f"--layerwise needs gradient accumulation 1 (each update runs in backward), this run has {grad_accum}: "
            "raise --micro-batch-size to global batch / W"
        )
    if args.grad_clip:  # given, or from a resumed checkpoint
        raise UsageError(
            f"--layerwise cannot clip by the global gradient norm (no update may wait for every gradient): "
            f"--grad-clip {args.grad_clip:g} must be 0"
        )
    return 0.0


def check_tp(args: argparse.Namespace, engine: str, world: int) -> int:
    """``--tp T``: T, after the checks that need no model (fsdp2 only, T divides W, no --init-from)."""
    tp = args.tp
    if tp == 1:
        return 1
    if tp < 1 or world % tp:
        raise UsageError(f"--tp {tp}: must be >= 1 and divide W = {world}")
    if engine != "fsdp2":
        raise UsageError(f"--tp {tp} runs FSDP2 x tensor parallel, this run's engine is {engine}: use --engine fsdp2")
    if args.init_from:
        raise UsageError(
            f"--tp {tp} with --init-from: reading a pretrained checkpoint's column blocks is not supported"
        )
    return tp


def parse_mesh(text: str, engine: str, world: int, tp: int = 1) -> tuple[int, int]:
    """``--mesh RxS``: (replicas, shards) of FSDP2's data-parallel mesh; UsageError unless R x S = W / tp under fsdp2."""
    if engine != "fsdp2":
        raise UsageError(f"--mesh {text} shapes FSDP2's device mesh, this run's engine is {engine}: use --engine fsdp2")
    try:
        r, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--mesh {text}: expected RxS (replicas x shards), e.g. 2x4") from None
    if r < 1 or s < 1 or r * s != world:
        started = f"the launcher started W = {world} ranks" if tp == 1 else f"W / tp = {world} data-parallel ranks"
        raise UsageError(f"--mesh {text}: R x S = {r * s}, {started}; they must be equal")
    return r, s


def deepspeed_config(ds_cfg: dict, hp: OptimizerConfig, run: RunConfig) -> dict:
    """The JSON with train.py's resolved values written in (flags win over the file)."""
    cfg = copy.deepcopy(ds_cfg)
    cfg.update(
        train_batch_size=run.global_batch_size,
        train_micro_batch_size_per_gpu=run.micro_batch_size,
        gradient_accumulation_steps=run.grad_accum,
        gradient_clipping=run.grad_clip,
    )
    cfg.setdefault("steps_per_print", 10**9)  # progress is train.py's job
    cfg.pop("scheduler", None)  # the schedule comes from --warmup-steps / --steps
    cfg.pop("bfloat16", None)
    cfg["bf16"] = {**(ds_cfg.get("bf16") or ds_cfg.get("bfloat16") or {}), "enabled": run.dtype == "bf16"}
    if "fp16" in cfg:
        cfg["fp16"] = {**cfg["fp16"], "enabled": False}
    if hp.optimizer == "adamw":
        cfg.pop("optimizer", None)  # a client torch AdamW (DeepSpeed's fused one needs a compiled op)
        cfg["zero_allow_untested_optimizer"] = True
    else:
        params = {k: v for k, v in hp.to_dict().items() if k != "optimizer"}
        cfg["optimizer"] = {"type": "APOLLO-Mini" if hp.optimizer == "apollo-mini" else "APOLLO", "params": params}
    return cfg


def validate(args: argparse.Namespace) -> tuple[RunConfig, OptimizerConfig, Optional[dict], Any, data.Split]:
    """Everything that can be wrong with the input, checked before any process group work."""
    world = runtime.env_world_size()
    if args.init_from:
        take_pretrained(args)
    saved = saved_settings(args.resume) if args.resume else {}
    take_saved_settings(args, saved)
    ds_cfg = load_json(args.deepspeed, "--deepspeed") if args.deepspeed else None
    try:
        check_model_arg(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from e
    defaults = defaults_config(args, ds_cfg)
    run = resolve_run(args, ds_cfg, defaults, world)
    hp = resolve_hparams(args, defaults)
    saved_hp = {k: v for k, v in (saved.get("hparams") or {}).items() if k not in HP_FLAGS}  # betas, eps, targets...
    hp = OptimizerConfig.from_dict({**hp.to_dict(), **saved_hp})
    if run.layerwise and hp.optimizer == "adamw":
        raise UsageError("--layerwise is layer-wise APOLLO: use --optimizer apollo or apollo-mini")
    model_name = os.path.basename(args.model).removesuffix(".json")
    run.metrics_file = run.metrics_file or os.path.join(
        "runs", f"{run.engine}-{model_name}-{hp.optimizer}", "metrics.jsonl"
    )
    args.resume_how = resume_how(args.resume, saved, run, hp) if args.resume else None
    if args.resume:
        check_same_model_and_optimizer(args.resume, saved, run, hp)
    tokenizer = data.load_tokenizer(args.tokenizer)
    split = data.Split.of(data.load_tokens(args.data, tokenizer), args.seq_len, args.val_fraction, args.data)
    return run, hp, ds_cfg, tokenizer, split


# Flags a resumed run takes from its checkpoint unless given (each flag's dest is its key in trainer.json,
# or in its hparams). A given flag wins; check_same_model_and_optimizer refuses the ones that cannot change.
RUN_FLAGS = RUN_KEYS_SAVED  # RunConfig's saved fields
HP_FLAGS = ("optimizer", "lr", "weight_decay", *TUNABLE_LOW_RANK_KEYS)


def resume_how(path: str, meta: dict, run: RunConfig, hp: OptimizerConfig) -> str:
    """How --resume ``path`` loads, as the start-up summary names it: "native" (written by this engine at
    this W: the engine's own load), "canonical", or "native ENGINE W=N" (written by another engine or at
    another W: apollo_dist's loader, each rank reading what it holds). UsageError for what only the writing
    engine and W read."""
    from apollo_dist.checkpoint import is_canonical

    if is_canonical(path):
        return "canonical"
    if (meta["engine"], meta["world_size"]) == (run.engine, run.world):
        return "native"
    written = f"written by {meta['engine']} with W={meta['world_size']}, this run is {run.engine} with W={run.world}"
    if meta["engine"] == "single":
        raise UsageError(
            f"--resume {path}: {written}; a --engine single checkpoint (one torch.save file) resumes only under "
            "--engine single"
        )
    if hp.optimizer == "adamw":
        raise UsageError(
            f"--resume {path}: {written}; AdamW checkpoints resume only with the engine and W that wrote them "
            "(the loader at another W or engine is APOLLO's)"
        )
    return f"native {meta['engine']} W={meta['world_size']}"


def take_pretrained(args: argparse.Namespace) -> None:
    """--init-from DIR: the model is DIR's config.json, the tokenizer DIR's when it has one (unless
    --tokenizer says otherwise); UsageError when DIR is no such checkpoint or --model names another."""
    config = os.path.join(args.init_from, "config.json")
    if not os.path.isfile(config):
        raise UsageError(f"--init-from {args.init_from}: no config.json")
    if not any(
        os.path.isfile(os.path.join(args.init_from, f)) for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise UsageError(f"--init-from {args.init_from}: no model.safetensors or model.safetensors.index.json")
    if "model" in args.explicit and args.model != config:
        raise UsageError(f"--init-from {args.init_from} brings its own model: drop --model {args.model}")
    args.model = config
    if "tokenizer" not in args.explicit and os.path.isfile(os.path.join(args.init_from, "tokenizer_config.json")):
        args.tokenizer = args.init_from


def saved_settings(path: str) -> dict:
    """The run settings a checkpoint recorded: trainer.json of a native one, the index's trainer.run of a
    canonical one (both hold model, batch, schedule, hparams, ...). UsageError when it is no checkpoint."""
    from apollo_dist.checkpoint import is_canonical

    if is_canonical(path):
        with open(os.path.join(path, "index.json")) as f:
            return dict((json.load(f).get("trainer") or {}).get("run") or {})
    try:
        return engines.resolve_checkpoint(path)[2]
    except ValueError as e:
        raise UsageError(str(e)) from e


def take_saved_settings(args: argparse.Namespace, saved: dict) -> None:
    """Fill every flag of RUN_FLAGS / HP_FLAGS that was not given from the checkpoint's settings."""
    hparams = saved.get("hparams") or {}
    for flags, source in ((RUN_FLAGS, saved), (HP_FLAGS, hparams)):
        for key in flags:
            if key not in args.explicit and source.get(key) is not None:
                setattr(args, key, source[key])


def check_same_model_and_optimizer(path: str, meta: dict, run: RunConfig, hp: OptimizerConfig) -> None:
    """UsageError when a native checkpoint was written for another model, optimizer or low-rank structure
    (its state would not load, or would load into the wrong shapes). Canonical checkpoints are checked
    param by param by load_canonical."""
    saved = meta.get("hparams") or {}
    pairs = [
        ("model", meta.get("model"), run.model),
        ("optimizer", saved.get("optimizer"), hp.optimizer),
        ("weight_quant", meta.get("weight_quant"), run.weight_quant),
    ]  # int8 weights are in the checkpoint
    if hp.optimizer != "adamw":
        pairs += [(k, saved.get(k), getattr(hp, k)) for k in (*TUNABLE_LOW_RANK_KEYS, "target_modules")]
    for key, was, now in pairs:
        if was is not None and was != now:  # None: not recorded (a canonical checkpoint made without trainer.json)
            raise UsageError(f"--resume {path}: the checkpoint has {key} {was!r}, this run {key} {now!r}")


# -- reporting ----------------------------------------------------------------------------------
def peak_mem_gib(device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return runtime.host_peak_rss_gib()


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def describe_hparams(hp: OptimizerConfig, run: RunConfig) -> str:
    low = (
        ""
        if hp.optimizer == "adamw"
        else (
            f" rank {hp.rank} scale_type {hp.scale_type} scale {hp.scale:g} proj gap {hp.update_proj_gap}"
            + (f" proj {hp.proj}" if hp.proj not in (None, "random") else "")
        )
    )
    return (
        f"{hp.optimizer}{low} lr {hp.lr:g} wd {hp.weight_decay:g}, "
        f"warmup {run.warmup_steps} + cosine over {run.steps} steps, grad clip {run.grad_clip:g}"
    )


class Metrics:
    """JSON lines on rank 0; on resume keeps the lines up to the resumed step. With ``tensorboard`` (a
    directory) the rows' numbers also go out as TensorBoard scalars (train/loss, train/lr, ..., val/loss)
    at global_step = the row's step; a resumed run hides the events past its resumed step (purge_step)."""

    def __init__(self, path: str, resume_step: int, enabled: bool, tensorboard: Optional[str] = None):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard, purge_step=resume_step + 1 if resume_step else None)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_step and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def log(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "wall_time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = "val/loss" if key == "val_loss" else f"train/{key}"
                    self.tb.add_scalar(tag, value, global_step=row["step"])
            self.tb.flush()  # as current as the JSON lines when the job dies

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def rows(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], path: str, title: str) -> None:
    """Train and validation loss against step (tools/compare_runs.py draws several runs the same way)."""
    from launch.plots import plot_runs

    plot_runs({"": rows}, path, title)


# -- training -----------------------------------------------------------------------------------
def evaluate(engine: engines.Engine, split: data.Split, run: RunConfig, n_samples: int) -> float:
    """Mean validation loss per token over the fixed validation windows (all ranks)."""
    import torch

    d = engine.d
    acc = torch.zeros(2, device=d.device, dtype=torch.float64)
    for x, y, w in data.val_micro_batches(
        split, run.seq_len, n_samples, d.data_rank, d.data_world, run.micro_batch_size, d.device
    ):
        losses = engine.token_losses(x, y)
        acc[0] += (losses.sum(1).double() * w).sum()
        acc[1] += w.double().sum() * y.shape[1]
    d.all_sum(acc)
    return float(acc[0] / acc[1])


class OptimizerTimer:
    """--time-optimizer: the seconds spent inside ``optimizer.step`` (torch's step hooks; DeepSpeed calls it once
    per ZeRO-3 sub-group or ZeRO-1/2 group: summed) since the last `take`. CUDA is synchronized at both ends,
    so a GPU step's time is its real time (a small cost, hence a flag)."""

    def __init__(self, optimizer: Any, device: Any):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.total, self.t0 = 0.0, 0.0
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.sync()
        self.total += time.perf_counter() - self.t0

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


def timed_step(engine, split, run: RunConfig, d, step: int, micro: int, global_batch: int) -> dict:
    """Training step ``step`` (its batches, forward/backward per micro-batch of ``micro`` sequences, the
    update) and its metrics row: mean loss over ranks, tokens/s, peak memory, and ``wall_time`` (seconds
    since the epoch: launch-to-step times, tools/bench_dist.py)."""
    t0 = time.perf_counter()
    batches = data.train_micro_batches(
        split, run.seq_len, run.seed, step, global_batch, d.data_rank, d.data_world, micro, d.device
    )
    loss = float(
        d.all_sum(engine.train_step(batches, step).float().reshape(1)) / d.world
    )  # waits for the step: the time is real
    dt = time.perf_counter() - t0
    row = {
        "step": step,
        "loss": loss,
        "tokens_per_s": global_batch * run.seq_len / dt,
        "peak_mem_gib": peak_mem_gib(d.device),
        "wall_time": time.time(),
    }
    timer = getattr(engine, "optimizer_timer", None)
    if timer is not None:
        row.update(optimizer_s=timer.take(), host_peak_rss_gib=runtime.host_peak_rss_gib())
    return row


def probe_sizes(text: str) -> list[int]:
    """--probe-micro-batches: positive, strictly increasing sizes (a later size is only reached if the
    earlier ones fit)."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--probe-micro-batches {text}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise UsageError(f"--probe-micro-batches {text}: sizes must be positive and increasing")
    return sizes


def probe_micro_batches(engine, split, run: RunConfig, d, sizes: list[int], metrics: "Metrics", first: dict) -> None:
    """Run ``run.steps`` steps at each micro-batch size in turn on the one built model and optimizer
    (start-up paid once); rows carry ``micro_batch`` and the peak memory of that size alone. An
    out-of-memory error ends the job (the rows so far are written): the largest size with rows fits.
    ``first``: extra keys of the first row (the host memory of start-up)."""
    import torch

    step = 0
    for mb in sizes:
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(d.device)
        for _ in range(run.steps):
            step += 1
            row = {**timed_step(engine, split, run, d, step, mb, mb * d.data_world), "micro_batch": mb}
            if step == 1:
                row.update(first, optimizer_state_bytes_per_rank=d.all_gather_int(engine.optimizer_state_bytes()))
            metrics.log(row)
        if d.rank == 0:
            print(f"micro-batch {mb}: fits ({run.steps} steps, peak {peak_mem_gib(d.device):.2f} GiB)", flush=True)


def start_up_summary(
    args: argparse.Namespace,
    run: RunConfig,
    hp: OptimizerConfig,
    engine: Any,
    d: Any,
    config: Any,
    split: data.Split,
    tokenizer: Any,
    n_params: int,
    n_int8: int,
    rss: tuple[float, float],
    resumed_at: tuple[int, str],
) -> str:
    """The lines rank 0 prints before training: engine, model, data, batch, optimizer, the memory the
    layer-wise and int8 modes save, host memory ``rss`` (before, with the model built) and the resume."""
    rss_before, rss_init = rss
    start, resumed = resumed_at
    tokens_per_step = run.global_batch_size * run.seq_len
    return (
        f"apollo_dist train: engine {engine.describe()}, W={d.world} on {d.device.type}\n"
        f"  model: {args.model} LLaMA, {fmt_count(n_params)} params (hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}), seq_len {run.seq_len}\n"
        f"  data: {args.data}: {fmt_count(len(split.train))} train / {fmt_count(len(split.val))} val tokens, "
        f"{type(tokenizer).__name__}\n"
        f"  batch: global {run.global_batch_size} = {'W' if d.tp == 1 else 'W / tp'} {d.data_world} x micro {run.micro_batch_size} x accumulation "
        f"{run.grad_accum} ({tokens_per_step} tokens/step)\n"
        f"  optimizer: {describe_hparams(hp, run)}\n"
        + (
            f"  layer-wise updates: each weight updated in backward and its gradient freed at once; saves about "
            f"{n_params * 4 / d.world / 2**20:.1f} MiB of fp32 gradients per rank (the model's, / W; at most one "
            f"layer's stay alive)\n"
            if run.layerwise
            else ""
        )
        + (
            f"  int8 weights: {fmt_count(n_int8)} weights of the target linears as int8 + fp32 scales per 128 inputs "
            f"(~1.03 B instead of 4 B each: saves about {n_int8 * (4 - 1 - 4 / 128) / 2**20:.1f} MiB)\n"
            if n_int8
            else ""
        )
        + f"  host memory (rank 0): peak RSS {rss_init:.2f} GiB with the model built ({rss_before:.2f} GiB before)\n"
        + (f"  resumed from {args.resume} ({resumed} checkpoint) at step {start}\n" if resumed else "")
    )


def skipped_note(skipped: int) -> str:
    """How a count of skipped steps reads after a validation loss (--no-progress), empty for none."""
    return f" ({skipped} steps skipped so far: non-finite gradients)" if skipped else ""


def done_summary(
    rows: list[dict],
    args: argparse.Namespace,
    run: RunConfig,
    hp: OptimizerConfig,
    engine: Any,
    d: Any,
    seen: int,
    elapsed: float,
) -> str:
    """Rank 0's last line (losses first -> last, steps skipped for non-finite gradients since step 1,
    tokens/s, peak memory, where the metrics went), after plotting the metrics next to their file."""
    png = os.path.splitext(run.metrics_file)[0] + ".png"
    plot(rows, png, f"{args.model} LLaMA, {hp.optimizer}, {engine.describe()}, W={d.world}")
    train = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    toks = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:] or [0.0]  # step 1 includes warm-up
    last = next((r for r in reversed(rows) if "skipped_steps" in r), None)
    return (
        f"done: {seen} steps in {elapsed:.1f}s; "
        + (
            f"skipped {last['skipped_steps']} of steps 1-{last['step']} (non-finite gradients); "
            if last is not None
            else ""
        )
        + (f"train loss {train[0]:.3f} -> {train[-1]:.3f}; " if train else "")
        + (f"val loss {vals[0]:.3f} -> {vals[-1]:.3f}; " if vals else "")
        + f"{fmt_count(sum(toks) / len(toks))} tokens/s; peak mem {peak_mem_gib(d.device):.2f} GiB; "
        f"metrics {run.metrics_file}; plot {png}"
    )


def train(
    engine: Any,
    split: data.Split,
    run: RunConfig,
    d: Any,
    args: argparse.Namespace,
    metrics: Metrics,
    start: int,
    host_rss: dict,
) -> tuple[int, float]:
    """Steps start+1 .. run.steps (an evaluation at step 0 of a fresh run, every --eval-every and at the end;
    checkpoints every --save-every and at the end); returns (steps run, seconds). Each row carries
    ``skipped_steps``, the steps skipped for non-finite gradients so far; the bar shows it once > 0."""
    from tqdm import tqdm

    is_main = d.rank == 0

    def log_eval(step: int, row: dict) -> float:
        val = evaluate(engine, split, run, args.eval_samples)
        row["val_loss"] = val
        if is_main and args.no_progress:
            print(f"step {step}: val_loss {val:.4f}{skipped_note(row.get('skipped_steps', 0))}", flush=True)
        return val

    if start == 0:
        first = {"step": 0, **host_rss}
        log_eval(0, first)
        metrics.log(first)
    bar = tqdm(total=run.steps, initial=start, disable=not is_main or args.no_progress, dynamic_ncols=True, unit="step")
    t_start, seen, val = time.perf_counter(), 0, None
    for step in range(start + 1, run.steps + 1):
        lr = engine.lr()
        row = {**timed_step(engine, split, run, d, step, run.micro_batch_size, run.global_batch_size), "lr": lr}
        # Read where timed_step has just waited for the step's loss: APOLLO's skip flag is ready, no extra sync.
        row["skipped_steps"] = skipped = engine.skipped_steps()
        loss = row["loss"]
        seen += 1
        if step == start + 1:
            per_rank = d.all_gather_int(engine.optimizer_state_bytes())
            row["optimizer_state_bytes_per_rank"] = per_rank
            if is_main:
                bar.write(f"  optimizer state per rank: {', '.join(f'{b / 2**20:.2f} MiB' for b in per_rank)}")
        if (args.eval_every > 0 and step % args.eval_every == 0) or step == run.steps:
            val = log_eval(step, row)
        metrics.log(row)
        bar.set_postfix(
            loss=f"{loss:.3f}",
            tok_s=fmt_count(row["tokens_per_s"]),
            mem=f"{row['peak_mem_gib']:.2f}GiB",
            **({"val": f"{val:.3f}"} if val is not None else {}),
            **({"skipped": skipped} if skipped else {}),
        )
        bar.update(1)
        if run.save_dir and ((args.save_every and step % args.save_every == 0) or step == run.steps):
            path = engine.save_checkpoint(step)
            if is_main:
                bar.write(f"  checkpoint: {path}")
    bar.close()
    return seen, time.perf_counter() - t_start


def _save_on_resume_hook(engine: Any, run: RunConfig, start: int) -> None:
    """Test hook (tests/test_resume_any.py): with APOLLO_DIST_SAVE_ON_RESUME=1 a run resumed at another W or
    engine saves what the load put into it (master weights, optimizer state) under --save-dir as step
    ``start``, before any step."""
    if os.environ.get("APOLLO_DIST_SAVE_ON_RESUME") == "1" and run.save_dir:
        engine.save_checkpoint(start)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run, hp, ds_cfg, tokenizer, split = validate(args)
        sizes = probe_sizes(args.probe_micro_batches) if args.probe_micro_batches else None
        if sizes and run.grad_accum != 1:
            raise UsageError(
                f"--probe-micro-batches: runs without gradient accumulation, but the batch settings give "
                f"{run.grad_accum} micro-batches per step (pass --global-batch-size W x --micro-batch-size)"
            )
    except (UsageError, data.DataError) as e:
        if runtime.env_rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2

    if runtime.launched_by_mpi():
        runtime.mpi_discovery()
    from launch.model import llama_config, meta_model

    if run.engine == "deepspeed":
        import logging

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    try:
        d = engines.init_distributed(run.engine, args.dist_timeout)
        d.tp = run.tp  # tp-adjacent ranks share a data shard (the mesh's last dim is tp)
    except engines.TooManyRanks as e:
        if runtime.env_rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if d.rank != 0:  # param_groups' warning (rank > a weight's smaller dimension): once per job, not per rank
        warnings.filterwarnings("ignore", message="APOLLO rank")
    config = llama_config(args.model, tokenizer.vocab_size, args.seq_len)
    rss_before = runtime.host_peak_rss_gib()
    model = meta_model(config)  # the engine allocates and initializes each rank's part (a function of the seed)
    if run.activation_checkpointing:  # per decoder layer, non-reentrant (works under FSDP2 and ZeRO-3)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    ds_full = deepspeed_config(ds_cfg, hp, run) if run.engine == "deepspeed" else None

    start, resumed = 0, ""
    try:
        engine = engines.make_engine(run.engine, model, hp, run, d, ds_full)
        if args.resume_how == "native":  # this engine at this W: its own load
            start, resumed = engine.load_checkpoint(args.resume), "native"
        elif args.resume:  # canonical, or native of another W or engine: each rank reads what it holds
            start, resumed = engine.load_any_checkpoint(args.resume), args.resume_how
            _save_on_resume_hook(engine, run, start)
    except ValueError as e:  # input that only the built model shows wrong: target_modules, a canonical checkpoint
        # Every rank finds the same problem (same model, same files), but a rank cannot know that the
        # others did: each one says it, rank 0 without a prefix; the launcher ends any rank still waiting.
        print(f"train.py: error: {'' if d.rank == 0 else f'(rank {d.rank}) '}{e}", file=sys.stderr, flush=True)
        return 2
    rss_init = engine.host_rss_model_gib  # this rank's host memory once its part of the model exists
    if args.time_optimizer:
        engine.optimizer_timer = OptimizerTimer(runtime.unwrap(engine.optimizer), d.device)
    n_int8 = sum(b.numel() for n, b in engine.model.named_buffers() if n.endswith("weight_int8"))
    is_main = d.rank == 0
    metrics = Metrics(run.metrics_file, start, is_main, args.tensorboard)
    if is_main:
        print(
            start_up_summary(
                args,
                run,
                hp,
                engine,
                d,
                config,
                split,
                tokenizer,
                n_params,
                n_int8,
                (rss_before, rss_init),
                (start, resumed),
            ),
            flush=True,
        )

    host_rss = {
        "host_rss_before_model_gib": d.all_gather_float(rss_before),
        "host_rss_model_built_gib": d.all_gather_float(rss_init),
    }
    if sizes:
        probe_micro_batches(engine, split, run, d, sizes, metrics, host_rss)
        metrics.close()
        runtime.shutdown()
        return 0
    try:
        seen, elapsed = train(engine, split, run, d, args, metrics, start, host_rss)
    except engines.DiskFullError as e:  # a checkpoint that did not fit: nothing lost, say what happened
        print(f"train.py: error: {'' if d.rank == 0 else f'(rank {d.rank}) '}{e}", file=sys.stderr, flush=True)
        metrics.close()
        return 1  # no shutdown: the other ranks may be inside the save's collectives; the launcher ends them
    if is_main:
        print(done_summary(metrics.rows(), args, run, hp, engine, d, seen, elapsed), flush=True)
    metrics.close()
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
