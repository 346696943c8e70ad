"""Readers of the files Ray Tune writes for an experiment, on a local folder or a storage URI.

Each trial folder holds `params.json` (its suggestion), `result.json` (one JSON object per
report) and `error.txt` when it raised; `experiment_state-*.json` snapshots hold trial states,
and `searcher-state-*.pkl` the searcher (with its Optuna study). Read with pyarrow's filesystem
layer, with no Ray imported. Ray copies those files to the storage only at its snapshots, so a
trial's reports are completed from the log it keeps itself (`experiment.report_log`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from jepatune.errors import JepatuneError
from jepatune.experiment.layout import filesystem, parse_jsonl
from jepatune.experiment.report_log import merge_reports, read_report_logs
from jepatune.experiment.settings import read_settings
from jepatune.experiment.trials import METRIC, PENALIZED

# Ray names trial folders <trainable>_<trial id>_<index>_<tag>; the index counts from 1 in creation order.
TRIAL_FOLDER = re.compile(r"_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_(\d+)_")
OOM_ERROR = "MachineOutOfMemory"  # the class name of search.trainable's error, in Ray's error.txt


def read_text(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError):
        return None


def trial_states(fs: pafs.FileSystem, root: str) -> dict[str, tuple[str, int]]:
    """trial_id -> (Ray status: TERMINATED, ERROR, RUNNING, ...; failures) from the newest snapshot.

    Each driver session writes its own `experiment_state-<start time>.json` and a resumed one
    lists every trial, so the newest holds the latest word; Ray copies it in place
    (not atomically), so one cut by a crash mid-copy falls back to the one before."""
    snaps = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root))
                   if Path(i.path).name.startswith("experiment_state"))
    for snap in reversed(snaps):
        try:
            states = {}
            for trial_json, runtime_json in json.loads(read_text(fs, snap) or "")["trial_data"]:
                trial, runtime = json.loads(trial_json), json.loads(runtime_json)
                failures = int(runtime.get("num_failures", 0))
                # A trial that ended in ERROR failed once more than it was restarted.
                restarts = failures - 1 if trial["status"] == "ERROR" and failures else failures
                states[trial["trial_id"]] = (trial["status"], restarts)
            return states
        except (ValueError, KeyError, TypeError):
            continue
    return {}


def read_trials(experiment: str) -> list[dict[str, Any]]:
    """One dict per trial: id, params, reports, error, Ray state. A trial is a Ray trial folder, or a
    report log whose folder never reached the storage; its reports are Ray's copy with the steps that
    copy lacks taken from the trial's report log (`experiment.report_log`)."""
    fs, root = filesystem(experiment)
    states = trial_states(fs, root)
    logs = read_report_logs(experiment)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory or (params := read_text(fs, f"{info.path}/params.json")) is None:
            continue
        ray_reports = parse_jsonl(read_text(fs, f"{info.path}/result.json") or "")  # a line cut by a crash is skipped
        logged = logs.pop(info.base_name, {"reports": []})["reports"]
        found[info.base_name] = (json.loads(params), merge_reports(ray_reports, logged),
                                 read_text(fs, f"{info.path}/error.txt"))
    for name, log in logs.items():
        if log["params"] is not None:
            found[name] = (log["params"], log["reports"], None)
    trials = []
    for name, (params, reports, error) in found.items():
        match = TRIAL_FOLDER.search(name)
        trial_id = reports[0]["trial_id"] if reports else (match.group(1) if match else name)
        index = int(match.group(2)) if match else 10**9
        state, restarts = states.get(trial_id, (None, 0))
        trials.append({"trial_id": trial_id, "folder": name, "params": params, "index": index,
                       "reports": reports, "error": error, "state": state, "restarts": restarts})
    return sorted(trials, key=lambda t: (t["index"], t["folder"]))


def metric_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports that carry the metric, one per step (the last), in the order they were made."""
    by_step: dict[Any, dict[str, Any]] = {}
    for r in reports:
        if METRIC in r:
            by_step.pop(r.get("step"), None)  # re-insert: the order follows the kept report
            by_step[r.get("step")] = r
    return list(by_step.values())


def trial_status(trial: dict[str, Any], trial_steps: int) -> str:
    reports = metric_reports(trial["reports"])
    last = reports[-1] if reports else {}
    if last.get("status") in PENALIZED:
        return last["status"]
    if last.get("step", 0) >= trial_steps:
        return "completed"
    if trial["error"] and trial["state"] != "TERMINATED":
        return "oom" if OOM_ERROR in trial["error"] else "errored"
    if trial["state"] == "TERMINATED" and reports:
        return "pruned"
    return "incomplete"


def load_study(folder: str | os.PathLike):
    """The Optuna study behind the sweep at `folder`, from the searcher state Ray saved on the
    sweep's storage (trusted folders only: it is a pickle)."""
    fs, root = filesystem(read_settings(folder).experiment_path)
    snaps = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root))
                   if Path(i.path).name.startswith("searcher-state-") and i.path.endswith(".pkl"))
    for snap in reversed(snaps):  # one per driver session, the newest first
        try:
            with fs.open_input_stream(snap) as f:
                return pickle.loads(f.read())["_ot_study"]
        except (EOFError, pickle.UnpicklingError):  # cut by a crash while Ray copied it
            continue
    raise JepatuneError(f"{folder}: no searcher state saved yet")
