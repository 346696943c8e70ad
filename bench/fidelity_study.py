"""Fidelity study: which rung value lets ASHA stop curriculum trials without losing the best one.

On the demo proxy (the `demo` preset on the demo corpus, a 120-step budget) it samples configs from
the `curriculum` space (Optuna's random sampler, seeded; the reference recipe first), trains each
to its full budget with `probe_steps=k` (so every rung has the running model's BPB, `snapshot`,
and the BPB after a k-step pure-CE cool-down, `probe`) and once per rung r with `iterations=r`
(`restart`: the whole curriculum compressed into r steps). Then, per fidelity and rung, the
Spearman correlation with the final BPB, and by replaying ASHA over random arrival orders
(`jepatune.analysis.replay`) per (grace, reduction factor): how often the truly best config is
stopped, what the best kept one loses, and the compute spent.

    python bench/fidelity_study.py                                # 24 configs, 2 processes
    python bench/fidelity_study.py --quick                        # 3 configs on a 40-step budget
    python bench/fidelity_study.py --from-records runs/fidelity/records.jsonl   # tables only
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from jepatune.analysis.explore import spearman  # noqa: E402
from jepatune.analysis.replay import fidelity_cost, milestones, orders_summary, replay_permutations  # noqa: E402
from jepatune.atomic import atomic_write_text  # noqa: E402
from jepatune.benchmark.record import machine  # noqa: E402
from jepatune.errors import JepatuneError  # noqa: E402
from jepatune.experiment.fidelity import default_grace  # noqa: E402

Record = dict[str, Any]
MODES = ("snapshot", "probe", "restart")
PENALTY_BPB = 10.0  # = jepatune.search.trainable.PENALTY_BPB (that module imports Ray): a diverged run's value


# --- the plan: configs and runs -----------------------------------------------------------------

def ladders(budget: int, graces: Iterable[int], factors: Iterable[int]) -> dict[tuple[int, int], tuple[int, ...]]:
    """ASHA's milestones for every (grace, reduction factor) compared."""
    return {(g, rf): milestones(budget, g, rf) for g, rf in itertools.product(graces, factors)}


def base_config(data: Path, budget: int, rungs: tuple[int, ...], probe_steps: int):
    from jepatune.trainer.config import PRESETS, TrainConfig

    return TrainConfig.from_dict({**PRESETS["demo"], "data_path": str(data), "iterations": budget, "eval_steps": rungs,
                                  "val_loss_every": 0, "probe_steps": probe_steps})


def sample_configs(base, n: int, seed: int) -> list[Record]:
    """The reference recipe, then n - 1 random feasible points of the `curriculum` space."""
    import optuna

    from jepatune.spaces import INFEASIBLE_KEY, get_space
    from jepatune.trainer.loop import trainer_code_bytes

    space = get_space("curriculum", base=base, code_bytes=trainer_code_bytes())
    reference = space.reference_point()
    out = [{"config": 0, "reference": True, "params": reference, "overrides": space.overrides(reference)}]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while len(out) < n:
        trial = study.ask()
        overrides = space.sample(trial)
        if INFEASIBLE_KEY not in overrides:
            out.append({"config": len(out), "reference": False, "params": trial.params, "overrides": overrides})
    return out


def plan_runs(configs: list[Record], base, budget: int, rungs: tuple[int, ...]) -> list[Record]:
    """Per config, one full run with probes, then one compressed run per rung (longest first): configs
    complete one after another, so the records of a stopped study still hold whole configs."""
    jobs = []
    for c in configs:
        full = base.replace(**c["overrides"])
        jobs.append({"config": c["config"], "kind": "main", "iterations": budget, "train": full.to_dict()})
        for r in sorted(rungs, reverse=True):
            short = full.replace(iterations=r, eval_steps=(), probe_steps=0)
            jobs.append({"config": c["config"], "kind": "restart", "iterations": r, "train": short.to_dict()})
    return jobs


