"""Build byte-level shard folders (values 0..255 in the uint16 shard format of `jepatune.trainer.data`).

Four sources: a demo corpus cut from the running Python's standard library (present on
every machine, no network), the user's own UTF-8 text files, SentencePiece shards
transpiled to bytes (the reference's derivation), and the challenge's FineWeb shards
downloaded from the Hugging Face hub.

Every builder writes its whole output folder atomically: shards go to a temporary sibling
folder that is renamed onto `out` only once everything is written, so a crash or a bad
input never leaves a half-built folder that the trainer would happily read. Builders
return a small summary dict and print nothing; the CLI does the printing.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from jepatune.errors import DataError
from jepatune.trainer.data import TRAIN_PATTERN, VAL_PATTERN, read_shard, write_shard

SEPARATOR = b"\n\n"
DEFAULT_SHARD_BYTES = 100_000_000
MB = 1_000_000
CORPUS_JSON = "corpus.json"
_READ_BLOCK = 1 << 24

# Demo corpus: folders that are not library source (third-party packages, the huge test
# suite, IDLE, the deprecated 2to3 grammar tool) would swamp the mix or duplicate code.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
# pydoc's topics file is the one large block of English prose in the stdlib; it always goes
# to train (being one 0.75 MB document, in val it alone would fill the split).
_DEMO_TRAIN_ONLY = ("pydoc_data/topics.py",)
# Files are cut into pieces of about this many bytes and the pieces of a split interleaved,
# so that any stretch of the stream mixes many files (like FineWeb's shuffled documents of a
# few KB): whole files written one after another put long runs of one kind of text (0.75 MB
# of prose in topics.py, a big module, a run of codec tables) into the stream, and a model
# trained through such a run drifts away from val.
_DEMO_PIECE_BYTES = 4096
# Stored in the settings, so that a folder built with another layout is rebuilt, not reused.
# Changing how pieces are cut or ordered changes the bytes: bump it then.
_DEMO_LAYOUT = 2

# The challenge's FineWeb export, laid out as its downloader (data/cached_challenge_fineweb.py
# of openai/parameter-golf) reads it: `{root}/manifest.json` lists each dataset's shard counts
# and its tokenizer's files (paths relative to `{root}`); shards lie under
# `{root}/datasets/<dataset>/`. The same environment variables point it at another export.
HF_REPO_ID = "willdepueoai/parameter-golf"
HF_ROOT = "datasets"
ENV_REPO_ID = "MATCHED_FINEWEB_REPO_ID"
ENV_ROOT = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
BYTE260_OFFSET = 4  # byte260 stores byte b as b + 4; ids 0..3 are specials (BOS = 1)
_FINEWEB_VARIANT = re.compile(r"sp\d+|byte260")
_ELSEWHERE = f"set {ENV_REPO_ID} / {ENV_ROOT} to an export that has it"


@dataclass(frozen=True)
class FinewebExport:
    """One dataset of the export, as its manifest lists it."""

    dataset: str  # the folder under {root}/datasets/
    val_shards: int
    train_shards: int  # how many the export holds
    tokenizer: str | None  # the SentencePiece model's path under {root}; None for byte260


Download = Callable[[str, str, Path], Path]  # (repo id, path in the repo, local folder) -> local file
Converter = Callable[[Path, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- output folder


def _check_out_free(out: Path, replace: Iterable[str] = ()) -> None:
    """Raise unless `out` is missing or empty (files named in `replace` aside)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a folder; pick an empty folder or delete it")
    ignored = frozenset(replace)
    if out.is_dir() and any(p.name not in ignored for p in out.iterdir()):
        shards = len(list(out.glob(TRAIN_PATTERN))) + len(list(out.glob(VAL_PATTERN)))
        held = f"already holds {shards} shards" if shards else "is not empty"
        raise DataError(f"output folder {out} {held}; pick an empty folder or delete it")


