"""A synthetic DeepSpeed ZeRO-2 checkpoint in the exact file layout apollo_dist.deepspeed writes
(per-rank optimizer files with APOLLO's state dict and layout, flat fp32 partitions, DeepSpeed's
param_slice_mappings; model states with param_shapes), of any size, without running DeepSpeed.

Every tensor is a pure function of (param index, tensor name), so a converted checkpoint can be
checked against `expected(...)`. Params are cut mid-row by the flat partition (as ZeRO-1/2 does).

    python tests/workers/synthetic_ckpt.py OUT --layers 24 --dim 4096 --world 2    (writes OUT/step_0000010)
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from pathlib import Path

import torch

from apollo_dist.layout import position_owners

RANK = 64
HP = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "correct_bias": True,
    "generator_device": "cpu",
    "scale_front": False,
    "disable_nl": False,
}
LOW = {
    "rank": RANK,
    "proj": "random",
    "proj_type": "std",
    "scale_type": "channel",
    "scale": 1.0,
    "update_proj_gap": 200,
}


def model_params(layers: int, dim: int, vocab: int) -> list[list[tuple[str, tuple[int, int] | tuple[int]]]]:
    """Two groups: plain Adam (embedding, norms) and low-rank (a tall and a wide weight per layer)."""
    adam = [("embed.weight", (vocab, dim))] + [(f"layers.{i}.norm.weight", (dim,)) for i in range(layers)]
    low = []
    for i in range(layers):
        low += [(f"layers.{i}.up.weight", (2 * dim, dim)), (f"layers.{i}.down.weight", (dim, 2 * dim))]
    return [adam, low]


def expected(index: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The canonical tensor ``key`` of param ``index`` (reference orientation for low-rank moments)."""
    g = torch.Generator().manual_seed(10 * index + ("weight", "exp_avg", "exp_avg_sq", "limiter_norm").index(key))
    t = torch.rand(shape, generator=g) if key == "exp_avg_sq" else torch.randn(shape, generator=g)
    return t


def canonical_shapes(shape: tuple[int, ...], lowrank: bool) -> dict[str, tuple[int, ...]]:
    if not lowrank:
        return {"weight": shape, "exp_avg": shape, "exp_avg_sq": shape}
    m, n = shape
    mom = (m, RANK) if m >= n else (RANK, n)
    return {"weight": shape, "exp_avg": mom, "exp_avg_sq": mom, "limiter_norm": (1,)}


def write(out: Path, layers: int, dim: int, world: int, vocab: int = 8000, step: int = 10) -> Path:
    """Write the checkpoint under ``out/step_0000010`` (and ``out/latest``); returns the step dir."""
    from deepspeed.utils.tensor_fragment import fragment_address

    step_dir = out / f"step_{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    groups = model_params(layers, dim, vocab)
    indexed, idx = [], 0
    for gi, params in enumerate(groups):
        for name, shape in params:
            indexed.append((gi, idx, name, shape))
            idx += 1
    # Each group's params laid end to end and cut into W equal pieces.
    ranges: dict[int, list[tuple[int, int]]] = {}
    pieces = []
    for gi, params in enumerate(groups):
        total = sum(math.prod(s) for _, s in params)
        piece = -(-total // world)
        pieces.append(piece)
        off = 0
        for g2, i, _, shape in indexed:
            if g2 != gi:
                continue
            numel = math.prod(shape)
            ranges[i] = [
                (min(max(w * piece - off, 0), numel), min(max((w + 1) * piece - off, 0), numel)) for w in range(world)
            ]
            ranges[i] = [(a, b) if b > a else (0, 0) for a, b in ranges[i]]
            off += numel
    for w in range(world):
        state, layout, flats, mappings = {}, {}, [], []
        for gi, params in enumerate(groups):
            flat_parts, mapping, pos = [], OrderedDict(), 0
            for g2, i, name, shape in indexed:
                if g2 != gi:
                    continue
                low = gi == 1
                a, b = ranges[i][w]
                full = {k: expected(i, k, s) for k, s in canonical_shapes(shape, low).items()}
                entry = {"group": gi, "shape": list(shape), "start": a, "end": b}
                st = {"seed": i + 1, "step": torch.tensor(float(step))}
                if low:
                    m, n = shape
                    o0, o1 = position_owners(m, n, ranges[i])[w]
                    entry["owned"] = [o0, o1]
                    for k in ("exp_avg", "exp_avg_sq"):
                        cm = full[k] if m >= n else full[k].t()  # channel-major, as APOLLO keeps it
                        st[k] = cm[o0:o1].clone()
                    st["limiter_norm"] = full["limiter_norm"].clone()
                else:
                    for k in ("exp_avg", "exp_avg_sq"):
                        st[k] = full[k].reshape(-1)[a:b].clone()
                state[i], layout[i] = st, entry
                if b > a:
                    flat_parts.append(full["weight"].reshape(-1)[a:b])
                    mapping[name] = fragment_address(numel=b - a, start=pos)
                    pos += b - a
                del full
            flat = torch.zeros(pieces[gi])
            if flat_parts:
                torch.cat(flat_parts, out=flat[:pos])
            flats.append(flat[:pos])  # DeepSpeed saves the partition without its padding
            mappings.append(mapping)
        param_groups = [
            {
                **HP,
                **(LOW if gi == 1 else {}),
                "params": [i for g2, i, _, _ in indexed if g2 == gi],
                "param_names": [n for g2, _, n, _ in indexed if g2 == gi],
            }
            for gi in range(len(groups))
        ]
        apollo_sd = {
            "state": state,
            "param_groups": param_groups,
            "apollo_layout": {
                "version": 1,
                "world_size": world,
                "rank": w,
                "generator_device": "cpu",
                "params": layout,
            },
        }
        osd = {
            "zero_stage": 2,
            "partition_count": world,
            "base_optimizer_state": apollo_sd,
            "single_partition_of_fp32_groups": flats,
            "param_slice_mappings": mappings,
        }
        torch.save({"optimizer_state_dict": osd}, step_dir / f"zero_pp_rank_{w}_mp_rank_00_optim_states.pt")
        del state, flats, apollo_sd, osd
    shapes = [OrderedDict((n, torch.Size(s)) for n, s in params) for params in groups]
    torch.save(
        {"param_shapes": shapes, "lr_scheduler": None, "step": step, "global_steps": step},
        step_dir / "mp_rank_00_model_states.pt",
    )
    (out / "latest").write_text(step_dir.name)
    return step_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    step_dir = write(a.out, a.layers, a.dim, a.world, a.vocab)
    size = sum(p.stat().st_size for p in step_dir.iterdir())
    print(f"{step_dir}: {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
