"""Sweeps as Optuna studies: export one to a journal file, import a study's trials as warm-start points.

    path = export_study("runs/sweep/sweep")          # runs/sweep/sweep/optuna.journal
    # optuna-dashboard runs/sweep/sweep/optuna.journal
    study = optuna.load_study(study_name="sweep", storage=journal_storage(path))
    optuna.visualization.plot_optimization_history(study)
    points = import_study(path, "sweep", "curriculum")

The export copies the sweep's own Optuna study (Ray's searcher state): the space's parameters
(e.g. bridge_share), their distributions, intermediate values by step, PRUNED and FAIL states and
the constraints. Without searcher state it is rebuilt from the `trials` and `curves` tables; its
parameters are then the TrainConfig knobs (e.g. ce_pure_frac), not the space's.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd

from jepatune.analysis.explore import distribution_of, knob_columns
from jepatune.analysis.tables import load_tables
from jepatune.atomic import atomic_path
from jepatune.errors import JepatuneError
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import read_settings
from jepatune.experiment.trials import PENALIZED
from jepatune.spaces import CONSTRAINT_KEY, FAILURE_CONSTRAINT

if TYPE_CHECKING:
    from jepatune.spaces import Dim, Space

JOURNAL_NAME = "optuna.journal"
TrialState = optuna.trial.TrialState
# Table status -> Optuna state; incomplete trials are left out.
STATES = {"completed": TrialState.COMPLETE, "diverged": TrialState.COMPLETE, "infeasible": TrialState.COMPLETE,
          "oom": TrialState.FAIL, "pruned": TrialState.PRUNED, "errored": TrialState.FAIL}


def journal_storage(path: str | os.PathLike) -> optuna.storages.JournalStorage:
    """The Optuna storage of a journal file (created when missing)."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def export_study(folder: str | os.PathLike, path: str | os.PathLike | None = None, *,
                 overwrite: bool = False) -> Path:
    """Write the sweep at `folder` as an Optuna study (named after the sweep, minimize) in a journal
    file, `<folder>/optuna.journal` by default; return its path. Unfinished (running, waiting)
    trials are left out. The study's user attr `jepatune_source` says where the trials came from:
    "searcher" (the sweep's own study) or "tables". Written atomically; an existing file is kept
    unless `overwrite`."""
    settings = read_settings(folder)
    path = Path(folder) / JOURNAL_NAME if path is None else Path(path)
    if path.exists() and not overwrite:
        raise JepatuneError(f"{path} exists; pass overwrite=True or another path")
    trials, source = _sweep_trials(Path(folder))
    with _quiet(), atomic_path(path) as tmp:
        study = optuna.create_study(study_name=settings.name, storage=journal_storage(tmp), direction="minimize")
        study.set_user_attr("jepatune_source", source)
        study.add_trials(trials)
    return path


def _sweep_trials(folder: Path) -> tuple[list[optuna.trial.FrozenTrial], str]:
    try:
        study = load_study(folder)
    except (JepatuneError, OSError, ImportError, AttributeError, KeyError, pickle.UnpicklingError):
        return table_trials(folder), "tables"  # no searcher state, or one this Ray/Optuna cannot read
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()], "searcher"


def _float(value: Any) -> float | None:
    return None if pd.isna(value) else float(value)


def table_trials(folder: str | os.PathLike) -> list[optuna.trial.FrozenTrial]:
    """The sweep's trials rebuilt from its tables: knob columns as params (distributions inferred as
    `explore.importance` does), last_val_bpb as value (PRUNED: like Optuna, the last reported one),
    val_bpb by step as intermediate values; errored and oom trials FAIL, incomplete ones left out,
    infeasible ones with the space constraint at 1, diverged and infeasible ones with the failure
    constraint at 1 (as the sweep told them). User attrs: trial_id, status, is_reference."""
    tables = load_tables(folder)
    trials, curves = tables["trials"], tables["curves"]
    trials = trials[trials["status"].isin(list(STATES)).fillna(False).astype(bool).to_numpy()]
    dists = {p: distribution_of(trials[p].dropna()) for p in knob_columns(trials) if trials[p].notna().any()}
    reported = curves.dropna(subset=["step", "val_bpb"])
    steps = {tid: dict(zip(g["step"].astype(int), g["val_bpb"].astype(float), strict=True))
             for tid, g in reported.groupby("trial_id")}
    out = []
    for row in trials.to_dict("records"):
        state = STATES[row["status"]]
        value = None if state == TrialState.FAIL else _float(row["last_val_bpb"])
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # nothing to tell
        params = {p: kind(row[p]) for p, (_, kind) in dists.items() if not pd.isna(row[p])}
        out.append(optuna.trial.create_trial(
            state=state, value=value, params=params, distributions={p: dists[p][0] for p in params},
            intermediate_values=steps.get(row["trial_id"], {}),
            user_attrs={"trial_id": row["trial_id"], "status": row["status"],
                        "is_reference": bool(pd.notna(row["is_reference"]) and row["is_reference"])},
            constraints={CONSTRAINT_KEY: 1.0 if row["status"] == "infeasible" else 0.0,
                         FAILURE_CONSTRAINT: 1.0 if row["status"] in PENALIZED else 0.0}))
    return out


