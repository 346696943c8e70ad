"""An experiment folder wherever it lives: a local folder or a storage URI (s3://bucket/path, ...).

Every file a resume, a table or a report needs is read and written here, through pyarrow's
filesystem layer, so the driver, every worker node and a new driver on another machine see the
same files. A write is whole or absent: a local file is renamed into place, an object store
shows an object only once its upload has finished. Objects cannot be appended to, so a row
appended to a remote log is an object of its own (`NAME.rows/`); `read_rows` reads both forms.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from jepatune.atomic import atomic_write_bytes
from jepatune.experiment.layout import append_jsonl, filesystem, parse_jsonl, read_jsonl

ROWS_SUFFIX = ".rows"  # a remote log `NAME` is the folder `NAME.rows/`, an object per row


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    """`location`/parts, for a URI or a local path."""
    return "/".join([str(location).rstrip("/"), *parts]) if is_uri(location) else str(Path(location, *parts))


class Store:
    """The files under one root. Picklable (it travels to Ray workers): only the root is kept, the
    filesystem is opened again where it is used."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/") if is_uri(root) else str(Path(root).resolve())
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self._fs = state["root"], None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    def _open(self):
        if self._fs is None:
            self._fs = filesystem(self.root)
        return self._fs

    def path(self, rel: str = "") -> str:
        """The filesystem path of `rel` (for pyarrow calls); a local path when the store is local."""
        fs, base = self._open()
        return f"{base}/{rel}".rstrip("/") if rel else base

    def uri(self, rel: str = "") -> str:
        return join(self.root, rel) if rel else self.root

    @property
    def fs(self):
        return self._open()[0]

    # --- reading -----------------------------------------------------------------------------

    def info(self, rel: str):
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        return None if info.type == pafs.FileType.NotFound else info

    def exists(self, rel: str) -> bool:
        return self.info(rel) is not None

    def mtime_ns(self, rel: str) -> int | None:
        info = self.info(rel)
        return None if info is None or info.mtime_ns is None else int(info.mtime_ns)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8", errors="replace")

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        return None if text is None else json.loads(text)

    def files(self, rel: str, suffix: str = "", recursive: bool = False) -> list:
        """pyarrow's FileInfo (path, size, mtime) of the files in folder `rel` ending with `suffix`, in
        one listing."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive)
        return sorted((i for i in self.fs.get_file_info(selector)
                       if i.type == pafs.FileType.File and i.base_name.endswith(suffix)), key=lambda i: i.path)

    def names(self, rel: str, suffix: str = "") -> list[str]:
        """The names of the files directly in folder `rel` ending with `suffix`, sorted."""
        return [i.base_name for i in self.files(rel, suffix)]

    def newest_in(self, rel: str, suffix: str = "") -> int | None:
        """The newest modification time of the files in folder `rel`."""
        return max((i.mtime_ns for i in self.files(rel, suffix) if i.mtime_ns is not None), default=None)

    def read_rows(self, rel: str) -> list[dict[str, Any]]:
        """The rows of a JSON-lines log: the file's lines, then the rows appended remotely, in write order.
        A line or object cut by a crash is skipped."""
        rows = read_jsonl(self.path(rel)) if not self.remote else parse_jsonl(self.read_text(rel) or "")
        for name in self.names(f"{rel}{ROWS_SUFFIX}", ".json"):
            rows += parse_jsonl(self.read_text(f"{rel}{ROWS_SUFFIX}/{name}") or "")
        return rows

    def newest_mtime_ns(self, rel: str) -> int | None:
        """The newest modification of a log: its file, or a row appended remotely."""
        times = (self.mtime_ns(rel), self.newest_in(f"{rel}{ROWS_SUFFIX}"))
        return max((t for t in times if t is not None), default=None)

    # --- writing -----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        if not self.remote:
            atomic_write_bytes(Path(self.path(rel)), data)
            return
        path = self.path(rel)
        if self.fs.type_name == "local":  # a file:// URI; object stores have no folders to make
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:  # visible once the upload completes
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def append_row(self, rel: str, row: dict[str, Any]) -> None:
        """Add one row to the log `rel`: appended and synced locally, one object of its own remotely."""
        if not self.remote:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path(rel), row)
            return
        self.write_text(f"{rel}{ROWS_SUFFIX}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json", json.dumps(row))

    def put_dir(self, local: str | os.PathLike, rel: str) -> None:
        """Copy the local folder `local` to `rel`, replacing what was there."""
        import pyarrow.fs as pafs

        self.delete_dir(rel)
        if not self.remote:  # copied beside, then renamed into place: whole or absent
            part = f"{self.path(rel)}.part-{uuid.uuid4().hex[:8]}"
            shutil.copytree(local, part)
            os.replace(part, self.path(rel))
            return
        pafs.copy_files(str(Path(local).resolve()), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def total_bytes(self, rel: str = "") -> int:
        """Bytes of every file under `rel`."""
        return sum(i.size or 0 for i in self.files(rel, recursive=True))


def file_store(location: str | os.PathLike) -> tuple[Store, str]:
    """(the store of the folder holding `location`, the file's name in it)."""
    text = str(location).rstrip("/")
    if is_uri(text):
        parent, _, name = text.rpartition("/")
        return Store(parent), name
    path = Path(text).resolve()
    return Store(path.parent), path.name
