"""`fetch_fineweb` against a stand-in hub: a local folder laid out like the challenge's dataset repo
(`{root}/manifest.json`, `{root}/datasets/<dataset>/`, `{root}/tokenizers/`)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import test_corpora
from test_corpora import SAMPLE, no_leftovers, sp_encode

from jepatune import corpora
from jepatune.cli import main
from jepatune.corpora import fetch_fineweb
from jepatune.errors import DataError
from jepatune.trainer.data import read_shard, write_shard

tokenizer = test_corpora.tokenizer  # the tiny SentencePiece model, as a fixture of this module too

DEFAULT_REPO = "willdepueoai/parameter-golf"
SP_TEXTS = {
    "fineweb_val_000000.bin": "A val document, café.",
    "fineweb_val_000001.bin": "The lazy dog 🙂 sleeps.",
    "fineweb_train_000000.bin": SAMPLE,
    "fineweb_train_000001.bin": "lambda mu, naïve " * 30,
    "fineweb_train_000002.bin": "alpha beta gamma line 7.",
}
BYTE_DOCS = {
    "fineweb_val_000000.bin": [b"val one \xff\x00", "ünï".encode()],
    "fineweb_val_000001.bin": [b"val two"],
    "fineweb_train_000000.bin": [b"train A", b"train B"],
    "fineweb_train_000001.bin": [bytes(range(256))],
    "fineweb_train_000002.bin": [b"third"],
}


class FakeHub:
    """Stand-in for the hub download: copies from local folders, one per repo id, laid out like the repo."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def __call__(self, repo_id: str, relative_path: str, local_dir: Path) -> Path:
        self.calls.append((repo_id, relative_path))
        dst = Path(local_dir) / relative_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / repo_id / relative_path, dst)
        return dst

    def paths(self) -> list[str]:
        return [path for _, path in self.calls]


def byte260(*docs: bytes) -> np.ndarray:
    ids = []
    for d in docs:
        ids += [1] + [b + 4 for b in d]  # BOS, then each byte shifted past the 4 specials
    return np.array(ids, dtype=np.uint16)


def manifest(train: int = 3, val: int = 2) -> dict:
    """The shape of the export's manifest.json (download_hf_docs_and_tokenize.py writes it)."""
    stats = {"docs_total": 10, "files_total": train + val, "files_val": val, "files_train": train}
    return {
        "version": "10B", "shard_size": 100_000_000,
        "tokenizers": [
            {"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 320,
             "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
            {"name": "pure_byte_260", "kind": "byte", "vocab_size": 260,
             "path": "tokenizers/fineweb_pure_byte_260.json"},
        ],
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "tokenizer_kind": "sentencepiece_bpe",
             "path": "datasets/fineweb10B_sp1024", "vocab_size": 320, "stats": dict(stats)},
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260", "tokenizer_kind": "byte",
             "path": "datasets/fineweb10B_byte260", "vocab_size": 260, "stats": dict(stats)},
        ],
    }


