"""Optimizer-state bytes of a mixture-of-experts model by arithmetic (no memory: the model is built on the
meta device): AdamW, APOLLO and APOLLO-Mini with apollo_dist's default targets (attn, mlp: under Mixtral's
``mlp`` sit the fused experts and the router), fp32 moments.

    python tools/moe_state.py                       # Mixtral-8x7B (transformers' MixtralConfig defaults)
    python tools/moe_state.py --layers 1 --json     # one layer, as JSON

APOLLO keeps, per low-rank weight (and per expert slice of a fused expert weight), two C x r moments (C = the
longer side) and one limiter norm; plain Adam two moments per element; AdamW two per element.
"""

from __future__ import annotations

import argparse
import json

import torch


def mixtral(layers: int = 32, experts: int = 8) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(num_hidden_layers=layers, num_local_experts=experts)
    with torch.device("meta"):
        return MixtralForCausalLM(cfg)


def state_bytes(model: torch.nn.Module, preset: str) -> dict[str, int]:
    """Bytes of optimizer state: ``{"total", "experts"}`` (experts: of the fused 3-D weights)."""
    if preset == "adamw":
        total = sum(8 * p.numel() for p in model.parameters())
        experts = sum(8 * p.numel() for p in model.parameters() if p.dim() == 3)
        return {"total": total, "experts": experts}
    from apollo_dist import param_groups

    rest, low = param_groups(model, preset=preset)
    r = low["rank"]
    total = sum(8 * p.numel() for p in rest["params"])
    experts = 0
    for p in low["params"]:
        slices = p.shape[0] if p.dim() == 3 else 1
        nbytes = slices * (8 * max(p.shape[-2:]) * r + 4)
        total += nbytes
        experts += nbytes if p.dim() == 3 else 0
    return {"total": total, "experts": experts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="APOLLO rank")  # the router (8 x 4096) is narrower than rank 256
    model = mixtral(args.layers, args.experts)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    rows = {k: state_bytes(model, k) for k in ("adamw", "apollo", "apollo-mini")}
    if args.json:
        print(json.dumps({"params": params, "expert_params": expert_params, "state_bytes": rows}))
        return
    print(f"params {params / 1e9:.2f} B, of which fused experts {expert_params / 1e9:.2f} B")
    for k, v in rows.items():
        print(f"{k:12s} state {v['total'] / 2**30:8.2f} GiB  (experts {v['experts'] / 2**30:8.2f} GiB)")


if __name__ == "__main__":
    main()
