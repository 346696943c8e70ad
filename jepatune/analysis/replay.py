"""Offline ASHA: what a sweep would have kept, stopped and spent under other rung settings.

Given each trial's value at every milestone (the rung value of some fidelity) and its full-budget
BPB (unknown for a trial that was pruned and not audited), `replay_asha` replays asynchronous
successive halving with Ray's rule; `replay_summary` scores one replay (trials kept, compute, was
the truly best stopped); `replay_orders` averages that over random arrival orders; `replay_sweep`
does it for a finished sweep's tables under other (grace, reduction factor, fidelity column)
settings.

Compute is counted as the fidelity of the rung values says (`jepatune.experiment.fidelity`).

Everything here is pure pandas/numpy: no training, no Ray.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from jepatune.errors import JepatuneError
from jepatune.experiment.fidelity import SNAPSHOT, Fidelity, get_fidelity, rung_steps
from jepatune.experiment.trials import PENALIZED

# The fidelity a curves column holds when a setting does not say (it decides how compute is counted).
COLUMN_FIDELITY = {"snapshot_bpb": "snapshot", "probe_bpb": "probe", "val_bpb": "snapshot"}
REPLAY_COLUMNS = {"trial": "object", "stopped_at": "Int64", "reached_end": bool, "unknown": bool, "furthest": "Int64",
                  "final": float}
SUMMARY_KEYS = ("trials", "kept", "unknown", "scored", "best_stopped", "best_kept_rank", "regret", "compute",
                "compute_low", "compute_all", "compute_frac")

Values = pd.DataFrame | Mapping[Hashable, Mapping[int, float]]


class Setting(NamedTuple):
    """One ASHA setting to replay: first rung, reduction factor, the curves column that holds the rung
    values, and the fidelity that column measured (None: `COLUMN_FIDELITY`, else snapshot)."""

    grace: int
    reduction_factor: int
    column: str = "val_bpb"
    fidelity: str | None = None


def milestones(budget: int, grace: int, reduction_factor: float) -> tuple[int, ...]:
    """ASHA's rungs grace * rf^k strictly below the budget: where trials are judged (Ray judges nothing
    at max_t itself). The sweep's ladder (`rung_steps`) without its last rung, the budget."""
    _check_ladder(grace, reduction_factor)
    return rung_steps(budget, grace, reduction_factor)[:-1]


def _check_ladder(grace: int, reduction_factor: float) -> None:
    if grace < 1:
        raise JepatuneError(f"grace={grace}: the first rung must be at least 1 step")
    if not reduction_factor > 1:
        raise JepatuneError(f"reduction_factor={reduction_factor}: must be above 1 (ASHA keeps 1/rf of a rung)")


def fidelity_cost(fidelity: str, rungs: Sequence[int], budget: int,
                  probe_steps: int = 0) -> tuple[dict[int, float], float]:
    """(compute a trial has spent when judged at each rung, compute of a trial run to the end), in
    optimiser steps, under the fidelity named `fidelity`."""
    return get_fidelity(fidelity).cost(tuple(int(r) for r in rungs), budget, probe_steps)


def _values_dict(values: Values) -> dict[Hashable, dict[int, float]]:
    """values[trial][milestone] as plain floats (NaN for a missing value)."""
    rows = values.to_dict(orient="index") if isinstance(values, pd.DataFrame) else values
    return {t: {int(m): float(v) if pd.notna(v) else math.nan for m, v in dict(r).items()} for t, r in rows.items()}


def _float(value: Any) -> float:
    """A final as a float: NaN for a missing one (None, NaN, <NA>)."""
    return math.nan if value is None or pd.isna(value) else float(value)


class AshaRule:
    """Ray's asynchronous successive halving rule (`AsyncHyperBandScheduler`, one bracket), minimising.

    At each milestone a value is held against the cut-off np.percentile(rewards, (1 - 1/rf) * 100) of
    the rewards (= -values) recorded there before it: it stops when its reward is below the cut-off,
    i.e. when the value is above the (1/rf)-quantile (linear interpolation) of the earlier values. A
    tie continues; the first value at a milestone always continues. The value is recorded whether it
    stops or not."""

    def __init__(self, milestones: Sequence[int], reduction_factor: float):
        _check_ladder(1, reduction_factor)
        self.percent = (1 - 1 / reduction_factor) * 100
        self.recorded: dict[int, list[float]] = {int(m): [] for m in milestones}  # rewards, as Ray keeps them

    def judge(self, milestone: int, value: float) -> bool:
        """Record `value` at `milestone`; True when the trial stops there."""
        earlier = self.recorded[int(milestone)]
        stop = bool(earlier) and -value < np.percentile(earlier, self.percent)
        earlier.append(-value)
        return stop


