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

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jepatune.analysis import schema
from jepatune.analysis.finalists import finalists_table
from jepatune.atomic import atomic_path
from jepatune.experiment.layout import DECISIONS_NAME, FINAL_RUNS, REPORTS_DIR, TABLES_DIR
from jepatune.experiment.ray_files import metric_reports, read_trials, trial_status
from jepatune.experiment.report_log import LOG_SUFFIX
from jepatune.experiment.settings import SweepSettings, read_metadata, read_settings
from jepatune.experiment.store import Store
from jepatune.experiment.trials import KNOBS, METRIC, PENALIZED, trial_config, trial_key
from jepatune.trainer.config import TrainConfig

# Which of two trials of one recipe a table keeps: the most finished.
STATUS_RANK = {s: i for i, s in enumerate(("completed", "diverged", "infeasible", "oom", "pruned", "errored",
                                            "incomplete"))}


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
    hints = typing.get_type_hints(TrainConfig)
    knob_columns = {k: schema.knob_dtype(hints[k]) for k in knobs}
    trial_rows, curve_rows = [], []
    trials = read_trials(experiment)
    for t in trials:
        reports = metric_reports(t["reports"])
        last = reports[-1] if reports else {}
        values = [r[METRIC] for r in reports if r.get("status") not in PENALIZED]
        key = last.get("config_key") or (key_of(t["params"]) if key_of is not None else None)
        row = {
            "trial_id": t["trial_id"], "status": trial_status(t, trial_steps),
            "is_reference": t["index"] == 1,  # the first trial is always the enqueued reference recipe
            "config_key": key, "best_val_bpb": min(values) if values else None,
            "last_val_bpb": last.get(METRIC), "step": last.get("step"), "trial_steps": trial_steps,
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


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Atomically: a reader sees the previous table or the new one, never half of one."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)


def put_parquet(store: Store, rel: str, frame: pd.DataFrame) -> str:
    """`frame` as the table `rel` of `store` (whole or absent, as `write_parquet`); returns its location."""
    if store.remote:
        store.write_bytes(rel, parquet_bytes(frame))
    else:
        write_parquet(frame, store.path(rel))
    return store.uri(rel)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def read_parquet(store: Store, rel: str) -> pd.DataFrame:
    return pd.read_parquet(pa.BufferReader(store.read_bytes(rel))) if store.remote else pd.read_parquet(store.path(rel))


def table_name(name: str) -> str:
    return f"{TABLES_DIR}/{name}.parquet"


def write_tables(folder: str | os.PathLike, settings: SweepSettings | None = None) -> dict[str, str]:
    """(Re)build every table of the sweep at `folder` (its local folder or storage URI) from its files,
    where the sweep lives; return their locations. `settings`: `read_settings(folder)`, when read."""
    settings = settings or read_settings(folder)
    store = settings.store
    meta = read_metadata(folder)
    knobs = searched_knobs(settings.experiment_path)
    decisions = _typed(store.read_rows(DECISIONS_NAME), schema.DECISIONS)
    trials, curves = build_trials(settings.experiment_path, settings.trial_steps, knobs,
                                  key_of=_key_function(meta, settings),
                                  audited=frozenset(decisions.loc[decisions["decision"] == "audit", "trial_id"]))
    final = _typed(store.read_rows(FINAL_RUNS), schema.FINAL)
    return {name: put_parquet(store, table_name(name), frame)
            for name, frame in (("trials", trials), ("curves", curves), ("decisions", decisions), ("final", final),
                                ("finalists", finalists_table(final)))}


def _key_function(meta: dict[str, Any], settings: SweepSettings) -> Callable[[dict[str, Any]], str | None]:
    """params -> the `config_key` the trainable computes, from the base recipe the sweep recorded."""
    def key_of(params: dict[str, Any]) -> str | None:
        try:
            config = trial_config(meta["base"], params, settings.trial_steps, tuple(meta["rungs"]),
                                  settings.probe_length)
            return trial_key(config, settings.rung_fidelity)
        except Exception:  # an unreadable recipe: left unfolded rather than failing the tables
            return None

    return key_of


def searched_knobs(experiment: str) -> list[str]:
    """The TrainConfig knobs that any trial's suggestion set (in first-seen order)."""
    seen: dict[str, None] = {}
    for t in read_trials(experiment):
        for k in t["params"]:
            if k in KNOBS:
                seen.setdefault(k)
    return list(seen)


def load_tables(folder: str | os.PathLike, settings: SweepSettings | None = None) -> dict[str, pd.DataFrame]:
    """The sweep's tables as DataFrames (built first when missing)."""
    settings = settings or read_settings(folder)
    store = settings.store
    if not all(store.exists(table_name(name)) for name in schema.TABLES):
        write_tables(folder, settings)
    return {name: read_parquet(store, table_name(name)) for name in schema.TABLES}


class Tables(NamedTuple):
    """The tables of a sweep (columns: `jepatune.analysis.schema`, plus the knob columns of trials)."""

    trials: pd.DataFrame
    curves: pd.DataFrame
    decisions: pd.DataFrame
    final: pd.DataFrame
    finalists: pd.DataFrame


def load(folder: str | os.PathLike) -> Tables:
    """The tables of the sweep at `folder` (its local folder or storage URI), rebuilt from its files
    first when missing or stale.

    Stale: a source is newer (mtime) than the oldest table. Sources: the decisions and the retrain's
    runs, and each Ray trial's `result.json` and report log when the sweep is on a local path (on a
    storage URI such as s3:// those are not checked: listing every trial costs a request each)."""
    settings = read_settings(folder)  # read once for the check, the rebuild and the reads
    if _stale(settings):
        write_tables(folder, settings)
    tables = load_tables(folder, settings)
    return Tables(**{name: tables[name] for name in Tables._fields})


def _stale(settings: SweepSettings) -> bool:
    store = settings.store
    built = [store.mtime_ns(table_name(name)) for name in schema.TABLES]
    if None in built:
        return False  # load_tables builds them
    oldest = min(built)
    sources = [store.newest_mtime_ns(DECISIONS_NAME), store.newest_mtime_ns(FINAL_RUNS)]
    if not store.remote:
        sources += [p.stat().st_mtime_ns for p in Path(settings.experiment_path).glob("*/result.json")]
        sources.append(store.newest_in(REPORTS_DIR, LOG_SUFFIX))
    return any(t is not None and t > oldest for t in sources)
