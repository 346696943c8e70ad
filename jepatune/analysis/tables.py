"""Build the Parquet tables of a sweep from its experiment folder alone.

Ray's trial folders (`result.json`: one JSON object per report; `error.txt` when a trial
raised) are the source of truth, with the experiment snapshot for trial states. A crashed
sweep still builds: trials running at the crash are `incomplete`, and folders that a
restore orphaned are folded by recipe (`config_key`), so each recipe appears once.

A trial that restarts (after a failure, or a resumed driver) appends to its `result.json`, so a
step can be reported twice: redone from an older checkpoint, or replayed from the finished-trial
cache. Reports are de-duplicated by step, the last one kept (its run produced the result).
"""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jepatune.analysis import schema
from jepatune.atomic import atomic_path

TABLES_DIR = "tables"
# Ray names trial folders <trainable>_<trial id>_<index>_<tag>; the index counts from 1 in creation order.
TRIAL_FOLDER = re.compile(r"_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_(\d+)_")
FINAL_RUNS = "final/runs.jsonl"
OOM_ERROR = "MachineOutOfMemory"  # the class name of search.trainable's error, in Ray's error.txt
STATUS_RANK = {s: i for i, s in enumerate(("completed", "diverged", "infeasible", "oom", "pruned", "errored",
                                            "incomplete"))}


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, root) of a local folder or a storage URI such as s3://bucket/path."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError):
        return None


def _trial_states(fs: pafs.FileSystem, root: str) -> dict[str, tuple[str, int]]:
    """trial_id -> (Ray status: TERMINATED, ERROR, RUNNING, ...; failures) from the newest snapshot.

    Each driver session writes its own `experiment_state-<start time>.json` and a resumed one
    lists every trial, so the newest holds the latest word; Ray copies it in place
    (not atomically), so one cut by a crash mid-copy falls back to the one before."""
    snaps = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root))
                   if Path(i.path).name.startswith("experiment_state"))
    for snap in reversed(snaps):
        try:
            states = {}
            for trial_json, runtime_json in json.loads(_read_text(fs, snap) or "")["trial_data"]:
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
    """One dict per trial folder: id, params, reports, error, Ray state."""
    fs, root = filesystem(experiment)
    states = _trial_states(fs, root)
    trials = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory:
            continue
        results = _read_text(fs, f"{info.path}/result.json")
        params = _read_text(fs, f"{info.path}/params.json")
        if params is None:
            continue
        reports = []
        for line in (results or "").splitlines():
            try:
                reports.append(json.loads(line))
            except ValueError:  # a line cut by a crash mid-write
                continue
        error = _read_text(fs, f"{info.path}/error.txt")
        name = Path(info.path).name
        match = TRIAL_FOLDER.search(name)
        trial_id = reports[0]["trial_id"] if reports else (match.group(1) if match else name)
        index = int(match.group(2)) if match else 10**9
        trials.append({"trial_id": trial_id, "folder": name, "params": json.loads(params), "index": index,
                       "reports": reports, "error": error, "state": states.get(trial_id, (None, 0))[0],
                       "restarts": states.get(trial_id, (None, 0))[1]})
    return sorted(trials, key=lambda t: (t["index"], t["folder"]))


def metric_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports that carry the metric, one per step (the last), in the order they were made."""
    by_step: dict[Any, dict[str, Any]] = {}
    for r in reports:
        if "val_bpb" in r:
            by_step.pop(r.get("step"), None)  # re-insert: the order follows the kept report
            by_step[r.get("step")] = r
    return list(by_step.values())


def trial_status(trial: dict[str, Any], trial_steps: int) -> str:
    reports = metric_reports(trial["reports"])
    last = reports[-1] if reports else {}
    if last.get("status") in schema.PENALIZED:
        return last["status"]
    if last.get("step", 0) >= trial_steps:
        return "completed"
    if trial["error"] and trial["state"] != "TERMINATED":
        return "oom" if OOM_ERROR in trial["error"] else "errored"
    if trial["state"] == "TERMINATED" and reports:
        return "pruned"
    return "incomplete"


def _last_error_line(text: str | None) -> str | None:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def _typed(rows: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def build_trials(experiment: str, trial_steps: int, knobs: list[str],
                 key_of: Callable[[dict[str, Any]], str | None] | None = None,
                 audited: frozenset[str] = frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `trials` and `curves` tables of the Ray experiment at `experiment`. `key_of` maps a
    trial's params to its `config_key`, for folders with no report (orphaned before reporting);
    `audited` names the trials ASHA would have stopped but ran to the end as audits."""
    from jepatune.trainer.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    knob_columns = {k: schema.knob_dtype(hints[k]) for k in knobs}
    trial_rows, curve_rows = [], []
    trials = read_trials(experiment)
    for t in trials:
        reports = metric_reports(t["reports"])
        last = reports[-1] if reports else {}
        values = [r["val_bpb"] for r in reports if r.get("status") not in schema.PENALIZED]
        key = last.get("config_key") or (key_of(t["params"]) if key_of is not None else None)
        row = {
            "trial_id": t["trial_id"], "status": trial_status(t, trial_steps),
            "is_reference": t["index"] == 1,  # the first trial is always the enqueued reference recipe
            "config_key": key, "best_val_bpb": min(values) if values else None,
            "last_val_bpb": last.get("val_bpb"), "step": last.get("step"), "trial_steps": trial_steps,
            "tokens": last.get("tokens"), "train_s": last.get("elapsed_s"), "device_s": last.get("device_s"),
            "flops": last.get("flops"), "params": last.get("params"), "node": last.get("node") or last.get("hostname"),
            "error": _last_error_line(t["error"]) if t["error"] else last.get("reason"), "reports": len(reports),
            # answered from the finished-trial cache without training here (not: trained, then replayed)
            "cached": bool(reports) and all(r.get("cached", False) for r in reports), "restarts": t["restarts"],
            "compute_steps": last.get("compute_steps", last.get("step")),
            "audited": t["trial_id"] in audited,
            # at the end: the running weights' BPB, and the average's before the int8+zlib round trip
            "live_bpb": last.get("live_bpb"), "avg_bpb": last.get("avg_bpb"),
        }
        row.update({k: t["params"].get(k) for k in knobs})
        trial_rows.append(row)
        for r in reports:
            curve = {k: r.get(k) for k in schema.CURVES}
            curve["time"] = r.get("timestamp")
            curve_rows.append(curve)
    trials_df = fold_duplicates(_typed(trial_rows, {**schema.TRIALS, **knob_columns}))
    curves_df = _typed(curve_rows, schema.CURVES)
    kept = curves_df["trial_id"].isin(set(trials_df["trial_id"]))  # not the folded-away duplicates
    return trials_df, curves_df[kept].reset_index(drop=True)