class AuditRule:
    """Which of ASHA's stops run to the end anyway (`RecordingASHA`'s audits): the first stop always
    (when audits are on), each later one with probability `frac`, from random.Random(seed)."""

    def __init__(self, frac: float, seed: int):
        self.frac, self._rng, self.audited = frac, random.Random(seed), 0

    def audit(self) -> bool:
        """Asked once per stop, in the order the stops happen."""
        if self.frac > 0 and (not self.audited or self._rng.random() < self.frac):
            self.audited += 1
            return True
        return False


def replay_asha(values: Values, finals: Mapping[Hashable, float] | pd.Series, order: Iterable[Hashable],
                milestones: Sequence[int], reduction_factor: float) -> pd.DataFrame:
    """Replay asynchronous successive halving (minimising) over trials that arrive in `order`.

    values[trial][milestone]: the value a trial would report at that milestone (a DataFrame indexed by
    trial with one column per milestone, or a mapping of mappings); finals[trial]: its full-budget BPB,
    NaN (or None, <NA>, absent) when unknown, e.g. a trial the sweep pruned: it still takes part with
    the values it recorded, and shapes the cut-offs at those rungs.

    Ray's rule (`ray.tune.schedulers.AsyncHyperBandScheduler`, one bracket): at each milestone the
    trial's value is held against the cut-off np.percentile(rewards, (1 - 1/rf) * 100) of the rewards
    (= -values) recorded there before it; it stops when its reward is below the cut-off, i.e. when its
    value is above the (1/rf)-quantile (linear interpolation) of the earlier values. A tie continues;
    with no earlier value (the first trial at a rung) it always continues. Its value is recorded at the
    rung whether it stops or not.

    Simplification: trials run one at a time, each through all its rungs before the next arrives. In a
    sweep with several trials at once a later trial can reach an early rung before an earlier one
    reaches a later rung, so cut-offs there see fewer values; the order of arrival at each rung is
    what matters, and a random order of whole trials samples it.

    A trial whose value at a milestone it is promoted to is missing (NaN, or no such trial/column) is
    `unknown` from there: it is neither stopped nor at the end, and records nothing at that rung. One
    that passes every milestone reaches the end; it is `unknown` too when its final is missing. A trial
    stopped at a milestone whose value is known is not `unknown`, whatever its final (NaN or not).

    Returns one row per trial in order: trial, stopped_at (milestone, <NA> when not stopped),
    reached_end, unknown, furthest (the last milestone it reached: where it stopped or its data ran
    out, else the last one; <NA> with no milestones), final (NaN when missing)."""
    table = _values_dict(values)
    rungs = [int(m) for m in milestones]
    if any(b <= a for a, b in zip(rungs, rungs[1:], strict=False)) or any(m < 1 for m in rungs):
        raise JepatuneError(f"milestones {rungs}: must be positive and increasing")
    _check_ladder(1, reduction_factor)
    order = list(order)
    if len(set(order)) != len(order):
        raise JepatuneError("order lists a trial twice; give each trial once, in the order it arrives")
    rule = AshaRule(rungs, reduction_factor)
    rows = []
    for trial in order:
        final = _float(finals.get(trial))
        row = {"trial": trial, "stopped_at": pd.NA, "reached_end": False, "unknown": False, "furthest": pd.NA,
               "final": final}
        for m in rungs:
            row["furthest"] = m
            value = table.get(trial, {}).get(m, math.nan)
            if math.isnan(value):
                row["unknown"] = True
                break
            if rule.judge(m, value):
                row["stopped_at"] = m
                break
        else:
            row["reached_end"] = True
            row["unknown"] = math.isnan(final)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(REPLAY_COLUMNS)).astype(REPLAY_COLUMNS)


