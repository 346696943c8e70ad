"""The pandas helpers of jepatune.analysis.explore: hand-checked on small frames, then on a real sweep."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from conftest import copy_sweep

from jepatune.analysis import explore, schema
from jepatune.analysis.tables import load
from jepatune.errors import JepatuneError

KNOBS = {"jepa_pure_frac": "float64", "sigreg_weight": "float64", "swa_enabled": "boolean", "num_layers": "Int64"}


def table(columns: dict[str, str], rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def trials(rows: list[dict]) -> pd.DataFrame:
    """A trials table with the schema's dtypes; unset fields: completed, 16 steps, not the reference."""
    defaults = {"status": "completed", "is_reference": False, "step": 16, "trial_steps": 16, "device_s": 1.0}
    rows = [{**defaults, "trial_id": f"t{i}", **r} for i, r in enumerate(rows)]
    return table({**schema.TRIALS, **KNOBS}, rows)


# --- leaderboard, knob_columns -----------------------------------------------------------------

def test_leaderboard_sorts_completed_keeps_the_reference_and_appends_pruned():
    t = trials([{"last_val_bpb": 5.3, "is_reference": True, "jepa_pure_frac": 0.1},
                {"last_val_bpb": 5.1, "jepa_pure_frac": 0.2},
                {"last_val_bpb": 7.0, "status": "pruned", "step": 4},
                {"last_val_bpb": 5.0, "jepa_pure_frac": 0.3},
                {"last_val_bpb": 6.5, "status": "pruned", "step": 8},
                {"last_val_bpb": 10.0, "status": "diverged"},
                {"last_val_bpb": 5.2}])
    assert explore.knob_columns(t) == list(KNOBS)
    board = explore.leaderboard(t, k=2)
    assert list(board.columns) == ["trial_id", "status", "is_reference", "val_bpb", *KNOBS, "step", "device_s"]
    assert list(board["trial_id"]) == ["t3", "t1", "t0"]  # the top 2, then the reference outside them
    assert list(board["is_reference"]) == [False, False, True]
    assert list(explore.leaderboard(t, k=10)["trial_id"]) == ["t3", "t1", "t6", "t0"]
    full = explore.leaderboard(t, k=10, include_pruned=True)
    assert list(full["trial_id"]) == ["t3", "t1", "t6", "t0", "t4", "t2"]  # pruned: furthest first
    assert list(full["status"].iloc[-2:]) == ["pruned", "pruned"]
    assert explore.leaderboard(t.iloc[:0]).columns.tolist() == board.columns.tolist()


# --- marginals ---------------------------------------------------------------------------------

def test_marginals_quantile_bins_by_hand():
    bpb = [5.0, 5.2, 5.1, 5.4, 5.3, 6.0, 6.4, 6.2, 6.6, 6.8]
    rows = [{"jepa_pure_frac": i / 10, "last_val_bpb": v} for i, v in enumerate(bpb)]
    rows += [{"jepa_pure_frac": 0.05, "last_val_bpb": 1.0, "status": "pruned"},  # not completed: left out
             {"jepa_pure_frac": None, "last_val_bpb": 1.0}]  # no value: left out
    m = explore.marginals(trials(rows), "jepa_pure_frac", bins=2)
    assert list(m.columns) == ["bin", "low", "high", "count", "mean_bpb", "min_bpb", "std_bpb"]
    assert list(m["bin"]) == ["[0, 0.45]", "(0.45, 0.9]"]
    assert m["low"].tolist() == pytest.approx([0.0, 0.45]) and m["high"].tolist() == pytest.approx([0.45, 0.9])
    assert m["count"].tolist() == [5, 5]
    assert m["mean_bpb"].tolist() == pytest.approx([5.2, 6.4])
    assert m["min_bpb"].tolist() == pytest.approx([5.0, 6.0])
    # first bin: deviations -.2, 0, -.1, .2, .1 -> sum of squares .1, / 4
    assert m["std_bpb"].iloc[0] == pytest.approx(math.sqrt(0.1 / 4))


def test_marginals_of_a_log_scale_param_have_geometric_edges():
    rows = [{"sigreg_weight": w, "last_val_bpb": v} for w, v in ((1e-3, 5.0), (1e-2, 5.2), (1e-1, 6.0), (1.0, 6.4))]
    m = explore.marginals(trials(rows), "sigreg_weight", bins=2)
    assert m["low"].tolist() == pytest.approx([1e-3, 10**-1.5])  # the median of the log10 values, not 0.055
    assert m["high"].tolist() == pytest.approx([10**-1.5, 1.0])
    assert m["count"].tolist() == [2, 2] and m["mean_bpb"].tolist() == pytest.approx([5.1, 6.2])


