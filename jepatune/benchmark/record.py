"""Record a benchmark: recipes drawn to cover a space, each trained for real, every value a sweep sees.

The plan, for a space, a base recipe (a model preset, knobs, data) and a trial budget B:

1. Recipes: the space's reference point, CE from step 0 (no JEPA stage, no bridge; the other
   parameters the reference's) when the space has those parameters, then a Latin hypercube over
   the space's unit cube (`Dim.from_unit`), so that every parameter's range is covered evenly.
   Infeasible points are dropped.
2. Recipe after recipe, for every seed (the base's seed + k, as an ablation pairs seeds):
   - its `main` run, built exactly as a sweep builds a trial (`experiment.trials.trial_config`: the
     budget B, evaluations at every rung of the recorded ladders), scored as a trial is scored (the
     shipped weights, after the int8+zlib round trip, on the val prefix). Each rung's value is the
     `snapshot` fidelity; a k-step cool-down branched off at each rung and undone gives the `probe`
     fidelity in the same run (undone to the bit: the running model, the data it reads and the
     score are those of a run without probes);
   - its `restart` runs, for the first `fidelity_seeds` seeds: one run per rung r with
     `iterations=r`, the third fidelity.
3. Once they are in, `refine_recipes` more recipes near the best ones (`refine`: Latin hypercubes
   of half-width `refine_width` in the unit cube around the best quarter as many recipes), each
   recorded as in 2, so the surrogate has close neighbours where a sampler ends up.
4. Then a transfer subset (the reference, CE from 0, the best recipes by their
   mean score and others spread over the ranks) is trained at `transfer_factor` x B (`transfer`: the
   final budget, scored as a trial is; on the full val split each score would cost more than the
   training at the demo's shape).

Runs go to a local process pool (one torch thread each), or with `ray` to Ray tasks: the runner is
passed in (`jepatune.search.record_on_ray` is the Ray one), so this layer does not import Ray. Every
finished run is one line of OUT/records.jsonl, appended as it lands, with the kind of CPU it ran on
(its floats are that CPU's: `trainer.runtime.cpu_kind`): a crash loses only the runs in flight, and
`--resume` trains only what is missing. When every run is in, the Parquet tables and benchmark.json
are written (`jepatune.benchmark.tables` reads them).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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
from jepatune.trainer.runtime import cpu_kind, same_cpu_kind

Record = dict[str, Any]
Runner = Callable[[list[Record]], Iterator[Record]]  # jobs -> their records, in the order they finish
RUNNER_SETTINGS = ("workers", "ray", "cpus_per_run", "gpus_per_run")  # this command's, not the recording's
FORMAT = 2  # 1: probes in runs of their own, probes and restarts for the transfer subset only


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


def ranked_recipes(main: pd.DataFrame) -> list[int]:
    """The recipes of the main runs, best mean score over seeds first."""
    return main.groupby("recipe")["score"].mean().sort_values().index.tolist()


def refine(space: Space, recipes: list[Record], main: pd.DataFrame, n: int, width: float, seed: int) -> list[Record]:
    """n recipes around the best recipes by mean score (a quarter of n of them, each the centre of
    as many points), from Latin hypercubes of half-width `width` in the unit cube; infeasible points
    are drawn again."""
    if n == 0:
        return []
    ranked = ranked_recipes(main)
    centres = [np.array([d.to_unit(recipes[i]["params"][d.name]) for d in space.dims])
               for i in ranked[:max(1, n // 4)]]
    points: list[dict[str, Any]] = []
    for attempt in range(20):
        offsets = (latin_hypercube(n, len(space.dims), seed + 1000 + attempt) * 2 - 1) * width
        for j, off in enumerate(offsets):
            p = {d.name: d.from_unit(u) for d, u in zip(space.dims, np.clip(centres[j % len(centres)] + off, 0, 1),
                                                        strict=True)}
            if len(points) < n and INFEASIBLE_KEY not in space.overrides(p):
                points.append(p)
        if len(points) == n:
            break
    else:
        raise JepatuneError(f"space {space.name!r}: fewer than {n} feasible points near the best recipes in 20 "
                            f"draws; record with fewer --refine-recipes or a wider --refine-width")
    first = len(recipes)
    return [{"recipe": first + i, "origin": "refine", "params": p, "knobs": space.overrides(p)}
            for i, p in enumerate(points)]


def all_recipes(records: list[Record]) -> list[Record]:
    """The design's recipes (in the meta record), then the refined ones once drawn."""
    refined = next((r["recipes"] for r in records if r.get("record") == "refine"), [])
    return records[0]["recipes"] + refined


# --- the runs ---------------------------------------------------------------------------------------

def job_key(job: Record) -> str:
    return f"{job['kind']}:{job['recipe']}:{job['seed']}:{job['iterations']}"


def main_jobs(s: RecordSettings, base: TrainConfig, recipes: list[Record]) -> list[Record]:
    """Recipe after recipe, every seed's main run then its restarts: a benchmark cut short still holds
    whole recipes."""
    jobs = []
    for r in recipes:
        jobs += [job(base, r, "main", k, s.trial_steps, s.rungs(), s.probe_steps) for k in range(s.seeds)]
        jobs += [job(base, r, "restart", k, rung) for k in range(s.fidelity_seeds)
                 for rung in s.restart_rungs()]
    return jobs


