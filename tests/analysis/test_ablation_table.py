"""ablation_table on hand-made runs (means, stds, paired deltas and intervals checked by hand), and the
runs table rebuilt from a hand-made ablation folder."""

import json
import math
import os
import statistics

import pandas as pd
import pytest

from jepatune.analysis import ablation_table, load_ablation, schema
from jepatune.analysis.explore import t_quantile_975
from jepatune.errors import JepatuneError


def runs(rows: list[tuple]) -> pd.DataFrame:
    """(variant, seed, val_bpb, status) tuples as an ablation_runs table."""
    frame = pd.DataFrame([{"variant": v, "change": "" if v == "base" else f"{v}=1", "seed": s, "val_bpb": bpb,
                           "prequant_bpb": bpb, "steps": 12, "status": status, "trial_id": f"t{i}"}
                          for i, (v, s, bpb, status) in enumerate(rows)], columns=list(schema.ABLATION_RUNS))
    return frame.astype(schema.ABLATION_RUNS)


def interval(d: list[float]) -> tuple[float, float]:
    half = t_quantile_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d) - half, statistics.mean(d) + half


@pytest.fixture
def table() -> pd.DataFrame:
    ok = "completed"
    return ablation_table(runs([
        ("a", 0, 4.8, ok), ("a", 1, 5.1, ok), ("a", 2, 4.9, ok), ("a", 3, math.nan, "diverged"),
        ("base", 0, 5.0, ok), ("base", 1, 5.2, ok), ("base", 2, 5.1, ok),  # the base need not come first
        ("b", 0, 5.3, ok), ("b", 1, 5.0, ok), ("b", 2, math.nan, "errored"), ("b", 3, 5.6, ok),  # base lacks 3
        ("c", 1, 5.0, ok),
        ("d", 0, math.nan, "errored"), ("d", 1, math.nan, "errored"),
    ]))


def test_columns_dtypes_and_order(table):
    assert {c: str(t) for c, t in table.dtypes.items()} == schema.ABLATION
    assert list(table["variant"]) == ["base", "a", "b", "c", "d"]
    assert list(table["change"]) == ["", "a=1", "b=1", "c=1", "d=1"]


def test_means_and_stds_over_each_variants_completed_runs(table):
    t = table.set_index("variant")
    for variant, values in {"base": [5.0, 5.2, 5.1], "a": [4.8, 5.1, 4.9], "b": [5.3, 5.0, 5.6]}.items():
        assert t.loc[variant, "mean_bpb"] == pytest.approx(statistics.mean(values))
        assert t.loc[variant, "std_bpb"] == pytest.approx(statistics.stdev(values))
    assert t.loc["c", "mean_bpb"] == pytest.approx(5.0) and math.isnan(t.loc["c", "std_bpb"])
    assert math.isnan(t.loc["d", "mean_bpb"])


def test_paired_deltas_and_intervals_by_hand(table):
    t = table.set_index("variant")
    assert t.loc["base", "n"] == 3
    assert all(math.isnan(t.loc["base", k]) for k in ("delta", "ci_low", "ci_high"))
    assert not t.loc["base", "significant"]
    # a: every seed paired; the variant is better on each, the interval excludes 0.
    d = [4.8 - 5.0, 5.1 - 5.2, 4.9 - 5.1]
    assert t.loc["a", "n"] == 3
    assert t.loc["a", "delta"] == pytest.approx(statistics.mean(d))
    assert (t.loc["a", "ci_low"], t.loc["a", "ci_high"]) == pytest.approx(interval(d))
    assert t.loc["a", "ci_high"] < 0 and t.loc["a", "significant"]
    # b: seed 2 errored and the base has no seed 3, so only seeds 0 and 1 pair (its mean uses all three).
    d = [5.3 - 5.0, 5.0 - 5.2]
    assert t.loc["b", "n"] == 2
    assert t.loc["b", "delta"] == pytest.approx(0.05)
    assert (t.loc["b", "ci_low"], t.loc["b", "ci_high"]) == pytest.approx(interval(d))
    assert t.loc["b", "ci_low"] < 0 < t.loc["b", "ci_high"] and not t.loc["b", "significant"]
    # c: one pair: a delta, no interval.
    assert t.loc["c", "n"] == 1 and t.loc["c", "delta"] == pytest.approx(5.0 - 5.2)
    assert math.isnan(t.loc["c", "ci_low"]) and not t.loc["c", "significant"]
    # d: nothing completed.
    assert t.loc["d", "n"] == 0 and math.isnan(t.loc["d", "delta"]) and not t.loc["d", "significant"]


