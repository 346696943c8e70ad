"""Record a benchmark: recipes drawn to cover a space, each trained for real, every value a sweep sees.

The plan, for a space, a base recipe (a model preset, knobs, data) and a trial budget B:

1. Recipes: the space's reference point, CE from step 0 (no JEPA stage, no bridge; the other
   parameters the reference's) when the space has those parameters, then a Latin hypercube over
   the space's unit cube (`Dim.from_unit`), so that every parameter's range is covered evenly.
   Infeasible points are dropped.
2. `main` runs: every recipe with every seed (the base's seed + k, as an ablation pairs seeds), built
   exactly as a sweep builds a trial (`experiment.trials.trial_config`: the budget B, evaluations at
   every rung of the recorded ladders), scored as a trial is scored (the shipped weights, after the
   int8+zlib round trip, on the val prefix). Each rung's value is the `snapshot` fidelity.
3. Once the main runs are in, a transfer subset (the reference, CE from 0, the best recipes by their
   mean score and others spread over the ranks) is trained at `transfer_factor` x B (`transfer`: the
   final budget, scored as a trial is; on the full val split each score would cost more than the
   training at the demo's shape), and, with `fidelity_seeds` seeds, with probes and restarts
   (`probe`: the main run again with k-step cool-downs at the rungs; `restart`: one run per rung r
   with `iterations=r`), so the other two fidelities have their values.

Every finished run is one line of OUT/records.jsonl, appended as it lands: a crash loses only the
runs in flight, and `--resume` trains only what is missing. When every run is in, the Parquet
tables and benchmark.json are written (`jepatune.benchmark.tables` reads them).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jepatune.analysis.tables import write_parquet
from jepatune.atomic import atomic_write_text
from jepatune.benchmark.settings import RecordSettings
from jepatune.benchmark.tables import BENCHMARK_NAME, CURVES_NAME, RECIPES_NAME, RECORDS_NAME, RUNS_NAME, read_records
from jepatune.errors import JepatuneError
from jepatune.experiment.settings import base_config
from jepatune.experiment.trials import PENALTY_BPB, trial_config
from jepatune.spaces import INFEASIBLE_KEY, Space, get_space
from jepatune.trainer.config import TrainConfig

Record = dict[str, Any]


# --- the design -------------------------------------------------------------------------------------

def latin_hypercube(n: int, d: int, seed: int) -> np.ndarray:
    """n points in [0, 1]^d, one in each of the n equal slices of every coordinate."""
    rng = np.random.default_rng(seed)
    return np.stack([(rng.permutation(n) + rng.random(n)) / n for _ in range(d)], axis=1)


def ce_from_zero(space: Space) -> dict[str, Any] | None:
    """The reference's point with cross-entropy from step 0, when the space has the curriculum."""
    ref = space.reference_point()
    if not {"jepa_pure_frac", "bridge_share"} <= set(ref):
        return None
    return {**ref, "jepa_pure_frac": 0.0, "bridge_share": 0.0}


def design(space: Space, n: int, seed: int) -> list[Record]:
    """The recipes: reference, CE from 0, then Latin-hypercube points until there are n feasible ones."""
    points = [("reference", space.reference_point())]
    if (ce0 := ce_from_zero(space)) is not None:
        points.append(("ce-from-0", ce0))
    need = n - len(points)
    for attempt in range(20):  # a design with infeasible points is drawn again, with the next seed
        unit = latin_hypercube(need, len(space.dims), seed + attempt)
        draws = [p for p in ({d.name: d.from_unit(u) for d, u in zip(space.dims, row, strict=True)} for row in unit)
                 if INFEASIBLE_KEY not in space.overrides(p)]
        if len(draws) == need:
            break
    else:
        raise JepatuneError(f"space {space.name!r}: fewer than {n} feasible points in 20 designs; record fewer "
                            f"recipes or widen the space")
    points += [("design", p) for p in draws]
    return [{"recipe": i, "origin": origin, "params": params, "knobs": space.overrides(params)}
            for i, (origin, params) in enumerate(points)]


# --- the runs ---------------------------------------------------------------------------------------

def job_key(job: Record) -> str:
    return f"{job['kind']}:{job['recipe']}:{job['seed']}:{job['iterations']}"


