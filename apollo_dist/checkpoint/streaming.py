"""Streaming safetensors I/O and atomic destinations: files written tensor by tensor (only the tensor being
written is in memory), split into shards of a bounded size, into temporary directories renamed into place
only when everything succeeded. Used for canonical checkpoints and for exported model weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .format import SHARD_BYTES, CheckpointError

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

Entry = tuple[str, torch.dtype, tuple[int, ...]]  # a tensor to write: (key, dtype, shape)


def nbytes(entries: list[Entry]) -> int:
    """Bytes of the data of tensors ``entries`` (no header)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in entries)


class SafetensorsStream:
    """Writes one safetensors file tensor by tensor: the header comes from shapes known up front, so
    only the tensor being written is in memory. Computes the file's SHA-256 on the way."""

    def __init__(self, path: Path, entries: list[Entry], metadata: Optional[dict[str, str]] = None):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, dtype, shape in entries:
            size = nbytes([(key, dtype, shape)])
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
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


class ShardedWriter:
    """Streams items (one param's tensors each, in a fixed order) into safetensors files of at most
    ``shard_bytes`` (an item is never split), holding only the item being written.

    ``items``: (item name, its tensors' (key, dtype, shape)) in the order `put` will receive them;
    ``pattern``: file names, formatted with (shard number, number of shards).
    """

    def __init__(
        self,
        out: Path,
        items: list[tuple[str, list[Entry]]],
        pattern: str,
        shard_bytes: int = SHARD_BYTES,
        metadata: Optional[dict[str, str]] = None,
    ):
        self.out, self.items, self.metadata = Path(out), items, metadata
        self.shards: list[list[int]] = [[]]
        size = 0
        for i, (_, entries) in enumerate(items):
            item_bytes = nbytes(entries)
            if self.shards[-1] and size + item_bytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(i)
            size += item_bytes
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
        """Close the file being written, after a failure (the staged directory holding it is deleted)."""
        if self._stream is not None:
            self._stream.file.close()


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
