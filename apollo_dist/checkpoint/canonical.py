"""Writing and reading canonical checkpoints (the directory layout: apollo_dist.checkpoint's docstring).

`write_canonical` streams any `Source` into safetensors files one parameter at a time; `CanonicalCheckpoint`
opens one, checks its index and files, and reads whole tensors or only the slices a rank holds
(``safe_open(...).get_slice``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_BYTES,
    CheckpointError,
    Meta,
    ParamEntry,
    Source,
    canonical_entries,
    jsonable,
)
from .streaming import ShardedWriter, sha256_file, staged_directories


# -- writing ---------------------------------------------------------------------------------------
def write_canonical(
    source: Source, out: Path, shard_bytes: int = SHARD_BYTES, on_param: Optional[Callable] = None
) -> dict[str, Any]:
    """Write ``source`` as a canonical checkpoint into the (empty, usually temporary) directory ``out``.

    Reads and writes one parameter at a time. ``on_param(entry, tensors)`` sees each param's tensors
    as they pass (the converter exports model weights from it). Returns the index it wrote.
    """
    meta = source.meta
    writer = ShardedWriter(
        out, [(e.name, canonical_entries(e)) for e in meta.params], "state-{:05d}-of-{:05d}.safetensors", shard_bytes
    )
    try:
        for e in meta.params:
            tensors = source.read(e)
            for key, shape in e.tensor_shapes().items():
                t = tensors.get(key)
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise CheckpointError(
                        f"param {e.name}: {key} has shape {got} in {meta.source.get('path', 'the source')}, expected {shape}"
                    )
            if on_param is not None:
                on_param(e, tensors)
            writer.put({f"{e.name}/{k}": v for k, v in tensors.items()})
            del tensors  # one param's tensors at a time
        writer.close()
    except BaseException:
        writer.abort()
        raise
    index = canonical_index(meta, writer.where, writer.files)
    with open(out / INDEX_FILE, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return index


def canonical_index(meta: Meta, where: dict[str, str], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The index.json of ``meta`` (``where``: param name -> file; ``files``: file -> {"bytes", "sha256"})."""
    return {
        "format": FORMAT,
        "format_version": _version_needed(meta),
        "generator_device": meta.generator_device,
        "optimizer": jsonable(meta.optimizer),
        "trainer": jsonable(meta.trainer),
        "source": jsonable(meta.source),
        "param_groups": [
            {**jsonable(g), "params": [e.name for e in meta.params if e.group == gi]}
            for gi, g in enumerate(meta.groups)
        ],
        "params": {
            e.name: {
                "group": e.group,
                "shape": list(e.shape),
                "seed": e.seed,
                "step": e.step if e.step is not None else int(meta.groups[e.group]["step"]),
                "rank": e.r,
                **({"expert": list(e.expert)} if e.expert is not None else {}),
                **(
                    {"projection": {"kind": e.proj, "tensors": [k for k in e.tensor_shapes() if k == "projection"]}}
                    if e.lowrank
                    else {}
                ),
                "file": where[e.name],
                "tensors": {
                    k: {"shape": list(s), "dtype": str(e.dtype(k)).removeprefix("torch.")}
                    for k, s in e.tensor_shapes().items()
                },
            }
            for e in meta.params
        },
        "files": files,
    }


def save_canonical(
    source: Source, dst: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES
) -> dict[str, Any]:
    """`write_canonical` into a temporary directory renamed to ``dst`` at the end (atomic)."""
    with staged_directories(Path(dst), overwrite=overwrite) as (tmp,):
        return write_canonical(source, tmp, shard_bytes)


# -- reading ---------------------------------------------------------------------------------------
def is_canonical(path: Path) -> bool:
    """True when ``path`` is a canonical checkpoint directory (has an index.json)."""
    return (Path(path) / INDEX_FILE).is_file()