def main_jobs(s: RecordSettings, base: TrainConfig, recipes: list[Record]) -> list[Record]:
    """Recipe after recipe, every seed: a benchmark cut short still holds whole recipes."""
    return [_job(s, base, r, "main", k, s.trial_steps, s.rungs(), 0) for r in recipes for k in range(s.seeds)]


def followup_jobs(s: RecordSettings, base: TrainConfig, recipes: list[Record], subset: list[int]) -> list[Record]:
    fid = s.default_rungs()
    jobs = []
    for i in subset:
        r = recipes[i]
        for k in range(s.transfer_seeds):
            jobs.append(_job(s, base, r, "transfer", k, s.trial_steps * s.transfer_factor, (), 0))
        for k in range(s.fidelity_seeds):
            jobs.append(_job(s, base, r, "probe", k, s.trial_steps, fid, s.probe_steps))
            jobs += [_job(s, base, r, "restart", k, rung, (), 0) for rung in fid]
    return jobs


def _job(s: RecordSettings, base: TrainConfig, recipe: Record, kind: str, k: int, iterations: int,
         rungs: tuple[int, ...], probe_steps: int) -> Record:
    knobs = {key: v for key, v in recipe["knobs"].items() if key != INFEASIBLE_KEY}
    config = trial_config(base.to_dict(), knobs, iterations, rungs, probe_steps).replace(seed=base.seed + k)
    return {"kind": kind, "recipe": recipe["recipe"], "seed": k, "iterations": iterations, "train": config.to_dict()}