def transfer_jobs(s: RecordSettings, base: TrainConfig, recipes: list[Record], subset: list[int]) -> list[Record]:
    return [job(base, recipes[i], "transfer", k, s.trial_steps * s.transfer_factor)
            for i in subset for k in range(s.transfer_seeds)]


def job(base: TrainConfig, recipe: Record, kind: str, k: int, iterations: int, rungs: tuple[int, ...] = (),
        probe_steps: int = 0) -> Record:
    """One run of a recipe (`{"recipe": id, "knobs": {...}}`) with seed base + k, built as a sweep builds a
    trial: what `run_job` trains."""
    knobs = {key: v for key, v in recipe["knobs"].items() if key != INFEASIBLE_KEY}
    config = trial_config(base.to_dict(), knobs, iterations, rungs, probe_steps).replace(seed=base.seed + k)
    return {"kind": kind, "recipe": recipe["recipe"], "seed": k, "iterations": iterations, "train": config.to_dict()}


def transfer_subset(recipes: list[Record], main: pd.DataFrame, n: int) -> list[int]:
    """The reference and CE from 0, the best recipes by mean score (two thirds of the subset), the rest
    spread evenly over the ranks below them."""
    if n == 0:
        return []
    ranked = ranked_recipes(main)
    chosen = [r["recipe"] for r in recipes if r["origin"] in ("reference", "ce-from-0")][:n]
    for i in ranked[: max(0, 2 * n // 3)]:
        if len(chosen) < n and i not in chosen:
            chosen.append(i)
    rest = [i for i in ranked if i not in chosen]
    if rest and len(chosen) < n:
        picks = np.linspace(0, len(rest) - 1, n - len(chosen)).round().astype(int)
        chosen += [rest[j] for j in dict.fromkeys(picks.tolist())]
    return chosen[:n]


def run_job(job: Record) -> Record:
    """Train one run and return its record."""
    import torch

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
           "seconds": round(time.perf_counter() - t0, 2), "cpu": cpu_kind()}
    if config.device != "cpu" and torch.cuda.is_available():  # trained there ("auto" or "cuda")
        rec["gpu"] = torch.cuda.get_device_name()  # on a GPU its kernels round too
    return rec


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def machine() -> Record:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_kind()}


def process_pool(workers: int) -> Runner:
    """Runs in `workers` local processes of one torch thread each (two threads on a small shared
    machine are slower and far less steady than two processes of one)."""
    def run(jobs: list[Record]) -> Iterator[Record]:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=one_thread) as pool:
            for future in as_completed([pool.submit(run_job, j) for j in jobs]):
                yield future.result()
    return run