class SliceReader:
    """Reads of the parts of a param's canonical tensors that one rank holds, over ``_slice(name, key)``: an
    object with ``get_shape()`` and ``[...]`` slicing (a safetensors slice, or `_TensorSlice`). Shared by
    canonical checkpoints (reading only those rows from disk) and native ones (`SourceSlices`)."""

    def _slice(self, name: str, key: str) -> Any:
        raise NotImplementedError

    def read_flat(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Flat row-major elements [start, end) of ``name/key``, reading only the rows they lie in."""
        sl = self._slice(name, key)
        shape = sl.get_shape()
        if end <= start:
            return torch.zeros(0)
        if len(shape) <= 1:
            return sl[start:end].reshape(-1)
        row = math.prod(shape[1:])
        r0, r1 = start // row, -(-end // row)
        return sl[r0:r1].reshape(-1)[start - r0 * row : end - r0 * row]

    def read_held(self, name: str, key: str, slot: Any) -> torch.Tensor:
        """The elements of ``name/key`` that `Slot` ``slot`` holds, row-major (a flat range, or a block)."""
        if slot.block is None:
            return self.read_flat(name, key, slot.start, slot.end)
        r0, r1, c0, c1 = slot.block
        if slot.numel == 0:
            return torch.zeros(0)
        n = slot.shape[1]
        return self.read_flat(name, key, r0 * n, r1 * n).view(r1 - r0, n)[:, c0:c1].reshape(-1)

    def read_channels(self, name: str, key: str, c0: int, c1: int, tall: bool) -> torch.Tensor:
        """Channels [c0, c1) of a low-rank moment, channel-major ((c1 - c0) x r): rows when tall, columns when wide."""
        sl = self._slice(name, key)
        return sl[c0:c1] if tall else sl[:, c0:c1].t().contiguous()


class CanonicalCheckpoint(SliceReader):
    """A canonical checkpoint directory: its index, checked, and its tensors, read lazily.

    Opening checks the format name and version, that every file the index names exists with its
    recorded size, and that the index is consistent; `verify` checks SHA-256 (all files or some).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise CheckpointError(f"{self.path}: not a canonical checkpoint (no {INDEX_FILE})")
        try:
            with open(index_path) as f:
                self.index = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path}: corrupted index ({e})") from e
        fmt, version = self.index.get("format"), self.index.get("format_version")
        if fmt != FORMAT:
            raise CheckpointError(f"{index_path}: format {fmt!r}, expected {FORMAT!r}")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{index_path}: format_version {version!r}; this apollo_dist reads up to {FORMAT_VERSION}"
            )
        for fname, info in self.index["files"].items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: missing (named in {index_path})")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(
                    f"{fpath}: {size} bytes, the index records {info['bytes']} (truncated or replaced)"
                )
        self.meta = self._meta()
        self._open: dict[str, Any] = {}

    def _meta(self) -> Meta:
        ix = self.index
        params = [
            ParamEntry(
                name,
                int(p["group"]),
                tuple(p["shape"]),
                int(p["seed"]),
                p.get("rank"),
                p.get("step"),
                (p.get("projection") or {}).get("kind", "random"),
                _expert_of(name, p, ix["format_version"]),
            )
            for name, p in ix["params"].items()
        ]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in ix["param_groups"]]
        return Meta(
            params, groups, ix["generator_device"], ix.get("optimizer", {}), ix.get("trainer", {}), ix.get("source", {})
        )

    @property
    def files(self) -> list[str]:
        """The safetensors files of the checkpoint, sorted."""
        return sorted(self.index["files"])

    def verify(self, files: Optional[list[str]] = None) -> None:
        """CheckpointError naming the first file whose SHA-256 differs from the index."""
        for fname in self.files if files is None else files:
            digest = sha256_file(self.path / fname)
            if digest != self.index["files"][fname]["sha256"]:
                raise CheckpointError(
                    f"{self.path / fname}: SHA-256 {digest[:16]}... differs from the index's "
                    f"{self.index['files'][fname]['sha256'][:16]}... (corrupted)"
                )

    def handle(self, name: str):
        """The open safetensors file holding param ``name`` (memory-mapped; nothing read yet)."""
        from safetensors import safe_open

        fname = self.index["params"][name]["file"]
        if fname not in self._open:
            try:
                self._open[fname] = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupted file
                raise CheckpointError(f"{self.path / fname}: cannot be read as safetensors ({e})") from e
        return self._open[fname]

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``entry`` (the `Source` protocol)."""
        f = self.handle(entry.name)
        return {k: f.get_tensor(f"{entry.name}/{k}") for k in entry.tensor_shapes()}

    def _slice(self, name: str, key: str) -> Any:
        return self.handle(name).get_slice(f"{name}/{key}")

    def close(self) -> None:
        """Drop the open file handles."""
        self._open.clear()


class _TensorSlice:
    """A tensor behind safetensors' slice API (``get_shape``, ``[...]``)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.t[index]


class SourceSlices(SliceReader):
    """Any `Source` (a native DeepSpeed or DCP checkpoint) read like a canonical checkpoint by the live loader:
    an index of the same shape, built from its meta, and slices of one param at a time (the source assembles
    a param's canonical tensors from its pieces; only the last param read is kept). Native checkpoints carry no
    checksums: ``files`` is empty, so there is nothing to ``verify``."""

    files: list[str] = []

    def __init__(self, source: Any, path: Path):
        self.source, self.path, self.meta = source, Path(path), source.meta
        self.index = canonical_index(self.meta, {e.name: None for e in self.meta.params}, {})
        self._entries = {e.name: e for e in self.meta.params}
        self._name: Optional[str] = None
        self._tensors: dict[str, torch.Tensor] = {}

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        return self.source.read(entry)

    def _slice(self, name: str, key: str) -> Any:
        if name != self._name:
            self._tensors, self._name = {}, None  # the previous param's tensors go before the next is read
            self._tensors, self._name = self.source.read(self._entries[name]), name
        return _TensorSlice(self._tensors[key])

    def verify(self, files: Optional[list[str]] = None) -> None:
        """Nothing to check: native checkpoints record no checksums."""

    def close(self) -> None:
        self._tensors, self._name = {}, None


def _expert_of(name: str, record: dict[str, Any], version: int) -> Optional[tuple[str, int]]:
    """(fused weight, e) of an expert slice: the index records it (format 3); format 2 named slices
    ``<fused name>.<e>`` (a low-rank entry ending in a number) and recorded nothing else."""
    if "expert" in record:
        fused, e = record["expert"]
        return str(fused), int(e)
    base, _, last = name.rpartition(".")
    if version < 3 and record.get("rank") is not None and last.isdigit() and base:
        return base, int(last)
    return None


def _version_needed(meta: Meta) -> int:
    """The lowest format version that reads ``meta`` right: 2 (which older apollo_dist reads) unless some param
    is an expert slice or would be taken for one by version 2's name rule (a low-rank name ending in a number)."""
    if all(_expert_of(e.name, {"rank": e.r}, 2) == e.expert for e in meta.params):
        return 2
    return FORMAT_VERSION
