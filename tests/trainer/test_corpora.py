"""Byte corpora builders: demo (stdlib), text files, SentencePiece transpile (FineWeb fetch: test_fineweb.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jepatune.corpora import (
    SEPARATOR,
    build_demo,
    build_from_text,
    demo_cuts,
    transpile_sentencepiece,
)
from jepatune.errors import DataError
from jepatune.trainer.data import find_shards, read_shard, write_shard

spm = pytest.importorskip("sentencepiece")

SAMPLE = "Hello  world!\nA line with ünïcödé — and emoji 🙂.\n\n\tThe quick brown fox, café 日本語."


def split_bytes(folder: Path, split: str) -> bytes:
    shards = [read_shard(f) for f in find_shards(folder, split)]
    tokens = np.concatenate(shards) if shards else np.zeros(0, np.uint16)
    assert tokens.size == 0 or int(tokens.max()) < 256
    return tokens.astype(np.uint8).tobytes()


def joined_pieces(root: Path, split_meta: dict) -> bytes:
    """A split's bytes as its corpus.json entry describes them."""
    texts = [(root / rel).read_bytes() for rel, _ in split_meta["documents"]]
    data = SEPARATOR.join(texts[i][start:end] for i, start, end in split_meta["pieces"])
    return data[: split_meta["bytes"]]


def max_segment_tv(data: bytes, segments: int = 8) -> float:
    """The largest total-variation distance between the byte histogram of one of `segments`
    equal stretches of `data` and that of the whole."""
    tokens = np.frombuffer(data, np.uint8)
    whole = np.bincount(tokens, minlength=256) / tokens.size
    return max(0.5 * float(np.abs(np.bincount(part, minlength=256) / part.size - whole).sum())
               for part in np.array_split(tokens, segments))


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, tiny SentencePiece BPE model, trained offline in a fraction of a second."""
    folder = tmp_path_factory.mktemp("sp")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu sigma tau".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" line {i}." for i in range(200)]
    lines += ["The quick brown fox jumps over the lazy dog, café, naïve, 日本語."] * 40
    (folder / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "tiny"), vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    return folder / "tiny.model"


def sp_encode(tokenizer: Path, text: str) -> np.ndarray:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # the model itself round-trips, so any mismatch is the transpiler's
    return np.array(ids, dtype=np.uint16)


# ----------------------------------------------------------------------------------- demo


def test_demo_builds_readable_deterministic_disjoint_splits(tmp_path: Path) -> None:
    a = build_demo(tmp_path / "a", train_mb=1.0, val_mb=0.2)
    b = build_demo(tmp_path / "b", train_mb=1.0, val_mb=0.2)
    assert (a["train_bytes"], a["val_bytes"], a["reused"]) == (1_000_000, 200_000, False)
    assert {**b, "out": a["out"]} == a
    for split in ("train", "val"):
        assert split_bytes(tmp_path / "a", split) == split_bytes(tmp_path / "b", split)
    train, val = split_bytes(tmp_path / "a", "train"), split_bytes(tmp_path / "a", "val")
    assert len(train) == a["train_bytes"] and len(val) == a["val_bytes"]

    meta = json.loads((tmp_path / "a" / "corpus.json").read_text())
    root = Path(meta["stdlib"])
    docs = {s: meta[s]["documents"] for s in ("train", "val")}
    assert "pydoc_data/topics.py" not in {r for r, _ in docs["val"]}  # too big for val
    # a stable shuffle, not alphabetical: each split mixes packages and modules from everywhere
    train_names = [r for r, _ in docs["train"]]
    assert train_names != sorted(train_names) and len({r.split("/")[0][:1] for r in train_names}) > 5
    # corpus.json describes the shards exactly: each split is pieces of its own files joined
    # (the last one cut at the size limit), so disjoint file hashes mean disjoint content.
    for split, data in (("train", train), ("val", val)):
        assert joined_pieces(root, meta[split]) == data
    assert not {h for _, h in docs["train"]} & {h for _, h in docs["val"]}
    assert not {r for r, _ in docs["train"]} & {r for r, _ in docs["val"]}
    assert no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def demo4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default-size demo (4 MB train, 0.5 MB val): a fraction of a second to build."""
    out = tmp_path_factory.mktemp("demo4") / "data"
    build_demo(out)
    return out


