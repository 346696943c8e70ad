"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Write to a temporary name in the same folder, fsync, then `os.replace`, which is atomic
on POSIX filesystems. A crash leaves at most a stray `.tmp-*` file, never a torn output.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide tables and reports from other users
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def unwritable_ancestor(path: str | os.PathLike) -> Path | None:
    """The nearest existing folder at or above `path` when it cannot be written, else None:
    a check that an output can be created before any work starts, without creating it."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    return None if probe.is_dir() and os.access(probe, os.W_OK) else probe  # a file is no folder to write in


def creation_problem(path: str | os.PathLike) -> str | None:
    """Why a folder at `path` (with its parents) could not be created, else None; found without creating
    anything, so that a bad output path stops a command before any work starts. Covers an existing
    ancestor that is a file or not writable, a name or path too long for the filesystem, and any other
    error of looking the path up (a folder that may not be searched, say)."""
    path = Path(os.path.abspath(path))
    try:
        probe = path
        while not os.path.lexists(probe):  # False for a name too long to look up: its length is checked below
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):  # a file, or a symlink mkdir would not follow
            return f"{probe} is not a writable folder"
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except OSError as e:
        return f"{e.strerror or e}"
    for name in path.relative_to(probe).parts:
        if (size := len(os.fsencode(name))) > name_max:
            return f"the name {name[:24]}... is {size} bytes, more than the {name_max} its filesystem allows"
    if (size := len(os.fsencode(str(path)))) >= path_max:  # PATH_MAX counts the terminating NUL
        return f"the path is {size} bytes, more than the {path_max - 1} allowed"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
