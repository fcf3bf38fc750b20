"""World-size-independent ("canonical") checkpoints of APOLLO training (DESIGN.md §4).

A canonical checkpoint is a directory::

    index.json               format name + version; the run's trainer state (data position = step,
                             lr schedule); the projection generator's device type (CPU and CUDA draw
                             different P); the optimizer's flags; the param groups (hyperparameters,
                             step, param names); per param: group, shape, initial seed, file, tensor
                             shapes and dtypes; per file: size and SHA-256
    state-00001.safetensors  per param, in index order:
    ...                        <name>/weight        fp32 master weights, the param's shape
                               <name>/exp_avg       low-rank: the reference's orientation (m x r when
                               <name>/exp_avg_sq      tall, m >= n; r x n when wide); plain Adam: the param's shape
                               <name>/limiter_norm  low-rank only, shape (1,); < 0: no norm yet

It is written one parameter at a time (`write_canonical` streams safetensors files), so converting a
checkpoint never holds more than one parameter's tensors. `load_canonical` loads it into a bound
APOLLO at any world size under any engine, each rank reading only the slices it holds
(``safe_open(...).get_slice``). Readers of native checkpoints (DeepSpeed, DCP) live in
`apollo_dist.native_checkpoints`; ``tools/convert_checkpoint.py`` is the command line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from .core import AdamBucket, LowRankBucket
from .projection import SeedChain
from .quant import refuse_int8

FORMAT = "apollo_dist.canonical"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_BYTES = 2 * 2**30  # safetensors files of at most ~2 GiB (a bigger single tensor gets its own file)
# Keys that change what the optimizer computes from the same state: a mismatch is an error on load.
STRUCTURAL_KEYS = ("rank", "update_proj_gap", "scale_type", "scale", "proj", "proj_type")
# Per-group keys APOLLO.state_dict adds that describe the run, not the group (see APOLLO.state_dict).
RUN_KEYS = ("generator_device", "scale_front", "disable_nl")

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file, param or value."""


# -- what a checkpoint describes ------------------------------------------------------------------
@dataclass
class ParamEntry:
    """One optimized parameter of a checkpoint."""

    name: str
    group: int
    shape: tuple[int, ...]
    seed: int
    rank: Optional[int] = None  # the low-rank r; None: plain Adam

    @property
    def lowrank(self) -> bool:
        return self.rank is not None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensors of this param and their shapes (moments in the reference's orientation)."""
        if not self.lowrank:
            return {"weight": self.shape, "exp_avg": self.shape, "exp_avg_sq": self.shape}
        m, n = self.shape
        moments = (m, self.rank) if m >= n else (self.rank, n)
        return {"weight": self.shape, "exp_avg": moments, "exp_avg_sq": moments, "limiter_norm": (1,)}


@dataclass
class Meta:
    """Everything of a checkpoint but the tensors."""

    params: list[ParamEntry]
    groups: list[dict[str, Any]]  # JSON hyperparameters of each group, with "step" (optimizer steps taken)
    generator_device: str = "cpu"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"scale_front": False, "disable_nl": False})
    trainer: dict[str, Any] = field(default_factory=dict)  # "step" (data position), "scheduler", "run", "hf_config"
    source: dict[str, Any] = field(default_factory=dict)  # where it came from: engine, world size, path


class Source(Protocol):
    """A checkpoint readable one parameter at a time (canonical or native)."""

    meta: Meta

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``entry`` (see `ParamEntry.tensor_shapes`), fp32 on CPU."""


def jsonable(value: Any) -> Any:
    """``value`` as JSON types (tuples as lists, 0-d tensors as numbers); TypeError when it has none."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a canonical checkpoint's index")


def group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The JSON hyperparameters of a param group (no params, names or run-level keys)."""
    return {k: jsonable(v) for k, v in group.items() if k not in ("params", "param_names") + RUN_KEYS}


def check_same_hyperparameters(where: str, saved: dict[str, Any], live: dict[str, Any]) -> None:
    """CheckpointError naming ``where``, the key and both values when APOLLO's structural keys differ."""
    for key in STRUCTURAL_KEYS:
        a, b = saved.get(key), live.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and float(a) == float(b):
            continue
        if a != b:
            raise CheckpointError(f"{where}: the checkpoint has {key}={a!r}, this optimizer {key}={b!r}")