def test_demo_train_stream_is_stationary(demo4: Path) -> None:
    """Every eighth of the train stream has about the byte mix of the whole, several times
    closer than the same files written one after another (the long run of pydoc's prose
    topics, or of one big module, made the old layout drift)."""
    meta = json.loads((demo4 / "corpus.json").read_text())
    root = Path(meta["stdlib"])
    train = split_bytes(demo4, "train")
    contiguous = SEPARATOR.join((root / rel).read_bytes() for rel, _ in meta["train"]["documents"])
    contiguous = contiguous[: len(train)]
    assert len(contiguous) == len(train)
    new, old = max_segment_tv(train), max_segment_tv(contiguous)
    assert new < 0.04 and 4 * new < old, (new, old)
    # Many files in every stretch: each eighth holds pieces of most of the split's large files.
    pieces = meta["train"]["pieces"]
    sizes = [len((root / rel).read_bytes()) for rel, _ in meta["train"]["documents"]]
    large = {i for i, n in enumerate(sizes) if n >= 64_000}
    assert len(large) >= 5
    for part in np.array_split(np.arange(len(pieces)), 8):
        assert len(large & {pieces[k][0] for k in part}) >= len(large) - 1


def test_demo_pieces_keep_the_split_by_file(demo4: Path) -> None:
    """No piece of a val file is in train: each split is made of its own files' pieces, and
    the few val pieces found verbatim in train are stdlib duplicates (near-identical code-page
    tables), present in a train file of their own."""
    meta = json.loads((demo4 / "corpus.json").read_text())
    root = Path(meta["stdlib"])
    train, val = split_bytes(demo4, "train"), split_bytes(demo4, "val")
    assert joined_pieces(root, meta["train"]) == train and joined_pieces(root, meta["val"]) == val
    docs = {s: [(root / rel).read_bytes() for rel, _ in meta[s]["documents"]] for s in ("train", "val")}
    assert not {r for r, _ in meta["train"]["documents"]} & {r for r, _ in meta["val"]["documents"]}
    for split in ("train", "val"):
        # A file's cuts cover it without overlap, a few KB each, after a line break.
        cuts = [demo_cuts(text) for text in docs[split]]
        for text, spans in zip(docs[split], cuts, strict=True):
            assert spans[0][0] == 0 and spans[-1][1] == len(text)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert all(end - start <= 4096 * 5 // 4 for start, end in spans)
            assert all(text[end - 1:end] == b"\n" for _, end in spans[:-1])
        # The stream holds every cut of every file once, but for the split's last file (cut
        # short to meet the size) and the stream's last piece (short by at most a separator).
        *body, (i, start, end) = [tuple(p) for p in meta[split]["pieces"]]
        full = next(b for a, b in cuts[i] if a == start)
        assert end <= full and (full - end <= len(SEPARATOR) or i == len(docs[split]) - 1)
        held = sorted((*body, (i, start, full)))
        assert len(set(held)) == len(held)
        for i, spans in enumerate(cuts):
            got = [(a, b) for d, a, b in held if d == i]
            if i < len(cuts) - 1:
                assert got == spans
            else:
                assert got and got[:-1] == spans[: len(got) - 1] and got[-1][0] == spans[len(got) - 1][0]
    leaked = [docs["val"][i][a:b] for i, a, b in meta["val"]["pieces"] if b - a >= 256]
    leaked = [p for p in leaked if p in train]
    assert len(leaked) <= len(meta["val"]["pieces"]) // 10
    assert all(any(p in text for text in docs["train"]) for p in leaked)


def test_demo_is_deterministic_across_walk_order_and_hash_seed(tmp_path: Path, demo4: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    from jepatune import corpora

    expected = {s: split_bytes(demo4, s) for s in ("train", "val")}
    meta = (demo4 / "corpus.json").read_text()
    walk = os.walk

    def reversed_walk(top, *args, **kwargs):  # the filesystem may list entries in any order
        for folder, dirs, files in walk(top, *args, **kwargs):
            dirs.reverse()
            files.reverse()
            yield folder, dirs, files

    monkeypatch.setattr(corpora.os, "walk", reversed_walk)
    build_demo(tmp_path / "walk")
    monkeypatch.undo()
    code = "import sys; from jepatune.corpora import build_demo; build_demo(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "seed")], env=env, check=True)
    for out in (tmp_path / "walk", tmp_path / "seed"):
        assert {s: split_bytes(out, s) for s in expected} == expected
        assert (out / "corpus.json").read_text() == meta


def test_demo_rebuilds_a_folder_of_an_older_layout(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    build_demo(out, train_mb=0.3, val_mb=0.05)
    fresh = {s: split_bytes(out, s) for s in ("train", "val")}
    meta_path = out / "corpus.json"
    meta = json.loads(meta_path.read_text())
    # What the builder of whole files in order wrote: no layout in the settings, other shards.
    del meta["settings"]["layout"]
    meta["train"]["shards"] = ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    write_shard(out / "fineweb_train_000001.bin", np.zeros(10, np.uint16))
    write_shard(out / "fineweb_train_000000.bin", np.zeros(10, np.uint16))
    meta_path.write_text(json.dumps(meta))
    # Other files in the folder: not ours to delete, so no rebuild, and the old build stays.
    (out / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="not empty|already holds"):
        build_demo(out, train_mb=0.3, val_mb=0.05)
    assert (out / "fineweb_train_000001.bin").is_file()
    assert "layout" not in json.loads(meta_path.read_text())["settings"]
    (out / "notes.md").unlink()
    again = build_demo(out, train_mb=0.3, val_mb=0.05)
    assert again["reused"] is False and again["files"] == 2
    names = ["corpus.json", "fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert {s: split_bytes(out, s) for s in fresh} == fresh
    assert build_demo(out, train_mb=0.3, val_mb=0.05)["reused"] is True
    # Another size is still refused, old layout or not.
    del meta["settings"]["train_mb"]
    meta_path.write_text(json.dumps({**meta, "settings": {**meta["settings"], "train_mb": 9.0}}))
    with pytest.raises(DataError, match="pick another folder or delete it"):
        build_demo(out, train_mb=0.3, val_mb=0.05)
    assert no_leftovers(tmp_path)


def test_demo_default_size_and_shard_splitting(tmp_path: Path) -> None:
    s = build_demo(tmp_path / "d")
    assert abs(s["train_bytes"] - 4_000_000) < 1000 and abs(s["val_bytes"] - 500_000) < 1000
    small = build_demo(tmp_path / "small", train_mb=0.25, val_mb=0.05, shard_bytes=100_000)
    assert [f.name for f in find_shards(tmp_path / "small", "train")] == [
        f"fineweb_train_{i:06d}.bin" for i in range(3)
    ]
    assert small["files"] == 3 + 1
    sizes = [read_shard(f).size for f in find_shards(tmp_path / "small", "train")]
    assert sizes == [100_000, 100_000, 50_000]


def test_demo_reuses_a_complete_folder_and_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = build_demo(out, train_mb=0.3, val_mb=0.05)
    shard = out / "fineweb_train_000000.bin"
    stamp = shard.stat().st_mtime_ns
    again = build_demo(out, train_mb=0.3, val_mb=0.05)
    assert again["reused"] is True and shard.stat().st_mtime_ns == stamp
    assert {k: again[k] for k in ("files", "train_bytes", "val_bytes")} == {
        k: first[k] for k in ("files", "train_bytes", "val_bytes")
    }
    with pytest.raises(DataError, match="pick another folder or delete it"):
        build_demo(out, train_mb=0.4, val_mb=0.05)
    shard.unlink()
    with pytest.raises(DataError):
        build_demo(out, train_mb=0.3, val_mb=0.05)


# ----------------------------------------------------------------------------------- text


def test_text_round_trip_and_val_tail(tmp_path: Path) -> None:
    texts = ["first file, ünïcödé\n", "second — 日本語 🙂", "third " * 50]
    files = []
    for i, t in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(t, encoding="utf-8")
    s = build_from_text(files, tmp_path / "out", val_frac=0.1, shard_bytes=64)
    whole = SEPARATOR.join(t.encode() for t in texts)
    train, val = split_bytes(tmp_path / "out", "train"), split_bytes(tmp_path / "out", "val")
    assert (train + val).decode("utf-8") == SEPARATOR.decode().join(texts)
    assert len(val) == round(len(whole) * 0.1) == s["val_bytes"] and s["train_bytes"] == len(train)
    assert all(read_shard(f).size <= 64 for f in (tmp_path / "out").glob("*.bin"))
    assert s["files"] == len(list((tmp_path / "out").glob("*.bin"))) > 2


def test_text_tiny_input_keeps_one_val_byte(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("ab")
    s = build_from_text([tmp_path / "t.txt"], tmp_path / "out", val_frac=0.01)
    assert (s["train_bytes"], s["val_bytes"]) == (1, 1)
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(DataError, match="too little"):
        build_from_text([tmp_path / "one.txt"], tmp_path / "out2")


def test_text_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("plenty of good text " * 10)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(DataError, match="missing.txt: no such"):
        build_from_text([good, tmp_path / "missing.txt"], tmp_path / "o1")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        build_from_text([good, tmp_path / "empty.txt"], tmp_path / "o2")
    with pytest.raises(DataError, match="latin1.txt: not valid UTF-8"):
        build_from_text([good, tmp_path / "latin1.txt"], tmp_path / "o3")
    # a failure half-way through leaves neither the output nor the staging folder behind
    assert not (tmp_path / "o3").exists() and no_leftovers(tmp_path)


def test_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("plenty of good text " * 10)
    build_from_text([good], tmp_path / "out")
    with pytest.raises(DataError, match="already holds 2 shards; pick an empty folder or delete it"):
        build_from_text([good], tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="is not empty"):
        build_demo(tmp_path / "other", train_mb=0.1, val_mb=0.01)
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert build_from_text([good], tmp_path / "empty")["files"] == 2


# ------------------------------------------------------------------------------ transpile


def test_transpile_decodes_each_shard_to_its_exact_text(tmp_path: Path, tokenizer: Path) -> None:
    sp_dir = tmp_path / "sp"
    texts = {"fineweb_train_000000.bin": SAMPLE, "fineweb_train_000001.bin": "lambda mu, naïve " * 30,
             "fineweb_val_000000.bin": "The lazy dog 🙂 sleeps."}
    for name, text in texts.items():
        write_shard(sp_dir / name, sp_encode(tokenizer, text))
    s = transpile_sentencepiece(sp_dir, tokenizer, tmp_path / "bytes")
    for name, text in texts.items():
        assert read_shard(tmp_path / "bytes" / name).astype(np.uint8).tobytes() == text.encode("utf-8")
    assert s["files"] == 3 and s["val_bytes"] == len(texts["fineweb_val_000000.bin"].encode())


def test_transpile_errors(tmp_path: Path, tokenizer: Path) -> None:
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    with pytest.raises(DataError, match="no fineweb_train"):
        transpile_sentencepiece(sp_dir, tokenizer, tmp_path / "o1")
    write_shard(sp_dir / "fineweb_val_000000.bin", np.array([5, 6, 320], dtype=np.uint16))
    with pytest.raises(DataError, match="fineweb_val_000000.bin: token id 320 >= the vocab size 320"):
        transpile_sentencepiece(sp_dir, tokenizer, tmp_path / "o2")
    with pytest.raises(DataError, match="does not exist"):
        transpile_sentencepiece(sp_dir, tmp_path / "nope.model", tmp_path / "o3")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        transpile_sentencepiece(sp_dir, tmp_path / "junk.model", tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5)) and no_leftovers(tmp_path)
