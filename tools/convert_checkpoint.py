"""Convert an APOLLO training checkpoint to the world-size-independent canonical form, and/or export
its model weights for Hugging Face transformers.

    python tools/convert_checkpoint.py SRC DST [--tag TAG] [--export-hf DIR] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

EPILOG = """\
SRC may be:
  - a DeepSpeed checkpoint written with APOLLO through apollo_dist.deepspeed (ZeRO stage 1, 2 or 3,
    any number of ranks): the --save-dir of launch/train.py or of engine.save_checkpoint (its
    `latest` file names the tag; --tag picks another), or one step/tag directory;
  - an FSDP2 torch.distributed.checkpoint (DCP) directory holding get_state_dict(model, APOLLO)
    (launch/train.py --engine fsdp2 writes {"model": ..., "optim": ...}), or a save dir whose
    `latest` names one;
  - a canonical checkpoint (re-checked against its SHA-256 sums, then copied / exported).

DST receives the canonical form: index.json (format version, param names, shapes, dtypes, APOLLO
hyperparameters and step per group, initial seeds, the projection generator's device type, the lr
schedule and data position of the run, SHA-256 of each file) and state-*.safetensors (per param:
fp32 master weights, low-rank moments in the reference's orientation (m x r tall, r x n wide),
limiter norm; plain-Adam moments at the param's shape). Any engine loads it at any world size with
apollo_dist.checkpoint.load_canonical (launch/train.py --resume DST), each rank reading only its slices.

--export-hf DIR writes the model weights as safetensors (model.safetensors, or shards plus an index)
and config.json, so that transformers.AutoModelForCausalLM.from_pretrained(DIR) loads them. The
config comes from --hf-config, else config.json next to SRC, else the one stored in a canonical
SRC, else it is rebuilt from launch/train.py's trainer.json (--model size, vocabulary from the
embedding's rows). Only the optimized parameters are exported (launch/train.py optimizes all).

Conversion holds one parameter's tensors at a time (peak memory ~ the largest parameter's weight
and moments, not the model's). Outputs are written to temporary directories next to DST / DIR and
renamed into place at the end: when anything fails (missing rank file, checksum, shape or name
mismatch) nothing in DST or DIR is created or overwritten. An existing non-empty DST / DIR is
refused unless --overwrite. Exit status: 0 on success, 1 on a checkpoint error (one line on stderr).
"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert an APOLLO checkpoint (DeepSpeed ZeRO-1/2/3, FSDP2 DCP, canonical) to the canonical "
        "world-size-independent form and/or export Hugging Face model weights.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", type=Path, help="checkpoint to read (see below)")
    p.add_argument(
        "dst",
        metavar="DST",
        type=Path,
        nargs="?",
        help="canonical checkpoint directory to write (optional with --export-hf)",
    )
    p.add_argument("--tag", help="DeepSpeed checkpoint tag under SRC (default: the one `latest` names)")
    p.add_argument(
        "--export-hf", metavar="DIR", type=Path, help="also write model weights + config.json for from_pretrained"
    )
    p.add_argument(
        "--hf-config", metavar="PATH", type=Path, help="config.json (or a directory holding one) for --export-hf"
    )
    p.add_argument(
        "--hf-dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="dtype of the exported weights (default fp32)",
    )
    p.add_argument(
        "--shard-size",
        type=float,
        default=2.0,
        metavar="GIB",
        help="max size of a canonical safetensors file (default 2)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST / DIR (still atomically)")
    p.add_argument("--no-verify", action="store_true", help="skip SHA-256 checks of a canonical SRC")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    args = p.parse_intermixed_args(argv)  # SRC --tag T DST works too
    if args.dst is None and args.export_hf is None:
        p.error("give DST and/or --export-hf DIR")
    return args


def _hf_config_from_trainer(src_meta_trainer: dict[str, Any], embed_rows: Optional[int]) -> Optional[dict[str, Any]]:
    """Rebuild the LlamaConfig of a launch/train.py run from its trainer.json flags."""
    run = src_meta_trainer.get("run") or {}
    if "model" not in run or embed_rows is None:
        return None
    from launch.model import llama_config

    return llama_config(run["model"], embed_rows, int(run.get("seq_len", 1))).to_dict()


def resolve_hf_config(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """--hf-config, else None (convert() then looks next to SRC and in a canonical SRC), else trainer.json."""
    if args.hf_config is not None:
        path = args.hf_config / "config.json" if args.hf_config.is_dir() else args.hf_config
        with open(path) as f:
            return json.load(f)
    from apollo_dist.convert import find_hf_config
    from apollo_dist.native_checkpoints import open_source

    source = open_source(args.src, args.tag)
    if find_hf_config(args.src, source.meta.trainer) is not None:
        return None
    embed = next((e for e in source.meta.params if e.name.endswith("embed_tokens.weight")), None)
    return _hf_config_from_trainer(source.meta.trainer, embed.shape[0] if embed else None)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from apollo_dist.checkpoint import CheckpointError
    from apollo_dist.convert import convert

    t0 = time.perf_counter()
    try:
        hf_config = resolve_hf_config(args) if args.export_hf is not None else None
        out = convert(
            args.src,
            args.dst,
            export_hf=args.export_hf,
            hf_config=hf_config,
            tag=args.tag,
            overwrite=args.overwrite,
            hf_dtype=args.hf_dtype,
            shard_bytes=int(args.shard_size * 2**30),
            verify=not args.no_verify,
        )
    except (CheckpointError, ValueError, OSError) as e:  # CheckpointError is a ValueError: one line, exit 1
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        src = out["source"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB
        wrote = " and ".join(str(p) for p in (args.dst, args.export_hf) if p is not None)
        print(
            f"converted {args.src} ({src.get('engine')}, W={src.get('world_size')}, {out['params']} params) -> {wrote} "
            f"in {time.perf_counter() - t0:.1f}s, peak RSS {peak:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault(
        "DS_ACCELERATOR", "cpu"
    )  # unpickling DeepSpeed objects imports deepspeed: never probe for GPUs
    sys.exit(main())