# -- streaming safetensors ------------------------------------------------------------------------
class SafetensorsStream:
    """Writes one safetensors file tensor by tensor: the header comes from shapes known up front, so
    only the tensor being written is in memory. Computes the file's SHA-256 on the way."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Optional[dict[str, str]] = None):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.expected = path, [(k, d, tuple(s)) for k, d, s in entries]
        self.sha = hashlib.sha256()
        self.size = 0
        self.file = open(path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data: Any) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``key``; keys must come in the order given to the constructor."""
        want_key, dtype, shape = self.expected.pop(0)
        if key != want_key or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: expected {want_key} {shape}, got {key} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu", dtype).contiguous()
        if t.numel():
            self._write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    def close(self) -> dict[str, Any]:
        """Flush to disk; returns {"bytes", "sha256"}."""
        if self.expected:
            raise CheckpointError(f"{self.path}: {len(self.expected)} tensors not written, first {self.expected[0][0]}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def sha256_file(path: Path, chunk: int = 2**24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- atomic directories ---------------------------------------------------------------------------
def check_destination(dst: Path, overwrite: bool) -> None:
    """CheckpointError unless ``dst`` is absent, empty, or ``overwrite`` allows replacing it."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"destination {dst} exists and is not empty (pass overwrite / --overwrite to replace it)")


@contextlib.contextmanager
def staged_directories(*destinations: Path, overwrite: bool = False) -> Iterator[list[Path]]:
    """Temporary directories next to each destination; renamed into place only when the block
    succeeds (all of them, at the end), deleted when it fails: a failed write changes no destination."""
    dsts = [Path(d) for d in destinations]
    for d in dsts:
        check_destination(d, overwrite)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temps = [d.parent / f".{d.name}.tmp-{tag}" for d in dsts]
    try:
        for t in temps:
            t.mkdir(parents=True)
        yield temps
        for d, t in zip(dsts, temps):
            old = d.parent / f".{d.name}.old-{tag}"
            if d.exists():
                d.rename(old)
            t.rename(d)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


# -- writing ---------------------------------------------------------------------------------------
def _nbytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in entries)


class ShardedWriter:
    """Streams items (one param's tensors each, in a fixed order) into safetensors files of at most
    ``shard_bytes`` (an item is never split), holding only the item being written.

    ``items``: (item name, its tensors' (key, dtype, shape)) in the order `put` will receive them;
    ``pattern``: file names, formatted with (shard number, number of shards).
    """

    def __init__(self, out: Path, items: list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]],
                 pattern: str, shard_bytes: int = SHARD_BYTES, metadata: Optional[dict[str, str]] = None):
        self.out, self.items, self.metadata = Path(out), items, metadata
        self.shards: list[list[int]] = [[]]
        size = 0
        for i, (_, entries) in enumerate(items):
            nbytes = _nbytes(entries)
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(i)
            size += nbytes
        self.names = [pattern.format(k + 1, len(self.shards)) for k in range(len(self.shards))]
        self.where: dict[str, str] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self._next, self._shard, self._stream = 0, -1, None

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the next item's tensors (keys as declared)."""
        i = self._next
        if self._stream is None or i not in self.shards[self._shard]:
            self._finish_shard()
            self._shard += 1
            entries = [e for j in self.shards[self._shard] for e in self.items[j][1]]
            self._stream = SafetensorsStream(self.out / self.names[self._shard], entries, self.metadata)
        for key, _, _ in self.items[i][1]:
            self._stream.write(key, tensors[key])
        self.where[self.items[i][0]] = self.names[self._shard]
        self._next += 1

    def _finish_shard(self) -> None:
        if self._stream is not None:
            self.files[self.names[self._shard]] = self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Finish the last file (every item must have been written)."""
        if self._next != len(self.items):
            raise CheckpointError(f"{self.out}: {len(self.items) - self._next} items not written")
        self._finish_shard()

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.file.close()


def canonical_entries(entry: ParamEntry) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(f"{entry.name}/{k}", torch.float32, s) for k, s in entry.tensor_shapes().items()]


def write_canonical(source: Source, out: Path, shard_bytes: int = SHARD_BYTES, on_param: Optional[Callable] = None) -> dict[str, Any]:
    """Write ``source`` as a canonical checkpoint into the (empty, usually temporary) directory ``out``.

    Reads and writes one parameter at a time. ``on_param(entry, tensors)`` sees each param's tensors
    as they pass (the converter exports model weights from it). Returns the index it wrote.
    """
    meta = source.meta
    writer = ShardedWriter(out, [(e.name, canonical_entries(e)) for e in meta.params], "state-{:05d}-of-{:05d}.safetensors", shard_bytes)
    try:
        for e in meta.params:
            tensors = source.read(e)
            for key, shape in e.tensor_shapes().items():
                t = tensors.get(key)
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise CheckpointError(f"param {e.name}: {key} has shape {got} in {meta.source.get('path', 'the source')}, expected {shape}")
            if on_param is not None:
                on_param(e, tensors)
            writer.put({f"{e.name}/{k}": v for k, v in tensors.items()})
            del tensors  # one param's tensors at a time
        writer.close()
    except BaseException:
        writer.abort()
        raise
    where, files = writer.where, writer.files
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator_device": meta.generator_device,
        "optimizer": jsonable(meta.optimizer),
        "trainer": jsonable(meta.trainer),
        "source": jsonable(meta.source),
        "param_groups": [
            {**jsonable(g), "params": [e.name for e in meta.params if e.group == gi]} for gi, g in enumerate(meta.groups)
        ],
        "params": {
            e.name: {
                "group": e.group, "shape": list(e.shape), "seed": e.seed, "rank": e.rank, "file": where[e.name],
                "tensors": {k: {"shape": list(s), "dtype": "float32"} for k, s in e.tensor_shapes().items()},
            }
            for e in meta.params
        },
        "files": files,
    }
    with open(out / INDEX_FILE, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return index


def save_canonical(source: Source, dst: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """`write_canonical` into a temporary directory renamed to ``dst`` at the end (atomic)."""
    with staged_directories(Path(dst), overwrite=overwrite) as (tmp,):
        return write_canonical(source, tmp, shard_bytes)


# -- reading ---------------------------------------------------------------------------------------
class CanonicalCheckpoint:
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
            raise CheckpointError(f"{index_path}: format_version {version!r}; this apollo_dist reads up to {FORMAT_VERSION}")
        for fname, info in self.index["files"].items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: missing (named in {index_path})")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(f"{fpath}: {size} bytes, the index records {info['bytes']} (truncated or replaced)")
        self.meta = self._meta()
        self._open: dict[str, Any] = {}

    def _meta(self) -> Meta:
        ix = self.index
        params = [
            ParamEntry(name, int(p["group"]), tuple(p["shape"]), int(p["seed"]), p.get("rank"))
            for name, p in ix["params"].items()
        ]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in ix["param_groups"]]
        return Meta(params, groups, ix["generator_device"], ix.get("optimizer", {}), ix.get("trainer", {}), ix.get("source", {}))

    @property
    def files(self) -> list[str]:
        return sorted(self.index["files"])

    def verify(self, files: Optional[list[str]] = None) -> None:
        """CheckpointError naming the first file whose SHA-256 differs from the index."""
        for fname in self.files if files is None else files:
            digest = sha256_file(self.path / fname)
            if digest != self.index["files"][fname]["sha256"]:
                raise CheckpointError(f"{self.path / fname}: SHA-256 {digest[:16]}... differs from the index's "
                                      f"{self.index['files'][fname]['sha256'][:16]}... (corrupted)")

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
        f = self.handle(entry.name)
        return {k: f.get_tensor(f"{entry.name}/{k}") for k in entry.tensor_shapes()}

    def read_flat(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Flat row-major elements [start, end) of ``name/key``, reading only the rows they lie in."""
        f = self.handle(name)
        sl = f.get_slice(f"{name}/{key}")
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
        sl = self.handle(name).get_slice(f"{name}/{key}")
        return sl[c0:c1] if tall else sl[:, c0:c1].t().contiguous()

    def close(self) -> None:
        self._open.clear()


# -- loading into a live optimizer -----------------------------------------------------------------
def _param_names(optimizer: torch.optim.Optimizer, model: Optional[torch.nn.Module]) -> dict[int, str]:
    """id(param) -> name: the model's names when given, else the groups' ``param_names``."""
    if model is not None:
        return {id(p): n for n, p in model.named_parameters()}
    names = {}
    for g in optimizer.param_groups:
        for p, n in zip(g["params"], g.get("param_names") or []):
            names[id(p)] = n
    return names


def _verify_shared(ckpt: CanonicalCheckpoint, group: Optional[dist.ProcessGroup]) -> None:
    """SHA-256 of every file, the files split over the ranks; every rank raises the same error."""
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    error = None
    try:
        ckpt.verify(ckpt.files[rank::world])
    except CheckpointError as e:
        error = str(e)
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def _sync_model_param(p: torch.nn.Parameter, slot, ckpt: CanonicalCheckpoint, name: str) -> None:
    """Make the model's own copy of ``p`` match the master weights just loaded, where the engine keeps
    one apart from them: ZeRO-3 keeps the rank's chunk in ``p.ds_tensor``; ZeRO-1/2 (and DDP-like
    replicas) keep the whole param on every rank. One process and FSDP2 update the param in place."""
    local = getattr(p, "_local_tensor", p)
    if slot.data.untyped_storage().data_ptr() == local.untyped_storage().data_ptr() and local.numel():
        return  # slot.data is a view of the param itself
    with torch.no_grad():
        if hasattr(p, "ds_tensor"):
            p.ds_tensor.view(-1)[: slot.numel].copy_(slot.data)
        elif p.numel():
            p.data.view(-1).copy_(ckpt.read_flat(name, "weight", 0, p.numel()))


def load_canonical(
    path: Path,
    optimizer: torch.optim.Optimizer,
    model: Optional[torch.nn.Module] = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a canonical checkpoint into ``optimizer`` (an APOLLO, bound or bindable) and its model.

    Works at any world size and under any engine: each rank reads only the elements it holds (master
    weights, plain-Adam moments) and the channels it owns (low-rank moments). Every trainable param
    must be in the checkpoint with the same shape and the same group structure (rank, gap,
    scale_type, scale); the group's lr, betas, eps, weight decay come from the checkpoint. Seeds,
    limiter norms and step counts are restored, so the projections continue where they were.

    ``verify``: check every file's SHA-256 first (split over the ranks). Returns the trainer state
    (``step``: the data position, ``scheduler``: the lr scheduler's state dict, ``run``, ...).
    Raises CheckpointError naming the file, param or value that does not fit.
    """
    ckpt = CanonicalCheckpoint(path)
    optimizer.ensure_bound()
    refuse_int8(optimizer.slots(), "canonical checkpoints (load_canonical)")
    if verify:
        _verify_shared(ckpt, optimizer.process_group)
    index = ckpt.index
    live_device = optimizer.device.type
    if index["generator_device"] != live_device:
        warnings.warn(
            f"{ckpt.path}: projections were drawn by a {index['generator_device']} generator, this run draws them on "
            f"{live_device}: P changes from the next step on (moments stay valid, the run is not bit-identical)",
            stacklevel=2,
        )
    names = _param_names(optimizer, model)
    saved_groups = index["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{ckpt.path}: {len(saved_groups)} param groups, this optimizer has {len(optimizer.param_groups)}")
    for gi, (saved, live) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if ("rank" in saved) != ("rank" in live):
            raise CheckpointError(f"{ckpt.path}: param group {gi} is {'low-rank' if 'rank' in saved else 'plain Adam'} in the checkpoint, not in this optimizer")
        check_same_hyperparameters(f"{ckpt.path}: param group {gi}", saved, live)

    live_names = set()
    for b in optimizer.buckets:
        group = optimizer.param_groups[b.group_index]
        saved = saved_groups[b.group_index]
        b.step_count.fill_(float(saved["step"]))
        for i, s in enumerate(b.slots):
            name = names.get(id(s.param))
            if name is None:
                raise CheckpointError(f"optimizer param at position {s.index} has no name: pass the model (or groups with param_names)")
            live_names.add(name)
            rec = index["params"].get(name)
            if rec is None:
                raise CheckpointError(f"{ckpt.path}: no param {name!r} (a different model?)")
            if tuple(rec["shape"]) != tuple(s.shape):
                raise CheckpointError(f"{ckpt.path}: param {name} has shape {tuple(rec['shape'])}, the model's is {tuple(s.shape)}")
            if rec["group"] != b.group_index:
                raise CheckpointError(f"{ckpt.path}: param {name} is in group {rec['group']}, in this optimizer in group {b.group_index}")
            with torch.no_grad():
                s.data.copy_(ckpt.read_held(name, "weight", s))
                _sync_model_param(s.param, s, ckpt, name)
                if isinstance(b, AdamBucket):
                    b.exp_avg[i].copy_(ckpt.read_held(name, "exp_avg", s))
                    b.exp_avg_sq[i].copy_(ckpt.read_held(name, "exp_avg_sq", s))
                else:
                    lay = b.layouts[i]
                    o0, o1 = lay.owners[b.comm.rank]
                    rows = slice(b.o_off[i], b.o_off[i] + o1 - o0)
                    b.exp_avg[rows].copy_(ckpt.read_channels(name, "exp_avg", o0, o1, lay.tall))
                    b.exp_avg_sq[rows].copy_(ckpt.read_channels(name, "exp_avg_sq", o0, o1, lay.tall))
                    b.limiter_norm[i : i + 1].copy_(ckpt.read_flat(name, "limiter_norm", 0, 1))
                    b.seeds[i] = SeedChain(int(rec["seed"]))
            optimizer.state[s.param]["seed"] = int(rec["seed"])
        if isinstance(b, LowRankBucket):
            b.proj_epoch = -1  # regenerate P from the loaded seeds at the next step
        for k, v in saved.items():  # lr, betas, ... as they were (the scheduler's state comes with them)
            if k not in ("params", "step") + STRUCTURAL_KEYS:
                group[k] = tuple(v) if k == "betas" else v
    extra = sorted(set(index["params"]) - live_names)
    if extra:
        raise CheckpointError(f"{ckpt.path}: params {extra[:4]} are not in this optimizer (a different model?)")
    ckpt.close()
    trainer = dict(index.get("trainer") or {})
    if trainer.get("step") is None:  # no data position recorded: one optimizer step per training step
        trainer["step"] = max((int(g["step"]) for g in saved_groups), default=0)
    return trainer


# -- a live single-process optimizer as a source ---------------------------------------------------
def assemble_param(entry: ParamEntry, idx: int, ranks: list["RankState"]) -> dict[str, torch.Tensor]:
    """One param's canonical tensors from every rank's piece (each rank: its APOLLO state dict's
    layout and state, and its master weights): pieces must tile the param and its channels."""
    numel = math.prod(entry.shape)
    weight = torch.empty(numel)
    covered = 0
    moments = {k: torch.empty(numel if not entry.lowrank else 0) for k in ("exp_avg", "exp_avg_sq")}
    if entry.lowrank:
        m, n = entry.shape
        C = max(m, n)  # channels: rows when tall, columns when wide
        moments = {k: torch.empty(C, entry.rank) for k in ("exp_avg", "exp_avg_sq")}
        owned = 0
    limiter = None
    for rs in ranks:
        lay = rs.layout["params"].get(idx)
        if lay is None:
            raise CheckpointError(f"{rs.where}: no layout for param {entry.name}")
        if "block" in lay:  # DeepSpeed and one-process layouts hold flat ranges; blocks come with DCP (global tensors)
            raise CheckpointError(f"{rs.where}: param {entry.name} is held as a block {lay['block']}: not assembled offline")
        a, b = lay["start"], lay["end"]
        state = rs.state.get(idx, {})
        if b > a:
            weight[a:b] = rs.master(idx, entry, a, b)
            covered += b - a
        if entry.lowrank:
            o0, o1 = lay["owned"]
            for k in moments:
                if o1 > o0:
                    moments[k][o0:o1] = _local(state[k]).reshape(o1 - o0, entry.rank)
            owned += o1 - o0
            q = _local(state["limiter_norm"]).reshape(1).clone()
            if limiter is None:
                limiter = q
            elif not torch.equal(limiter, q):
                raise CheckpointError(f"{rs.where}: param {entry.name}: limiter norm {q.item()} differs from rank 0's {limiter.item()}")
        elif b > a:
            for k in moments:
                moments[k][a:b] = _local(state[k]).reshape(-1)
    if covered != numel:
        raise CheckpointError(f"param {entry.name}: the rank files hold {covered} of its {numel} elements (a rank file missing?)")
    out = {"weight": weight.view(entry.shape)}
    if entry.lowrank:
        if owned != moments["exp_avg"].shape[0]:
            raise CheckpointError(f"param {entry.name}: the rank files own {owned} of its {moments['exp_avg'].shape[0]} channels")
        tall = entry.shape[0] >= entry.shape[1]
        out.update({k: v if tall else v.t().contiguous() for k, v in moments.items()})
        out["limiter_norm"] = limiter
    else:
        out.update({k: v.view(entry.shape) for k, v in moments.items()})
    return out


def _local(t: Any) -> torch.Tensor:
    t = getattr(t, "_local_tensor", t)
    return torch.as_tensor(t).detach().float().cpu()


@dataclass
class RankState:
    """What one rank saved: its APOLLO state dict's layout and state, and a reader of its master weights."""

    where: str
    layout: dict[str, Any]
    state: dict[int, dict[str, Any]]
    master: Callable[[int, ParamEntry, int, int], torch.Tensor]


def meta_from_state_dicts(
    optim_sd: dict[str, Any], names: list[str], trainer: dict[str, Any], source: dict[str, Any]
) -> tuple[Meta, dict[str, int]]:
    """Meta of an APOLLO state dict (``names``: the param names in state-dict index order), and name -> index."""
    layout = optim_sd["apollo_layout"]
    params, groups, index_of = [], [], {}
    for gi, g in enumerate(optim_sd["param_groups"]):
        steps = {float(_local(optim_sd["state"][idx]["step"])) for idx in g["params"] if idx in optim_sd["state"]}
        if len(steps) > 1:
            raise CheckpointError(f"{source.get('path')}: params of group {gi} have different steps {sorted(steps)}")
        groups.append({**group_hyperparameters(g), "step": int(steps.pop()) if steps else 0})
        for idx in g["params"]:
            if idx not in layout["params"]:
                continue  # frozen: not optimized
            name = names[idx]
            lay = layout["params"][idx]
            params.append(ParamEntry(name, gi, tuple(lay["shape"]), int(optim_sd["state"][idx]["seed"]), g.get("rank")))
            index_of[name] = idx
    first = optim_sd["param_groups"][0] if optim_sd["param_groups"] else {}
    meta = Meta(
        params, groups, layout["generator_device"],
        {"scale_front": bool(first.get("scale_front", False)), "disable_nl": bool(first.get("disable_nl", False))},
        trainer, {**source, "world_size": layout["world_size"]},
    )
    return meta, index_of


class LiveSource:
    """A single-process APOLLO (world size 1) as a `Source`: save it canonically without a native
    checkpoint in between. Sharded runs save natively and convert (tools/convert_checkpoint.py)."""

    def __init__(self, optimizer, model: Optional[torch.nn.Module] = None, trainer: Optional[dict[str, Any]] = None):
        refuse_int8(optimizer.slots(), "canonical checkpoints (LiveSource)")
        sd = optimizer.state_dict()
        if sd["apollo_layout"]["world_size"] != 1:
            raise CheckpointError("LiveSource needs a single-process optimizer: save sharded runs natively and convert them")
        by_id = _param_names(optimizer, model)
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        names = [by_id.get(id(p), f"param{i}") for i, p in enumerate(ordered)]
        slots = {s.index: s for s in optimizer.slots()}
        self.meta, self._index = meta_from_state_dicts(sd, names, dict(trainer or {}), {"engine": "live"})
        master = lambda idx, entry, a, b: slots[idx].data.detach().float().cpu()[: b - a]  # noqa: E731
        self._rank = RankState("live optimizer", sd["apollo_layout"], sd["state"], master)

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        return assemble_param(entry, self._index[entry.name], [self._rank])


# -- resuming a training run -----------------------------------------------------------------------
def is_canonical(path: Path) -> bool:
    """True when ``path`` is a canonical checkpoint directory (has an index.json)."""
    return (Path(path) / INDEX_FILE).is_file()


def resume_canonical(path: Path, optimizer: Any, model: torch.nn.Module, scheduler: Any = None, verify: bool = True) -> dict[str, Any]:
    """`load_canonical` for a training script, whatever the engine: unwraps DeepSpeed's optimizer
    wrapper and engine (``.optimizer`` / ``.module``), restores the lr scheduler's state too.
    Returns the trainer state (``step`` = the data position to continue after)."""
    from .optimizer import APOLLO

    apollo = optimizer
    while not isinstance(apollo, APOLLO) and hasattr(apollo, "optimizer"):
        apollo = apollo.optimizer
    if not isinstance(apollo, APOLLO):
        raise CheckpointError(f"{path}: a canonical checkpoint loads into APOLLO, not {type(optimizer).__name__}")
    module = model.module if type(model).__name__ == "DeepSpeedEngine" else model
    trainer = load_canonical(path, apollo, module, verify=verify)
    sched = trainer.get("scheduler")
    if scheduler is not None and sched is not None:
        sched = dict(sched)
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR's state carries (picklable) lambdas' state, or None
            sched.setdefault("lr_lambdas", [None] * len(scheduler.lr_lambdas))
        scheduler.load_state_dict(sched)
    return trainer
