"""The tables of an ablation: one row per run, then one per variant with its paired-by-seed delta.

An ablation folder (made by `jepatune ablate`, see `jepatune.search.ablate`) holds `ablation.json`
(settings, the base recipe, each variant's config and the planned runs), `finished/` (one JSON per
finished run, named by its config key), Ray's trial folders and `tables/`. The tables are rebuilt from
those files alone: a finished run from its JSON, a run that raised from its Ray trial's error file.
`ablation_table` is pure: runs in, variants out.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from jepatune.analysis import schema
from jepatune.analysis.explore import pair_by_seed
from jepatune.analysis.tables import put_parquet, read_parquet
from jepatune.experiment.layout import ABLATION_NAME, CACHE_DIR, TABLES_DIR
from jepatune.experiment.ray_files import read_trials
from jepatune.experiment.settings import read_record
from jepatune.experiment.store import Store, is_uri, join

BASE = "base"
RUNS_TABLE, TABLE = "ablation_runs", "ablation"


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant of the `ablation_runs` table, the base first, then in order of appearance.

    mean_bpb and std_bpb are over the variant's completed runs with a val_bpb (std NaN for one run).
    Pairing is by seed, as in `explore.compare_final` (`explore.pair_by_seed`): a seed missing (or not
    completed) on either side is left out of that pair; n counts the paired seeds (for the base, its
    completed runs). delta is the mean of the paired differences variant - base (negative: the
    variant is better), with the 95% t interval of those differences when n >= 2; significant when
    the interval excludes 0. delta, ci_low and ci_high are NaN for the base. A seed run twice by one
    variant counts once (its last completed row). Each row also carries `missing` (the seeds left out
    of the pair and why, "" when none)."""
    done = runs["status"].eq("completed").fillna(False).astype(bool).to_numpy() & runs["val_bpb"].notna().to_numpy()
    ok = runs[done].drop_duplicates(["variant", "seed"], keep="last")
    order = sorted(dict.fromkeys(runs["variant"]), key=lambda v: v != BASE)  # stable: the base moves first
    changes = runs.drop_duplicates("variant").set_index("variant")["change"]
    base = runs[runs["variant"].eq(BASE).to_numpy()]
    rows = []
    for variant in order:
        bpb = ok.loc[ok["variant"].eq(variant).to_numpy(), "val_bpb"].astype(float)
        row = {"variant": variant, "change": changes[variant], "n": len(bpb), "mean_bpb": bpb.mean(),
               "std_bpb": bpb.std(), "delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "missing": ""}
        if variant != BASE:
            row.update(_paired(variant, runs[runs["variant"].eq(variant).to_numpy()], base))
        row["significant"] = bool(row["ci_low"] > 0 or row["ci_high"] < 0)  # False when NaN
        rows.append(row)
    return pd.DataFrame(rows, columns=list(schema.ABLATION)).astype(schema.ABLATION)


def _paired(variant: str, runs_of: pd.DataFrame, base: pd.DataFrame) -> dict[str, Any]:
    """n, delta, its interval and the missing seeds: every run of the variant against every run of
    the base (errored and diverged ones too, so that `missing` can say why a seed is left out)."""
    if base.empty:
        return {"n": 0, "missing": f"no {BASE} run"}
    # Only "completed" runs count here; pair_by_seed would count a run with no status as finished.
    runs_of, base = (r.assign(status=r["status"].fillna("without status")) for r in (runs_of, base))
    pair = pair_by_seed(runs_of, base, (variant, BASE))
    return {"n": pair["n_paired"], **{k: pair[k] for k in ("delta", "ci_low", "ci_high", "missing")}}


def ablation_store(location: str | os.PathLike) -> Store:
    """Where the ablation at `location` (its local folder or storage URI) keeps its runs and tables."""
    if is_uri(location):
        return Store(location)
    folder = Path(location).resolve()
    storage = (read_record(folder, ABLATION_NAME, "ablation").get("settings") or {}).get("storage")
    return Store(folder if storage is None else join(storage, folder.name))


def read_plan(location: str | os.PathLike) -> dict[str, Any]:
    """The contents of `ablation.json`, read where the ablation lives; a clear error when `location`
    is not an ablation."""
    return read_record(ablation_store(location).root, ABLATION_NAME, "ablation")


def build_runs(location: str | os.PathLike) -> pd.DataFrame:
    """The `ablation_runs` table of the ablation: one row per planned run that finished or raised, in
    plan order. A run neither finished nor errored (not started, or cut by a kill) has no row."""
    store = ablation_store(location)
    plan = read_plan(location)
    errored = {(t["params"].get("variant"), t["params"].get("seed")): t["trial_id"]
               for t in read_trials(store.root) if t["error"]}  # the last such trial of each run
    rows = []
    for run in plan["runs"]:
        row = {"variant": run["variant"], "change": run["change"], "seed": run["seed"]}
        finished = _read_json(store, f"{CACHE_DIR}/{run['config_key']}.json")
        if finished is not None:
            rows.append({**row, **{k: finished.get(k) for k in ("val_bpb", "prequant_bpb", "steps", "status",
                                                                  "trial_id")}})
        elif (run["variant"], run["seed"]) in errored:
            rows.append({**row, "steps": run["steps"], "status": "errored",
                         "trial_id": errored[run["variant"], run["seed"]]})
    return pd.DataFrame(rows, columns=list(schema.ABLATION_RUNS)).astype(schema.ABLATION_RUNS)


def _read_json(store: Store, rel: str) -> dict[str, Any] | None:
    try:
        return store.read_json(rel)
    except ValueError:
        return None


def _tables() -> dict[str, str]:
    return {name: f"{TABLES_DIR}/{name}.parquet" for name in schema.ABLATION_TABLES}


def write_ablation_tables(location: str | os.PathLike) -> dict[str, str]:
    """(Re)build both tables of the ablation at `location` from its files; return their locations."""
    store = ablation_store(location)
    runs = build_runs(location)
    return {RUNS_TABLE: put_parquet(store, _tables()[RUNS_TABLE], runs),
            TABLE: put_parquet(store, _tables()[TABLE], ablation_table(runs))}


def _stale(store: Store) -> bool:
    """A table is missing, or a source (the plan, a finished run, a local Ray trial's error) is newer."""
    built = [store.mtime_ns(rel) for rel in _tables().values()]
    if None in built:
        return True
    sources = [store.mtime_ns(ABLATION_NAME), store.newest_in(CACHE_DIR, ".json")]
    if not store.remote:
        sources += [p.stat().st_mtime_ns for p in Path(store.root).glob("*/error.txt")]
    return any(t is not None and t > min(built) for t in sources)


def load_ablation(location: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ablation table, runs table) of the ablation at `location`, rebuilt first when missing or stale."""
    read_plan(location)  # a clear error for a folder that is not an ablation
    store = ablation_store(location)
    if _stale(store):
        write_ablation_tables(location)
    return read_parquet(store, _tables()[TABLE]), read_parquet(store, _tables()[RUNS_TABLE])