def fold_duplicates(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per recipe: a restore can leave an orphan folder and a re-run of the same
    recipe (answered from the cache). Keep the most finished, non-cached row of each."""
    if trials.empty:
        return trials
    order = trials.assign(_rank=trials["status"].map(STATUS_RANK), _cached=trials["cached"].astype(bool),
                          _pos=range(len(trials)))
    keyed = order[order["config_key"].notna()].sort_values(["_rank", "_cached", "_pos"])
    keyed = keyed.drop_duplicates("config_key", keep="first")
    kept = pd.concat([keyed, order[order["config_key"].isna()]]).sort_values("_pos")
    return kept.drop(columns=["_rank", "_cached", "_pos"]).reset_index(drop=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Atomically: a reader sees the previous table or the new one, never half of one."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)


def write_tables(folder: str | os.PathLike) -> dict[str, Path]:
    """(Re)build every table of the sweep at `folder` from its files; return their paths."""
    from jepatune.search.searcher import DECISIONS_NAME
    from jepatune.search.sweep import SETTINGS_NAME, ray_experiment_path, read_settings

    folder = Path(folder)
    settings = read_settings(folder)
    meta = json.loads((folder / SETTINGS_NAME).read_text())
    knobs = _searched_knobs(folder, meta)
    decisions = _typed(read_jsonl(folder / DECISIONS_NAME), schema.DECISIONS)
    trials, curves = build_trials(ray_experiment_path(settings), settings.trial_steps, knobs,
                                  key_of=_key_function(meta, settings),
                                  audited=frozenset(decisions.loc[decisions["decision"] == "audit", "trial_id"]))
    final = _typed(read_jsonl(folder / FINAL_RUNS), schema.FINAL)
    from jepatune.analysis.finalists import finalists_table

    out = {}
    for name, frame in (("trials", trials), ("curves", curves), ("decisions", decisions), ("final", final),
                        ("finalists", finalists_table(final))):
        out[name] = folder / TABLES_DIR / f"{name}.parquet"
        write_parquet(frame, out[name])
    return out


def _key_function(meta: dict[str, Any], settings) -> Callable[[dict[str, Any]], str | None]:
    """params -> the `config_key` the trainable computes, from the base recipe the sweep recorded."""
    from jepatune.search.trainable import trial_config, trial_key

    def key_of(params: dict[str, Any]) -> str | None:
        try:
            config = trial_config(meta["base"], params, settings.trial_steps, tuple(meta["rungs"]),
                                  settings.probe_length)
            return trial_key(config, settings.fidelity)
        except Exception:  # an unreadable recipe: left unfolded rather than failing the tables
            return None

    return key_of


def _searched_knobs(folder: Path, meta: dict[str, Any]) -> list[str]:
    """The TrainConfig knobs that any trial's suggestion set (in first-seen order)."""
    from jepatune.search.sweep import ray_experiment_path, read_settings
    from jepatune.search.trainable import KNOBS

    seen: dict[str, None] = {}
    for t in read_trials(ray_experiment_path(read_settings(folder))):
        for k in t["params"]:
            if k in KNOBS:
                seen.setdefault(k)
    return list(seen)


def load_tables(folder: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The sweep's tables as DataFrames (built first when missing)."""
    folder = Path(folder)
    paths = {name: folder / TABLES_DIR / f"{name}.parquet" for name in schema.TABLES}
    if not all(p.exists() for p in paths.values()):
        paths = write_tables(folder)
    return {name: pd.read_parquet(p) for name, p in paths.items()}
