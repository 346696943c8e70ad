"""Atomic writes: the whole new file or the old one, readable as any file the user creates."""

import os
import stat

import pytest

from jepatune.atomic import atomic_path, atomic_write_text


def test_a_written_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "table.txt", "x")
    assert stat.S_IMODE((tmp_path / "table.txt").stat().st_mode) == 0o666 & ~mask  # 0644 under umask 022


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]