def run_job(job: Record) -> Record:
    """Train one run (in a worker process, on one torch thread) and return its record."""
    from jepatune.trainer.config import TrainConfig
    from jepatune.trainer.loop import train

    t0 = time.perf_counter()
    config = TrainConfig.from_dict(job["train"])
    result = train(config, final_score=False)
    points = [{k: h.get(k) for k in ("step", "val_bpb", "probe_bpb", "compute_steps")}
              for h in result.history if not h.get("final")]
    final = result.summary["val_bpb"] if result.status == "completed" else PENALTY_BPB
    return {"record": "run", "config": job["config"], "kind": job["kind"], "iterations": job["iterations"],
            "probe_steps": config.probe_steps, "status": result.status, "final": final, "points": points,
            "seconds": round(time.perf_counter() - t0, 2)}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_study(args: argparse.Namespace) -> list[Record]:
    from jepatune.corpora import build_demo

    data = args.data or Path(args.records).parent / "data"
    build_demo(data)
    rungs = tuple(sorted({m for ms in ladders(args.steps, args.graces, args.factors).values() for m in ms}))
    base = base_config(Path(data).resolve(), args.steps, rungs, args.probe_steps)
    configs = sample_configs(base, args.configs, args.seed)
    jobs = plan_runs(configs, base, args.steps, rungs)
    meta = {"record": "meta", "machine": {**machine(), "date": datetime.datetime.now().isoformat(timespec="seconds")},
            "command": " ".join(sys.argv), "budget": args.steps,
            "rungs": list(rungs), "probe_steps": args.probe_steps, "graces": args.graces, "factors": args.factors,
            "seed": args.seed, "workers": args.workers, "configs": configs}
    partial = Path(f"{args.records}.partial")  # every finished run, appended as it lands, in case of a crash
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(meta) + "\n")
    print(f"{len(configs)} configs, {len(jobs)} runs on {args.workers} processes; rungs {list(rungs)}, "
          f"probe {args.probe_steps} steps; load {meta['machine']['load']}", flush=True)
    t0, records = time.perf_counter(), [meta]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(run_job, j) for j in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            rec = future.result()
            records.append(rec)
            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[{done}/{len(jobs)}] config {rec['config']} {rec['kind']} {rec['iterations']}: "
                  f"{rec['final']:.4f} ({rec['seconds']:.0f}s, {time.perf_counter() - t0:.0f}s in all)", flush=True)
    records.append({"record": "end", "wall_s": round(time.perf_counter() - t0, 1),
                    "load": [round(x, 2) for x in os.getloadavg()]})
    atomic_write_text(args.records, "".join(json.dumps(r) + "\n" for r in records))
    partial.unlink()
    return records


# --- the tables ---------------------------------------------------------------------------------------

def read_records(path: Path) -> list[Record]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise JepatuneError(f"records file {path} cannot be read ({e.strerror or e}); give a file this script "
                            f"wrote") from None
    records = [json.loads(line) for line in lines if line.strip()]
    if not records or records[0].get("record") != "meta":
        raise JepatuneError(f"records file {path} does not start with the study's meta record; give a file this "
                            f"script wrote")
    return records


class Study:
    """The recorded values as frames: final BPB per config, and per mode a configs x rungs frame."""

    def __init__(self, records: list[Record]):
        self.meta = records[0]
        self.budget, self.k = self.meta["budget"], self.meta["probe_steps"]
        self.rungs = tuple(self.meta["rungs"])
        runs = [r for r in records if r.get("record") == "run"]
        have: dict[int, set] = {}
        for r in runs:
            have.setdefault(r["config"], set()).add((r["kind"], r["iterations"]))
        # Only configs with every run: the records of a study stopped early still give whole tables.
        need = {("main", self.budget), *(("restart", r) for r in self.rungs)}
        whole = {c for c, kinds in have.items() if need <= kinds}
        if len(whole) < 2:
            raise JepatuneError(f"the records hold {len(whole)} config(s) with all their runs; the tables need 2")
        runs = [r for r in runs if r["config"] in whole]
        main = {r["config"]: r for r in runs if r["kind"] == "main"}
        self.final = pd.Series({c: float(r["final"]) for c, r in main.items()}).sort_index()
        self.values = {"snapshot": self._points(main, "val_bpb"), "probe": self._points(main, "probe_bpb"),
                       "restart": pd.DataFrame({c: {r["iterations"]: float(r["final"]) for r in runs
                                                    if r["kind"] == "restart" and r["config"] == c}
                                                for c in self.final.index}).T.reindex(columns=list(self.rungs))}
        self.configs = pd.DataFrame([{"config": c["config"], "reference": c["reference"], **c["overrides"]}
                                     for c in self.meta["configs"]]).set_index("config").loc[self.final.index]

    def _points(self, main: dict[int, Record], key: str) -> pd.DataFrame:
        # A diverged run stops reporting: its later rungs get the penalty a sweep would report.
        rows = {c: {p["step"]: p[key] for p in r["points"] if p.get(key) is not None} for c, r in main.items()}
        frame = pd.DataFrame.from_dict(rows, orient="index").reindex(index=self.final.index, columns=list(self.rungs))
        return frame.astype(float).fillna(PENALTY_BPB)

    def alone_cost(self, mode: str, rung: int) -> int:
        """Steps to get a value at this rung alone: the run to it, plus one probe branch."""
        return rung + (self.k if mode == "probe" else 0)


def correlation_table(s: Study) -> pd.DataFrame:
    best = s.final.idxmin()
    rows = []
    for mode, rung in itertools.product(MODES, s.rungs):
        at = s.values[mode][rung]
        rows.append({"mode": mode, "rung": rung, "spearman": spearman(at, s.final),
                     "best_rank": int(at.rank(method="min")[best]), "steps": s.alone_cost(mode, rung)})
    return pd.DataFrame(rows)