def replay_summary(replay: pd.DataFrame, cost: Mapping[int, float], end_cost: float,
                   full_cost: float | None = None) -> dict[str, Any]:
    """What one replay kept and spent.

    cost[m]: compute a trial has spent when judged at milestone m; end_cost: compute of a trial run to
    the end under the same fidelity; full_cost: compute of one trial run to the end with no early
    stopping (default end_cost).

    The scores are over the trials whose final is known (`scored`: completed and audited ones in a
    sweep); a trial with no final (pruned, not audited) only shapes the cut-offs. A trial whose value
    at a milestone it was promoted to is missing has an unknown outcome: it might have been stopped
    at any later milestone or run to the end. `compute` counts it as running to the end (an upper
    bound), `compute_low` at the milestone it was promoted to (a lower bound: it got at least that
    far); the two agree when no trial is unknown that way.

    Keys: trials, kept (reached the end, with a final or not), unknown (promoted past its data, or at
    the end with no final), scored (trials with a final), best_stopped (the trial with the lowest
    final was stopped; with a tie, every trial sharing it was; False with no final), best_kept_rank
    (rank by final, 1 = lowest, among the scored trials, of the best trial that reached the end with
    a final; <NA> when none did), regret (its final minus the lowest final; NaN when none), compute,
    compute_low, compute_all (trials * full_cost), compute_frac (compute / compute_all)."""
    ends = replay["reached_end"].to_numpy()
    short = replay["unknown"].to_numpy() & ~ends  # promoted past its data
    at = [cost[int(m)] if pd.notna(m) else end_cost for m in replay["furthest"]]
    spent = float(sum(end_cost if end or cut else c for end, cut, c in zip(ends, short, at, strict=True)))
    low = float(sum(end_cost if end else c for end, c in zip(ends, at, strict=True)))
    finals = replay.set_index("trial")["final"].astype(float)
    known = finals.dropna()
    best = replay["final"].eq(known.min()).to_numpy() if len(known) else None
    ranks = known.rank(method="min")
    kept = replay[ends & replay["final"].notna().to_numpy()]
    best_kept = kept.loc[kept["final"].idxmin()] if len(kept) else None
    compute_all = len(replay) * (end_cost if full_cost is None else full_cost)
    return {
        "trials": len(replay), "kept": int(ends.sum()), "unknown": int(replay["unknown"].sum()),
        "scored": len(known),
        "best_stopped": best is not None and bool(replay.loc[best, "stopped_at"].notna().all()),
        "best_kept_rank": int(ranks[best_kept["trial"]]) if best_kept is not None else pd.NA,
        "regret": float(best_kept["final"] - known.min()) if best_kept is not None else math.nan,
        "compute": spent, "compute_low": low, "compute_all": float(compute_all),
        "compute_frac": spent / compute_all if compute_all else math.nan,
    }


def replay_permutations(values: Values, finals: Mapping[Hashable, float] | pd.Series, milestones: Sequence[int],
                        reduction_factor: float, *, orders: int, seed: int = 0) -> pd.DataFrame:
    """`replay_asha` over `orders` random arrival orders of the trials in `finals` (numpy's
    default_rng(seed) permutations): its rows for every order, with the order's number in `order`."""
    if orders < 1:
        raise JepatuneError(f"orders={orders}: replay at least one arrival order")
    trials = list(finals.index if isinstance(finals, pd.Series) else finals)
    rng = np.random.default_rng(seed)
    table = _values_dict(values)
    runs = [replay_asha(table, finals, [trials[i] for i in rng.permutation(len(trials))], milestones,
                        reduction_factor).assign(order=k) for k in range(orders)]
    return pd.concat(runs, ignore_index=True)


def orders_summary(replays: pd.DataFrame, cost: Mapping[int, float], end_cost: float,
                   full_cost: float | None = None) -> dict[str, Any]:
    """`replay_summary` of each order in `replay_permutations`' rows, averaged: best_stopped becomes the
    fraction of orders in which the best trial was stopped; best_kept_rank and regret are means over the
    orders that kept a trial with a final."""
    runs = [_numeric(replay_summary(group, cost, end_cost, full_cost))
            for _, group in replays.groupby("order", sort=True)]
    means = pd.DataFrame(runs)[list(SUMMARY_KEYS[1:])].mean()  # NaN (no trial kept) is left out
    return {"trials": runs[0]["trials"], "orders": len(runs), **means.to_dict()}