@contextlib.contextmanager
def _staging(out: Path, replace: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of `out`; on success rename it onto `out`.

    `replace` names files of an outdated build in `out`: they are deleted only once the new
    build is complete, so a failed build keeps the old one.
    """
    replace = tuple(replace)
    _check_out_free(out, replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, not /tmp: the final rename must stay on one filesystem to be atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        try:
            for name in replace:
                (out / name).unlink(missing_ok=True)
            if out.is_dir():
                out.rmdir()  # checked empty above; POSIX rename replaces an empty folder, Windows' does not
            os.rename(tmp, out)
        except OSError as e:
            raise DataError(f"cannot move the built shards into {out} ({e.strerror}); "
                            f"pick an empty folder or delete it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(out: Path, train_bytes: int, val_bytes: int, files: int, **extra: Any) -> dict[str, Any]:
    return {"out": str(out), "files": files, "train_bytes": train_bytes, "val_bytes": val_bytes, **extra}


class _ShardWriter:
    """Cuts one split's byte stream into shards of at most `shard_bytes` tokens, named in order."""

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        if shard_bytes < 1:
            raise DataError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.buffer = bytearray()
        self.names: list[str] = []
        self.total = 0

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.total += len(data)
        while len(self.buffer) >= self.shard_bytes:
            self._flush(self.shard_bytes)

    def close(self) -> None:
        if self.buffer:
            self._flush(len(self.buffer))

    def _flush(self, n: int) -> None:
        name = f"fineweb_{self.split}_{len(self.names):06d}.bin"
        write_shard(self.folder / name, np.frombuffer(bytes(self.buffer[:n]), dtype=np.uint8))
        del self.buffer[:n]
        self.names.append(name)


def _write_splits(folder: Path, splits: dict[str, bytes], shard_bytes: int) -> list[str]:
    names = []
    for split, data in splits.items():
        writer = _ShardWriter(folder, split, shard_bytes)
        writer.write(data)
        writer.close()
        names += writer.names
    return names


# ------------------------------------------------------------------------------ demo corpus


def _stdlib_sources() -> tuple[Path, list[str]]:
    """The stdlib folder and its library `.py` files (relative posix paths) in a stable
    shuffled order, so that any prefix of the list mixes modules, prose and packages alike."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune: never walk site-packages
        rel_folder = Path(folder).relative_to(root)
        found += [(rel_folder / f).as_posix() for f in files if f.endswith(".py")]
    return root, sorted(found, key=lambda rel: (_hash_fraction("order:" + rel), rel))


def _hash_fraction(text: str) -> float:
    """A stable number in [0, 1) for `text` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _demo_reuse(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """(summary, ()) for a complete demo folder at `out` built with `settings`; (None, its
    files) for a demo folder built with the same sizes but another layout, to be rebuilt in
    place; (None, ()) when there is no demo folder."""
    meta_path = out / CORPUS_JSON
    if not meta_path.is_file():
        return None, ()
    try:
        meta = json.loads(meta_path.read_text())
        names = [str(name) for split in ("train", "val") for name in meta[split]["shards"]]
        stored = dict(meta["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{meta_path} is unreadable; delete {out} and build the demo again") from None
    shards = [out / name for name in names]
    sizes = {k: v for k, v in settings.items() if k != "layout"}
    if stored != settings and {k: v for k, v in stored.items() if k != "layout"} == sizes:
        # Only names it listed itself, and no path outside the folder.
        return None, (CORPUS_JSON, *(n for n in names if Path(n).name == n))
    if stored != settings:
        raise DataError(f"{out} holds a demo corpus built with {stored}, not {settings}; "
                        f"pick another folder or delete it")
    for shard in shards:
        read_shard(shard)  # raises DataError for a missing or corrupt shard
    return _summary(out, meta["train"]["bytes"], meta["val"]["bytes"], len(shards), reused=True), ()


def demo_cuts(data: bytes, size: int = _DEMO_PIECE_BYTES) -> list[tuple[int, int]]:
    """(start, end) of consecutive pieces of about `size` bytes covering `data`, each ending
    at a line break where the line allows it (else not inside a UTF-8 character)."""
    cuts = []
    start, n = 0, len(data)
    while start < n:
        if n - start <= size + size // 4:  # no tiny tail piece
            end = n
        else:
            end = start + size
            newline = data.rfind(b"\n", start + size // 2, end)
            if newline >= 0:
                end = newline + 1
            else:
                while end > start + 1 and data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                    end -= 1
        cuts.append((start, end))
        start = end
    return cuts


def _demo_interleave(rels: Sequence[str], cuts: Sequence[list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """(document index, start, end) of every piece in stream order.

    A document of k pieces gets k evenly spaced slots, (m + u) / k of the way through the
    stream for m = 0..k-1 with u a stable hash of its path in [0, 1), and its pieces fill
    them in a shuffled order: any stretch of the stream then holds about its share of every
    document (a plain shuffle of all pieces leaves clumps), and no stretch holds all the
    files' beginnings (module docstrings and imports), as keeping each file's pieces in order
    would. Hashes, not filesystem order or Python's salted hash(), fix the order everywhere.
    """
    slots = []
    for i, rel in enumerate(rels):
        u, k = _hash_fraction(f"piece:{_DEMO_LAYOUT}:{rel}"), len(cuts[i])
        shuffled = sorted(range(k), key=lambda j: (_hash_fraction(f"piece:{_DEMO_LAYOUT}:{rel}:{j}"), j))
        slots += [((m + u) / k, rel, j, i) for m, j in enumerate(shuffled)]
    return [(i, *cuts[i][j]) for _, _, j, i in sorted(slots)]


def _demo_trim(cuts: list[tuple[int, int]], excess: int) -> list[tuple[int, int]]:
    """The pieces of the split's last document with about `excess` bytes (separators
    included) taken off its end, so that the split meets its size without dropping pieces of
    other documents; at least one byte of it stays."""
    cuts = list(cuts)
    while len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] + len(SEPARATOR) <= excess:
        start, end = cuts.pop()
        excess -= end - start + len(SEPARATOR)
    start, end = cuts[-1]
    cuts[-1] = (start, end - max(0, min(excess, end - start - 1)))
    return cuts


def _demo_stream(docs: Sequence[bytes], order: list[tuple[int, int, int]], limit: int) -> tuple[bytes, list[list[int]]]:
    """The split's bytes (the pieces joined by SEPARATOR, cut at `limit`) and the pieces it
    holds, the last one cut (empty when the limit falls inside the separator before it)."""
    kept: list[list[int]] = []
    pos = 0  # where the next piece starts
    for i, start, end in order:
        if kept and pos - len(SEPARATOR) >= limit:  # its separator would start at the limit
            break
        end = max(start, min(end, start + limit - pos))
        kept.append([i, start, end])
        pos += end - start + len(SEPARATOR)
    data = SEPARATOR.join(docs[i][start:end] for i, start, end in kept)[:limit]
    return data, kept


def build_demo(out: str | os.PathLike, *, train_mb: float = 4.0, val_mb: float = 0.5,
               shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """A real byte corpus from the running Python's standard library source, split by file.

    A file goes to val when a stable hash of its relative path falls below val's share of
    the requested bytes (so both splits fill at about the same pace through the shuffled
    list) until val holds `val_mb`; everything else goes to train until `train_mb`.
    Identical files are kept once, so no val document also appears in train. Each split's
    files are cut into pieces of about 4 KB at line breaks and the pieces interleaved, so
    the stream is stationary: any stretch of it mixes many files.
    An existing complete demo folder with the same settings is reused as is; one built with
    the same sizes but an older layout is rebuilt in place.
    """
    out = Path(out).absolute()
    limits = {"train": int(train_mb * MB), "val": int(val_mb * MB)}
    if min(limits.values()) < 1:
        raise DataError(f"train_mb and val_mb must be positive, got {train_mb} and {val_mb}")
    settings = {"train_mb": train_mb, "val_mb": val_mb, "shard_bytes": shard_bytes, "layout": _DEMO_LAYOUT}
    reused, outdated = _demo_reuse(out, settings)
    if reused is not None:
        return reused
    _check_out_free(out, outdated)

    root, sources = _stdlib_sources()
    val_share = limits["val"] / (limits["train"] + limits["val"])
    # Each split's pieces, each counted with a separator after it (one more than the stream has).
    sizes = {"train": 0, "val": 0}
    texts: dict[str, list[bytes]] = {"train": [], "val": []}
    cuts: dict[str, list[list[tuple[int, int]]]] = {"train": [], "val": []}
    docs: dict[str, list[list[str]]] = {"train": [], "val": []}
    seen: set[str] = set()
    def has_room(split: str) -> bool:  # the stream is still short of the limit
        return sizes[split] - len(SEPARATOR) < limits[split]

    for rel in sources:
        if not (has_room("train") or has_room("val")):
            break
        to_val = rel not in _DEMO_TRAIN_ONLY and _hash_fraction(rel) < val_share and has_room("val")
        split = "val" if to_val else "train"
        if not has_room(split):
            continue
        data = (root / rel).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not data.strip() or digest in seen:
            continue
        seen.add(digest)
        texts[split].append(data)
        cuts[split].append(demo_cuts(data))
        sizes[split] += len(data) + len(SEPARATOR) * len(cuts[split][-1])
        docs[split].append([rel, digest])
    splits: dict[str, bytes] = {}
    pieces: dict[str, list[list[int]]] = {}
    for s in texts:
        excess = sizes[s] - len(SEPARATOR) - limits[s]
        if excess > 0:  # the last document overflows the split: cut it, not the interleaved stream
            cuts[s][-1] = _demo_trim(cuts[s][-1], excess)
        order = _demo_interleave([rel for rel, _ in docs[s]], cuts[s])
        splits[s], pieces[s] = _demo_stream(texts[s], order, limits[s])
    if not splits["train"] or not splits["val"]:
        raise DataError(f"the standard library at {root} has too little source for a demo corpus")

    with _staging(out, outdated) as tmp:
        names = _write_splits(tmp, splits, shard_bytes)
        meta = {
            "source": f"Python {platform.python_version()} standard library .py files",
            "python": platform.python_version(),
            "stdlib": str(root),
            "stdlib_files": len(sources),
            "settings": settings,
            "separator": SEPARATOR.decode(),
            "piece_bytes": _DEMO_PIECE_BYTES,
            "note": "a split is its documents' pieces [document index, start byte, end byte] in the listed "
                    "order, joined by the separator; the last document may be cut short, the last piece by "
                    "a few bytes",
            **{
                s: {"bytes": len(splits[s]), "documents": docs[s], "pieces": pieces[s],
                    "shards": [n for n in names if n.startswith(f"fineweb_{s}_")]}
                for s in splits
            },
        }
        text = json.dumps(meta, indent=1)
        # One line per piece rather than five (JSON strings hold no raw newline, so only pieces match).
        text = re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)
        (tmp / CORPUS_JSON).write_text(text)
    return _summary(out, len(splits["train"]), len(splits["val"]), len(names), reused=False)


# ------------------------------------------------------------------------------- text files


def _read_text_blocks(path: Path) -> Iterator[bytes]:
    """The file's raw bytes in blocks, checked as UTF-8 on the way (files may exceed memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BLOCK)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 text (bad byte near offset {offset + e.start}); "
                                f"convert it to UTF-8 (e.g. `iconv -t UTF-8`) or leave it out") from None
            if not block:
                return
            offset += len(block)
            yield block


def build_from_text(files: Sequence[str | os.PathLike], out: str | os.PathLike, *, val_frac: float = 0.05,
                    shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Byte shards from UTF-8 text files: their raw bytes in order, joined with a blank line;
    the last `val_frac` of the bytes is the val split."""
    out = Path(out).absolute()
    if not 0 < val_frac < 1:
        raise DataError(f"val_frac must be between 0 and 1, got {val_frac}")
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no text files given; pass at least one UTF-8 text file")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such text file; check the path")
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the file is empty; leave it out")
    # Sizes are known up front, so the stream can be split on the fly without holding it.
    total = sum(p.stat().st_size for p in paths) + len(SEPARATOR) * (len(paths) - 1)
    val_n = max(1, round(total * val_frac))
    train_n = total - val_n
    if train_n < 1:
        raise DataError(f"{total} bytes of text is too little to split into train and val; add more text")
    _check_out_free(out)

    def stream() -> Iterable[bytes]:
        for i, p in enumerate(paths):
            if i:
                yield SEPARATOR
            yield from _read_text_blocks(p)

    with _staging(out) as tmp:
        train, val = _ShardWriter(tmp, "train", shard_bytes), _ShardWriter(tmp, "val", shard_bytes)
        pos = 0
        for chunk in stream():
            cut = min(len(chunk), max(0, train_n - pos))
            train.write(chunk[:cut])
            val.write(chunk[cut:])
            pos += len(chunk)
        train.close()
        val.close()
    return _summary(out, train.total, val.total, len(train.names) + len(val.names))


# ---------------------------------------------------------------- token shards to byte shards


def _load_sentencepiece(tokenizer: str | os.PathLike) -> Any:
    try:
        import sentencepiece  # optional dependency, only these conversions need it
    except ImportError:
        raise DataError(
            "decoding SentencePiece shards needs sentencepiece: pip install sentencepiece"
        ) from None
    path = Path(tokenizer)
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass the SentencePiece .model of these shards")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({e})") from None


def _sentencepiece_to_bytes(sp: Any, tokenizer: Path) -> Converter:
    vocab = int(sp.vocab_size())

    def convert(path: Path, tokens: np.ndarray) -> np.ndarray:
        if tokens.size and int(tokens.max()) >= vocab:
            raise DataError(f"{path}: token id {int(tokens.max())} >= the vocab size {vocab} of {tokenizer}; "
                            f"use the tokenizer these shards were made with")
        # The whole shard at once, as the reference does: decoding pieces separately would
        # drop the leading space of each piece's first word and split multi-byte characters.
        text = sp.decode(tokens.tolist())
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    return convert


def _byte260_to_bytes(path: Path, tokens: np.ndarray) -> np.ndarray:
    if tokens.size and int(tokens.max()) >= 256 + BYTE260_OFFSET:
        raise DataError(f"{path}: token id {int(tokens.max())} > 259 is not a byte260 id; "
                        f"is this a fineweb10B_byte260 shard?")
    # Drop the specials (a BOS opens each document); a byte stream has no room for them.
    return (tokens[tokens >= BYTE260_OFFSET] - BYTE260_OFFSET).astype(np.uint8)


def _token_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(TRAIN_PATTERN)) + sorted(folder.glob(VAL_PATTERN))


def _convert_shards(files: list[Path], out: Path, convert: Converter) -> dict[str, Any]:
    """One output shard per input shard, same name, into `out` as a whole."""
    totals = {"train": 0, "val": 0}
    with _staging(out) as tmp:
        for f in files:
            data = convert(f, read_shard(f))
            write_shard(tmp / f.name, data)
            totals["val" if f.name.startswith("fineweb_val_") else "train"] += data.size
    return _summary(out, totals["train"], totals["val"], len(files))


def transpile_sentencepiece(sp_dir: str | os.PathLike, tokenizer: str | os.PathLike,
                            out: str | os.PathLike) -> dict[str, Any]:
    """Byte shards from SentencePiece token shards: decode each shard with `tokenizer`,
    re-encode the text as UTF-8, one output shard per input shard with the same name."""
    out, sp_dir = Path(out).absolute(), Path(sp_dir)
    sp = _load_sentencepiece(tokenizer)
    files = _token_shards(sp_dir)
    if not files:
        raise DataError(f"{sp_dir}: no fineweb_train_*.bin or fineweb_val_*.bin shards to transpile")
    return _convert_shards(files, out, _sentencepiece_to_bytes(sp, Path(tokenizer)))


# ------------------------------------------------------------------------------ FineWeb hub


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hub_download(repo_id: str, relative_path: str, local_dir: Path) -> Path:
    """Fetch one file of the dataset repo `repo_id` into `local_dir`/`relative_path`."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise DataError("downloading FineWeb needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=relative_path, repo_type="dataset",
                                    local_dir=local_dir))
    except LocalEntryNotFoundError as e:  # offline; a subclass of EntryNotFoundError, so caught first
        raise DataError(f"could not download {relative_path} from the Hugging Face hub ({repo_id}): the hub "
                        f"could not be reached ({_reason(e)}); check the network and retry") from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise DataError(f"the Hugging Face dataset {repo_id} has no file {relative_path} or refused it "
                        f"({_reason(e)}); check {ENV_REPO_ID} and {ENV_ROOT}") from None
    except (HfHubHTTPError, OSError) as e:
        raise DataError(
            f"could not download {relative_path} from the Hugging Face hub ({repo_id}): the hub "
            f"could not be reached or refused the file ({_reason(e)}); check the network and retry"
        ) from None


def _fetch(repo_id: str, relative_path: str, local_dir: Path, download: Download, *,
           refresh: bool = False) -> Path:
    local = local_dir / relative_path
    if local.is_file() and not refresh:  # reuse earlier downloads: shards are 200 MB each
        return local
    got = Path(download(repo_id, relative_path, local_dir))
    if not got.is_file():
        raise DataError(f"download of {relative_path} from {repo_id} produced no file at {got}")
    return got


def _remote(*parts: str) -> str:
    """A path in the hub repo; an empty root prefix means the repo's top level."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _read_manifest(path: Path, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{where} is not readable JSON ({_reason(e)}); delete {path} to download it "
                        f"again, or {_ELSEWHERE}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where} is not a manifest (a JSON object); {_ELSEWHERE}")
    return manifest


def _manifest_entries(manifest: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries = manifest.get(key)
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _fineweb_export(manifest: dict[str, Any], variant: str, train_shards: int, where: str) -> FinewebExport:
    """The variant's dataset as `manifest` lists it, checked against the request."""
    dataset = f"fineweb10B_{variant}"
    datasets = _manifest_entries(manifest, "datasets")
    entry = next((e for e in datasets if e.get("name") == dataset), None)
    if entry is None:
        have = ", ".join(str(e.get("name", "?")).removeprefix("fineweb10B_") for e in datasets) or "none"
        raise DataError(f"variant {variant}: {where} lists no dataset {dataset} (its variants: {have}); "
                        f"pick one of those or {_ELSEWHERE}")
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    counts = {}
    for split in ("val", "train"):
        try:
            counts[split] = int(stats[f"files_{split}"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where} gives no stats.files_{split} shard count for {dataset}; {_ELSEWHERE}") from None
    if counts["val"] < 1:
        raise DataError(f"{where} lists no val shards for {dataset}; {_ELSEWHERE}")
    if train_shards > counts["train"]:
        raise DataError(f"asked for {train_shards} train shards, but {dataset} in {where} has "
                        f"{counts['train']}; pass --train-shards 1..{counts['train']}")
    model = None
    if variant != "byte260":  # byte260 decodes by its fixed offset: no tokenizer file needed
        name = entry.get("tokenizer_name")
        tok = next((t for t in _manifest_entries(manifest, "tokenizers") if t.get("name") == name), None)
        if tok is None:
            raise DataError(f"{dataset} in {where} names tokenizer {name!r}, which it does not list; "
                            f"{_ELSEWHERE}")
        model = tok.get("model_path")
        parts = PurePosixPath(model).parts if isinstance(model, str) else ()
        # The path is joined onto the cache folder: nothing absolute, nothing climbing out of it.
        if not parts or model.startswith("/") or ".." in parts or not model.endswith(".model"):
            raise DataError(f"tokenizer {name!r} in {where} has no SentencePiece model_path inside the export "
                            f"(got {model!r}); {_ELSEWHERE}")
    return FinewebExport(dataset, counts["val"], counts["train"], model)


def fetch_fineweb(
    out: str | os.PathLike,
    *,
    train_shards: int,
    variant: str = "sp1024",
    download: Download | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The challenge's FineWeb shards from the hub, converted to byte shards in `out`.

    The export is the Hugging Face dataset `MATCHED_FINEWEB_REPO_ID` (default
    willdepueoai/parameter-golf) rooted at `MATCHED_FINEWEB_REMOTE_ROOT_PREFIX` (default
    `datasets`; empty for the repo's top level), as for the challenge's own downloader. Its
    `manifest.json` gives the shard counts and the tokenizer: all val shards and the first
    `train_shards` train shards are fetched.
    Downloads go to `cache_dir` (default: `out` + ".download"), one folder per repo, and are
    reused when present. `download(repo_id, relative_path, local_dir) -> Path` defaults to
    `huggingface_hub.hf_hub_download`.
    """
    if not _FINEWEB_VARIANT.fullmatch(variant):
        raise DataError(f"unknown FineWeb variant {variant!r}; give sp<vocab size> (e.g. sp1024) or byte260")
    if train_shards < 1:
        raise DataError(f"train_shards must be >= 1, got {train_shards}")
    repo_id = os.environ.get(ENV_REPO_ID) or HF_REPO_ID
    root = os.environ.get(ENV_ROOT, HF_ROOT)  # set but empty: the repo's top level
    out = Path(out).absolute()
    cache = Path(cache_dir) if cache_dir is not None else out.with_name(out.name + ".download")
    local = cache / repo_id.replace("/", "--")  # two exports never share cached files
    _check_out_free(out)  # before downloading gigabytes, not after
    download = download or hub_download

    manifest_path = _remote(root, "manifest.json")
    where = f"{repo_id}:{manifest_path}"
    cached = (local / manifest_path).is_file()
    try:
        export = _fineweb_export(_read_manifest(_fetch(repo_id, manifest_path, local, download), where),
                                 variant, train_shards, where)
    except DataError:
        if not cached:
            raise
        # The cached manifest may predate the export's latest datasets: ask the hub once more.
        fresh = _fetch(repo_id, manifest_path, local, download, refresh=True)
        export = _fineweb_export(_read_manifest(fresh, where), variant, train_shards, where)

    if export.tokenizer is None:
        convert: Converter = _byte260_to_bytes
    else:  # the tokenizer first: a missing sentencepiece or a bad model fails before the shards
        tokenizer = _fetch(repo_id, _remote(root, export.tokenizer), local, download)
        convert = _sentencepiece_to_bytes(_load_sentencepiece(tokenizer), tokenizer)
    prefix = _remote(root, "datasets", export.dataset)
    # Train shards are numbered from 0, so N shards are the prefix of the export's shuffled order.
    remote = [f"{prefix}/fineweb_val_{i:06d}.bin" for i in range(export.val_shards)]
    remote += [f"{prefix}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files = [_fetch(repo_id, rel, local, download) for rel in remote]
    return _convert_shards(files, out, convert) | {
        "variant": variant, "repo_id": repo_id, "manifest": manifest_path,
        "train_shards_available": export.train_shards, "cache_dir": str(cache),
    }