def transfer_subset(recipes: list[Record], main: pd.DataFrame, n: int) -> list[int]:
    """The reference and CE from 0, the best recipes by mean score (two thirds of the subset), the rest
    spread evenly over the ranks below them."""
    if n == 0:
        return []
    ranked = main.groupby("recipe")["score"].mean().sort_values().index.tolist()
    chosen = [r["recipe"] for r in recipes if r["origin"] != "design"][:n]
    for i in ranked[: max(0, 2 * n // 3)]:
        if len(chosen) < n and i not in chosen:
            chosen.append(i)
    rest = [i for i in ranked if i not in chosen]
    if rest and len(chosen) < n:
        picks = np.linspace(0, len(rest) - 1, n - len(chosen)).round().astype(int)
        chosen += [rest[j] for j in dict.fromkeys(picks.tolist())]
    return chosen[:n]


def run_job(job: Record) -> Record:
    """Train one run (in a worker process, on one torch thread) and return its record."""
    from jepatune.trainer.loop import train

    t0 = time.perf_counter()
    config = TrainConfig.from_dict(job["train"])
    result = train(config, final_score=False)
    done = result.status == "completed"
    points = [{"step": h["step"], "snapshot_bpb": h.get("val_bpb"), "probe_bpb": h.get("probe_bpb")}
              for h in result.history if not h.get("final")]
    rec = {"record": "run", **{k: job[k] for k in ("kind", "recipe", "seed", "iterations")},
           "status": result.status, "score": result.summary["val_bpb"] if done else PENALTY_BPB,
           "compute_steps": result.summary.get("compute_steps", result.step), "points": points,
           "seconds": round(time.perf_counter() - t0, 2)}
    return rec


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def machine() -> Record:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load": [round(x, 2) for x in os.getloadavg()]}


def run_jobs(jobs: list[Record], records_path: Path, workers: int, log: Callable[[str], None]) -> list[Record]:
    if not jobs:
        return []
    t0, out = time.perf_counter(), []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(run_job, j) for j in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            rec = future.result()
            with open(records_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            out.append(rec)
            elapsed = time.perf_counter() - t0
            log(f"[{done}/{len(jobs)}] {rec['kind']} recipe {rec['recipe']} seed {rec['seed']} "
                f"{rec['iterations']} steps: {rec['score']:.4f} ({rec['seconds']:.0f}s; "
                f"{elapsed / done * (len(jobs) - done) / 60:.0f} min left)")
    return out


# --- the whole recording ----------------------------------------------------------------------------

def record_benchmark(s: RecordSettings, *, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Record (or, with `resume`, finish recording) the benchmark in `s.out`; returns the folder."""
    from jepatune.corpora import build_demo

    s.check()
    out = Path(s.out)
    records_path = out / RECORDS_NAME
    if records_path.exists() and not resume:
        raise JepatuneError(f"{out} already holds a benchmark recording; add --resume to finish it, or choose "
                            f"another --out")
    if resume and not records_path.exists():
        raise JepatuneError(f"--resume: {out} holds no recording ({RECORDS_NAME}); start one without --resume")
    if not any(Path(s.data).glob("*_val_*.bin")):  # no shards given: the demo corpus, as `jepatune demo` builds it
        build_demo(s.data)
    base = base_config(s)
    space = get_space(s.space, base=base)
    if resume:
        records = read_records(records_path)
        # A line cut by a crash is dropped from the file too, before new runs are appended after it.
        atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
        meta = records[0]
        s = RecordSettings(**{**meta["settings"], "workers": s.workers})
        recipes = meta["recipes"]
    else:
        recipes = design(space, s.recipes, s.seed)
        meta = {"record": "meta", "settings": _jsonable(asdict(s)), "recipes": recipes, "base": base.to_dict(),
                "rungs": list(s.rungs()), "fidelity_rungs": list(s.default_rungs()), "command": " ".join(sys.argv),
                "machine": machine(), "started": _now()}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(records_path, json.dumps(meta) + "\n")
        records = [meta]
    done = {job_key(r) for r in records[1:] if r.get("record") == "run"}
    t0 = time.perf_counter()
    log(f"recording {len(recipes)} recipes of the {s.space!r} space x {s.seeds} seeds, {s.trial_steps} steps, rungs "
        f"{list(s.rungs())}, on {s.workers} processes; {len(done)} runs already in")
    main = [j for j in main_jobs(s, base, recipes) if job_key(j) not in done]
    records += run_jobs(main, records_path, s.workers, log)
    runs = runs_frame(records)
    subset = transfer_subset(recipes, runs[runs["kind"] == "main"], s.transfer_recipes)
    later = [j for j in followup_jobs(s, base, recipes, subset) if job_key(j) not in done]
    log(f"transfer subset: {len(subset)} recipes at {s.transfer_factor}x ({s.trial_steps * s.transfer_factor} steps), "
        f"with probes and restarts at {list(s.default_rungs())}: {len(later)} runs")
    records += run_jobs(later, records_path, s.workers, log)
    write_tables(out, records, {"finished": _now(), "wall_s": round(time.perf_counter() - t0, 1),
                                "machine_end": machine(), "transfer_subset": subset})
    return out


def runs_frame(records: Iterable[Record]) -> pd.DataFrame:
    columns = ["kind", "recipe", "seed", "iterations", "status", "score", "compute_steps", "seconds"]
    rows = [{k: r.get(k) for k in columns} for r in records if r.get("record") == "run"]
    return pd.DataFrame(rows, columns=columns).astype({"recipe": int, "seed": int, "iterations": int, "score": float})


def write_tables(out: Path, records: list[Record], end: Record) -> None:
    """recipes, runs and curves as Parquet, then benchmark.json (written last: its presence says the
    tables are whole)."""
    meta = records[0]
    runs = runs_frame(records)
    recipes = pd.DataFrame([{"recipe": r["recipe"], "origin": r["origin"], **r["params"],
                             **{f"knob:{k}": v for k, v in r["knobs"].items()}} for r in meta["recipes"]])
    curves = pd.DataFrame([{"kind": r["kind"], "recipe": r["recipe"], "seed": r["seed"], "iterations": r["iterations"],
                            **p} for r in records[1:] if r.get("record") == "run" for p in r["points"]],
                          columns=["kind", "recipe", "seed", "iterations", "step", "snapshot_bpb", "probe_bpb"])
    write_parquet(recipes, out / RECIPES_NAME)
    write_parquet(runs.drop(columns="seconds"), out / RUNS_NAME)
    write_parquet(curves.astype({"snapshot_bpb": float, "probe_bpb": float}), out / CURVES_NAME)
    info = {k: v for k, v in meta.items() if k not in ("record", "recipes")}
    info.update(end, runs=len(runs), train_seconds=round(float(runs["seconds"].sum()), 1))
    atomic_write_text(out / BENCHMARK_NAME, json.dumps(info, indent=1) + "\n")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
