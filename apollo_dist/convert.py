"""Conversion of a checkpoint (canonical, DeepSpeed, DCP) to the canonical form and/or to model
weights that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, in one streaming pass.

Both outputs are written into temporary directories next to their destinations and renamed into
place only after everything succeeded: a failed conversion leaves every destination as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint.canonical import CanonicalCheckpoint, write_canonical
from .checkpoint.format import SHARD_BYTES, CheckpointError, ParamEntry
from .checkpoint.streaming import ShardedWriter, check_destination, nbytes, staged_directories
from .native_checkpoints import open_source

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def find_hf_config(src: Path, source_meta_trainer: dict[str, Any]) -> Optional[dict[str, Any]]:
    """A model config for the export: ``config.json`` in the checkpoint's directory or its parent,
    else one recorded in a canonical checkpoint's trainer state. None when there is none."""
    if source_meta_trainer.get("hf_config"):
        return dict(source_meta_trainer["hf_config"])
    for d in (src, src.parent):
        path = d / "config.json"
        if path.is_file():
            with open(path) as f:
                return json.load(f)
    return None


class HFExport:
    """Model weights streamed into safetensors (``model.safetensors`` or shards plus
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them) and ``config.json``."""

    def __init__(
        self,
        out: Path,
        params: list[ParamEntry],
        config: dict[str, Any],
        dtype: torch.dtype,
        shard_bytes: int = HF_SHARD_BYTES,
    ):
        self.out, self.config, self.dtype = Path(out), config, dtype
        # expert slices (`ParamEntry.expert`, consecutive) go back into their fused weight
        self.fused: dict[str, int] = {}  # fused name -> E
        for e in params:
            if (base := fused_name(e)) is not None:
                self.fused[base] = self.fused.get(base, 0) + 1
        self._slices: list[torch.Tensor] = []
        items = [
            (e.name, [(e.name, dtype, e.shape)])
            if (base := fused_name(e)) is None
            else (base, [(base, dtype, (self.fused[base], *e.shape))])
            for e in params
            if e.expert is None or e.expert[1] == 0
        ]
        one_file = sum(nbytes(entries) for _, entries in items) <= shard_bytes
        pattern = "model.safetensors" if one_file else "model-{:05d}-of-{:05d}.safetensors"
        self.writer = ShardedWriter(self.out, items, pattern, shard_bytes, metadata={"format": "pt"})

    def put(self, entry: ParamEntry, tensors: dict[str, torch.Tensor]) -> None:
        base = fused_name(entry)
        if base is None:
            self.writer.put({entry.name: tensors["weight"].to(self.dtype)})
            return
        self._slices.append(tensors["weight"].to(self.dtype))  # one fused weight held until its last slice
        if len(self._slices) == self.fused[base]:
            self.writer.put({base: torch.stack(self._slices)})
            self._slices = []

    def close(self) -> None:
        self.writer.close()
        if len(self.writer.files) > 1:
            total = sum(info["bytes"] for info in self.writer.files.values())
            with open(self.out / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": self.writer.where}, f, indent=1)
        config = {**self.config, "torch_dtype": str(self.dtype).removeprefix("torch.")}
        with open(self.out / "config.json", "w") as f:
            json.dump(config, f, indent=1)


def fused_name(entry: ParamEntry) -> Optional[str]:
    """The fused weight whose expert slice ``entry`` is (every source records it: `ParamEntry.expert`), else None."""
    return entry.expert[0] if entry.expert is not None else None


def convert(
    src: Path,
    dst: Optional[Path] = None,
    export_hf: Optional[Path] = None,
    hf_config: Optional[dict[str, Any]] = None,
    tag: Optional[str] = None,
    overwrite: bool = False,
    hf_dtype: str = "fp32",
    shard_bytes: int = SHARD_BYTES,
    verify: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` (canonical; DeepSpeed save or step directory, any stage and W; DCP directory)
    into a canonical checkpoint at ``dst`` and/or model weights at ``export_hf``.

    Holds one parameter's tensors at a time. ``hf_config``: the model config to write with the
    weights (default: `find_hf_config`). A canonical ``src`` is checksum-verified first (``verify``).
    Returns {"source": the source's description, "params": count, "index": the canonical index or None}.
    Raises CheckpointError (naming the file, param or value) and leaves every destination untouched.
    """
    if dst is None and export_hf is None:
        raise CheckpointError("nothing to do: give a destination and/or export_hf")
    src = Path(src)
    outs = [Path(p) for p in (dst, export_hf) if p is not None]
    for p in outs:  # refuse early, before reading anything
        check_destination(p, overwrite)
    source = open_source(src, tag)
    if isinstance(source, CanonicalCheckpoint) and verify:
        source.verify()
    meta = source.meta
    if export_hf is not None:
        hf_config = hf_config or find_hf_config(src if src.is_dir() else src.parent, meta.trainer)
        if hf_config is None:
            raise CheckpointError(f"{src}: no model config found for --export-hf (no config.json next to it): pass one")
        meta.trainer = {**meta.trainer, "hf_config": hf_config}
    with staged_directories(*outs, overwrite=overwrite) as temps:
        tmp = dict(zip([p for p in (dst, export_hf) if p is not None], temps))
        hf = HFExport(tmp[export_hf], meta.params, hf_config, HF_DTYPES[hf_dtype]) if export_hf is not None else None
        on_param = hf.put if hf is not None else None
        if dst is not None:
            index = write_canonical(source, tmp[dst], shard_bytes, on_param=on_param)
        else:
            index = None
            for e in meta.params:
                hf.put(e, source.read(e))
        if hf is not None:
            try:
                hf.close()
            except BaseException:
                hf.writer.abort()
                raise
    return {"source": meta.source, "params": len(meta.params), "index": index}