def _storage(source: str | os.PathLike | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    if isinstance(source, optuna.storages.BaseStorage):
        return source
    if "://" in str(source):
        return optuna.storages.get_storage(str(source))
    if not Path(source).is_file():
        raise JepatuneError(f"{source}: no such journal file; give a journal path or a storage URL (sqlite:///x.db)")
    return journal_storage(source)


def _domain(dim: Dim) -> str:
    if dim.choices is not None:
        return f"choices {list(dim.choices)}"
    return f"range [{dim.low}, {dim.high}]" + (f" step {dim.step}" if dim.step is not None else "")


def _coerce(dim: Dim, value: Any) -> Any:
    return value if dim.choices is not None else int(value) if dim.integer else float(value)


def import_study(source: str | os.PathLike | optuna.storages.BaseStorage, study_name: str,
                 space: str | Space = "curriculum") -> list[dict[str, Any]]:
    """The finished trials of an Optuna study (a journal file, a storage URL such as sqlite:///x.db,
    or a storage) whose parameters match `space` (a name, a TOML path or a `Space`), as points
    `{"params": {...}, "value": float, "state": "COMPLETE" | "PRUNED"}` in trial order.

    Every finished trial must have exactly the space's parameters, and every value must lie in the
    space's range or choices; otherwise a JepatuneError names the trial and the parameter. A PRUNED
    point's value is its last intermediate value (at a lower budget); a trial with no value is left
    out. The study must minimize one objective.

    Not wired into `search`; a sweep can warm-start from the points by re-running them,
    `OptunaSearch(space.sample, points_to_evaluate=[p["params"] for p in points])` or
    `study.enqueue_trial(p["params"])`, or by telling their values without training:
    `OptunaSearch(evaluated_rewards=...)` (needs a dict space, not the define-by-run `space.sample`) or
    `study.add_trial(optuna.trial.create_trial(params=..., distributions=..., value=...))`.
    """
    from jepatune.spaces import get_space

    space = get_space(space) if isinstance(space, str) else space
    storage = _storage(source)
    try:
        with _quiet():
            study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as e:
        names = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise JepatuneError(f"{source}: no study named {study_name!r}; its studies: {names}") from e
    if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
        raise JepatuneError(f"study {study_name!r} does not minimize one objective; points carry a val_bpb to minimize")
    dims = {d.name: d for d in space.dims}
    points = []
    for t in study.get_trials(deepcopy=False):
        for name, value in t.params.items():
            if name not in dims:
                raise JepatuneError(f"trial {t.number}: param {name!r} is not in space {space.name!r} "
                                    f"(its params: {', '.join(space.params)})")
            if not dims[name].contains(value):
                raise JepatuneError(f"trial {t.number}: param {name!r} = {value!r} is outside space "
                                    f"{space.name!r}: {_domain(dims[name])}")
        missing = [p for p in space.params if p not in t.params]
        if t.state.is_finished() and missing:
            raise JepatuneError(f"trial {t.number}: param {missing[0]!r} of space {space.name!r} is missing")
        value = t.value
        if value is None and t.state == TrialState.PRUNED and t.last_step is not None:
            value = t.intermediate_values[t.last_step]
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and value is not None and math.isfinite(value):
            points.append({"params": {p: _coerce(dims[p], t.params[p]) for p in space.params}, "value": float(value),
                           "state": t.state.name})
    return points
