"""compare_final on hand-made final tables: pairing over the seeds both sides finished, the seeds it
names as missing, and one label retrained with two recipes (told apart by recipe_key)."""

import math
import statistics

import pandas as pd
import pytest

from jepatune.analysis import explore, schema


def final(rows: list[tuple]) -> pd.DataFrame:
    """(recipe, seed, val_bpb, status[, recipe_key]) tuples as a final table, in append order."""
    keys = [{"recipe_key": r[4]} if len(r) > 4 else {} for r in rows]
    frame = [{"recipe": r[0], "seed": r[1], "steps": 100, "val_bpb": r[2], "status": r[3], **k}
             for r, k in zip(rows, keys, strict=True)]
    return pd.DataFrame(frame, columns=list(schema.FINAL)).astype(schema.FINAL)


def interval(d: list[float]) -> tuple[float, float]:
    half = explore.t_quantile_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d) - half, statistics.mean(d) + half


REF = [("reference", s, v, "completed") for s, v in enumerate([5.3, 5.4, 5.35])]


def test_a_seed_diverged_on_the_recipe_side_pairs_the_other_seeds():
    c = explore.compare_final(final([("best", 0, 5.0, "completed"), ("best", 1, math.nan, "diverged"),
                                     ("best", 2, 4.9, "completed"), *REF])).set_index("recipe")
    b = c.loc["best"]
    d = [5.0 - 5.3, 4.9 - 5.35]  # seeds 0 and 2 (a difference of means over all seeds: -0.4)
    assert b["count"] == 2 and b["mean"] == pytest.approx(4.95)
    assert b["n_paired"] == 2 and b["paired"] and b["delta"] == pytest.approx(-0.375)
    assert (b["ci_low"], b["ci_high"]) == pytest.approx(interval(d))  # t(0.975, df=1) = 12.706
    assert b["missing"] == "best seed 1 diverged"
    # with seed 1 the reference's outlier, the difference of means and the paired delta part
    c = explore.compare_final(final([("best", 0, 5.0, "completed"), ("best", 1, math.nan, "diverged"),
                                     ("best", 2, 4.9, "completed"), ("reference", 0, 5.3, "completed"),
                                     ("reference", 1, 9.0, "completed"), ("reference", 2, 5.35, "completed")]))
    b = c.set_index("recipe").loc["best"]
    assert b["delta"] == pytest.approx(statistics.mean(d)) and b["n_paired"] == 2


def test_the_reference_missing_a_seed():
    c = explore.compare_final(final([("best", s, v, "completed") for s, v in enumerate([5.0, 5.2, 4.9])]
                                    + REF[:2]))
    b = c.set_index("recipe").loc["best"]
    assert b["count"] == 3 and b["mean"] == pytest.approx(statistics.mean([5.0, 5.2, 4.9]))  # seed 2 too
    assert b["n_paired"] == 2 and b["delta"] == pytest.approx(statistics.mean([5.0 - 5.3, 5.2 - 5.4]))
    assert (b["ci_low"], b["ci_high"]) == pytest.approx(interval([5.0 - 5.3, 5.2 - 5.4]))
    assert b["missing"] == "reference lacks seed 2"
    # one seed short of an interval; then none in common; then no reference at all
    one = explore.compare_final(final([("best", 0, 5.0, "completed"), ("best", 1, 5.2, "completed"),
                                       ("reference", 1, 5.4, "completed"), ("reference", 0, 5.5, "errored")]))
    b = one.set_index("recipe").loc["best"]
    assert b["n_paired"] == 1 and not b["paired"] and b["delta"] == pytest.approx(-0.2) and math.isnan(b["ci_low"])
    assert b["missing"] == "reference seed 0 errored"
    none = explore.compare_final(final([("best", 0, 5.0, "completed"), ("reference", 0, math.nan, "diverged"),
                                        ("reference", 1, math.nan, "diverged")]))
    assert list(none["recipe"]) == ["best"]  # the reference finished nothing: no row of its own
    b = none.iloc[0]
    assert b["n_paired"] == 0 and math.isnan(b["delta"]) and not b["paired"]
    assert b["missing"] == "best lacks seed 1; reference seeds 0, 1 diverged"
    alone = explore.compare_final(final([("best", 0, 5.0, "completed"), ("best", 1, 5.2, None)])).iloc[0]
    assert alone["count"] == 2 and alone["n_paired"] == 0 and alone["missing"] == "no reference run"


def test_two_configs_under_one_label_are_not_pooled():
    # A first "best" (recipe a), then a retrain of a new best under the same label (recipe b, seeds
    # finishing out of order).
    old = [("best", s, v, "completed", "a") for s, v in enumerate([9.0, 9.1, 9.2])]
    ref = [(*r, "r") for r in REF]
    new = [("best", 1, 5.2, "completed", "b"), ("best", 0, 5.0, "completed", "b"),
           ("best", 2, 4.9, "completed", "b")]
    c = explore.compare_final(final(old + ref + new)).set_index("recipe")
    b = c.loc["best"]
    assert b["count"] == 3 and b["mean"] == pytest.approx(statistics.mean([5.0, 5.2, 4.9]))
    assert b["std"] == pytest.approx(statistics.stdev([5.0, 5.2, 4.9]))
    assert b["n_paired"] == 3 and b["delta"] == pytest.approx(statistics.mean([-0.3, -0.2, -0.45]))
    assert b["missing"] == ""
    # The old recipe had run seed 0 only (a retrain cut short): it does not count either.
    cut = explore.compare_final(final(old[:1] + ref + new)).set_index("recipe").loc["best"]
    assert cut["count"] == 3 and cut["mean"] == pytest.approx(b["mean"])
    # The newest config's seed 1 diverged: the old config's seed 1 does not stand in for it.
    diverged = [("best", 1, math.nan, "diverged", "b"), *new[1:]]
    d = explore.compare_final(final(old + ref + diverged)).set_index("recipe").loc["best"]
    assert d["count"] == 2 and d["mean"] == pytest.approx(4.95) and d["missing"] == "best seed 1 diverged"
    # A run reported twice is one run.
    twice = explore.compare_final(final(old + ref + new + [new[0]])).set_index("recipe").loc["best"]
    assert twice["count"] == 3 and twice["mean"] == pytest.approx(b["mean"])
    # The reference side likewise: its newest config counts.
    newer_ref = [(*r[:2], r[2] - 1.0, r[3], "s") for r in ref]
    r = explore.compare_final(final(old + ref + new + newer_ref)).set_index("recipe")
    assert r.loc["reference", "mean"] == pytest.approx(4.35) and r.loc["reference", "count"] == 3
    assert r.loc["best", "delta"] == pytest.approx(statistics.mean([0.7, 0.8, 0.55]))