def publish(hub: FakeHub, tokenizer: Path, *, repo: str = DEFAULT_REPO, root: str = "datasets",
            meta: dict | None = None) -> Path:
    """An export of 2 val and 3 train shards per variant, plus one shard of each split that the
    manifest does not count (a fetch that took its counts from the folder would pick them up)."""
    base = hub.root / repo / root
    base.mkdir(parents=True, exist_ok=True)
    (base / "manifest.json").write_text(json.dumps(manifest() if meta is None else meta))
    (base / "tokenizers").mkdir()
    shutil.copyfile(tokenizer, base / "tokenizers" / "fineweb_1024_bpe.model")
    (base / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("unused by the decoder")
    sp, byte = base / "datasets" / "fineweb10B_sp1024", base / "datasets" / "fineweb10B_byte260"
    for name, text in {**SP_TEXTS, "fineweb_val_000002.bin": "x", "fineweb_train_000003.bin": "y"}.items():
        write_shard(sp / name, sp_encode(tokenizer, text))
    for name, docs in {**BYTE_DOCS, "fineweb_val_000002.bin": [b"x"], "fineweb_train_000003.bin": [b"y"]}.items():
        write_shard(byte / name, byte260(*docs))
    return base


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    return FakeHub(tmp_path / "hub")


def out_bytes(folder: Path, name: str) -> bytes:
    tokens = read_shard(folder / name)
    assert tokens.size == 0 or int(tokens.max()) < 256
    return tokens.astype(np.uint8).tobytes()


def test_sp1024_takes_counts_and_tokenizer_from_the_manifest(tmp_path: Path, hub: FakeHub, tokenizer: Path) -> None:
    publish(hub, tokenizer)
    s = fetch_fineweb(tmp_path / "out", train_shards=2, download=hub)
    prefix = "datasets/datasets/fineweb10B_sp1024"
    assert hub.calls == [(DEFAULT_REPO, p) for p in [
        "datasets/manifest.json", "datasets/tokenizers/fineweb_1024_bpe.model",
        f"{prefix}/fineweb_val_000000.bin", f"{prefix}/fineweb_val_000001.bin",  # all val shards the manifest counts
        f"{prefix}/fineweb_train_000000.bin", f"{prefix}/fineweb_train_000001.bin",
    ]]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(list(SP_TEXTS)[:4])
    for name in names:  # decoded by the downloaded tokenizer, one output shard per shard
        assert out_bytes(tmp_path / "out", name) == SP_TEXTS[name].encode()
    val = sum(len(SP_TEXTS[f"fineweb_val_00000{i}.bin"].encode()) for i in range(2))
    assert (s["files"], s["val_bytes"], s["train_shards_available"], s["repo_id"]) == (4, val, 3, DEFAULT_REPO)
    assert (tmp_path / "out.download" / "willdepueoai--parameter-golf" / prefix).is_dir()

    # Every file, the manifest included, comes from the cache the second time.
    fetch_fineweb(tmp_path / "again", train_shards=2, download=hub, cache_dir=tmp_path / "out.download")
    assert len(hub.calls) == 6 and no_leftovers(tmp_path)


@pytest.mark.parametrize(("root", "expected"), [
    ("my_50B_export_root", "my_50B_export_root/"), ("nested/root/", "nested/root/"), ("", ""),
])
def test_env_overrides_pick_the_repo_and_root(tmp_path: Path, hub: FakeHub, tokenizer: Path,
                                              monkeypatch: pytest.MonkeyPatch, root: str, expected: str) -> None:
    publish(hub, tokenizer, repo="someone/fineweb-export", root=root)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/fineweb-export")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", root)  # empty: the repo's top level
    s = fetch_fineweb(tmp_path / "out", train_shards=3, variant="byte260", download=hub)
    names = list(BYTE_DOCS)
    assert hub.calls == [("someone/fineweb-export", f"{expected}manifest.json")] + [
        ("someone/fineweb-export", f"{expected}datasets/fineweb10B_byte260/{n}") for n in names
    ]  # byte260 needs no tokenizer file
    for name, docs in BYTE_DOCS.items():  # b + 4 undone, the BOS markers dropped
        assert out_bytes(tmp_path / "out", name) == b"".join(docs)
    assert s["files"] == 5 and s["repo_id"] == "someone/fineweb-export"
    assert (tmp_path / "out.download" / "someone--fineweb-export").is_dir()


def _drop_tokenizers(m: dict) -> None:
    m["tokenizers"] = [t for t in m["tokenizers"] if t["name"] != "sp_bpe_1024"]


def _no_model_path(m: dict) -> None:
    del m["tokenizers"][0]["model_path"]


def _climbing_model_path(m: dict) -> None:
    m["tokenizers"][0]["model_path"] = "../../outside.model"


def _no_counts(m: dict) -> None:
    del m["datasets"][0]["stats"]["files_train"]


@pytest.mark.parametrize(("variant", "n", "edit", "message"), [
    ("sp1024", 4, None, "asked for 4 train shards, but fineweb10B_sp1024 in "
                        "willdepueoai/parameter-golf:datasets/manifest.json has 3; pass --train-shards 1..3"),
    ("byte260", 4, None, "fineweb10B_byte260 in willdepueoai/parameter-golf:datasets/manifest.json has 3"),
    ("sp4096", 1, None, "variant sp4096: willdepueoai/parameter-golf:datasets/manifest.json lists no dataset "
                        "fineweb10B_sp4096 (its variants: sp1024, byte260); pick one of those or set "
                        "MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"),
    ("sp1024", 1, _drop_tokenizers, "names tokenizer 'sp_bpe_1024', which it does not list"),
    ("sp1024", 1, _no_model_path, "tokenizer 'sp_bpe_1024' in willdepueoai/parameter-golf:datasets/manifest.json "
                                  "has no SentencePiece model_path inside the export (got None)"),
    ("sp1024", 1, _climbing_model_path, "no SentencePiece model_path inside the export (got '../../outside.model')"),
    ("sp1024", 1, _no_counts, "gives no stats.files_train shard count for fineweb10B_sp1024"),
])
def test_requests_the_manifest_cannot_serve_fail_after_the_manifest_alone(
        tmp_path: Path, hub: FakeHub, tokenizer: Path, variant: str, n: int, edit, message: str) -> None:
    meta = manifest()
    if edit is not None:
        edit(meta)
    publish(hub, tokenizer, meta=meta)
    with pytest.raises(DataError) as e:
        fetch_fineweb(tmp_path / "out", train_shards=n, variant=variant, download=hub)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert hub.paths() == ["datasets/manifest.json"]  # no shard, no tokenizer
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_a_cached_manifest_that_falls_short_is_fetched_again(tmp_path: Path, hub: FakeHub, tokenizer: Path) -> None:
    base = publish(hub, tokenizer)
    cache = tmp_path / "cache"
    fetch_fineweb(tmp_path / "first", train_shards=1, variant="byte260", download=hub, cache_dir=cache)
    (base / "manifest.json").write_text(json.dumps(manifest(train=4)))  # the export grew a shard
    hub.calls.clear()
    s = fetch_fineweb(tmp_path / "second", train_shards=4, variant="byte260", download=hub, cache_dir=cache)
    assert hub.paths() == ["datasets/manifest.json"] + [
        f"datasets/datasets/fineweb10B_byte260/fineweb_train_00000{i}.bin" for i in (1, 2, 3)
    ]  # val and the first train shard came from the cache
    assert s["files"] == 6 and out_bytes(tmp_path / "second", "fineweb_train_000003.bin") == b"y"