def append_record(records_path: Path, rec: Record) -> None:
    """One line of records.jsonl, written as soon as it exists (a crash cuts at most this line)."""
    with open(records_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def run_jobs(jobs: list[Record], records_path: Path, runner: Runner, log: Callable[[str], None]) -> list[Record]:
    if not jobs:
        return []
    t0, out = time.perf_counter(), []
    for done, rec in enumerate(runner(jobs), 1):
        append_record(records_path, rec)
        out.append(rec)
        elapsed = time.perf_counter() - t0
        log(f"[{done}/{len(jobs)}] {rec['kind']} recipe {rec['recipe']} seed {rec['seed']} "
            f"{rec['iterations']} steps: {rec['score']:.4f} ({rec['seconds']:.0f}s; "
            f"{elapsed / done * (len(jobs) - done) / 60:.0f} min left)")
    return out


def cpu_kinds(records: Iterable[Record]) -> list[Record]:
    """The kinds of CPU the runs ran on, with how many runs each (a record without one: unknown)."""
    kinds: list[Record] = []
    for r in records:
        if r.get("record") != "run":
            continue
        cpu = r.get("cpu") or {}
        entry = next((k for k in kinds if k["cpu"] == cpu), None)
        if entry is None:
            kinds.append(entry := {"cpu": cpu, "runs": 0})
        entry["runs"] += 1
    return kinds


# --- the whole recording ----------------------------------------------------------------------------

def record_benchmark(s: RecordSettings, *, resume: bool = False, log: Callable[[str], None] = print,
                     runner: Runner | None = None) -> Path:
    """Record (or, with `resume`, finish recording) the benchmark in `s.out`; returns the folder.
    `runner` trains the runs (default: a local process pool of `s.workers`)."""
    from jepatune.corpora import build_demo

    s.check()
    out = Path(s.out)
    records_path = out / RECORDS_NAME
    if records_path.exists() and not resume:
        raise JepatuneError(f"{out} already holds a benchmark recording; add --resume to finish it, or choose "
                            f"another --out")
    if resume and not records_path.exists():
        raise JepatuneError(f"--resume: {out} holds no recording ({RECORDS_NAME}); start one without --resume")
    where = "Ray tasks" if s.ray else f"{s.workers} processes"  # `ray` is the command's, also on --resume
    runner = runner or process_pool(s.workers)
    if resume:
        records = read_records(records_path)
        meta = records[0]
        if meta.get("format", 1) != FORMAT:
            raise JepatuneError(f"{records_path}: recorded in format {meta.get('format', 1)} (probes in runs of their "
                                f"own, for the transfer subset only); it can be read and simulated but not resumed "
                                f"by this version: record it anew into another --out")
        # A line cut by a crash is dropped from the file too, before new runs are appended after it.
        atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
        s = RecordSettings(**{**meta["settings"], "out": str(out), **{k: getattr(s, k) for k in RUNNER_SETTINGS}})
        recipes = meta["recipes"]
        here = cpu_kind()
        others = [k["cpu"] for k in cpu_kinds(records) if not same_cpu_kind(k["cpu"], here)]
        if others and not s.ray:  # the runs will be this machine's
            log(f"warning: runs of this recording ran on {others}, this machine is {here}: its runs will differ from "
                f"theirs as two seeds do (last-bit float differences grow over the steps); the tables list each "
                f"run's kind of CPU")
    if not any(Path(s.data).glob("*_val_*.bin")):  # no shards given: the demo corpus, as `jepatune demo` builds it
        build_demo(s.data)
    base = base_config(s)
    if not resume:
        recipes = design(get_space(s.space, base=base), s.recipes, s.seed)
        meta = {"record": "meta", "format": FORMAT, "settings": _jsonable(asdict(s)), "recipes": recipes,
                "base": base.to_dict(), "rungs": list(s.rungs()), "fidelity_rungs": list(s.restart_rungs()),
                "command": " ".join(sys.argv), "machine": machine(), "started": _now()}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(records_path, json.dumps(meta) + "\n")
        records = [meta]
    done = {job_key(r) for r in records[1:] if r.get("record") == "run"}
    t0 = time.perf_counter()
    log(f"recording {len(recipes)} recipes of the {s.space!r} space x {s.seeds} seeds, {s.trial_steps} steps, rungs "
        f"{list(s.rungs())}" + (f" with {s.probe_steps}-step probes" if s.probe_steps else "")
        + f", restarts at {list(s.restart_rungs())} for {s.fidelity_seeds} seeds, on {where}; {len(done)} runs "
        f"already in")
    main = [j for j in main_jobs(s, base, recipes) if job_key(j) not in done]
    records += run_jobs(main, records_path, runner, log)
    if s.refine_recipes and not any(r.get("record") == "refine" for r in records):
        runs = runs_frame(records)
        drawn = refine(get_space(s.space, base=base), recipes, runs[runs["kind"] == "main"], s.refine_recipes,
                       s.refine_width, s.seed)
        records.append(line := {"record": "refine", "recipes": drawn})
        append_record(records_path, line)
    refined = all_recipes(records)[len(recipes):]
    if refined:
        log(f"refine: {len(refined)} recipes near the best {max(1, len(refined) // 4)}, within {s.refine_width} of "
            f"them in the unit cube")
    records += run_jobs([j for j in main_jobs(s, base, refined) if job_key(j) not in done], records_path, runner, log)
    recipes = all_recipes(records)
    runs = runs_frame(records)
    subset = transfer_subset(recipes, runs[runs["kind"] == "main"], s.transfer_recipes)
    later = [j for j in transfer_jobs(s, base, recipes, subset) if job_key(j) not in done]
    log(f"transfer subset: {len(subset)} recipes at {s.transfer_factor}x ({s.trial_steps * s.transfer_factor} steps): "
        f"{len(later)} runs")
    records += run_jobs(later, records_path, runner, log)
    kinds = cpu_kinds(records)
    if len(kinds) > 1:
        log(f"warning: the runs ran on {len(kinds)} kinds of CPU ({', '.join(str(k['cpu']) for k in kinds)}); "
            f"benchmark.json lists them")
    write_tables(out, records, {"finished": _now(), "wall_s": round(time.perf_counter() - t0, 1),
                                "machine_end": machine(), "transfer_subset": subset, "cpus": kinds})
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
                             **{f"knob:{k}": v for k, v in r["knobs"].items()}} for r in all_recipes(records)])
    curves = pd.DataFrame([{"kind": r["kind"], "recipe": r["recipe"], "seed": r["seed"], "iterations": r["iterations"],
                            **p} for r in records[1:] if r.get("record") == "run" for p in r["points"]],
                          columns=["kind", "recipe", "seed", "iterations", "step", "snapshot_bpb", "probe_bpb"])
    write_parquet(recipes, out / RECIPES_NAME)
    write_parquet(runs.drop(columns="seconds"), out / RUNS_NAME)
    write_parquet(curves.astype({"snapshot_bpb": float, "probe_bpb": float}), out / CURVES_NAME)
    info = {k: v for k, v in meta.items() if k not in ("record", "recipes")}
    info["settings"] = {**info["settings"], "out": str(out)}  # where it was written, also after a resume elsewhere
    info.update(end, runs=len(runs), train_seconds=round(float(runs["seconds"].sum()), 1))
    atomic_write_text(out / BENCHMARK_NAME, json.dumps(info, indent=1) + "\n")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
