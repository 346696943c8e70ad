"""The names of the files and folders in an experiment folder, and the one way to read them.

A sweep folder `OUT/NAME` holds Ray's trial folders (the source of truth), `sweep.json`
(settings, base recipe, versions), `decisions.jsonl` (every ASHA decision), `finished/` (a cache
of finished trials, so none trains twice), `reports/` (every trial's params and reports, written by
the node that trains it), `final/` (the retrain's runs), `tables/` (Parquet),
`best.toml` and `report.md` with its figures. An ablation folder holds `ablation.json`,
`finished/`, Ray's trial folders and `tables/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs as pafs

SETTINGS_NAME = "sweep.json"
ABLATION_NAME = "ablation.json"
DECISIONS_NAME = "decisions.jsonl"
CACHE_DIR = "finished"
REPORTS_DIR = "reports"
TABLES_DIR = "tables"
FINAL_DIR = "final"
RUNS_NAME = "runs.jsonl"
FINAL_RUNS = f"{FINAL_DIR}/{RUNS_NAME}"
BEST_NAME = "best.toml"
REPORT_NAME = "report.md"
FIGURES_DIR = "report"
ABLATIONS_DIR = "ablations"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, root) of a local folder or a storage URI such as s3://bucket/path."""
    import pyarrow.fs as pafs  # here: the CLI reads these names at start-up, and pyarrow takes 0.4 s

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when it is missing); a line cut by a crash is skipped."""
    path = Path(path)
    return parse_jsonl(path.read_text(encoding="utf-8")) if path.is_file() else []


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def append_jsonl(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line in one write, synced. A line cut by an earlier crash (no final newline)
    is ended first, so it stays one unreadable line (skipped) instead of spoiling this one."""
    with open(path, "a+b") as f:
        cut = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
        f.write((b"\n" if cut else b"") + json.dumps(row).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
