"""Driver scaling: the sweep driver's cost per trial at 100, 1,000 and 5,000 trials, beside stock Ray Tune.

The trials train nothing: each reports a made-up val_bpb (a smooth function of the sampled
knobs) at every ASHA rung at once, so the wall time is the driver's: the real
`RungAwareOptunaSearch` (TPE or random, from `jepatune.search.sweep.make_search`) suggesting
and being told results, the real `RecordingASHA` deciding and appending its decisions, the
per-trial terminal lines, and Ray Tune's own bookkeeping (starting each trial on a reused
worker, processing results, the experiment snapshot with Ray's back-off, as in `run_sweep`).
`start_s` is the time to the first trial's completion (Ray starting the worker processes);
`ms/trial` the wall time per trial after it (between the first and the last completion);
`searcher` and `asha` the milliseconds per trial spent inside those two; `last10%` the wall time
per trial over the last tenth of the trials, the marginal cost at that history size, and
`searcher_last10%` the searcher's share of it.

`--drivers jepatune,stock` runs, in the same process and on the same Ray, stock Ray Tune beside it:
Ray's own `OptunaSearch` (the same seeded multivariate TPE or random sampler, the same space and
reference point) and `ASHAScheduler` (the same rungs), no callbacks, with the same trivial
trainable, and prints jepatune's wall time per trial over stock's.

    python bench/driver_scaling.py                             # 100 and 1,000 trials, TPE and random
    python bench/driver_scaling.py --trials 1000,5000 --samplers tpe --drivers jepatune,stock
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_overhead import load, machine, print_table, start_ray  # noqa: E402

from jepatune.experiment.settings import SweepSettings  # noqa: E402
from jepatune.experiment.trials import METRIC, PENALTY_BPB, TIME_ATTR  # noqa: E402
from jepatune.search.progress import TrialLines  # noqa: E402
from jepatune.search.retention import DropEndedState  # noqa: E402
from jepatune.search.searcher import RecordingASHA  # noqa: E402
from jepatune.search.sweep import make_search  # noqa: E402
from jepatune.spaces import get_space  # noqa: E402
from jepatune.trainer.config import TrainConfig  # noqa: E402


def instant_trial(config: dict[str, Any], *, rungs: tuple[int, ...]) -> None:
    """Report every rung at once: a bowl over the sampled knobs that improves with the steps."""
    if "_infeasible" in config:
        tune.report({METRIC: PENALTY_BPB, TIME_ATTR: 0, "status": "infeasible"})
        return
    bowl = sum((math.log10(v) + 1 if k == "sigreg_weight" else v - 0.3) ** 2
               for k, v in config.items() if isinstance(v, float))
    for step in rungs:
        tune.report({METRIC: 3.0 + bowl + 8.0 / math.sqrt(step), TIME_ATTR: step,
                     "status": "completed" if step == rungs[-1] else "running"})


class TimedSearcher(ConcurrencyLimiter):
    """Tune's concurrency limiter, timing every call into the searcher it wraps, and noting when
    each trial completes."""

    def __init__(self, searcher: Searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.seconds, self.completed, self.spent = 0.0, [], []  # spent: searcher seconds at each completion

    def _timed(self, call, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def suggest(self, trial_id: str) -> dict | str | None:
        return self._timed(super().suggest, trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._timed(super().on_trial_result, trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._timed(super().on_trial_complete, trial_id, result=result, error=error)
        self.completed.append(time.perf_counter())
        self.spent.append(self.seconds)


class TimedDecisions:
    """Mixed into a scheduler: times its decisions (every result passes through `on_trial_result`)."""

    seconds = 0.0

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t0 = time.perf_counter()
        try:
            return super().on_trial_result(tune_controller, trial, result)
        finally:
            self.seconds += time.perf_counter() - t0


class TimedASHA(TimedDecisions, RecordingASHA):
    pass


class TimedStockASHA(TimedDecisions, ASHAScheduler):
    pass


def stock_search(settings: SweepSettings, space) -> tuple[Searcher, ASHAScheduler]:
    """Stock Ray Tune: its OptunaSearch and ASHAScheduler, with the sampler, space and rungs a sweep uses."""
    if settings.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials,
                                             multivariate=True)
    searcher = OptunaSearch(space=space.sample, metric=METRIC, mode="min", sampler=sampler,
                            points_to_evaluate=[space.reference_point()])
    scheduler = TimedStockASHA(time_attr=TIME_ATTR, max_t=settings.rungs[-1], grace_period=settings.rungs[0],
                               reduction_factor=settings.reduction_factor)
    return searcher, scheduler


def run_once(settings: SweepSettings, trials: int, driver: str = "jepatune") -> dict[str, Any]:
    space = get_space(settings.space, base=TrainConfig())
    settings.folder.mkdir(parents=True, exist_ok=True)
    if driver == "stock":
        searcher, scheduler = stock_search(settings, space)
        callbacks = []
    else:
        searcher, scheduler = make_search(replace(settings, samples=trials), space)
        scheduler.__class__ = TimedASHA  # the same object, its decisions timed
        callbacks = [TrialLines(trials, settings.trial_steps), DropEndedState()]
    timed = TimedSearcher(searcher, settings.concurrency)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(instant_trial, rungs=settings.rungs), {"cpu": 1, "gpu": 0}),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", search_alg=timed, scheduler=scheduler,
                                    num_samples=trials, max_concurrent_trials=settings.concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=settings.name, storage_path=settings.out, verbose=0, callbacks=callbacks))
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # the per-trial lines
        tuner.fit()
    wall = time.perf_counter() - t0
    done = timed.completed
    study = searcher._ot_study if driver == "stock" else searcher.study
    return {"driver": driver, "sampler": settings.sampler, "trials": trials, "told": len(study.trials), "wall_s": wall,
            "start_s": done[0] - t0, "ms/trial": per_trial_ms(done), "searcher": 1000 * timed.seconds / trials,
            "asha": 1000 * scheduler.seconds / trials, "last10%": per_trial_ms(done[-max(2, trials // 10):]),
            "searcher_last10%": per_trial_ms(timed.spent[-max(2, trials // 10):]),
            "load": load().removeprefix("load average ")}


def per_trial_ms(completed: list[float]) -> float | None:
    """Milliseconds between consecutive trial completions, on average (the workers' start-up left out)."""
    return 1000 * (completed[-1] - completed[0]) / (len(completed) - 1) if len(completed) > 1 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="100,1000", help="comma list of sweep sizes (default 100,1000)")
    p.add_argument("--samplers", default="tpe,random", help="comma list of tpe, random")
    p.add_argument("--space", default="curriculum")
    p.add_argument("--trial-steps", type=int, default=120, help="the rungs' budget (default 120: rungs 15..120)")
    p.add_argument("--startup-trials", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray slots (default 2)")
    p.add_argument("--drivers", default="jepatune", help="comma list of jepatune, stock (stock Ray Tune beside it)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    args.trials = [int(n) for n in args.trials.split(",") if n.strip()]
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    args.drivers = [s.strip() for s in args.drivers.split(",") if s.strip()]
    if not args.drivers or set(args.drivers) - {"jepatune", "stock"}:
        p.error("--drivers: jepatune and/or stock")
    if not args.trials or min(args.trials) < 1 or set(args.samplers) - {"tpe", "random"} or not args.samplers:
        p.error("--trials: positive counts; --samplers: tpe and/or random")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_ray(args.concurrency)
    print(f"{machine()}\ninstant trials on the '{args.space}' space, rungs at {args.trial_steps // 8} .. "
          f"{args.trial_steps} steps, {args.concurrency} at a time; ms per trial", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jepatune-driver-") as tmp:
        for n in args.trials:
            for sampler in args.samplers:
                for driver in args.drivers:
                    settings = SweepSettings(data=tmp, out=tmp, name=f"{driver}-{sampler}-{n}", space=args.space,
                                             trial_steps=args.trial_steps, concurrency=args.concurrency,
                                             startup_trials=args.startup_trials, sampler=sampler)
                    rows.append(run_once(settings, n, driver))
                    print(f"  {driver} {sampler} x {n:,}: {rows[-1]['wall_s']:.0f} s", flush=True)
    print_table(rows, ("driver", "sampler", "trials", "told", "wall_s", "start_s", "ms/trial", "searcher", "asha",
                       "last10%", "searcher_last10%", "load"))
    by = {(r["driver"], r["sampler"], r["trials"]): r for r in rows}
    for (driver, sampler, n), row in by.items():
        if driver == "jepatune" and (stock := by.get(("stock", sampler, n))) and stock["ms/trial"]:
            print(f"{sampler} x {n:,}: jepatune / stock driver seconds per trial = "
                  f"{row['ms/trial'] / stock['ms/trial']:.2f} (last tenth: "
                  f"{row['last10%'] / stock['last10%']:.2f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
