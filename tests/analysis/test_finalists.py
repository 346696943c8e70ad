"""The finalists table and the sweep's answer, on hand-made final tables."""

import math
import statistics

import pandas as pd
import pytest

from jepatune.analysis import explore, schema
from jepatune.analysis.finalists import conclusion, finalists_table, trial_to_final_spearman


def final(runs: dict[str, tuple], seeds=(1, 2, 3), steps: int = 100) -> pd.DataFrame:
    """{recipe: (trial_id, trial_bpb, finalist, [val_bpb per seed])} as a final table."""
    rows = [{"recipe": recipe, "seed": s, "steps": steps, "status": "completed", "val_bpb": v, "trial_id": tid,
             "trial_bpb": tbpb, "finalist": fin, "recipe_key": recipe}
            for recipe, (tid, tbpb, fin, values) in runs.items() for s, v in zip(seeds, values, strict=True)]
    return pd.DataFrame(rows, columns=list(schema.FINAL)).astype(schema.FINAL)


RUNS = {  # the best trial retrains worse than the second: the retrain, not the trial, picks the winner
    "finalist-1": ("t1", 3.00, True, [3.40, 3.45, 3.38]),
    "finalist-2": ("t2", 3.05, True, [3.30, 3.33, 3.29]),
    "reference": ("t0", 3.50, False, [3.60, 3.62, 3.61]),
}


def test_the_best_retrain_wins_not_the_best_trial():
    t = finalists_table(final(RUNS)).set_index("recipe")
    assert list(t.index) == ["finalist-2", "finalist-1", "reference"]  # the winner first, then by mean
    assert t["winner"].tolist() == [True, False, False]
    assert t["final_rank"].tolist() == [1, 2, 3] and t["n"].tolist() == [3, 3, 3]
    d = [a - b for a, b in zip(RUNS["finalist-2"][3], RUNS["reference"][3], strict=True)]
    half = explore.t_quantile_975(2) * statistics.stdev(d) / math.sqrt(3)
    assert t.loc["finalist-2", "delta_ref"] == pytest.approx(statistics.mean(d))
    assert (t.loc["finalist-2", "ref_ci_low"], t.loc["finalist-2", "ref_ci_high"]) == pytest.approx(
        (statistics.mean(d) - half, statistics.mean(d) + half))
    assert t.loc["finalist-1", "delta_winner"] == pytest.approx(statistics.mean([0.10, 0.12, 0.09]))
    assert math.isnan(t.loc["finalist-2", "delta_winner"])
    # drift = retrain mean - trial score; excess over the reference's own drift is the winner's curse
    ref_drift = statistics.mean(RUNS["reference"][3]) - 3.50
    assert t.loc["finalist-1", "drift"] == pytest.approx(statistics.mean(RUNS["finalist-1"][3]) - 3.00)
    assert t.loc["finalist-1", "excess_drift"] == pytest.approx(t.loc["finalist-1", "drift"] - ref_drift)
    assert t.loc["reference", "excess_drift"] == pytest.approx(0.0)
    assert not t.loc["reference", "finalist"] and t.loc["finalist-1", "finalist"]
    assert trial_to_final_spearman(t.reset_index()) == pytest.approx(0.5)  # ranks (1,2,3) vs (2,1,3)


def test_the_answer_in_words():
    t = finalists_table(final(RUNS))
    sentence = conclusion(t)
    assert sentence.startswith("Use finalist-2 (trial t2, best.toml): retrained with 3 seeds it scores 3.3067 BPB")
    assert "a difference of -0.3033 BPB" in sentence and sentence.endswith("significant: the interval excludes 0.")
    noisy = {**RUNS, "finalist-2": ("t2", 3.05, True, [3.30, 3.65, 3.20])}
    unresolved = conclusion(finalists_table(final(noisy)))
    assert "not significant at 3 seeds" in unresolved and unresolved.startswith("finalist-2 (trial t2, best.toml) "
                                                                                  "has the best retrain mean: ")
    worse = {k: (*v[:3], [x + (1.0 if k != "reference" else 0.0) for x in v[3]]) for k, v in RUNS.items()}
    kept = conclusion(finalists_table(final(worse)))
    assert kept.startswith("Keep the reference recipe") and "finalist-2, is +0.6967 BPB" in kept
    assert finalists_table(final(worse)).iloc[0]["recipe"] == "reference"  # best.toml: the reference
    assert conclusion(finalists_table(final({}))).startswith("No retrain has finished yet")


def test_only_the_newest_budget_and_the_seeds_both_sides_ran():
    old = final(RUNS, steps=50)
    diverged = final({**RUNS, "finalist-2": ("t2", 3.05, True, [3.30, math.nan, 3.29])})
    diverged.loc[diverged["val_bpb"].isna(), "status"] = "diverged"
    t = finalists_table(pd.concat([old, diverged], ignore_index=True)).set_index("recipe")
    assert t.loc["finalist-2", "n"] == 2 and "finalist-2 seed 2 diverged" in t.loc["finalist-2", "missing"]
    assert t.loc["finalist-2", "delta_ref"] == pytest.approx(statistics.mean([3.30 - 3.60, 3.29 - 3.61]))
