"""Pandas helpers over a sweep's tables: leaderboard, marginals, importance, rung fidelity, final deltas.

`load(folder)` reads the tables of a sweep folder (rebuilding them when missing or stale); every
other function is pure: it takes the tables as DataFrames (with the dtypes of
`jepatune.analysis.schema`) and returns a new DataFrame. "Completed" trials are those that ran their
whole budget (`status == "completed"`) and have a `last_val_bpb`; "BPB" is that final value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import optuna
import pandas as pd

from jepatune.errors import JepatuneError
from jepatune.experiment.trials import KNOBS

EVALUATORS = ("fanova", "ped-anova")
# Two-sided 95% quantiles of Student's t for df = 1..30; above 30 a Cornish-Fisher expansion (error < 1e-5).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def knob_columns(trials: pd.DataFrame) -> list[str]:
    """The hyperparameter columns of `trials` (TrainConfig knobs), in table order."""
    return [c for c in trials.columns if c in KNOBS]


def completed_trials(trials: pd.DataFrame) -> pd.DataFrame:
    done = trials["status"].eq("completed").fillna(False).astype(bool) & trials["last_val_bpb"].notna()
    return trials[done.to_numpy()]


def leaderboard(trials: pd.DataFrame, k: int = 10, include_pruned: bool = False) -> pd.DataFrame:
    """The best `k` completed trials by val_bpb (ascending). The reference trial, when completed, is
    kept even outside the top `k` (after them). With `include_pruned`, the `k` pruned trials that went
    furthest (most steps, then lowest last val_bpb) follow.

    Columns: trial_id, status, is_reference, val_bpb (= last_val_bpb), the knob columns, step, device_s."""
    done = completed_trials(trials).sort_values("last_val_bpb", kind="stable")
    top = done.head(k)
    ref = done[done["is_reference"].fillna(False).astype(bool).to_numpy()]
    parts = [top, ref[~ref["trial_id"].isin(top["trial_id"])]]
    if include_pruned:
        pruned = trials[trials["status"].eq("pruned").fillna(False).astype(bool).to_numpy()]
        parts.append(pruned.sort_values(["step", "last_val_bpb"], ascending=[False, True], kind="stable").head(k))
    parts = [p for p in parts if len(p)]
    board = pd.concat(parts) if parts else trials.iloc[:0]
    columns = ["trial_id", "status", "is_reference", "last_val_bpb", *knob_columns(trials), "step", "device_s"]
    return board[columns].rename(columns={"last_val_bpb": "val_bpb"}).reset_index(drop=True)


def is_log(values: pd.Series) -> bool:
    """A log-scale parameter: all positive, spanning more than one decade."""
    return bool(len(values) and values.min() > 0 and values.max() / values.min() > 10)  # a Python bool: it is
    # written into Optuna journals, which refuse numpy's


def is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _check_param(trials: pd.DataFrame, param: str) -> None:
    knobs = knob_columns(trials)
    if param not in knobs:
        raise JepatuneError(f"{param!r} is not a hyperparameter of this sweep; choose one of {', '.join(knobs)}")


def marginals(trials: pd.DataFrame, param: str, bins: int = 5) -> pd.DataFrame:
    """BPB of the completed trials against one hyperparameter.

    A numeric param with more than `bins` distinct values falls into `bins` quantile bins (fewer
    when edges coincide), right-closed, computed on log10 values when the param is log-scale (all
    positive, spanning more than a decade: the edges are then geometric); one with fewer values, or
    a bool/string param, is grouped by value. Rows in bin order.

    Columns: bin (label), low, high (bin edges; low == high == the value for a numeric group by value;
    NaN for bool/string), count, mean_bpb, min_bpb, std_bpb (NaN for one trial)."""
    _check_param(trials, param)
    done = completed_trials(trials)
    done = done[done[param].notna().to_numpy()]
    x, bpb = done[param], done["last_val_bpb"].astype(float)
    if is_numeric(x) and x.nunique() > bins:
        x = x.astype(float)
        log = is_log(x)
        codes, edges = pd.qcut(np.log10(x) if log else x, bins, labels=False, retbins=True, duplicates="drop")
        edges = 10 ** edges if log else edges
        keys = codes.astype(int)
        low, high = edges[:-1], edges[1:]
        labels = [f"{'(' if i else '['}{lo:.4g}, {hi:.4g}]" for i, (lo, hi) in enumerate(zip(low, high, strict=True))]
    else:
        values = sorted(x.unique())
        keys = x.map({v: i for i, v in enumerate(values)})
        numeric = is_numeric(x)
        low = high = [float(v) if numeric else math.nan for v in values]
        labels = [f"{v:.4g}" if numeric else str(v) for v in values]
    stats = bpb.groupby(keys.to_numpy()).agg(["count", "mean", "min", "std"])
    rows = [{"bin": labels[i], "low": low[i], "high": high[i], "count": int(s["count"]), "mean_bpb": s["mean"],
             "min_bpb": s["min"], "std_bpb": s["std"]} for i, s in stats.iterrows()]
    columns = ["bin", "low", "high", "count", "mean_bpb", "min_bpb", "std_bpb"]
    return pd.DataFrame(rows, columns=columns).astype({"bin": "string", "low": float, "high": float,
                                                       "count": "Int64"})


def distribution_of(values: pd.Series) -> tuple[optuna.distributions.BaseDistribution, type]:
    """The Optuna distribution a param's values came from (inferred), and the Python type of a value."""
    if pd.api.types.is_bool_dtype(values):
        return optuna.distributions.CategoricalDistribution(sorted({bool(v) for v in values})), bool
    if pd.api.types.is_integer_dtype(values):
        return optuna.distributions.IntDistribution(int(values.min()), int(values.max()), log=is_log(values)), int
    if pd.api.types.is_float_dtype(values):
        values = values.astype(float)
        return optuna.distributions.FloatDistribution(values.min(), values.max(), log=is_log(values)), float
    return optuna.distributions.CategoricalDistribution(sorted({str(v) for v in values})), str