def test_marginals_group_bools_and_few_valued_ints_by_value():
    rows = [{"swa_enabled": s, "num_layers": n, "last_val_bpb": v}
            for s, n, v in ((True, 2, 5.0), (False, 4, 6.0), (True, 4, 5.5), (True, 2, 5.1))]
    m = explore.marginals(trials(rows), "swa_enabled")
    assert list(m["bin"]) == ["False", "True"] and m["low"].isna().all() and m["high"].isna().all()
    assert m["count"].tolist() == [1, 3] and m["mean_bpb"].tolist() == pytest.approx([6.0, 5.2])
    assert math.isnan(m["std_bpb"].iloc[0])  # one trial
    m = explore.marginals(trials(rows), "num_layers", bins=5)
    assert list(m["bin"]) == ["2", "4"] and m["low"].tolist() == m["high"].tolist() == [2.0, 4.0]
    assert m["mean_bpb"].tolist() == pytest.approx([5.05, 5.75])


def test_marginals_names_the_known_params_for_an_unknown_one():
    with pytest.raises(JepatuneError, match="'lr' is not a hyperparameter.*jepa_pure_frac, sigreg_weight"):
        explore.marginals(trials([{"last_val_bpb": 5.0}]), "lr")
    with pytest.raises(JepatuneError, match="not a hyperparameter"):
        explore.marginals(trials([{"last_val_bpb": 5.0}]), "step")  # a table column, not a knob


# --- Spearman, rung_correlation ------------------------------------------------------------------

RUNG2 = [1.0, 2.0, 2.0, 4.0, 5.0]  # average ranks 1, 2.5, 2.5, 4, 5
FINAL = [2.0, 1.0, 3.0, 5.0, 4.0]  # ranks 2, 1, 3, 5, 4
# rank deviations from 3: (-2, -.5, -.5, 1, 2) and (-1, -2, 0, 2, 1): 7 / sqrt(9.5 * 10)
RHO = 7 / math.sqrt(95)


def test_spearman_is_pearson_of_average_ranks():
    assert explore.spearman(pd.Series(RUNG2), pd.Series(FINAL)) == pytest.approx(RHO)
    assert explore.spearman(pd.Series([3.0, 1.0, 2.0]), pd.Series([30.0, 10.0, 20.0])) == pytest.approx(1.0)
    assert math.isnan(explore.spearman(pd.Series([1.0, 1.0, 1.0]), pd.Series([1.0, 2.0, 3.0])))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)  # many ties in a
    assert explore.spearman(pd.Series(a), pd.Series(b)) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert explore.spearman(pd.Series(RUNG2), pd.Series(FINAL)) == pytest.approx(stats.spearmanr(RUNG2, FINAL)[0])


