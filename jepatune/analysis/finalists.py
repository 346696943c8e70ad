"""The sweep's answer: its finalists retrained out of sample, the winner, and how sure that is.

A sweep's trials all train with one seed at the trial budget, so the best trial score is the best
of many noisy draws and flatters its recipe (the winner's curse). The finalists (the top distinct
recipes by trial score, and the reference) are retrained at the final budget with seeds no trial
used; the winner is the recipe with the best retrain mean (the reference when no finalist beats
it). `finalists_table` computes, from the `final` table alone (pure: DataFrame in, DataFrame out),
one row per retrained recipe; `conclusion` says it in one sentence.
"""

from __future__ import annotations

import math

import pandas as pd

from jepatune.analysis import schema
from jepatune.analysis.explore import compare_final, newest_budget, spearman

REFERENCE = "reference"


def finalists_table(final: pd.DataFrame) -> pd.DataFrame:
    """One row per recipe of the newest retrain, the winner first, then by retrain mean.

    Columns (`schema.FINALISTS`): recipe; finalist (it ranked among the top trials: the reference
    is retrained always, and is a finalist only when it ranked there); winner (the lowest mean of
    all, the reference included: when no finalist beats it, the answer is to keep it); its trial
    (`trial_id`, `trial_rank` among completed trials, `trial_bpb`); the
    retrain's `n`, `mean`, `std` and `final_rank`; the paired-by-seed delta vs the reference and vs
    the winner with 95% t intervals (`explore.compare_final`: seeds both sides completed; `missing`
    names the others); `drift` = retrain mean - trial score (at another budget this includes the
    budget's effect); `excess_drift` = drift - the reference's drift: the reference is trained in
    every sweep, never selected, so what the selected recipes drift more is the winner's curse."""
    rows = newest_budget(final)
    ok = rows[rows["status"].fillna("completed").eq("completed").to_numpy() & rows["val_bpb"].notna().to_numpy()]
    if ok.empty:
        return pd.DataFrame(columns=list(schema.FINALISTS)).astype(schema.FINALISTS)
    about = rows.drop_duplicates("recipe", keep="last").set_index("recipe")
    stats = compare_final(rows, reference=REFERENCE).set_index("recipe")  # all rows: `missing` says why
    is_finalist = {r: r != REFERENCE or _ranked(about, r) for r in stats.index}
    winner = stats["mean"].idxmin()  # the reference too: if it retrains best, it is what to ship
    vs_winner = compare_final(rows, reference=winner).set_index("recipe")
    out = []
    for recipe, s in stats.iterrows():
        trial_bpb = _about(about, recipe, "trial_bpb")
        out.append({
            "recipe": recipe, "finalist": is_finalist[recipe], "winner": recipe == winner,
            "trial_id": _about(about, recipe, "trial_id"), "trial_rank": _about(about, recipe, "trial_rank"),
            "trial_bpb": trial_bpb, "n": s["count"], "mean": s["mean"], "std": s["std"],
            "delta_ref": s["delta"], "ref_ci_low": s["ci_low"], "ref_ci_high": s["ci_high"],
            "delta_winner": vs_winner.loc[recipe, "delta"], "win_ci_low": vs_winner.loc[recipe, "ci_low"],
            "win_ci_high": vs_winner.loc[recipe, "ci_high"],
            "drift": s["mean"] - trial_bpb if trial_bpb is not None else math.nan,
            "missing": _missing(s, vs_winner.loc[recipe]),
        })
    table = pd.DataFrame(out)
    ref_drift = table.loc[table["recipe"].eq(REFERENCE), "drift"]
    table["excess_drift"] = table["drift"] - (ref_drift.iloc[0] if len(ref_drift) else math.nan)
    table["final_rank"] = table["mean"].rank(method="min")
    table = table.sort_values(["winner", "mean"], ascending=[False, True], kind="stable")
    return table[list(schema.FINALISTS)].astype(schema.FINALISTS).reset_index(drop=True)


def _ranked(about: pd.DataFrame, recipe: str) -> bool:
    value = about.loc[recipe].get("finalist", False) if recipe in about.index else False
    return bool(value) if pd.notna(value) else False


def _about(about: pd.DataFrame, recipe: str, column: str):
    if recipe not in about.index or column not in about or pd.isna(about.loc[recipe, column]):
        return None
    value = about.loc[recipe, column]
    return value.item() if hasattr(value, "item") else value


def _missing(vs_ref: pd.Series, vs_winner: pd.Series) -> str:
    parts = [str(m) for m in (vs_ref.get("missing"), vs_winner.get("missing")) if isinstance(m, str) and m]
    return "; ".join(dict.fromkeys(parts))


def trial_to_final_spearman(table: pd.DataFrame) -> float:
    """Rank correlation between the trial scores and the retrain means of the retrained recipes:
    does the order at the trial budget hold at the final budget? NaN below 3 recipes."""
    both = table.dropna(subset=["trial_bpb", "mean"])
    return spearman(both["trial_bpb"], both["mean"]) if len(both) >= 3 else math.nan


def significant(low: float, high: float) -> bool:
    return bool(low > 0 or high < 0)  # False when NaN


def conclusion(table: pd.DataFrame) -> str:
    """One sentence: which recipe to use, by how much it beats the reference, and whether that is
    resolved at this many seeds."""
    if table.empty:
        return "No retrain has finished yet: the sweep has no answer (run `jepatune retrain SWEEP`)."
    win = table[table["winner"]].iloc[0]
    n = int(win["n"])
    ref = table[table["recipe"].eq(REFERENCE)]
    if win["recipe"] == REFERENCE:
        others = table[~table["recipe"].eq(REFERENCE)]
        if others.empty:
            return f"Only the reference was retrained ({n} seeds, mean {win['mean']:.4f} BPB): nothing to compare."
        best = others.iloc[0]
        low, high = best["ref_ci_low"], best["ref_ci_high"]
        return (f"Keep the reference recipe: no finalist beat it when retrained with {int(best['n'])} seeds (the "
                f"best, {best['recipe']}, is {best['delta_ref']:+.4f} BPB against it, 95% CI [{low:+.4f}, "
                f"{high:+.4f}]), {_verdict(low, high, int(best['n']))}.")
    low, high = win["ref_ci_low"], win["ref_ci_high"]
    # "Use" only when the gain is resolved; otherwise the best retrain is named, not recommended.
    verb = ("Use {} (trial {}, best.toml): retrained" if significant(low, high) else
            "{} (trial {}, best.toml) has the best retrain mean: retrained")
    head = verb.format(win["recipe"], win["trial_id"]) + f" with {n} seeds it scores {win['mean']:.4f} BPB"
    if ref.empty or pd.isna(win["delta_ref"]):
        return head + "; the reference has no retrain at this budget to compare with."
    head += f" against the reference's {ref.iloc[0]['mean']:.4f}, a difference of {win['delta_ref']:+.4f} BPB"
    return head + f" (95% CI [{low:+.4f}, {high:+.4f}]), {_verdict(low, high, n)}."


def _verdict(low: float, high: float, n: int) -> str:
    if pd.isna(low):
        return "too few paired seeds for an interval: not resolved"
    if significant(low, high):
        return "significant: the interval excludes 0"
    return f"not significant at {n} seeds: the interval includes 0, so this sweep cannot tell it from the reference"
