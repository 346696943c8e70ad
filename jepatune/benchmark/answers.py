"""The questions a benchmark answers, as pure functions of its tables and of simulated sweeps.

- `strategy_table`: per strategy, what its sweeps found at a compute budget (mean true score of the
  answer, its 95% interval over repetitions, the share within the noise floor of the best recipe)
  and the compute it needed to come within that floor.
- `rank_transfer`: Spearman's rank correlation of the recipes' mean score at the trial budget with
  their mean score at the longer budget, with a bootstrap interval over recipes.
- `finalists_needed`: how many of a sweep's best trials a retrain must take for the recipe that is
  truly best at the longer budget to be among them, with a given probability, and how far the best
  of them is from that recipe there (what the retrain can ship).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from jepatune.analysis.explore import spearman
from jepatune.benchmark.tables import Benchmark


def mean_interval(x: np.ndarray) -> tuple[float, float]:
    """The mean's 95% normal interval (NaN for fewer than 2 values)."""
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def compute_to_floor(sim: pd.DataFrame, floor: float) -> pd.Series:
    """Per (strategy, repetition): the first compute point at which the answer's regret is within
    `floor` (NaN when never, within the simulated compute)."""
    hit = sim[sim["regret"] <= floor]
    first = hit.groupby(["strategy", "repetition"])["compute"].min()
    every = sim.groupby(["strategy", "repetition"])["compute"].max()
    return first.reindex(every.index)


def strategy_table(sim: pd.DataFrame, floor: float, at: float | None = None) -> pd.DataFrame:
    """One row per strategy, in the order first simulated: at compute `at` (default the largest
    simulated) the answers' mean true score and regret with 95% intervals, the regret of the best of
    its finalists (`simulate.anytime`), the share of sweeps whose
    answer is within `floor` of the best recipe, the trials they ran; and the median compute (in trial
    budgets) to come within the floor, with the share of sweeps that never did."""
    at = float(sim["compute"].max()) if at is None else at
    needed = compute_to_floor(sim, floor)
    rows = []
    for strategy in dict.fromkeys(sim["strategy"]):
        s = sim[(sim["strategy"] == strategy) & (sim["compute"] == at)]
        regret = s["regret"].to_numpy(float)
        lo, hi = mean_interval(regret)
        n = needed.loc[strategy]
        rows.append({"strategy": strategy, "sweeps": len(s), "compute": at, "true": float(np.nanmean(s["true"])),
                     "regret": float(np.nanmean(regret)), "regret_lo": lo, "regret_hi": hi,
                     "regret_finalists": float(np.nanmean(s["regret_finalists"])),
                     "within_floor": float(np.mean(regret <= floor)), "trials": float(s["trials"].mean()),
                     "to_floor": float(n.median()) if n.notna().mean() >= 0.5 else math.nan,
                     "never": float(n.isna().mean())})
    return pd.DataFrame(rows)


def rank_transfer(bench: Benchmark, *, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman of the mean trial-budget score with the mean longer-budget score over the recipes
    recorded at both, with a 95% percentile bootstrap interval over recipes."""
    short = bench.main_scores().mean(axis=1)
    long = bench.transfer_scores().mean(axis=1)
    both = short.index.intersection(long.index)
    a, b = short.loc[both].to_numpy(), long.loc[both].to_numpy()
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, len(both), len(both))
        if len(set(i.tolist())) > 2:
            boots.append(spearman(pd.Series(a[i]), pd.Series(b[i])))
    lo, hi = (np.nanpercentile(boots, [2.5, 97.5]) if boots else (math.nan, math.nan))
    return {"recipes": len(both), "spearman": spearman(pd.Series(a), pd.Series(b)), "lo": float(lo), "hi": float(hi)}


def finalists_needed(bench: Benchmark, *, prob: float = 0.9, draws: int = 4000, seed: int = 0,
                     resample: bool = False) -> pd.DataFrame:
    """`finalists_needed_from` on a benchmark: the recipes recorded at both budgets, seen through their
    trial-budget scores (recipe x seed), judged by their mean longer-budget score."""
    short = bench.main_scores()
    long = bench.transfer_scores().mean(axis=1)
    both = short.index.intersection(long.index)
    return finalists_needed_from(short.loc[both].to_numpy(), long.loc[both].to_numpy(), prob=prob, draws=draws,
                                 seed=seed, resample=resample)


def finalists_needed_from(seen: np.ndarray, truth: np.ndarray, *, prob: float = 0.9, draws: int = 4000,
                          seed: int = 0, resample: bool = False) -> pd.DataFrame:
    """P(the truly best candidate is among the top k by a sweep's view of them), for every k. A sweep
    sees each candidate once, through one of its seeds' scores `seen[i, :]` (drawn per candidate and
    draw, as its trials differ); `truth[i]` is what the candidate is worth at the final budget. With
    `resample`, each draw resamples the candidates with replacement (a new set of candidates like
    them: the answer's spread over candidate sets). Rows: k, prob, `regret` (the mean gap in truth
    between the best of the top k and the best candidate: what a retrain that tells the k apart
    still loses), and `enough` on the smallest k whose probability reaches `prob`."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    counts, regret = np.zeros(n), np.zeros(n)
    for _ in range(draws):
        pick = rng.integers(0, n, n) if resample else np.arange(n)
        observed = seen[pick, rng.integers(0, seen.shape[1], n)]
        best = np.flatnonzero(truth[pick] == truth[pick].min())
        order = np.argsort(observed, kind="stable")
        counts[int(np.flatnonzero(np.isin(order, best))[0])] += 1  # the first true best's 0-based rank
        regret += np.minimum.accumulate(truth[pick][order]) - truth[pick].min()
    table = pd.DataFrame({"k": np.arange(1, n + 1), "prob": np.cumsum(counts) / draws, "regret": regret / draws})
    reached = table.loc[table["prob"] >= prob, "k"]
    return table.assign(enough=table["k"] == (reached.min() if len(reached) else -1))