def rung_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Five completed trials (t1 is the best) and one pruned at rung 2; rung 4 has values for two only."""
    t = trials([{"last_val_bpb": v} for v in FINAL] + [{"last_val_bpb": 9.0, "status": "pruned", "step": 2}])
    curves = [{"trial_id": f"t{i}", "step": 2, "val_bpb": v} for i, v in enumerate(RUNG2)]
    curves += [{"trial_id": "t5", "step": 2, "val_bpb": 9.0}, {"trial_id": "t0", "step": 4, "val_bpb": 1.8},
               {"trial_id": "t1", "step": 4, "val_bpb": 1.5}]
    curves += [{"trial_id": f"t{i}", "step": 16, "val_bpb": v} for i, v in enumerate(FINAL)]
    decisions = [("t0", 2, 1.0, None, "continue"), ("t1", 2, 2.0, 2.1, "continue"), ("t5", 2, 9.0, 2.5, "stop"),
                 ("t2", 2, 2.0, 1.5, "stop"),  # a trial ASHA stopped that was resumed and finished later
                 ("t0", 4, 1.8, None, "continue"), ("t1", 4, 1.5, 1.4, "continue")]
    d = [dict(zip(("trial_id", "rung", "value", "cutoff", "decision"), r, strict=True)) for r in decisions]
    return t, table(schema.CURVES, curves), table(schema.DECISIONS, d)


def test_rung_correlation_by_hand():
    r = explore.rung_correlation(*rung_tables())
    assert list(r.columns) == ["rung", "n", "spearman", "ci_low", "ci_high", "cutoff", "best_stopped_here",
                               "stopped"]
    assert r["rung"].tolist() == [2, 4] and r["n"].tolist() == [5, 2]
    assert r["spearman"].iloc[0] == pytest.approx(RHO)  # the pruned t5 is not counted
    # Fisher's z, se 1.06 / sqrt(n - 3): five trials leave most of [-1, 1] open
    half = 1.959964 * 1.06 / math.sqrt(5 - 3)
    assert (r["ci_low"].iloc[0], r["ci_high"].iloc[0]) == pytest.approx(
        (math.tanh(math.atanh(RHO) - half), math.tanh(math.atanh(RHO) + half)))
    assert math.isnan(r["ci_low"].iloc[1])
    assert math.isnan(r["spearman"].iloc[1])  # n < 3
    assert r["cutoff"].tolist() == [2.5, 1.4] and r["stopped"].tolist() == [2, 0]
    # the best trial (t1) was at 2.0 <= 2.5 at rung 2, but at 1.5 > 1.4 at rung 4
    assert r["best_stopped_here"].tolist() == [False, True]


def test_rung_correlation_takes_rungs_from_curves_without_decisions():
    t, curves, decisions = rung_tables()
    r = explore.rung_correlation(t, curves, decisions.iloc[:0])
    assert r["rung"].tolist() == [2, 4]  # not 16, the budget
    assert r["spearman"].iloc[0] == pytest.approx(RHO)
    assert r["cutoff"].isna().all() and not r["best_stopped_here"].any() and (r["stopped"] == 0).all()


# --- compare_final -------------------------------------------------------------------------------

def final_table(rows: list[tuple]) -> pd.DataFrame:
    return table(schema.FINAL, [{"recipe": r, "seed": s, "val_bpb": v, "status": st} for r, s, v, st in rows])


def test_compare_final_paired_ci_by_hand():
    best, ref = [5.0, 5.2, 4.9], [5.3, 5.4, 5.35]
    rows = [("best", s, v, "completed") for s, v in enumerate(best)]
    rows += [("reference", s, v, "completed") for s, v in enumerate(ref)] + [("reference", 3, 99.0, "diverged")]
    c = explore.compare_final(final_table(rows))
    assert list(c.columns) == ["recipe", "mean", "std", "count", "delta", "ci_low", "ci_high", "paired",
                               "n_paired", "missing"]
    assert list(c["recipe"]) == ["best", "reference"] and c["count"].tolist() == [3, 3]
    b = c.iloc[0]
    d = [-0.3, -0.2, -0.45]  # per-seed differences, mean -0.31667
    sd = math.sqrt(sum((x + 0.95 / 3) ** 2 for x in d) / 2)
    half = 4.3027 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert b["delta"] == pytest.approx(-0.95 / 3) and b["paired"]
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((-0.95 / 3 - half, -0.95 / 3 + half))
    assert b["mean"] == pytest.approx(sum(best) / 3) and b["std"] == pytest.approx(np.std(best, ddof=1))
    assert b["n_paired"] == 3 and b["missing"] == "best lacks seed 3; reference seed 3 diverged"
    ref_row = c.iloc[1]
    assert math.isnan(ref_row["delta"]) and not ref_row["paired"]
    assert pd.isna(ref_row["n_paired"]) and ref_row["missing"] == ""


def test_compare_final_with_one_common_seed_has_no_ci():
    c = explore.compare_final(final_table([("best", 0, 5.0, "completed"), ("best", 1, 5.2, "completed"),
                                           ("reference", 0, 5.4, "completed"), ("reference", 2, 5.6, "completed")]))
    b = c.set_index("recipe").loc["best"]
    # one common seed (0): a delta over it alone (5.0 - 5.4), no interval
    assert b["delta"] == pytest.approx(-0.4) and not b["paired"] and math.isnan(b["ci_low"])
    assert b["n_paired"] == 1 and b["missing"] == "best lacks seed 2; reference lacks seed 1"
    assert explore.compare_final(final_table([])).columns.tolist() == list(c.columns)


def test_t_quantiles():
    assert explore.t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert explore.t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert explore.t_quantile_975(10**6) == pytest.approx(1.96, abs=1e-3)
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 41), 60, 120):
        assert explore.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


# --- importance ----------------------------------------------------------------------------------

def synthetic(n: int = 40) -> pd.DataFrame:
    """BPB depends on jepa_pure_frac only; the other knobs vary at random."""
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 0.6, n)
    return trials([{"jepa_pure_frac": a[i], "sigreg_weight": 10 ** rng.uniform(-3, 0),
                    "swa_enabled": bool(rng.integers(2)), "num_layers": int(rng.integers(2, 9)),
                    "last_val_bpb": 5.0 + 2.0 * a[i]} for i in range(n)])


@pytest.mark.parametrize("evaluator", ["ped-anova", "fanova"])
def test_importance_finds_the_param_that_matters(evaluator):
    imp = explore.importance(synthetic(), evaluator=evaluator, seed=0)
    assert list(imp.columns) == ["param", "importance", "evaluator"]
    assert set(imp["param"]) == set(KNOBS) and (imp["evaluator"] == evaluator).all()
    assert imp.iloc[0]["param"] == "jepa_pure_frac"
    assert imp["importance"].iloc[0] == imp["importance"].max()
    assert imp["importance"].sum() == pytest.approx(1.0)


def test_fanova_without_scikit_learn_says_how_to_install_it(monkeypatch):
    import optuna

    def missing(*args, **kwargs):  # what Optuna's fANOVA raises where scikit-learn is not installed
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(optuna.importance, "FanovaImportanceEvaluator", missing)
    with pytest.raises(JepatuneError, match="pip install scikit-learn"):
        explore.importance(synthetic(), evaluator="fanova")


def test_importance_errors():
    one = trials([{"jepa_pure_frac": 0.1, "last_val_bpb": 5.0},
                  {"jepa_pure_frac": 0.2, "last_val_bpb": 6.0, "status": "pruned"}])
    with pytest.raises(JepatuneError, match="at least 2 completed trials.*has 1"):
        explore.importance(one, evaluator="ped-anova")
    same = trials([{"jepa_pure_frac": 0.1, "last_val_bpb": 5.0}, {"jepa_pure_frac": 0.1, "last_val_bpb": 6.0}])
    with pytest.raises(JepatuneError, match="no hyperparameter varies across the 2 completed trials"):
        explore.importance(same, evaluator="ped-anova")
    with pytest.raises(JepatuneError, match="unknown; choose one of fanova, ped-anova"):
        explore.importance(synthetic(), evaluator="shap")
    # a param missing in some completed trial is left out, not an error
    t = synthetic(20)
    t.loc[0, "num_layers"] = pd.NA
    assert "num_layers" not in set(explore.importance(t, evaluator="ped-anova")["param"])


# --- a real sweep --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory, finished_sweep_folder):
    """The session's finished sweep (8 trials of the tiny model, a 2-seed retrain), copied."""
    return copy_sweep(finished_sweep_folder, tmp_path_factory.mktemp("explore"))


