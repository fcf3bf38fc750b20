"""LLaMA models of launch/train.py: the APOLLO / GaLore paper sizes, or a config JSON."""
from __future__ import annotations

import json
import os

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
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
            num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=max(MAX_POSITIONS, seq_len),
            rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, use_cache=False,
        )
    cfg = LlamaConfig.from_json_file(model)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"--model {model}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if cfg.max_position_embeddings < seq_len:
        raise ValueError(f"--model {model}: max_position_embeddings {cfg.max_position_embeddings} < --seq-len {seq_len}")
    cfg.use_cache = False
    return cfg


def build_model(config, seed: int) -> torch.nn.Module:
    """Random-init ``LlamaForCausalLM`` in fp32 on CPU, seeded: every engine and rank starts identical."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (B x T, fp32). We shift ourselves: targets = inputs + 1."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