def asha_table(s: Study, graces: list[int], factors: list[int], orders: int, seed: int) -> pd.DataFrame:
    n = len(s.final)
    jepa = s.configs["jepa_pure_frac"]
    rows = [{"mode": "none", "grace": "-", "rf": "-", "milestones": "-", "kept": n, "best_stopped": 0.0,
             "best_kept_rank": 1.0, "regret": 0.0, "jepa_kept": jepa.mean(), "compute": n * s.budget,
             "compute_frac": 1.0}]
    for mode, ((g, rf), ms) in itertools.product(MODES, ladders(s.budget, graces, factors).items()):
        replays = replay_permutations(s.values[mode][list(ms)], s.final, ms, rf, orders=orders, seed=seed)
        summary = orders_summary(replays, *fidelity_cost(mode, ms, s.budget, s.k), s.budget)
        kept = replays[replays["reached_end"].to_numpy()]
        rows.append({"mode": mode, "grace": g, "rf": rf, "milestones": ",".join(map(str, ms)),
                     **{k: summary[k] for k in ("kept", "best_stopped", "best_kept_rank", "regret", "compute",
                                                "compute_frac")},
                     "jepa_kept": kept["trial"].map(jepa).astype(float).mean()})
    return pd.DataFrame(rows)[list(rows[0])]


def configs_table(s: Study, top: int = 5) -> pd.DataFrame:
    table = s.configs.assign(final=s.final, rank=s.final.rank(method="min").astype(int)).sort_values("final")
    keep = table.head(top).index.union(table.index[table["reference"]], sort=False)
    columns = ["rank", "final", "reference", "jepa_pure_frac", "ce_pure_frac", "sigreg_weight", "swa_enabled",
               "swa_start_frac"]
    return table.loc[keep, columns].reset_index()


def markdown(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def report(records: list[Record], orders: int, seed: int) -> str:
    s = Study(records)
    meta, end = s.meta, next((r for r in records if r.get("record") == "end"), {})
    runs = [r for r in records if r.get("record") == "run"]
    steps = sum(r["iterations"] + len(s.rungs) * s.k * (r["kind"] == "main") for r in runs)
    ended = (f"in {end['wall_s']:.0f} s on {meta['workers']} processes; load {meta['machine']['load']} at the "
             f"start, {end['load']} at the end") if end else (
        f"on {meta['workers']} processes, stopped early: {len(s.final)} of {len(meta['configs'])} configs have all "
        f"their runs; load {meta['machine']['load']} at the start")
    head = (f"{len(s.final)} configs of the curriculum space, demo preset, {s.budget}-step budget, rungs "
            f"{list(s.rungs)}, probe {s.k} steps; {steps:,} training steps (probes included) {ended}; "
            f"{orders} arrival orders per ASHA setting")
    return "\n\n".join([
        head,
        "configs (best first, and the reference):\n" + markdown(configs_table(s)),
        "rung values against the final BPB (best_rank: the truly best config's rank at the rung; steps: compute "
        "for that one value):\n" + markdown(correlation_table(s)),
        "ASHA replayed (means over the orders; compute in steps, frac: of running every config to the end; "
        "jepa_kept: mean jepa_pure_frac of the configs kept to the end):\n"
        + markdown(asha_table(s, meta["graces"], meta["factors"], orders, seed)),
    ])


# --- command line -------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=24, help="configs, the reference included (24)")
    p.add_argument("--steps", type=int, default=120, help="each config's full budget (120, the demo's)")
    p.add_argument("--graces", type=int_list, default=None, help="first rungs compared (budget/8 and budget/4)")
    p.add_argument("--factors", type=int_list, default=[2, 3], help="reduction factors compared (2,3)")
    p.add_argument("--probe-steps", type=int, default=8, help="steps of each probe branch (8)")
    p.add_argument("--orders", type=int, default=200, help="random arrival orders per ASHA setting (200)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's and the orders' seed")
    p.add_argument("--workers", type=int, default=2, help="processes, one torch thread each (2)")
    p.add_argument("--data", type=Path, default=None, help="demo corpus folder (built there when missing)")
    p.add_argument("--records", type=Path, default=Path("runs/fidelity/records.jsonl"), help="where records go")
    p.add_argument("--from-records", type=Path, default=None, help="print the tables of a records file; no training")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 configs, a 40-step budget, 3-step probes")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.steps, args.probe_steps, args.orders = 3, 40, 3, 20
    args.graces = args.graces or [max(1, args.steps // 8), default_grace(args.steps)]
    if args.configs < 2 or args.workers < 1 or args.probe_steps < 1:
        p.error("--configs must be at least 2, --workers and --probe-steps at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = read_records(args.from_records) if args.from_records else run_study(args)
        print(report(records, args.orders, args.seed))
    except JepatuneError as e:
        print(f"fidelity_study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