def table_mtimes(folder) -> dict[str, int]:
    return {name: (folder / "tables" / f"{name}.parquet").stat().st_mtime_ns for name in schema.TABLES}


def test_every_helper_runs_on_a_real_sweep(sweep):
    from jepatune.experiment.trials import KNOBS as TRAINABLE_KNOBS

    before = table_mtimes(sweep.folder)
    tables = load(sweep.folder)
    assert table_mtimes(sweep.folder) == before  # fresh: read, not rebuilt
    assert tables._fields == ("trials", "curves", "decisions", "final", "finalists")
    for name, frame in tables._asdict().items():
        assert set(schema.TABLES[name]) <= set(frame.columns) and len(frame), name
    knobs = explore.knob_columns(tables.trials)
    assert knobs == [c for c in tables.trials.columns if c in TRAINABLE_KNOBS] and "jepa_pure_frac" in knobs

    board = explore.leaderboard(tables.trials, k=3, include_pruned=True)
    assert list(board.columns) == ["trial_id", "status", "is_reference", "val_bpb", *knobs, "step", "device_s"]
    done = board[board["status"] == "completed"]
    assert done["val_bpb"].is_monotonic_increasing and 2 <= len(done) <= 4  # top 3, maybe the reference
    assert list(board["status"]) == ["completed"] * len(done) + ["pruned"] * (len(board) - len(done))
    for param in knobs:
        m = explore.marginals(tables.trials, param, bins=3)
        assert list(m.columns) == ["bin", "low", "high", "count", "mean_bpb", "min_bpb", "std_bpb"]
        assert m["count"].sum() == (tables.trials["status"] == "completed").sum()
    imp = explore.importance(tables.trials, evaluator="ped-anova")
    assert list(imp.columns) == ["param", "importance", "evaluator"] and set(imp["param"]) <= set(knobs)
    rungs = explore.rung_correlation(tables.trials, tables.curves, tables.decisions)
    assert list(rungs.columns) == ["rung", "n", "spearman", "ci_low", "ci_high", "cutoff", "best_stopped_here",
                                   "stopped"]
    assert rungs["rung"].tolist() == [r for r in sweep.rungs if r < sweep.trial_steps]
    # stopped counts ASHA's stops, the audited ones (run on to the end) included
    assert rungs["stopped"].sum() == (tables.trials["status"] == "pruned").sum() + tables.trials["audited"].sum()
    final = explore.compare_final(tables.final)
    assert list(final.columns) == ["recipe", "mean", "std", "count", "delta", "ci_low", "ci_high", "paired",
                                   "n_paired", "missing"]
    finalists = set(final["recipe"]) - {"reference"}
    assert "reference" in set(final["recipe"]) and finalists and all(r.startswith("finalist-") for r in finalists)
    assert final.set_index("recipe").loc[sorted(finalists), "paired"].all()


