"""Streaming safetensors I/O and atomic destinations: files written tensor by tensor (only the tensor being
written is in memory), split into shards of a bounded size, into temporary directories renamed into place
only when everything succeeded. Used for canonical checkpoints and for exported model weights. A write that
fills its file system is a `DiskFullError` naming the path, the bytes to write and the bytes free (also for
launch/train.py's native checkpoints: `is_disk_full` recognizes torch.save's and DCP's forms of it)."""

from __future__ import annotations

import contextlib
import errno
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


# -- a full file system ----------------------------------------------------------------------------
# torch.save reports a full disk without an errno: its zip writer fails with one of these (the OSError is at
# best the __context__ of a save to a Python file; DCP passes on only the RuntimeError).
TORCH_WRITE_FAILURES = ("unexpected pos", "basic_ios::clear", "PytorchStreamWriter failed writing")


def fmt_bytes(n: int) -> str:
    """``n`` as exact bytes and in binary units, e.g. "3,145,728 bytes (3.0 MiB)"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**shift:
            return f"{n:,} bytes ({n / 2**shift:.1f} {unit})"
    return f"{n:,} bytes"


def free_bytes(path: os.PathLike | str) -> int:
    """Bytes free (for this user) on the file system of ``path`` or of its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def partial_bytes(path: os.PathLike | str) -> int:
    """Bytes the files under ``path`` occupy on disk (what removing them frees, once no process holds them
    open: a failed torch.save keeps its file open while its exception is alive)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


class DiskFullError(OSError):
    """A write that ran out of space (errno ENOSPC). The message names ``path``, the bytes that were to be
    written (``need``, None when unknown; ``what`` says what they are) and the bytes ``free`` on its file
    system, then ``note``."""

    def __init__(self, path: os.PathLike | str, need: Optional[int], free: int, note: str = "", what: str = "") -> None:
        self.path, self.need, self.free = Path(path), need, free
        to_write = f"{fmt_bytes(need)}{what} to write, " if need is not None else ""
        super().__init__(
            errno.ENOSPC,
            f"no space left on device writing {path}: {to_write}{fmt_bytes(free)} free on its file system{note}",
        )

    def __str__(self) -> str:
        return self.strerror  # without OSError's "[Errno 28]" prefix


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank exceptions of DCP's CheckpointException."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: rank -> (exception, traceback)
        if isinstance(failures, dict):
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f]


def is_disk_full(exc: BaseException, path: os.PathLike | str, need: int) -> bool:
    """Whether ``exc``, raised while writing ``need`` bytes under ``path``, is a full file system: an OSError
    ENOSPC anywhere in it, or torch's zip writer failing (which keeps no errno) while fewer than ``need``
    bytes are free there."""
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return True
    torch_write = any(isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_FAILURES) for e in chain)
    return torch_write and free_bytes(path) < need


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
        self.total = sum(nbytes(entries) for _, entries in items)  # tensor data, headers aside
        self._next, self._shard, self._stream = 0, -1, None

    @contextlib.contextmanager
    def _full_disk_named(self) -> Iterator[None]:
        """A full file system while writing: DiskFullError with the bytes of all the files and those free once
        what was written is removed (staged_directories removes it and counts again)."""
        try:
            yield
        except Exception as e:
            if isinstance(e, DiskFullError) or not is_disk_full(e, self.out, self.total):
                raise
            written = sum(f["bytes"] for f in self.files.values()) + (self._stream.size if self._stream else 0)
            raise DiskFullError(self.out, self.total, free_bytes(self.out) + written) from e

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the next item's tensors (keys as declared)."""
        with self._full_disk_named():
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
        with self._full_disk_named():
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
    succeeds (all of them, at the end), deleted when it fails: a failed write changes no destination.
    A full file system is a DiskFullError naming the destination and the bytes free once the temporary
    directories are gone."""
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
    except Exception as e:
        need = e.need if isinstance(e, DiskFullError) else None
        where = e.path if isinstance(e, DiskFullError) else None
        dst = next((d for d, t in zip(dsts, temps) if where is not None and t in (where, *where.parents)), dsts[0])
        if not (isinstance(e, DiskFullError) or is_disk_full(e, dst.parent, 0)):
            raise
        free = free_bytes(dst.parent) + sum(partial_bytes(t) for t in temps)  # before `finally` removes them
        note = "; nothing was written there (the partial files were removed)"
        raise DiskFullError(dst, need, free, note) from e
    finally:
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