def _evaluator(name: str, seed: int) -> optuna.importance.BaseImportanceEvaluator:
    if name == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    if name != "fanova":
        raise JepatuneError(f"importance evaluator {name!r} is unknown; choose one of {', '.join(EVALUATORS)}")
    try:
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    except ImportError as e:  # Optuna's fANOVA fits scikit-learn random forests
        raise JepatuneError("fANOVA importance needs scikit-learn, which is not installed: "
                            "pip install scikit-learn (or use evaluator='ped-anova')") from e


def importance(trials: pd.DataFrame, evaluator: str = "fanova", seed: int = 0) -> pd.DataFrame:
    """How much each hyperparameter explains the BPB of the completed trials, by Optuna's evaluator
    ("fanova": `FanovaImportanceEvaluator(seed)`, needs scikit-learn; "ped-anova":
    `PedAnovaImportanceEvaluator()`) on an in-memory study built from the table. Distributions are
    inferred from the values (float/int: their range, log-scale when all positive over more than a
    decade; bool/string: categorical); params null in some completed trial or constant are left out.

    Columns: param, importance (Optuna-normalised: sums to 1 unless all are 0), evaluator; most
    important first."""
    done = completed_trials(trials)
    if len(done) < 2:
        raise JepatuneError(f"importance needs at least 2 completed trials (full budget); this sweep has "
                            f"{len(done)}: run more --samples")
    if done["last_val_bpb"].nunique() < 2:
        raise JepatuneError(f"the {len(done)} completed trials all have the same val_bpb: no importance to attribute")
    params = [c for c in knob_columns(done) if done[c].notna().all() and done[c].nunique() > 1]
    if not params:
        raise JepatuneError(f"no hyperparameter varies across the {len(done)} completed trials; importance needs "
                            f"at least 2 completed trials with different recipes")
    chosen = _evaluator(evaluator, seed)
    dists = {p: distribution_of(done[p]) for p in params}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        study = optuna.create_study(direction="minimize")
        for _, row in done.iterrows():
            study.add_trial(optuna.trial.create_trial(
                params={p: kind(row[p]) for p, (_, kind) in dists.items()},
                distributions={p: dist for p, (dist, _) in dists.items()}, value=float(row["last_val_bpb"])))
        scores = optuna.importance.get_param_importances(study, evaluator=chosen)
    finally:
        optuna.logging.set_verbosity(verbosity)
    out = pd.DataFrame({"param": list(scores), "importance": [float(v) for v in scores.values()]})
    return out.assign(evaluator=evaluator).astype({"param": "string", "evaluator": "string"})


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation of two aligned series: the Pearson correlation of their average
    ranks (ties share the mean of their ranks). NaN when either is constant or shorter than 2."""
    return float(a.rank().reset_index(drop=True).corr(b.rank().reset_index(drop=True)))


def rung_correlation(trials: pd.DataFrame, curves: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """How well each ASHA rung's ranking predicts the final one, over the completed trials.

    Rungs: the steps ASHA judged at (`decisions.step`, the budget position; under the `restart`
    fidelity each rung is a run of that many steps), else the distinct curve steps below the budget.
    `best_stopped_here` is True when the best completed trial's val_bpb at the rung is worse
    (greater) than the most lenient (largest) cut-off recorded at that rung: whenever ASHA judged a
    trial there, it would have stopped that one. False when the rung has no cut-off or no value.

    Columns: rung, n (completed trials with a value at the rung), spearman (rung val_bpb vs final
    val_bpb; NaN when n < 3), ci_low/ci_high (its approximate 95% interval, `spearman_interval`: at
    n = 5 it spans most of [-1, 1]), cutoff (the largest recorded), best_stopped_here, stopped
    (trials ASHA stopped at the rung)."""
    done = completed_trials(trials)
    final = done.set_index("trial_id")["last_val_bpb"].astype(float)
    judged_at = decisions["step"].fillna(decisions["rung"])  # rows written without a step: the rung itself
    if len(decisions):
        rungs = sorted({int(r) for r in judged_at.dropna()})
    else:
        budget = trials["trial_steps"].max() if len(trials) else 0
        rungs = sorted({int(s) for s in curves["step"].dropna() if pd.notna(budget) and s < budget})
    best = final.idxmin() if len(final) else None
    rows = []
    for rung in rungs:
        at = curves[curves["step"].eq(rung).fillna(False).astype(bool).to_numpy()]
        at = at.drop_duplicates("trial_id", keep="last").set_index("trial_id")["val_bpb"].astype(float)
        both = pd.concat([at, final], axis=1, join="inner", keys=["rung", "final"]).dropna()
        judged = decisions[judged_at.eq(rung).fillna(False).astype(bool).to_numpy()]
        cutoff = float(judged["cutoff"].max()) if judged["cutoff"].notna().any() else math.nan
        value = at.get(best, math.nan) if best is not None else math.nan
        stopped = judged.loc[judged["decision"].isin(("stop", "audit")).fillna(False).astype(bool).to_numpy(),
                             "trial_id"]
        rho = spearman(both["rung"], both["final"]) if len(both) >= 3 else math.nan
        low, high = spearman_interval(rho, len(both))
        rows.append({"rung": rung, "n": len(both), "spearman": rho, "ci_low": low, "ci_high": high,
                     "cutoff": cutoff, "best_stopped_here": bool(value > cutoff), "stopped": stopped.nunique()})
    columns = ["rung", "n", "spearman", "ci_low", "ci_high", "cutoff", "best_stopped_here", "stopped"]
    return pd.DataFrame(rows, columns=columns).astype({"rung": "Int64", "n": "Int64", "spearman": float,
                                                       "ci_low": float, "ci_high": float, "cutoff": float,
                                                       "best_stopped_here": bool, "stopped": "Int64"})


def spearman_interval(rho: float, n: int) -> tuple[float, float]:
    """An approximate 95% interval of a Spearman correlation over `n` pairs: Fisher's z with the
    standard error 1.06 / sqrt(n - 3) (Fieller, Hartley and Pearson, 1957). NaN below 4 pairs."""
    if n < 4 or not math.isfinite(rho):
        return math.nan, math.nan
    z, half = math.atanh(max(-0.999999, min(0.999999, rho))), 1.959964 * 1.06 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion k / n (sound at 0 or n successes, small n)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def false_stops(trials: pd.DataFrame) -> pd.DataFrame:
    """How often ASHA's stops were wrong, estimated from the audit trials (stopped by the rule, run
    to the end anyway). A stop is false when the audited trial's final val_bpb beats the median final
    val_bpb of the trials ASHA itself let run to the end. One row: audited, false_stops, rate and
    its Wilson 95% interval (ci_low, ci_high), beat_best (audited trials better than every trial
    ASHA kept), kept (trials ASHA let finish). Rate and interval are NaN with no audit or no kept trial."""
    done = completed_trials(trials)
    audited = done["audited"].fillna(False).astype(bool) if "audited" in done else pd.Series(False, index=done.index)
    kept = done.loc[~audited.to_numpy(), "last_val_bpb"].astype(float)
    checked = done.loc[audited.to_numpy(), "last_val_bpb"].astype(float)
    n = len(checked) if len(kept) else 0
    k = int((checked < kept.median()).sum()) if n else 0
    low, high = wilson_interval(k, n)
    return pd.DataFrame([{"audited": len(checked), "false_stops": k, "rate": k / n if n else math.nan,
                          "ci_low": low, "ci_high": high,
                          "beat_best": int((checked < kept.min()).sum()) if len(kept) else 0, "kept": len(kept)}])


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (a 95% two-sided CI's multiplier)."""
    if df < 1:
        raise ValueError(f"df={df}: must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    g1, g2 = (z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def _newest_config(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows (in table order) of the newest recipe run under one label: those with the
    `recipe_key` (the config without its seed) of the label's last row. A retrain of another recipe
    under the same label (a sweep's new winner, say) replaces the older one rather than being pooled
    with it. Without a `recipe_key` every row is taken."""
    if "recipe_key" not in rows.columns or rows["recipe_key"].isna().all():
        return rows
    newest = rows["recipe_key"].iloc[-1]
    return rows[rows["recipe_key"].eq(newest).fillna(False).astype(bool).to_numpy()]


def _seed_outcomes(runs: pd.DataFrame) -> tuple[pd.Series, dict[int, str]]:
    """(val_bpb per seed that finished: status "completed" or unknown, with a val_bpb; why each other
    seed did not: its status, or "has no val_bpb"). A seed run twice counts once: its last finished
    row, else its last row. Rows without a seed cannot be paired and are left out."""
    runs = runs[runs["seed"].notna().to_numpy()]
    seeds = runs["seed"].astype(int).to_numpy()
    done = ((runs["status"].isna() | runs["status"].eq("completed")).fillna(False).astype(bool).to_numpy()
            & runs["val_bpb"].notna().to_numpy())
    values = pd.Series(runs["val_bpb"].astype(float).to_numpy()[done], index=seeds[done])
    values = values[~values.index.duplicated(keep="last")].sort_index()
    why = {}
    for seed, status in zip(seeds[~done], runs["status"].to_numpy()[~done], strict=True):
        if seed not in values.index:
            why[int(seed)] = "has no val_bpb" if pd.isna(status) or status == "completed" else str(status)
    return values, why


def _seed_list(seeds: Iterable[int]) -> str:
    seeds = sorted(seeds)
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def pair_by_seed(runs: pd.DataFrame, reference: pd.DataFrame,
                 names: tuple[str, str] = ("recipe", "reference")) -> dict[str, Any]:
    """One side's runs against the reference's (columns seed, status, val_bpb), paired by seed.

    Only seeds that finished on both sides pair (see `_seed_outcomes`). Keys: n_paired (those
    seeds), delta (mean of the paired differences runs - reference, NaN when none pair), ci_low and
    ci_high (its 95% t interval, NaN below 2 pairs), paired (n_paired >= 2), missing (every seed one
    side ran that is not in the pair, and why, naming the sides by `names`: "best seed 1 diverged;
    reference lacks seed 2"; "" when none)."""
    x, x_why = _seed_outcomes(runs)
    ref, ref_why = _seed_outcomes(reference)
    common = x.index.intersection(ref.index).sort_values()
    d = x.loc[common] - ref.loc[common]
    out = {"n_paired": len(d), "delta": d.mean() if len(d) else math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "paired": len(d) >= 2}
    if len(d) >= 2:
        half = t_quantile_975(len(d) - 1) * d.std() / math.sqrt(len(d))
        out.update(ci_low=d.mean() - half, ci_high=d.mean() + half)
    seen = set(x.index) | set(x_why) | set(ref.index) | set(ref_why)
    parts = []
    for name, values, why in ((names[0], x, x_why), (names[1], ref, ref_why)):
        absent = seen - set(values.index) - set(why)
        if absent:
            parts.append(f"{name} lacks {_seed_list(absent)}")
        for reason in dict.fromkeys(why[s] for s in sorted(why)):
            parts.append(f"{name} {_seed_list(s for s in why if why[s] == reason)} {reason}")
    out["missing"] = "; ".join(parts)
    return out


def newest_budget(final: pd.DataFrame) -> pd.DataFrame:
    """The runs at the newest retrain's budget (its last row's `steps`): an older retrain at another
    budget answers another question."""
    if final.empty or "steps" not in final or final["steps"].nunique() <= 1:
        return final
    return final[final["steps"].eq(final["steps"].iloc[-1]).fillna(False).astype(bool).to_numpy()]


def compare_final(final: pd.DataFrame, reference: str = "reference") -> pd.DataFrame:
    """The final retrain per recipe, each against `reference`, paired by seed.

    Rows compared: when the table holds retrains at several budgets (`steps`), only those at the
    newest retrain's budget (its last row's). When one label holds retrains of several configs
    (a re-run of the retrain with another config under the same label, e.g. a new "best"), only
    the label's newest config counts (the one of its last row; the table is append-ordered) and
    its older rows are ignored, on the reference's side as well (`_newest_config` says how configs
    are told apart by `recipe_key`). A run counts when it finished: status "completed" or unknown,
    with a val_bpb; a seed run twice counts once (its last finished row).

    mean, std and count are over the recipe's own finished runs. delta is the mean of the per-seed
    differences recipe - reference (negative: better) over the seeds both finished (n_paired),
    NaN when none; with 2 or more, ci_low/ci_high is their 95% paired t interval and paired is True,
    else NaN and False. missing names every seed either side ran that is not in the pair, and why
    ("best seed 1 diverged; reference lacks seed 2"; "" when none; "no reference run" without any).
    Recipes with no finished run have no row. Sorted by mean.

    Columns: recipe, mean, std, count, delta (NaN for the reference itself, or with no reference),
    ci_low, ci_high, paired, n_paired (<NA> for the reference itself), missing."""
    columns = ["recipe", "mean", "std", "count", "delta", "ci_low", "ci_high", "paired", "n_paired", "missing"]
    final = newest_budget(final)
    labels = {str(r): _newest_config(g) for r, g in final.groupby("recipe")}
    ref = labels.get(reference)
    rows = []
    for recipe, runs in labels.items():
        x, _ = _seed_outcomes(runs)
        if x.empty:
            continue
        row = {"recipe": recipe, "mean": x.mean(), "std": x.std(), "count": len(x), "delta": math.nan,
               "ci_low": math.nan, "ci_high": math.nan, "paired": False, "n_paired": pd.NA, "missing": ""}
        if recipe != reference:
            row.update(pair_by_seed(runs, ref, (recipe, reference)) if ref is not None
                       else {"n_paired": 0, "missing": f"no {reference} run"})
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns).astype({"recipe": "string", "mean": float, "std": float,
                                                      "count": "Int64", "delta": float, "ci_low": float,
                                                      "ci_high": float, "paired": bool, "n_paired": "Int64",
                                                      "missing": "string"})
    return out.sort_values("mean", kind="stable").reset_index(drop=True)
