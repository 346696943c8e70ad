"""Whole sweeps replayed against a recorded benchmark: the real search minus the training.

`simulate_sweep` runs one sweep as `jepatune search` would: the sampler a sweep builds
(`experiment.sampling.make_sampler`) asked and told through Optuna's ask-and-tell interface with the
feedback the sweep's searcher gives (intermediate values at their steps; a stopped trial PRUNED; a
diverged or infeasible one COMPLETE with the penalty and a failed constraint), the reference recipe
enqueued first, `concurrency` trials at once, and ASHA judging each trial at its milestones by
Ray's rule (`analysis.replay.AshaRule`) with the sweep's audits (`AuditRule`). Time is counted in
optimiser steps: a trial judged at milestone m has spent what its fidelity says (`Fidelity.cost`),
so a slot that frees early takes the next suggestion early, as Ray's slots do.

What a simulated sweep finds is the recipe with the lowest observed score among its completed
trials (a sweep's best trial); it is worth its true score (`Surrogate.true_score`: the mean over
seeds), which is what a retrain of it would measure on average.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from jepatune.analysis.replay import AshaRule, AuditRule
from jepatune.benchmark.strategy import Strategy
from jepatune.benchmark.surrogate import Surrogate
from jepatune.errors import JepatuneError
from jepatune.experiment.fidelity import get_fidelity
from jepatune.experiment.sampling import make_sampler
from jepatune.experiment.trials import PENALTY_BPB
from jepatune.spaces import FAILURE_CONSTRAINT, INFEASIBLE_KEY


@dataclass
class _Running:
    number: int
    trial: Any
    params: dict[str, Any]
    start: float
    values: dict[int, float]
    score: float
    diverged: bool
    audited: bool = False


@dataclass(frozen=True)
class SimulatedSweep:
    trials: pd.DataFrame
    decisions: pd.DataFrame  # number, milestone, value, decision (continue, stop, audit), in order


def simulate_sweep(surrogate: Surrogate, strategy: Strategy, *, compute_trials: float = math.inf, seed: int,
                   seed_index: int, samples: int | None = None) -> SimulatedSweep:
    """One simulated sweep, run until it has spent `compute_trials` full trial budgets, or (as a real
    sweep) until `samples` trials have started and ended.

    `trials`: one row per trial in the order they ended: number, the parameters, start and end (on
    the clock of one slot, in steps), stopped_at (milestone, or <NA>), status (completed, pruned,
    diverged (infeasible ones too: the same penalty), or unfinished when the compute ran out),
    audited, score (its observed final score; NaN unless it ended), true (its true score).
    `decisions`: every ASHA judgement, in order."""
    import optuna

    strategy.check()
    if math.isinf(compute_trials) and samples is None:
        raise JepatuneError("a simulated sweep needs a compute budget or a number of trials")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = surrogate.bench.budget
    fid = get_fidelity(strategy.fidelity)
    ladder = strategy.ladder(budget)
    missing = [r for r in ladder if r not in surrogate.rungs]
    if missing:
        raise JepatuneError(f"rungs {list(ladder)} of {strategy.label()}: the benchmark has no {strategy.fidelity} "
                            f"values at {missing}; choose a grace and reduction factor whose rungs are among the "
                            f"recorded {list(surrogate.rungs)}")
    cost, end_cost = fid.cost(ladder, budget, surrogate.bench.probe_steps) if ladder else ({}, float(budget))
    rule = AshaRule(ladder, strategy.reduction_factor)
    audits = AuditRule(strategy.audit_frac, seed)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(strategy.sampler, seed=seed,
                                                                           startup_trials=strategy.startup_trials))
    space = surrogate.space
    study.enqueue_trial(space.reference_point())
    limit = compute_trials * budget
    events: list[tuple[float, int, int, int]] = []  # (time, order, trial number, milestone index; -1 = end)
    running: dict[int, _Running] = {}
    rows: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    spent_done, order = 0.0, itertools.count()

    def started() -> int:
        return len(running) + len(rows)

    def spent(now: float) -> float:
        return spent_done + sum(now - r.start for r in running.values())

    def start(now: float) -> None:
        trial = study.ask()
        overrides = space.sample(trial)
        params = dict(trial.params)
        if INFEASIBLE_KEY in overrides:  # refused before training: the penalty at once, as a sweep does
            values, score, diverged = {}, PENALTY_BPB, True
        else:
            values, score, diverged = surrogate.predict(params, seed_index)
        r = running[trial.number] = _Running(trial.number, trial, params, now, values, score, diverged)
        if diverged:
            heapq.heappush(events, (now, next(order), r.number, -1))
        elif ladder:
            heapq.heappush(events, (now + cost[ladder[0]], next(order), r.number, 0))
        else:
            heapq.heappush(events, (now + end_cost, next(order), r.number, -1))

    def end(now: float, r: _Running, status: str, stopped_at: int | None) -> None:
        nonlocal spent_done
        spent_done += now - r.start
        del running[r.number]
        if status == "pruned":
            study.tell(r.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            if status == "diverged":
                r.trial.set_constraint(FAILURE_CONSTRAINT, 1.0)
            study.tell(r.trial, r.score)
        rows.append({"number": r.number, **r.params, "start": r.start, "end": now,
                     "stopped_at": stopped_at, "status": status, "audited": r.audited,
                     "score": math.nan if status == "pruned" else r.score,
                     "true": surrogate.true_score(r.params) if status != "diverged" else PENALTY_BPB})

    now = 0.0
    while True:
        while len(running) < strategy.concurrency and spent(now) < limit and started() != samples:
            start(now)
        if not events:
            break
        now, _, number, j = heapq.heappop(events)
        r = running[number]
        if j < 0:
            end(now, r, "diverged" if r.diverged else "completed", None)
            continue
        m = ladder[j]
        r.trial.report(r.values[m], m)
        stop = rule.judge(m, r.values[m])
        if stop and audits.audit():
            stop, r.audited = False, True
        decisions.append({"number": number, "milestone": m, "value": r.values[m],
                          "decision": "audit" if r.audited else "stop" if stop else "continue"})
        if stop:
            end(now, r, "pruned", m)
        elif j + 1 < len(ladder) and not r.audited:
            heapq.heappush(events, (r.start + cost[ladder[j + 1]], next(order), number, j + 1))
        else:
            r.trial.report(r.score, budget)
            heapq.heappush(events, (r.start + end_cost, next(order), number, -1))
        if spent(now) >= limit:
            break
    for r in list(running.values()):  # the compute is spent: what still runs ends unfinished
        rows.append({"number": r.number, **r.params, "start": r.start, "end": now, "stopped_at": None,
                     "status": "unfinished", "audited": r.audited, "score": math.nan, "true": math.nan})
    frame = pd.DataFrame(rows)
    frame["stopped_at"] = frame["stopped_at"].astype("Int64")
    return SimulatedSweep(frame, pd.DataFrame(decisions, columns=["number", "milestone", "value", "decision"]))


def anytime(log: pd.DataFrame, grid: Sequence[float], budget: int, finalists: int = 3) -> pd.DataFrame:
    """At each compute point of `grid` (in trial budgets): `true`, the true score of the sweep's
    answer then (the completed trial with the lowest observed score; NaN before the first);
    `true_finalists`, the best true score among its `finalists` best observed trials (what a retrain
    of the finalists finds when its seeds tell them apart); and the trials ended by then."""
    done = log[log["status"] == "completed"].sort_values("end", kind="stable")
    ends, top, seen = done["end"].to_numpy(float), [], []
    for score, true in zip(done["score"], done["true"], strict=True):
        bisect.insort(seen, (score, true))
        top.append((seen[0][1], min(t for _, t in seen[:finalists])))
    rows = []
    for g in grid:
        k = int(np.searchsorted(ends, g * budget, side="right"))  # trials completed by then
        one, best_of = top[k - 1] if k else (math.nan, math.nan)
        rows.append({"compute": g, "true": one, "true_finalists": best_of,
                     "trials": int((log["end"] <= g * budget).sum())})
    return pd.DataFrame(rows)


def simulate(surrogate: Surrogate, strategies: Sequence[Strategy], *, repetitions: int, compute_trials: float,
             seed: int = 0, grid: Sequence[float] | None = None,
             log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every strategy, `repetitions` times (sampler seed = seed + k; the training seed drawn per
    repetition, the same draws for every strategy); one row per (strategy, repetition, compute point)
    with the true score of the answer and its regret against the benchmark's best recipe."""
    if repetitions < 1 or compute_trials <= 0:
        raise JepatuneError("--repetitions must be at least 1 and --compute positive")
    grid = list(grid or np.unique([*np.arange(1, int(compute_trials) + 1), compute_trials]))
    budget, best = surrogate.bench.budget, surrogate.best_true()
    draws = np.random.default_rng(seed).integers(0, len(surrogate.seeds), size=repetitions)
    frames = []
    for strategy in strategies:
        t0 = time.perf_counter()
        for k in range(repetitions):
            run = simulate_sweep(surrogate, strategy, compute_trials=compute_trials, seed=seed + k,
                                 seed_index=int(draws[k]))
            curve = anytime(_on_compute_clock(run.trials), grid, budget)
            frames.append(curve.assign(strategy=strategy.label(), repetition=k, regret=curve["true"] - best,
                                       regret_finalists=curve["true_finalists"] - best,
                                       **{f"s:{key}": v for key, v in asdict(strategy).items()}))
        if log:
            log(f"{strategy.label()}: {repetitions} sweeps in {time.perf_counter() - t0:.1f}s")
    return pd.concat(frames, ignore_index=True)


def _on_compute_clock(run: pd.DataFrame) -> pd.DataFrame:
    """The log with `end` in total compute spent (all slots together) rather than on the wall clock."""
    events = sorted(itertools.chain(((s, 1) for s in run["start"]), ((e, -1) for e in run["end"])))
    clock, busy, last, at = 0.0, 0, 0.0, {}
    for t, step in events:
        clock += busy * (t - last)
        busy, last = busy + step, t
        at[t] = clock
    return run.assign(end=run["end"].map(at))
