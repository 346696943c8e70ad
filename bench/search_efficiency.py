"""Search efficiency: random search vs TPE, each with and without ASHA, at equal compute.

Each strategy gets the same budget in training steps per repetition; a repetition is one real
sweep (the trial function, `RungAwareOptunaSearch` with a random or TPE sampler, `RecordingASHA`
or no scheduler: `jepatune.search.sweep.make_search`) on the demo corpus, with its own sampler
seed. A wrapper around the searcher counts the steps every trial has reported and stops launching
trials once the budget is spent; the trials then running finish, and their steps are counted too
(the `spent` column), but the comparison reads each curve only up to the budget. "Best" is the
lowest val_bpb of a trial that ran its full budget, found within that much compute; `to_best`
is the compute a run needed to come within --tolerance of the best value any run found.

    python bench/search_efficiency.py             # 4 strategies x 3 seeds, 8 trial budgets each (about 15 min)
    python bench/search_efficiency.py --quick     # 4 strategies x 1 seed, a smoke run (under 3 min)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_overhead import demo_data, load, machine, print_table, run_in_temp, start_ray  # noqa: E402

from jepatune.experiment.settings import SweepSettings, base_config
from jepatune.experiment.trials import METRIC, TIME_ATTR  # noqa: E402
from jepatune.search.sweep import make_search, make_trainable  # noqa: E402
from jepatune.spaces import get_space  # noqa: E402
from jepatune.trainer.loop import trainer_code_bytes  # noqa: E402

STRATEGIES = {"random": ("random", "none"), "random+asha": ("random", "asha"),
              "tpe": ("tpe", "none"), "tpe+asha": ("tpe", "asha")}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Ledger:
    """Steps reported per trial, and each full-budget result with the compute spent when it came."""

    trial_steps: int
    steps: dict[str, int] = field(default_factory=dict)
    finals: list[tuple[int, float]] = field(default_factory=list)  # (steps spent by then, val_bpb)
    done: set[str] = field(default_factory=set)

    @property
    def spent(self) -> int:
        return sum(self.steps.values())

    def add(self, trial_id: str, result: dict[str, Any] | None) -> None:
        if not result or TIME_ATTR not in result:
            return
        trained = 0 if result.get("cached") else int(result[TIME_ATTR])  # a cached recipe trains nothing
        self.steps[trial_id] = max(self.steps.get(trial_id, 0), trained)
        if trained >= self.trial_steps and result.get("status") == "completed" and trial_id not in self.done:
            self.done.add(trial_id)
            self.finals.append((self.spent, float(result[METRIC])))

    def best_within(self, compute: float) -> float:
        return min((v for spent, v in self.finals if spent <= compute), default=math.inf)

    def compute_to_reach(self, target: float, budget: int) -> int | None:
        best = math.inf
        for spent, v in self.finals:
            best = min(best, v)
            if spent <= budget and best <= target:
                return spent
        return None


class StepBudget(ConcurrencyLimiter):
    """Tune's concurrency limiter that also ends the search once the trials have reported
    `budget` training steps in all (the running trials finish)."""

    def __init__(self, searcher: Searcher, max_concurrent: int, budget: int, ledger: Ledger):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.budget, self.ledger = budget, ledger

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.ledger.spent >= self.budget:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.add(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ledger.add(trial_id, result)  # ASHA's stopping result arrives only here
        super().on_trial_complete(trial_id, result=result, error=error)


def run_once(settings: SweepSettings, budget: int) -> tuple[Ledger, float]:
    """One budgeted sweep; returns its ledger and wall seconds."""
    config = base_config(settings)
    space = get_space(settings.space, base=config, code_bytes=trainer_code_bytes())
    settings.folder.mkdir(parents=True, exist_ok=True)
    searcher, scheduler = make_search(settings, space)
    ledger = Ledger(settings.trial_steps)
    tuner = tune.Tuner(
        make_trainable(settings, config),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=settings.samples,
                                    search_alg=StepBudget(searcher, settings.concurrency, budget, ledger),
                                    max_concurrent_trials=settings.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=settings.name, storage_path=settings.out, verbose=0))
    t0 = time.time()
    tuner.fit()
    return ledger, time.time() - t0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # as run_sweep
    base = SweepSettings(data=str(demo_data(work, args.data)), out=str(work), space=args.space,
                         trial_steps=args.trial_steps, concurrency=args.concurrency, preset=args.preset,
                         startup_trials=args.startup_trials)
    budget = args.budget_trials * args.trial_steps
    base = replace(base, samples=2 * budget // base.rungs[0] + 10)  # never the limit: the budget is
    start_ray(args.concurrency)
    print(f"{machine()}\n{len(args.strategies)} strategies x {len(args.seeds)} seeds; budget {budget:,} steps "
          f"({args.budget_trials} trials of {args.trial_steps} steps, ASHA rungs {list(base.rungs)}) of the "
          f"'{args.preset}' model on the '{args.space}' space, {args.concurrency} trials at a time", flush=True)
    runs = []
    for seed in args.seeds:
        for name in args.strategies:
            sampler, scheduler = STRATEGIES[name]
            settings = replace(base, name=f"{name}-{seed}", seed=seed, sampler=sampler, scheduler=scheduler)
            ledger, wall = run_once(settings, budget)
            runs.append({"strategy": name, "seed": seed, "ledger": ledger, "wall_s": wall})
            print(f"  {name} seed {seed}: {len(ledger.steps)} trials, {len(ledger.finals)} at full budget, "
                  f"{ledger.spent:,} steps, best {ledger.best_within(budget):.4f} within the budget, "
                  f"{wall:.0f} s ({load()})", flush=True)
    best = min(r["ledger"].best_within(budget) for r in runs)
    rows = [summarise(name, [r for r in runs if r["strategy"] == name], budget, best + args.tolerance)
            for name in args.strategies]
    print(f"\nbest val_bpb found by any run within the budget: {best:.4f}; mean over seeds (std), "
          f"best within each share of the budget; to_best: steps to come within {args.tolerance} of it "
          f"(median over the seeds that did; reached: how many did)")
    print_table(rows, ("strategy", "trials", "full", "spent", *(f"best@{f:.0%}" for f in FRACTIONS), "std@100%",
                       "to_best", "reached", "wall_s"))
    return {"machine": machine(), "budget_steps": budget, "best": best, "rows": rows,
            "runs": [{**{k: v for k, v in r.items() if k != "ledger"}, "finals": r["ledger"].finals,
                      "steps": r["ledger"].steps} for r in runs]}


def summarise(name: str, runs: list[dict[str, Any]], budget: int, target: float) -> dict[str, Any]:
    ledgers = [r["ledger"] for r in runs]
    row: dict[str, Any] = {"strategy": name, "trials": statistics.mean(len(x.steps) for x in ledgers),
                           "full": statistics.mean(len(x.finals) for x in ledgers),
                           "spent": statistics.mean(x.spent for x in ledgers),
                           "wall_s": statistics.mean(r["wall_s"] for r in runs)}
    for f in FRACTIONS:
        values = [x.best_within(f * budget) for x in ledgers]
        row[f"best@{f:.0%}"] = statistics.mean(values) if all(map(math.isfinite, values)) else None
    finals = [x.best_within(budget) for x in ledgers]
    row["std@100%"] = statistics.stdev(finals) if len(finals) > 1 and all(map(math.isfinite, finals)) else None
    reached = [c for x in ledgers if (c := x.compute_to_reach(target, budget)) is not None]
    row["to_best"] = int(statistics.median(reached)) if reached else None
    row["reached"] = f"{len(reached)}/{len(ledgers)}"
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 40-step trials, 4 trial budgets")
    p.add_argument("--preset", default="demo", help="trial model (default demo)")
    p.add_argument("--space", default="curriculum")
    p.add_argument("--trial-steps", type=int, help="each trial's full budget (default 120; quick 40)")
    p.add_argument("--budget-trials", type=int, help="budget per run in full trials (default 8; quick 4)")
    p.add_argument("--seeds", help="comma list of sampler seeds (default 0,1,2; quick 0)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of " + ", ".join(STRATEGIES))
    p.add_argument("--startup-trials", type=int, default=4, help="random trials before TPE models the space")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray slots (default 2)")
    p.add_argument("--tolerance", type=float, default=0.01, help="BPB from the best that counts as reaching it")
    p.add_argument("--data", type=Path, help="byte-shard folder (default: build the demo corpus)")
    p.add_argument("--json", type=Path, help="write the rows and every run's results here")
    args = p.parse_args(argv)
    args.trial_steps = args.trial_steps or (40 if args.quick else 120)
    args.budget_trials = args.budget_trials or (4 if args.quick else 8)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if unknown := set(args.strategies) - set(STRATEGIES):
        p.error(f"--strategies: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STRATEGIES)}")
    if min(args.trial_steps, args.budget_trials, args.concurrency) < 1 or not args.seeds:
        p.error("--trial-steps, --budget-trials and --concurrency must be at least 1, and --seeds not empty")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_in_temp(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
