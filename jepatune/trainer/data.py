"""Token shards in the reference format, and the streams the trainer reads from them.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count)
followed by the tokens as little-endian uint16. Byte-level shards hold values 0..255.
Shards are memory-mapped, so memory use does not grow with the corpus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jepatune.atomic import atomic_path
from jepatune.errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TRAIN_PATTERN = "fineweb_train_*.bin"
VAL_PATTERN = "fineweb_val_*.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` (values 0..65535) as one shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFF):
        raise DataError(f"{path}: token values must fit uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map one shard's tokens (uint16), after checking its header and size."""
    path = Path(path)
    try:
        return _read_shard(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror}); check the file and its permissions") from None


def _read_shard(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: cannot read shard (missing, or not a file)")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: corrupt shard, {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        raise DataError(
            f"{path}: not a token shard (magic {int(header[0])}, version {int(header[1])}; "
            f"expected {SHARD_MAGIC}, {SHARD_VERSION}); rebuild it with `jepatune data`"
        )
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(
            f"{path}: corrupt or truncated shard, {size} bytes but the header promises "
            f"{num_tokens} tokens ({expected} bytes); rebuild it with `jepatune data`"
        )
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The sorted shard files of `split` ('train' or 'val') in `data_dir`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; build one with `jepatune data demo --out {data_dir}`")
    files = sorted(data_dir.glob(TRAIN_PATTERN if split == "train" else VAL_PATTERN))
    if not files:
        raise DataError(
            f"{data_dir}: no fineweb_{split}_*.bin shards; build them with `jepatune data demo|text|fineweb`"
        )
    return files


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{where}: token id {int(tokens.max())} >= vocab_size {vocab_size}; a tokenizer's shards "
                        f"(e.g. SentencePiece) become byte shards with `jepatune data transpile`, or set vocab_size "
                        f"to match")


# The train split can be many GB, too long to scan before a run starts. The first 2 MB of each shard
# suffice for the mistake this catches, another tokenizer's shards passed as bytes: a shard holds one
# tokenizer's ids throughout, and most of a larger vocabulary lies above 255 (in SentencePiece-1024,
# every merged piece, the frequent ones among them), so a few KB of any shard already show such an id.
VOCAB_CHECK_TOKENS = 1 << 20


def check_train_vocab(files: list[Path], vocab_size: int) -> None:
    """Refuse train shards whose token ids do not fit `vocab_size`, from the first `VOCAB_CHECK_TOKENS`
    of each shard (milliseconds per shard: a memory-mapped prefix)."""
    for f in files:
        check_vocab(read_shard(f)[:VOCAB_CHECK_TOKENS], vocab_size, str(f))


@dataclass
class StreamPosition:
    """Where a `TokenStream` is: which shard, and the offset inside it."""

    shard: int = 0
    offset: int = 0


class TokenStream:
    """Reads the shards in order, wrapping around forever; its position can be saved."""

    def __init__(self, files: list[Path], position: StreamPosition | None = None):
        if not files:
            raise DataError("no train shards given")
        self.files = files
        self.position = StreamPosition(**vars(position)) if position else StreamPosition()
        self._tokens = read_shard(files[self.position.shard])
        if sum(1 for f in files if read_shard(f).size) == 0:
            raise DataError(f"{files[0].parent}: every train shard is empty")

    def take(self, n: int) -> np.ndarray:
        chunks, remaining = [], n
        while remaining > 0:
            available = self._tokens.size - self.position.offset
            if available <= 0:
                self.position = StreamPosition((self.position.shard + 1) % len(self.files), 0)
                self._tokens = read_shard(self.files[self.position.shard])
                continue
            k = min(remaining, available)
            chunks.append(np.asarray(self._tokens[self.position.offset : self.position.offset + k]))
            self.position.offset += k
            remaining -= k
        if not chunks:
            return np.zeros(0, dtype=np.uint16)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class DistributedTokenLoader:
    """Each call takes one contiguous chunk of world_size * (local_tokens + 1) tokens and
    gives this rank its own span, shifted by one for (inputs, targets)."""

    def __init__(self, files: list[Path], rank: int = 0, world_size: int = 1, position: StreamPosition | None = None):
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(files, position)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


def load_val_tokens(data_dir: str | os.PathLike, seq_len: int, limit: int = 0) -> np.ndarray:
    """The validation split cut to a multiple of seq_len (+1 for the shift).

    `limit` > 0 keeps only a prefix of about `limit` tokens (rounded down to whole
    sequences, at least one), for cheap intermediate evaluations.
    """
    files = find_shards(data_dir, "val")
    shards = [read_shard(f) for f in files]
    total = sum(s.size for s in shards)
    usable = ((total - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(
            f"{Path(data_dir)}: the val split has {total} tokens, fewer than one sequence of "
            f"train_seq_len={seq_len} (+1); use a shorter train_seq_len or a bigger val split"
        )
    if limit > 0:
        usable = min(usable, max(seq_len, (limit // seq_len) * seq_len))
    out, need = [], usable + 1
    for s in shards:
        if need <= 0:
            break
        out.append(np.asarray(s[:need]))
        need -= out[-1].size
    return np.concatenate(out)


def check_data(data_dir: str | os.PathLike, seq_len: int, val_tokens: int = 0) -> None:
    """Fail before any run starts on what every run would fail on: no train shards, a val split
    missing or shorter than one sequence (each a DataError naming the folder and the fix)."""
    find_shards(data_dir, "train")
    load_val_tokens(data_dir, seq_len, val_tokens)
