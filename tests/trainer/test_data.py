"""The shard format and the token streams the trainer reads from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jepatune.errors import DataError
from jepatune.trainer.data import (
    HEADER_BYTES,
    DistributedTokenLoader,
    StreamPosition,
    TokenStream,
    check_train_vocab,
    check_vocab,
    find_shards,
    load_val_tokens,
    read_shard,
    write_shard,
)


def shard(folder: Path, split: str, index: int, tokens) -> Path:
    path = folder / f"fineweb_{split}_{index:06d}.bin"
    write_shard(path, np.asarray(tokens))
    return path


# --- write_shard / read_shard ------------------------------------------------------------------


def test_round_trip_keeps_header_size_and_values(tmp_path):
    tokens = np.array([0, 1, 7, 255, 256, 1000, 65535], dtype=np.uint16)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)

    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    assert not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * tokens.size
    assert np.fromfile(path, dtype="<u2", offset=1024).tolist() == tokens.tolist()

    got = read_shard(path)
    assert isinstance(got, np.memmap)  # memory-mapped, not loaded
    assert got.dtype == np.uint16 and got.shape == tokens.shape
    assert got.tolist() == tokens.tolist()
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left nothing behind


def test_round_trip_of_int64_input_and_empty_shard(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(300, dtype=np.int64))
    assert read_shard(tmp_path / "a.bin").tolist() == list(range(300))
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16))
    assert (tmp_path / "e.bin").stat().st_size == HEADER_BYTES
    assert read_shard(tmp_path / "e.bin").size == 0


@pytest.mark.parametrize("bad", [[-1, 3], [65536]])
def test_write_shard_refuses_values_outside_uint16(tmp_path, bad):
    path = tmp_path / "s.bin"
    with pytest.raises(DataError, match="uint16") as e:
        write_shard(path, np.array(bad, dtype=np.int64))
    assert str(path) in str(e.value)
    assert not path.exists()


def _short(path: Path) -> None:
    path.write_bytes(b"\x00" * 100)


def _patch_header(index: int, value: int):
    def patch(path: Path) -> None:
        write_shard(path, np.arange(10))
        data = bytearray(path.read_bytes())
        data[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
        path.write_bytes(bytes(data))

    return patch


def _resize(delta: int):
    def resize(path: Path) -> None:
        write_shard(path, np.arange(10))
        data = path.read_bytes()
        path.write_bytes(data[:delta] if delta < 0 else data + b"\x00" * delta)

    return resize


@pytest.mark.parametrize("make, fragment", [
    (_short, "header"),
    (_patch_header(0, 12345), "magic 12345"),
    (_patch_header(1, 2), "version 2"),
    (_patch_header(2, 11), "11 tokens"),  # the header promises more than the file holds
    (_patch_header(2, -1), "-1 tokens"),
    (_resize(-2), "truncated"),
    (_resize(-1), "truncated"),
    (_resize(2), "1046 bytes"),  # extra trailing bytes
    (_resize(1), "1045 bytes"),
    (None, "cannot read"),  # missing file
], ids=["short", "magic", "version", "count-too-big", "count-negative", "truncated-token",
        "truncated-byte", "extra-token", "extra-byte", "missing"])
def test_every_bad_shard_raises_data_error_naming_the_file(tmp_path, make, fragment):
    path = tmp_path / "fineweb_train_000000.bin"
    if make is not None:
        make(path)
    with pytest.raises(DataError) as e:
        read_shard(path)
    assert str(path) in str(e.value)
    assert fragment in str(e.value)


# --- find_shards -----------------------------------------------------------------------------


def test_find_shards_sorted_per_split(tmp_path):
    for i in (2, 0, 1):
        shard(tmp_path, "train", i, [i])
    shard(tmp_path, "val", 0, [9])
    (tmp_path / "notes.txt").write_text("not a shard")
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]


def test_find_shards_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as e:
        find_shards(missing, "train")
    assert str(missing) in str(e.value) and "jepatune data" in str(e.value)


def test_find_shards_folder_without_shards(tmp_path):
    shard(tmp_path, "val", 0, [1, 2, 3])  # val only: no train shards
    (tmp_path / "fineweb_train_000000.txt").write_text("wrong suffix")
    with pytest.raises(DataError, match="no fineweb_train_") as e:
        find_shards(tmp_path, "train")
    assert str(tmp_path) in str(e.value) and "jepatune data" in str(e.value)


# --- TokenStream ------------------------------------------------------------------------------


@pytest.fixture
def three_shards(tmp_path) -> list[Path]:
    """700 tokens 0..699 over shards of 300, 250 and 150, written out of order."""
    shard(tmp_path, "train", 2, np.arange(550, 700))
    shard(tmp_path, "train", 0, np.arange(0, 300))
    shard(tmp_path, "train", 1, np.arange(300, 550))
    return find_shards(tmp_path, "train")


def test_token_stream_wraps_around_in_sorted_order(three_shards):
    got = TokenStream(three_shards).take(1000)
    assert got.tolist() == list(range(700)) + list(range(300))


def test_token_stream_position_continues_exactly(three_shards):
    whole = TokenStream(three_shards).take(1000)

    first = TokenStream(three_shards)
    a = first.take(600)
    assert (first.position.shard, first.position.offset) == (2, 50)
    saved = StreamPosition(**vars(first.position))
    second = TokenStream(three_shards, first.position)
    b = second.take(400)
    assert np.concatenate([a, b]).tolist() == whole.tolist()
    assert first.position == saved  # the new stream copied the position, it did not share it


def test_token_stream_position_at_a_shard_end(three_shards):
    stream = TokenStream(three_shards, StreamPosition(shard=0, offset=300))
    assert stream.take(5).tolist() == [300, 301, 302, 303, 304]
    stream = TokenStream(three_shards, StreamPosition(shard=2, offset=150))
    assert stream.take(3).tolist() == [0, 1, 2]  # wraps to the first shard


def test_token_stream_skips_empty_shards(tmp_path):
    shard(tmp_path, "train", 0, [1, 2])
    shard(tmp_path, "train", 1, [])
    shard(tmp_path, "train", 2, [3])
    assert TokenStream(find_shards(tmp_path, "train")).take(7).tolist() == [1, 2, 3, 1, 2, 3, 1]


def test_token_stream_all_empty_is_a_data_error(tmp_path):
    shard(tmp_path, "train", 0, [])
    shard(tmp_path, "train", 1, [])
    with pytest.raises(DataError, match="empty"):
        TokenStream(find_shards(tmp_path, "train"))


def test_token_stream_reports_a_corrupt_shard(tmp_path):
    shard(tmp_path, "train", 0, np.arange(10))
    bad = shard(tmp_path, "train", 1, np.arange(10))
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(DataError) as e:
        TokenStream(find_shards(tmp_path, "train"))
    assert str(bad) in str(e.value)


# --- DistributedTokenLoader ---------------------------------------------------------------------


def test_distributed_loader_gives_ranks_disjoint_consecutive_spans(tmp_path):
    shard(tmp_path, "train", 0, np.arange(0, 25))  # the second chunk crosses this boundary
    shard(tmp_path, "train", 1, np.arange(25, 60))
    files = find_shards(tmp_path, "train")
    seq_len, local = 4, 8
    span = local + 1
    loaders = [DistributedTokenLoader(files, rank=r, world_size=2) for r in range(2)]
    tokens = np.arange(60)
    for call in range(3):
        chunk = tokens[call * 2 * span : (call + 1) * 2 * span]
        assert chunk.size == 2 * span
        seen = []
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(local, seq_len)
            assert x.shape == y.shape == (local // seq_len, seq_len)
            assert x.dtype == y.dtype == np.int64
            own = chunk[rank * span : (rank + 1) * span]
            assert x.ravel().tolist() == own[:-1].tolist()
            assert y.ravel().tolist() == own[1:].tolist()  # targets are inputs shifted by one
            seen.append(own)
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        assert np.concatenate(seen).tolist() == chunk.tolist()


def test_distributed_loader_single_rank_and_position(tmp_path):
    shard(tmp_path, "train", 0, np.arange(40))
    files = find_shards(tmp_path, "train")
    loader = DistributedTokenLoader(files)
    x, y = loader.next_batch(8, 4)
    assert x.ravel().tolist() == list(range(8)) and y.ravel().tolist() == list(range(1, 9))
    resumed = DistributedTokenLoader(files, position=loader.stream.position)
    assert resumed.next_batch(8, 4)[0].ravel().tolist() == list(range(9, 17))


# --- load_val_tokens and check_vocab ------------------------------------------------------------


@pytest.fixture
def val_dir(tmp_path) -> Path:
    shard(tmp_path, "val", 1, np.arange(50, 87))
    shard(tmp_path, "val", 0, np.arange(0, 50))
    shard(tmp_path, "train", 0, np.arange(1000, 1100))  # never part of val
    return tmp_path


def test_load_val_tokens_cuts_to_whole_sequences(val_dir):
    full = load_val_tokens(val_dir, seq_len=8)
    assert full.size == 81 and (full.size - 1) % 8 == 0
    assert full.tolist() == list(range(81))


@pytest.mark.parametrize("limit, size", [(20, 17), (3, 9), (8, 9), (1000, 81)])
def test_load_val_tokens_limit_is_a_prefix(val_dir, limit, size):
    full = load_val_tokens(val_dir, seq_len=8)
    part = load_val_tokens(val_dir, seq_len=8, limit=limit)
    assert part.size == size and (part.size - 1) % 8 == 0
    assert part.tolist() == full[: part.size].tolist()


def test_load_val_tokens_exactly_one_sequence(tmp_path):
    shard(tmp_path, "val", 0, np.arange(9))
    assert load_val_tokens(tmp_path, seq_len=8).tolist() == list(range(9))


@pytest.mark.parametrize("n", [8, 1, 0])
def test_load_val_tokens_shorter_than_one_sequence(tmp_path, n):
    shard(tmp_path, "val", 0, np.arange(n))
    with pytest.raises(DataError, match="train_seq_len=8") as e:
        load_val_tokens(tmp_path, seq_len=8)
    assert str(tmp_path) in str(e.value)


def test_load_val_tokens_without_val_shards(tmp_path):
    shard(tmp_path, "train", 0, np.arange(100))
    with pytest.raises(DataError, match="no fineweb_val_"):
        load_val_tokens(tmp_path, seq_len=8)


def test_check_vocab(tmp_path):
    check_vocab(np.array([0, 255], dtype=np.uint16), 256, "here")
    check_vocab(np.zeros(0, dtype=np.uint16), 1, "here")
    with pytest.raises(DataError, match="token id 256 >= vocab_size 256") as e:
        check_vocab(np.array([3, 256, 9], dtype=np.uint16), 256, "somewhere/val split")
    assert "somewhere/val split" in str(e.value)


def test_check_train_vocab_reads_every_shard_s_prefix(tmp_path, monkeypatch):
    good = shard(tmp_path, "train", 0, np.arange(300) % 256)
    tokenized = shard(tmp_path, "train", 1, np.arange(300) % 1024)  # SentencePiece-1024 ids, not bytes
    check_train_vocab([good], 256)
    check_train_vocab([good, tokenized], 1024)
    with pytest.raises(DataError, match="token id 299 >= vocab_size 256") as e:
        check_train_vocab([good, tokenized], 256)
    assert str(tokenized) in str(e.value) and "jepatune data transpile" in str(e.value)
    # Only a prefix of each shard is read (a full scan of a FineWeb split would take minutes): an id past
    # it is not seen, which a wrong tokenizer's shard, tokenized throughout, never relies on.
    monkeypatch.setattr("jepatune.trainer.data.VOCAB_CHECK_TOKENS", 256)
    check_train_vocab([good, tokenized], 256)