def test_the_seeds_left_out_of_each_pair_are_named(table):
    assert "missing" in table.columns
    ok = "completed"
    t = ablation_table(runs([
        ("a", 0, 4.8, ok), ("a", 1, 5.1, ok), ("a", 2, 4.9, ok), ("a", 3, math.nan, "diverged"),
        ("base", 0, 5.0, ok), ("base", 1, 5.2, ok), ("base", 2, 5.1, ok),
        ("b", 0, 5.3, ok), ("b", 1, 5.0, ok), ("b", 2, math.nan, "errored"), ("b", 3, 5.6, ok),
        ("c", 1, 5.0, ok),
        ("d", 0, math.nan, "errored"), ("d", 1, math.nan, "errored"),
    ])).set_index("variant")
    assert t["missing"].to_dict() == {
        "base": "", "a": "a seed 3 diverged; base lacks seed 3", "b": "b seed 2 errored; base lacks seed 3",
        "c": "c lacks seeds 0, 2", "d": "d lacks seed 2; d seeds 0, 1 errored"}
    assert t.loc["b", "n"] == 2 and t.loc["b", "delta"] == pytest.approx(0.05)  # the same pairing as above
    alone = ablation_table(runs([("x", 0, 4.0, "completed")]))
    assert alone["missing"].tolist() == ["no base run"]


def test_a_worse_variant_is_significant_with_a_positive_interval():
    table = ablation_table(runs([("base", s, 5.0 + 0.01 * s, "completed") for s in range(4)]
                                + [("w", s, 5.5 + 0.02 * s, "completed") for s in range(4)]))
    w = table.set_index("variant").loc["w"]
    d = [0.5 + 0.01 * s for s in range(4)]
    assert w["delta"] == pytest.approx(statistics.mean(d)) and w["ci_low"] > 0 and w["significant"]
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(interval(d))


def test_a_seed_run_twice_counts_once_and_no_base_gives_no_delta():
    twice = ablation_table(runs([("base", 0, 5.0, "completed"), ("base", 1, 5.2, "completed"),
                                 ("x", 0, 9.0, "completed"), ("x", 0, 4.0, "completed"), ("x", 1, 4.4, "completed")]))
    x = twice.set_index("variant").loc["x"]
    assert x["n"] == 2 and x["mean_bpb"] == pytest.approx(4.2) and x["delta"] == pytest.approx(-0.9)
    alone = ablation_table(runs([("x", 0, 4.0, "completed"), ("x", 1, 4.4, "completed")]))
    assert list(alone["variant"]) == ["x"] and alone["n"].tolist() == [0] and math.isnan(alone["delta"].iloc[0])


# --- the runs table from an ablation folder's files ---------------------------------------------

def test_runs_come_from_finished_files_and_ray_errors_and_are_rebuilt_when_stale(tmp_path):
    plan = {"runs": [{"variant": v, "change": c, "seed": s, "steps": 12, "config_key": f"k{i}"}
                     for i, (v, c, s) in enumerate([("base", "", 0), ("x", "x=1", 0), ("x", "x=1", 1)])]}
    (tmp_path / "ablation.json").write_text(json.dumps(plan))
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "k0.json").write_text(json.dumps({"status": "completed", "val_bpb": 5.0, "prequant_bpb": 4.9,
                                                  "steps": 12, "trial_id": "aaaaa_00000"}))
    trial = tmp_path / "ablation_run_aaaaa_00001_1_seed=0,variant=x_2026-01-01_00-00-00"  # as Ray names it
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"variant": "x", "seed": 0}))
    (trial / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    table, runs = load_ablation(tmp_path)
    assert {c: str(t) for c, t in runs.dtypes.items()} == schema.ABLATION_RUNS
    assert runs[["variant", "seed", "status", "trial_id"]].values.tolist() == [
        ["base", 0, "completed", "aaaaa_00000"], ["x", 0, "errored", "aaaaa_00001"]]  # x seed 1: not run yet
    assert math.isnan(runs["val_bpb"].iloc[1]) and runs["steps"].tolist() == [12, 12]
    assert table["n"].tolist() == [1, 0]
    # x seed 0 is retried and finishes; the tables are older than its file, so they are rebuilt.
    (finished / "k1.json").write_text(json.dumps({"status": "completed", "val_bpb": 4.5, "prequant_bpb": 4.4,
                                                  "steps": 12, "trial_id": "bbbbb_00000"}))
    future = (tmp_path / "tables" / "ablation.parquet").stat().st_mtime_ns + 10**9
    os.utime(finished / "k1.json", ns=(future, future))
    table, runs = load_ablation(tmp_path)
    assert runs["status"].tolist() == ["completed", "completed"] and runs["trial_id"].iloc[1] == "bbbbb_00000"
    assert table["delta"].iloc[1] == pytest.approx(-0.5)


def test_a_folder_that_is_not_an_ablation(tmp_path):
    with pytest.raises(JepatuneError, match="not a jepatune ablation"):
        load_ablation(tmp_path)
    assert not any(tmp_path.iterdir())