def test_a_bad_shard_fails_naming_it_and_writes_nothing(tmp_path: Path, hub: FakeHub, tokenizer: Path) -> None:
    base = publish(hub, tokenizer)
    write_shard(base / "datasets" / "fineweb10B_byte260" / "fineweb_train_000002.bin",
                np.array([1, 300], dtype=np.uint16))
    with pytest.raises(DataError, match="fineweb_train_000002.bin: token id 300 > 259"):
        fetch_fineweb(tmp_path / "out", train_shards=3, variant="byte260", download=hub)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize(("variant", "n", "message"), [
    ("sp1024", 0, "train_shards must be >= 1"), ("gpt2", 1, "give sp<vocab size> (e.g. sp1024) or byte260"),
])
def test_bad_requests_fail_before_any_download(tmp_path: Path, hub: FakeHub, variant: str, n: int,
                                               message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        fetch_fineweb(tmp_path / "out", train_shards=n, variant=variant, download=hub)
    assert hub.calls == [] and not (tmp_path / "out").exists()


def test_refuses_a_full_output_folder_before_downloading(tmp_path: Path, hub: FakeHub) -> None:
    (tmp_path / "out").mkdir()
    write_shard(tmp_path / "out" / "fineweb_val_000000.bin", np.zeros(3, np.uint16))
    with pytest.raises(DataError, match="pick an empty folder"):
        fetch_fineweb(tmp_path / "out", train_shards=1, download=hub)
    assert hub.calls == []


def test_cli_reports_a_count_the_manifest_lacks_in_one_line(tmp_path: Path, hub: FakeHub, tokenizer: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    publish(hub, tokenizer)
    monkeypatch.setattr(corpora, "hub_download", hub)
    assert main(["data", "fineweb", "--train-shards", "80", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 3; pass --train-shards 1..3" in err
    assert not (tmp_path / "out").exists()
    assert main(["data", "fineweb", "--train-shards", "1", "--variant", "byte260", "--out", str(tmp_path / "b")]) == 0
    assert out_bytes(tmp_path / "b", "fineweb_val_000001.bin") == b"val two"


def fake_huggingface_hub(monkeypatch: pytest.MonkeyPatch, behaviour) -> list[dict]:
    """A stand-in `huggingface_hub` module with the error classes' real inheritance."""
    utils = types.ModuleType("huggingface_hub.utils")

    class HfHubHTTPError(OSError): ...
    class EntryNotFoundError(Exception): ...
    class LocalEntryNotFoundError(EntryNotFoundError, FileNotFoundError): ...
    class RepositoryNotFoundError(HfHubHTTPError): ...
    class RevisionNotFoundError(HfHubHTTPError): ...

    for cls in (HfHubHTTPError, EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                RevisionNotFoundError):
        setattr(utils, cls.__name__, cls)
    calls: list[dict] = []

    def hf_hub_download(**kwargs) -> str:
        calls.append(kwargs)
        return behaviour(utils, kwargs)

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download, hub.utils = hf_hub_download, utils
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", utils)
    return calls


def test_the_hub_download_asks_for_the_dataset_file_and_maps_its_errors(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def write(utils, kw):
        path = Path(kw["local_dir"]) / kw["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return str(path)

    calls = fake_huggingface_hub(monkeypatch, write)
    got = corpora.hub_download("someone/export", "root/manifest.json", tmp_path)
    assert got == tmp_path / "root" / "manifest.json"
    assert calls == [{"repo_id": "someone/export", "filename": "root/manifest.json", "repo_type": "dataset",
                      "local_dir": tmp_path}]

    for error, message in [("EntryNotFoundError", "the Hugging Face dataset someone/export has no file x.bin"),
                           ("RepositoryNotFoundError", "check MATCHED_FINEWEB_REPO_ID and"),
                           ("LocalEntryNotFoundError", "could not be reached (offline); check the network"),
                           ("HfHubHTTPError", "could not be reached or refused the file (offline)")]:
        def fail(utils, kw, error=error):
            raise getattr(utils, error)("offline\nmore detail")

        fake_huggingface_hub(monkeypatch, fail)
        with pytest.raises(DataError, match=re.escape(message)):
            corpora.hub_download("someone/export", "x.bin", tmp_path)
