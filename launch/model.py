"""LLaMA models of launch/train.py: the APOLLO / GaLore paper sizes, or a config JSON."""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F

# hidden, intermediate, heads, layers: the configs of the APOLLO / GaLore papers (llama_60m.json ...);
# `tiny` runs in seconds on CPU. Vocabulary comes from the tokenizer.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 352, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
MAX_POSITIONS = 1024


def check_model_arg(model: str) -> None:
    """ValueError unless ``model`` is a named size or an existing config JSON."""
    if model in SIZES:
        return
    if model.endswith(".json") or os.path.sep in model:
        if not os.path.isfile(model):
            raise ValueError(f"--model {model}: no such config file")
        try:
            with open(model) as f:
                json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model {model}: not valid JSON ({e})") from e
        return
    raise ValueError(f"--model {model!r}: unknown size; expected one of {', '.join(SIZES)} or a LLaMA config JSON path")


def llama_config(model: str, vocab_size: int, seq_len: int):
    """The ``LlamaConfig`` of a named size (vocab from the tokenizer) or of a config JSON."""
    from transformers import LlamaConfig

    if model in SIZES:
        hidden, inter, heads, layers = SIZES[model]
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            num_hidden_layers=layers,
            max_position_embeddings=max(MAX_POSITIONS, seq_len),
            rms_norm_eps=1e-6,
            initializer_range=0.02,
            tie_word_embeddings=False,
            use_cache=False,
        )
    kind = json.load(open(model)).get("model_type", "llama")
    if kind not in CAUSAL_LM:
        raise ValueError(f"--model {model}: model_type is not one of {sorted(CAUSAL_LM)}")
    cfg = _config_class(kind).from_json_file(model)  # also a checkpoint's config.json: GQA, tied embeddings, rope
    if getattr(cfg, "model_type", "llama") != kind:
        raise ValueError(f"--model {model}: model_type is not {kind!r}")
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"--model {model}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if cfg.max_position_embeddings < seq_len:
        raise ValueError(
            f"--model {model}: max_position_embeddings {cfg.max_position_embeddings} < --seq-len {seq_len}"
        )
    cfg.use_cache = False
    return cfg


# model_type -> the causal LM class: LLaMA, and Mixtral for mixture-of-experts runs (fused experts, apollo_dist.experts)
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


def _config_class(kind: str):
    import transformers

    return getattr(transformers, CAUSAL_LM[kind].replace("ForCausalLM", "Config"))


def causal_lm_class(config):
    """The transformers class of ``config`` (`CAUSAL_LM`)."""
    import transformers

    return getattr(transformers, CAUSAL_LM[getattr(config, "model_type", "llama")])


def meta_model(config) -> torch.nn.Module:
    """The causal LM (``LlamaForCausalLM``, ``MixtralForCausalLM``) on the meta device: shapes only, no memory,
    no random draws."""
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return causal_lm_class(config)(config)


def param_init(name: str, shape: tuple[int, ...], seed: int, std: float, device: torch.device) -> torch.Tensor:
    """The initial value of parameter ``name`` (fp32, whole, on ``device``): LLaMA's init (normal(0, std)
    for weights and embeddings, ones for norms, zeros for biases) from a generator seeded by (seed, name)
    alone, so every engine, world size and sharding starts from the same weights. Drawn on the device's
    generator (CPU and CUDA give different, equally valid, draws)."""
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=gen, device=device).mul_(std)  # in place: one full-size temporary


