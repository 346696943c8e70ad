"""A finished sweep's own records as a benchmark, as far as they go.

What a sweep can support: every trial that ran to the end (completed, audited ones included) is a
recipe with one seed, its rung values and its score, so a simulation over them replays other
samplers and ASHA settings (grace, reduction factor) on the sweep's own curves. What it cannot:
- one seed: the surrogate has no seed noise to add, and the noise floor is unknown (0);
- pruned trials are left out (their later rungs and scores were never measured), so the landscape
  is the survivors', biased towards the recipes this sweep's own ASHA kept;
- only the sweep's fidelity and its own rungs were recorded;
- a point between the recipes is interpolated between few of them, far apart in a small sweep.
A recorded benchmark (`jepatune benchmark record`) has none of these limits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from jepatune.analysis.tables import load
from jepatune.benchmark.tables import BENCHMARK_NAME, Benchmark, load_benchmark
from jepatune.errors import JepatuneError
from jepatune.experiment.layout import SETTINGS_NAME
from jepatune.experiment.settings import base_config, read_settings
from jepatune.experiment.store import is_uri
from jepatune.experiment.trials import KNOBS
from jepatune.spaces import get_space


def sweep_benchmark(folder: str | os.PathLike) -> Benchmark:
    settings = read_settings(folder)
    if settings.fidelity != "snapshot":
        raise JepatuneError(f"{folder}: a {settings.fidelity} sweep; only snapshot sweeps can be simulated from their "
                            f"own records (record a benchmark for the others)")
    tables = load(folder)
    trials = tables.trials[tables.trials["status"] == "completed"]
    base = base_config(settings)
    knobs = [k for k in trials.columns if k in KNOBS]
    recipes, runs, curves = [], [], []
    rungs = tuple(int(r) for r in settings.rungs[:-1])
    for i, row in enumerate(trials.itertuples(index=False)):
        values = {k: getattr(row, k) for k in knobs if pd.notna(getattr(row, k))}
        config = base.replace(**{k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()})
        params = get_space(settings.space, base=config).reference_point()  # the parameters of its knobs
        curve = tables.curves[tables.curves["trial_id"] == row.trial_id].drop_duplicates("step", keep="last")
        at = curve.set_index("step")["val_bpb"]
        if not all(r in at.index for r in rungs):
            continue
        recipes.append({"recipe": i, "origin": "reference" if row.is_reference else "trial", **params})
        runs.append({"kind": "main", "recipe": i, "seed": 0, "iterations": settings.trial_steps,
                     "status": "completed", "score": float(row.last_val_bpb), "compute_steps": row.compute_steps})
        curves += [{"kind": "main", "recipe": i, "seed": 0, "iterations": settings.trial_steps, "step": r,
                    "snapshot_bpb": float(at[r]), "probe_bpb": float("nan")} for r in rungs]
    if len(recipes) < 2:
        raise JepatuneError(f"{folder}: {len(recipes)} trial(s) ran to the end with every rung; a simulation needs 2")
    info = {"settings": {"space": settings.space, "trial_steps": settings.trial_steps, "probe_steps": 0,
                         "preset": settings.preset}, "rungs": list(rungs), "fidelity_rungs": [], "sweep": str(folder)}
    return Benchmark(info, pd.DataFrame(recipes), pd.DataFrame(runs), pd.DataFrame(curves))


def load_source(location: str | os.PathLike) -> Benchmark:
    """A benchmark folder, or a sweep (its folder or storage URI) as a benchmark of its own records."""
    path = Path(location)
    if not is_uri(str(location)) and (path / BENCHMARK_NAME).exists():
        return load_benchmark(path)
    if is_uri(str(location)) or (path / SETTINGS_NAME).exists():
        return sweep_benchmark(location)
    raise JepatuneError(f"{location} holds neither a {BENCHMARK_NAME} nor a sweep ({SETTINGS_NAME}); give a folder "
                        f"that `jepatune benchmark record` or `jepatune search` wrote")
