"""A recorded benchmark folder, read back (pure pandas; `record` writes it).

    benchmark.json     how it was produced: settings, base recipe, rungs, machine, command, dates
    recipes.parquet    one row a recipe: recipe, origin (reference, ce-from-0, design), the space's
                       parameters, and the knobs they set (columns `knob:NAME`)
    runs.parquet       one row a run: kind (main, restart, transfer; probe in format 1), recipe, seed,
                       iterations, status, score (the shipped weights' BPB on the val prefix, as a
                       trial scores), compute_steps (probe branches included)
    curves.parquet     one row an evaluation of a run: kind, recipe, seed, iterations, step,
                       snapshot_bpb (the running model), probe_bpb (after the cool-down branched off
                       there; main runs, probe runs in format 1)
    records.jsonl      the raw records, one line a finished run (kept: `--resume` reads it)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from jepatune.errors import JepatuneError
from jepatune.experiment.trials import PENALTY_BPB

BENCHMARK_NAME = "benchmark.json"
RECIPES_NAME = "recipes.parquet"
RUNS_NAME = "runs.parquet"
CURVES_NAME = "curves.parquet"
RECORDS_NAME = "records.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a recording; a last line cut by a crash is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise JepatuneError(f"{path} cannot be read ({e.strerror or e}); give a benchmark folder") from None
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise JepatuneError(f"{path}: line {i + 1} is not JSON; the recording is damaged") from None
    if not records or records[0].get("record") != "meta":
        raise JepatuneError(f"{path} does not start with a benchmark's meta record; give a folder that "
                            f"`jepatune benchmark record` wrote")
    return records


@dataclass(frozen=True)
class Benchmark:
    """The tables of one benchmark, and the views the surrogate and the analyses use."""

    info: dict[str, Any]
    recipes: pd.DataFrame
    runs: pd.DataFrame
    curves: pd.DataFrame

    @property
    def budget(self) -> int:
        return int(self.info["settings"]["trial_steps"])

    @property
    def rungs(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.info["rungs"])

    @property
    def params(self) -> list[str]:
        return [c for c in self.recipes.columns if c not in ("recipe", "origin") and not c.startswith("knob:")]

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs.loc[self.runs["kind"] == "main", "seed"].unique().tolist())

    def main_scores(self) -> pd.DataFrame:
        """recipe x seed: the trial score at the budget (a sweep's final value)."""
        main = self.runs[self.runs["kind"] == "main"]
        return main.pivot(index="recipe", columns="seed", values="score").sort_index()

    def transfer_scores(self) -> pd.DataFrame:
        """recipe x seed: the shipped score at the longer budget."""
        t = self.runs[self.runs["kind"] == "transfer"]
        return t.pivot(index="recipe", columns="seed", values="score").sort_index()

    def transfer_noise_floor(self) -> float:
        """The median over recipes of the seed-to-seed standard deviation at the longer budget."""
        return float(self.transfer_scores().std(axis=1).median())

    def rung_values(self, fidelity: str = "snapshot") -> pd.DataFrame:
        """(recipe, seed) x rung: the value a sweep would report at each recorded rung under the
        fidelity. A run that diverged before a rung gets the penalty there, as a sweep reports."""
        if fidelity == "snapshot":
            c = self.curves[self.curves["kind"] == "main"]
            frame = c.pivot_table(index=["recipe", "seed"], columns="step", values="snapshot_bpb", aggfunc="first")
            frame = frame.reindex(columns=list(self.rungs))
        elif fidelity == "probe":  # main runs branch probes off (format 1: runs of their own)
            c = self.curves[self.curves["kind"].isin(["main", "probe"]) & self.curves["probe_bpb"].notna()]
            frame = c.pivot_table(index=["recipe", "seed"], columns="step", values="probe_bpb", aggfunc="first")
            frame = frame.reindex(columns=sorted(frame.columns))
        elif fidelity == "restart":
            r = self.runs[self.runs["kind"] == "restart"]
            frame = r.pivot_table(index=["recipe", "seed"], columns="iterations", values="score", aggfunc="first")
            frame = frame.reindex(columns=self.fidelity_rungs)
        else:
            raise JepatuneError(f"fidelity {fidelity!r}: the benchmark records snapshot, probe and restart")
        if frame.empty:
            raise JepatuneError(f"the benchmark has no {fidelity} values; record it with --probe-steps above 0 and "
                                f"--fidelity-seeds above 0")
        frame.columns = [int(c) for c in frame.columns]
        return frame.astype(float).fillna(PENALTY_BPB)

    @property
    def fidelity_rungs(self) -> list[int]:
        """The restart rungs (format 1: the probe rungs too)."""
        return [int(r) for r in self.info["fidelity_rungs"]]

    def fidelity_recipes(self) -> tuple[list[int], list[int]]:
        """(recipes, seeds) that have values in all three fidelities (format 1: the transfer subset, seed 0)."""
        have = [set(self.rung_values(f).index) for f in ("snapshot", "probe", "restart")]
        both = sorted(set.intersection(*have))
        return sorted({r for r, _ in both}), sorted({k for _, k in both})

    @property
    def probe_steps(self) -> int:
        return int(self.info["settings"]["probe_steps"])

    def describe(self) -> str:
        s = self.info["settings"]
        kinds = self.runs["kind"].value_counts().to_dict()
        if "sweep" in self.info:
            return (f"the {len(self.recipes)} trials of sweep {self.info['sweep']} that ran to the end ({s['space']!r} "
                    f"space, {self.budget}-step budget, rungs {list(self.rungs)}): one seed, so no seed noise and no "
                    f"noise floor; pruned trials are left out (see jepatune/benchmark/from_sweep.py)")
        return (f"{len(self.recipes)} recipes of the {s['space']!r} space ({s.get('preset') or 'default'} preset), "
                f"{len(self.seeds)} seeds, {self.budget}-step budget, rungs {list(self.rungs)}; runs: "
                + ", ".join(f"{k} {kinds[k]}" for k in ("main", "transfer", "probe", "restart") if k in kinds))


def load_benchmark(folder: str | Path) -> Benchmark:
    folder = Path(folder)
    info_path = folder / BENCHMARK_NAME
    if not info_path.is_file():
        hint = (" (a recording in progress or cut short: finish it with `jepatune benchmark record --resume`)"
                if (folder / RECORDS_NAME).exists() else "")
        raise JepatuneError(f"{folder} holds no {BENCHMARK_NAME}{hint}; give a benchmark folder")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    tables = {name: pd.read_parquet(folder / name) for name in (RECIPES_NAME, RUNS_NAME, CURVES_NAME)}
    return Benchmark(info, tables[RECIPES_NAME], tables[RUNS_NAME], tables[CURVES_NAME])