def _numeric(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary with float best_stopped and best_kept_rank (NaN for <NA>), ready to average."""
    rank = summary["best_kept_rank"]
    return {**summary, "best_stopped": float(summary["best_stopped"]),
            "best_kept_rank": math.nan if rank is pd.NA else float(rank)}


def replay_orders(values: Values, finals: Mapping[Hashable, float] | pd.Series, milestones: Sequence[int],
                  reduction_factor: float, cost: Mapping[int, float], end_cost: float,
                  full_cost: float | None = None, *, orders: int, seed: int = 0) -> dict[str, Any]:
    """`orders_summary` of `replay_permutations`: what a setting keeps and spends, averaged over random
    arrival orders."""
    replays = replay_permutations(values, finals, milestones, reduction_factor, orders=orders, seed=seed)
    return orders_summary(replays, cost, end_cost, full_cost)


def _measured(curves: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The curves without the last report of each penalized trial (diverged, infeasible: see
    `PENALIZED`): that value is the penalty the searcher was told, not a BPB measured at that
    step. The report is last in the trial's rows (the tables keep the order reports were made)."""
    penalized = trials["status"].isin(PENALIZED).fillna(False).astype(bool).to_numpy()
    curves = curves.reset_index(drop=True)
    rows = curves[curves["trial_id"].isin(set(trials.loc[penalized, "trial_id"])).to_numpy()]
    return curves.drop(index=rows.groupby("trial_id", sort=False).tail(1).index)


def _sweep_trials(curves: pd.DataFrame, trials: pd.DataFrame) -> tuple[pd.Series, int]:
    """(final BPB per trial that takes part, NaN where unknown; the budget), in the trials table's order.

    A trial takes part when it recorded a measured val_bpb (`curves` as `_measured` leaves them) or
    completed: pruned, diverged, errored and incomplete trials take part with the values they
    recorded, as they did in the sweep. Its final is known when its curve reaches the budget (pruned
    trials run to the end anyway to audit the pruning) or it completed with a last_val_bpb."""
    budgets = trials["trial_steps"].dropna().astype(int).unique()
    if len(budgets) != 1:
        raise JepatuneError(f"the trials table has budgets (trial_steps) {sorted(budgets.tolist())}; replay needs "
                            f"the tables of one sweep, whose trials share one budget")
    budget = int(budgets[0])
    measured = curves[curves["val_bpb"].notna().to_numpy()]
    at_end = measured[measured["step"].eq(budget).fillna(False).astype(bool).to_numpy()]
    finals = at_end.drop_duplicates("trial_id", keep="last").set_index("trial_id")["val_bpb"].astype(float)
    done = trials[trials["status"].eq("completed").fillna(False).astype(bool).to_numpy()
                  & trials["last_val_bpb"].notna().to_numpy()]
    finals = pd.concat([finals, done.set_index("trial_id")["last_val_bpb"].astype(float)])
    finals = finals[~finals.index.duplicated(keep="first")]  # the curve's value at the budget first
    recorded = set(measured["trial_id"]) | set(finals.index)
    order = [t for t in dict.fromkeys(trials["trial_id"]) if t in recorded]  # the trials table's order
    return finals.reindex(pd.Index(order, name="trial_id")), budget


def _rung_values(curves: pd.DataFrame, column: str, trials: pd.Index, rungs: Sequence[int]) -> pd.DataFrame:
    rows = curves[curves["trial_id"].isin(trials).to_numpy() & curves["step"].isin(rungs).fillna(False).to_numpy()]
    rows = rows.drop_duplicates(["trial_id", "step"], keep="last")  # a restarted trial reports a rung again
    table = rows.pivot(index="trial_id", columns="step", values=column).astype(float)
    return table.reindex(index=trials, columns=list(rungs))


def replay_sweep(curves: pd.DataFrame, trials: pd.DataFrame, settings: Iterable[Setting | tuple],
                 *, probe_steps: int = 0, orders: int = 0, seed: int = 0) -> pd.DataFrame:
    """Replay other ASHA settings on a finished sweep's tables (curves: trial_id, step, the rung value
    columns; trials: trial_id, status, last_val_bpb, trial_steps).

    Every trial that recorded a value takes part (`_sweep_trials`), pruned ones included: their
    recorded rung values shape the cut-offs as in the sweep, and their final is unknown unless an
    audit ran them to the end. The last report of a diverged or infeasible trial is its penalty, not
    a rung value, and is left out. best_stopped, best_kept_rank and regret are over the trials with a
    known final (`scored`); compute counts a trial the replay promotes past its recorded values as
    running to the end (an upper bound; `compute_low` counts it at the milestone it was promoted to;
    see `replay_summary`).

    Each setting is a `Setting` (or a tuple of its fields): its milestones are ASHA's rungs below the
    budget, read from `column` (e.g. val_bpb; snapshot_bpb or probe_bpb in a probe-mode sweep).
    Compute is counted under the setting's fidelity (`fidelity_cost`, `probe_steps` per probe). With
    orders=0 the trials arrive in the trials table's order, once; otherwise over `orders` random
    orders (`replay_orders`). A setting whose column or milestones the curves do not hold is skipped
    with a `note`.

    Columns: grace, reduction_factor, column, fidelity, milestones ("15,30,60"), trials (taking part),
    orders, kept, unknown (their outcome: promoted past their data, or at the end with no final),
    scored (with a known final), best_stopped (the fraction of orders that stopped the best scored
    trial), best_kept_rank, regret, compute (upper bound), compute_low, compute_all, compute_frac, note
    (empty when replayed). kept, unknown, best_kept_rank, regret and the computes are means over the
    orders."""
    curves = _measured(curves, trials)
    finals, budget = _sweep_trials(curves, trials)
    rows = []
    for item in settings:
        s = Setting(*item)
        fidelity = s.fidelity or COLUMN_FIDELITY.get(s.column, "snapshot")
        rungs = milestones(budget, s.grace, s.reduction_factor)
        row: dict[str, Any] = {"grace": s.grace, "reduction_factor": s.reduction_factor, "column": s.column,
                               "fidelity": fidelity, "milestones": ",".join(map(str, rungs)),
                               "note": _unreplayable(curves, s.column, finals, rungs)}
        if not row["note"]:
            row.update(_replay_setting(_rung_values(curves, s.column, finals.index, rungs), finals, rungs, s,
                                       fidelity_cost(fidelity, rungs, budget, probe_steps), budget, orders, seed))
        rows.append(row)
    columns = ["grace", "reduction_factor", "column", "fidelity", "milestones", "trials", "orders", "kept", "unknown",
               "scored", "best_stopped", "best_kept_rank", "regret", "compute", "compute_low", "compute_all",
               "compute_frac", "note"]
    out = pd.DataFrame(rows, columns=columns)
    return out.astype({"grace": "Int64", "reduction_factor": float, "column": "string", "fidelity": "string",
                       "milestones": "string", "trials": "Int64", "orders": "Int64", "kept": float,
                       "unknown": float, "scored": "Int64", "best_stopped": float, "best_kept_rank": float,
                       "regret": float, "compute": float, "compute_low": float, "compute_all": float,
                       "compute_frac": float, "note": "string"})


def _unreplayable(curves: pd.DataFrame, column: str, finals: pd.Series, rungs: Sequence[int]) -> str:
    """Why a setting cannot be replayed on these curves ("" when it can)."""
    trials = finals.index
    if column not in curves.columns:
        return f"no column {column!r} in the curves"
    if not finals.notna().any():
        return "no trial with a known final"
    missing = [m for m, v in _rung_values(curves, column, trials, rungs).items() if v.isna().all()]
    return f"milestones {','.join(map(str, missing))} of {column} not recorded" if missing else ""


def _replay_setting(values: pd.DataFrame, finals: pd.Series, rungs: Sequence[int], s: Setting,
                    costs: tuple[dict[int, float], float], budget: int, orders: int, seed: int) -> dict[str, Any]:
    if orders:
        return replay_orders(values, finals, rungs, s.reduction_factor, *costs, budget, orders=orders, seed=seed)
    replayed = replay_asha(values, finals, finals.index, rungs, s.reduction_factor)
    return {**_numeric(replay_summary(replayed, *costs, budget)), "orders": 1}


def sweep_replays(curves: pd.DataFrame, trials: pd.DataFrame, rungs: Sequence[int], fidelity: Fidelity = SNAPSHOT,
                  probe_steps: int = 0, orders: int = 100, seed: int = 0) -> pd.DataFrame:
    """`replay_sweep` over the settings a sweep's own records allow: every recorded rung below the budget
    as the first rung, reduction factors 2, 3 and 4, on the sweep's rung values (and, in a probe-mode
    sweep, on the snapshot values it recorded beside them). Every trial that recorded a value takes
    part, pruned ones with the rung values they reached (see `replay_sweep`). Rows whose milestones
    were not recorded are left out."""
    grid = [Setting(g, rf, col, fid.name) for col, fid in fidelity.recorded_columns() for g in rungs[:-1]
            for rf in (2, 3, 4)]
    if not grid or trials["trial_steps"].dropna().empty:  # no rung below the budget, or no trial yet
        return pd.DataFrame()
    out = replay_sweep(curves, trials, grid, probe_steps=probe_steps, orders=orders, seed=seed)
    out = out[out["note"].fillna("").eq("").to_numpy()].drop(columns=["note"])
    return out.drop_duplicates(["column", "milestones"]).reset_index(drop=True)
