"""Every report of every trial, kept by the trial itself where the sweep lives: `reports/<trial folder>.jsonl`.

Ray also keeps a trial's reports (its `result.json`), but it writes them in the driver's staging
folder and copies them to the sweep's storage only when it snapshots the experiment; a trial that
restarts after its node was lost goes on from that copy, so what it reported between the last
snapshot and the loss would be missing from its curve. The trial writes this log before each report
(`tune.report` blocks, and code after a trial's last report may never run), so the snapshot period
can back off without a curve point lost, and a trial whose folder never reached the storage (started
and ended between two snapshots, then the driver killed) still has its params and reports.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

from jepatune.experiment.layout import REPORTS_DIR, parse_jsonl
from jepatune.experiment.store import ROWS_SUFFIX, Store

LOG_SUFFIX = ".jsonl"
SUGGESTION = "suggestion"  # the key of a log's start row (a report's `params` is the model's size)


class ReportLog:
    """The log of one trial: a row with its suggestion (Ray's params) when it starts (again on each
    restart), then its reports."""

    def __init__(self, experiment: str, trial_folder: str, trial_id: str):
        self.store, self.rel, self.trial_id = Store(experiment), f"{REPORTS_DIR}/{trial_folder}{LOG_SUFFIX}", trial_id

    def start(self, params: dict[str, Any]) -> None:
        self.store.append_row(self.rel, {"trial_id": self.trial_id, SUGGESTION: params})

    def add(self, report: dict[str, Any]) -> None:
        self.store.append_row(self.rel, {**report, "trial_id": self.trial_id, "timestamp": time.time()})


def log_owner(name: str) -> str | None:
    """The trial folder whose log `name` (an entry of `reports/`) is: `<trial folder>.jsonl`, or on an
    object store its folder of rows `<trial folder>.jsonl.rows`."""
    name = name.removesuffix(ROWS_SUFFIX)
    return name.removesuffix(LOG_SUFFIX) if name.endswith(LOG_SUFFIX) else None


def read_report_logs(experiment: str) -> dict[str, dict[str, Any]]:
    """trial folder name -> {"params": the last suggestion row's, "reports": [...] in write order}, in one
    listing: a local log is one file, a remote one a folder of rows (see `Store.append_row`)."""
    store = Store(experiment)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    base = PurePosixPath(store.path(REPORTS_DIR))
    for info in store.files(REPORTS_DIR, recursive=True):  # sorted by path: a remote log's rows in write order
        rel = PurePosixPath(info.path).relative_to(base)
        if (trial := log_owner(rel.parts[0])) is not None:
            rows[trial] += parse_jsonl(store.read_text(f"{REPORTS_DIR}/{rel}") or "")
    logs = {}
    for trial, trial_rows in rows.items():
        params = [r[SUGGESTION] for r in trial_rows if SUGGESTION in r]
        logs[trial] = {"params": params[-1] if params else None,
                       "reports": [r for r in trial_rows if SUGGESTION not in r]}
    return logs


def merge_reports(ray_reports: list[dict[str, Any]], logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ray's reports of a trial, with the logged ones of every step Ray's copy lacks, in step order."""
    have = {r.get("step") for r in ray_reports}
    merged = ray_reports + [r for r in logged if r.get("step") not in have]
    return sorted(merged, key=lambda r: -1 if r.get("step") is None else r["step"])  # stable: restarts keep order