def _local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``p`` holds: all of it, or an FSDP2 DTensor's shard."""
    if type(p).__name__ != "DTensor":
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def materialize(
    model: torch.nn.Module, seed: int, device: torch.device, weights: Optional["HFWeights"] = None
) -> torch.nn.Module:
    """Allocate a meta-device model (plain, or sharded by fully_shard) on ``device`` and fill what this
    rank holds: from ``weights`` (a pretrained checkpoint: only the rows this rank holds are read), else
    each parameter drawn whole by `param_init` (one at a time) and only its local part kept, so the host
    never holds the model. Rebuilds the buffers that construction computed (the rotary frequencies)."""
    model.to_empty(device=device)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p._local_tensor if type(p).__name__ == "DTensor" else p
            if weights is not None:
                rows = _local_rows(p)
                local.copy_(weights.read(name, tuple(p.shape), rows).view_as(local))
            else:
                local.copy_(_local_part(p, param_init(name, tuple(p.shape), seed, std, device)))
        _rebuild_buffers(model, device)
    return model


def _local_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows [r0, r1) of ``p`` this rank holds (an FSDP2 Shard(0) block, or all)."""
    if type(p).__name__ != "DTensor":
        return 0, p.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], offset[0] + shape[0]


def _rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Modules with buffers (LLaMA: the rotary embedding's inv_freq) computed them at construction; on the
    meta device they were not: build each such module again from the config, on ``device``, and copy."""
    for module in model.modules():
        if not any(True for _ in module.buffers(recurse=False)):
            continue
        with torch.device("cpu"):  # small: frequencies, not weights
            fresh = type(module)(config=model.config)
        for name, buf in fresh.named_buffers(recurse=False):
            getattr(module, name).copy_(buf)
        for name, value in vars(fresh).items():  # plain tensor attributes (older transformers' original_inv_freq)
            if isinstance(value, torch.Tensor):
                setattr(module, name, value.to(device))


def fill_zero3(model: torch.nn.Module, seed: int, weights: Optional["HFWeights"] = None) -> None:
    """After construction under ``deepspeed.zero.Init``: each rank's flat chunk ``ds_tensor`` of every
    parameter (chunk r of ceil(numel / W) elements, padding left as is) gets its part of the pretrained
    ``weights`` (reading only the rows the chunk spans) or of `param_init`."""
    import torch.distributed as dist

    rank = dist.get_rank()
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape, chunk = tuple(p.ds_shape), p.ds_tensor.numel()
            numel, row = math.prod(shape), math.prod(shape[1:])
            a, b = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
            if b <= a:
                continue
            if weights is not None:
                r0, r1 = a // row, -(-b // row)
                part = weights.read(name, shape, (r0, r1)).reshape(-1)[a - r0 * row : b - r0 * row]
            else:
                part = param_init(name, shape, seed, std, p.ds_tensor.device).view(-1)[a:b]
            p.ds_tensor.view(-1)[: b - a].copy_(part)


class HFWeights:
    """A local Hugging Face checkpoint's weights (``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``): what ``save_pretrained`` and ``tools/convert_checkpoint.py
    --export-hf`` write. `read` returns rows of one tensor as fp32, reading only those rows."""

    def __init__(self, directory: str):
        self.dir = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise ValueError(f"--init-from {directory}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[str, Any] = {}

    def read(self, name: str, shape: tuple[int, ...], rows: tuple[int, int]) -> torch.Tensor:
        """Rows [r0, r1) of tensor ``name`` (fp32); ValueError naming the file and tensor when it is
        missing, of another shape, or not floating point."""
        path = self.file_of.get(name)
        if path is None:
            raise ValueError(f"--init-from {self.dir}: no tensor {name!r} (the model needs it, shape {list(shape)})")
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(path, "pt")
        sl = self._open[path].get_slice(name)
        if tuple(sl.get_shape()) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(sl.get_shape())}, the model's is {list(shape)}")
        if sl.get_dtype() not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()}, expected a floating point type")
        return sl[rows[0] : rows[1]].float()


def build_model(config, seed: int) -> torch.nn.Module:
    """The whole model in fp32 on the CPU, initialized by `param_init` (tools and tests; training builds
    on the meta device and materializes each rank's part)."""
    return materialize(meta_model(config), seed, torch.device("cpu"))


def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (B x T, fp32). We shift ourselves: targets = inputs + 1."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