def test_load_rebuilds_tables_older_than_a_trial_result(sweep, monkeypatch):
    from jepatune.analysis import tables as tables_module

    folder = sweep.folder
    load(folder)
    reads, real = [], tables_module.read_settings
    monkeypatch.setattr(tables_module, "read_settings", lambda f: reads.append(f) or real(f))
    load(folder)
    assert len(reads) == 1  # sweep.json read once (on an object store, each read is a request)
    old = max(table_mtimes(folder).values()) - 60 * 10**9
    for name in schema.TABLES:  # tables written a minute ago, then a trial's result changes
        os.utime(folder / "tables" / f"{name}.parquet", ns=(old, old))
    next(folder.glob("*/result.json")).touch()
    load(folder)
    rebuilt = table_mtimes(folder)
    assert all(m > old for m in rebuilt.values())
    load(folder)
    assert table_mtimes(folder) == rebuilt  # now fresh again


def test_wilson_interval_matches_a_hand_computation():
    from jepatune.analysis.explore import wilson_interval

    low, high = wilson_interval(1, 4)  # p = 0.25, z = 1.96: centre 0.3725, half-width 0.3269
    assert low == pytest.approx(0.0456, abs=1e-4) and high == pytest.approx(0.6994, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and 0 < wilson_interval(0, 5)[1] < 0.5
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_false_stops_compares_audits_with_the_trials_asha_kept():
    from jepatune.analysis.explore import false_stops

    trials = pd.DataFrame({
        "trial_id": list("abcdefg"),
        "status": ["completed"] * 6 + ["pruned"],
        "last_val_bpb": [3.0, 3.2, 3.4, 2.9, 3.3, 3.6, 5.0],
        "audited": [False, False, False, True, True, True, False],
    })
    row = false_stops(trials).iloc[0]
    # kept: 3.0, 3.2, 3.4 (median 3.2); audits 2.9 (false stop, and better than every kept trial), 3.3, 3.6
    assert (row["audited"], row["false_stops"], row["beat_best"], row["kept"]) == (3, 1, 1, 3)
    assert row["rate"] == pytest.approx(1 / 3)
    none = false_stops(trials.assign(audited=False)).iloc[0]
    assert none["audited"] == 0 and math.isnan(none["rate"])


def test_compare_final_compares_the_newest_budget_only():
    final = pd.DataFrame({"recipe": ["best", "reference"] * 3, "seed": [0, 0, 1, 1, 0, 0],
                          "steps": [100, 100, 100, 100, 400, 400], "status": ["completed"] * 6,
                          "val_bpb": [3.0, 3.5, 3.1, 3.4, 2.0, 2.6]})
    out = explore.compare_final(final).set_index("recipe")
    assert out.loc["best", "count"] == 1 and out.loc["best", "mean"] == pytest.approx(2.0)
    assert out.loc["best", "delta"] == pytest.approx(-0.6)
