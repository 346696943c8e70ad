"""The offline replay of a sweep uses every recorded rung value: a pruned trial shapes the cut-offs
with the values it reached, though its final is unknown."""

import math

import pandas as pd
import pytest

from jepatune.analysis import replay, schema

# A 40-step sweep judged at 10 and 20 (rf = 2), trials in arrival order:
#   A completed  10: 5.0  20: 4.0  final 3.8
#   P pruned     10: 6.0 (> median[5.0])                       final unknown
#   B completed  10: 5.4  20: 3.9  final 3.5 (the best)
#   C pruned     10: 4.5  20: 4.2 (> median[4.0, 3.9] = 3.95)  final unknown
#   G diverged   10: 4.8, then the penalty 10.0 reported at 20 (not a measured value)
#   I infeasible: one report, the penalty at step 0
# B at 10 is judged against A's and P's values: 5.4 <= median[5.0, 6.0] = 5.5, it goes on. Against the
# completed trials alone (A's 5.0) it is stopped, and with it the best trial: the survivors' replay.
CURVES = {"A": {10: 5.0, 20: 4.0, 40: 3.8}, "P": {10: 6.0}, "B": {10: 5.4, 20: 3.9, 40: 3.5},
          "C": {10: 4.5, 20: 4.2}, "G": {10: 4.8, 20: 10.0}, "I": {0: 10.0}}
STATUS = {"A": "completed", "P": "pruned", "B": "completed", "C": "pruned", "G": "diverged", "I": "infeasible"}


def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    curves = [{"trial_id": t, "step": step, "val_bpb": v} for t, c in CURVES.items() for step, v in c.items()]
    trials = [{"trial_id": t, "status": STATUS[t], "last_val_bpb": list(c.values())[-1], "trial_steps": 40}
              for t, c in CURVES.items()]
    return (pd.DataFrame(curves).astype({k: schema.CURVES[k] for k in curves[0]}),
            pd.DataFrame(trials).astype({k: schema.TRIALS[k] for k in trials[0]}))


def test_a_pruned_trials_rung_value_keeps_the_best_trial_in():
    curves, trials = tables()
    row = replay.replay_sweep(curves, trials, [(10, 2)]).iloc[0]
    # I takes no part (nothing measured); the other five do, P and C with an unknown final.
    assert (row["trials"], row["scored"], row["kept"], row["unknown"]) == (5, 2, 2, 1)
    assert (row["best_stopped"], row["best_kept_rank"], row["regret"]) == (0.0, 1, 0.0)
    # A and B to the end, P stopped at 10, C at 20; G promoted to 20, where its data ends (its 10.0 there
    # is the penalty): counted to the end (upper bound) or to 20 (lower bound).
    assert (row["compute"], row["compute_low"], row["compute_all"]) == (40 + 10 + 40 + 20 + 40, 130, 200)
    assert row["compute_frac"] == pytest.approx(150 / 200)
    # The replay over the trials whose whole curve is known (A, B) stops the best trial at 10.
    values = {t: {m: CURVES[t][m] for m in (10, 20)} for t in "AB"}
    survivors = replay.replay_asha(values, {"A": 3.8, "B": 3.5}, "AB", [10, 20], 2)
    assert survivors["stopped_at"].tolist() == [pd.NA, 10]
    assert replay.replay_summary(survivors, {10: 10.0, 20: 20.0}, 40.0)["best_stopped"]


def test_the_replay_rows_of_pruned_and_diverged_trials():
    curves, trials = tables()
    values = replay._rung_values(replay._measured(curves, trials), "val_bpb", pd.Index(list("APBCG")), [10, 20])
    assert math.isnan(values.loc["G", 20]) and values.loc["G", 10] == 4.8  # the penalty is left out
    finals = pd.Series({"A": 3.8, "P": math.nan, "B": 3.5, "C": None, "G": pd.NA}, dtype=object)
    out = replay.replay_asha(values, finals, "APBCG", [10, 20], 2).set_index("trial")
    assert out["stopped_at"].tolist() == [pd.NA, 10, pd.NA, 20, pd.NA]
    assert out["reached_end"].tolist() == [True, False, True, False, False]
    # a pruned trial stopped within its data is no unknown, though it has no final; G ran out of data
    assert out["unknown"].tolist() == [False, False, False, False, True]
    assert out["final"].isna().tolist() == [False, True, False, True, True]
    s = replay.replay_summary(out.reset_index(), {10: 10.0, 20: 20.0}, 40.0)
    assert (s["trials"], s["kept"], s["unknown"], s["scored"], s["best_stopped"]) == (5, 2, 1, 2, False)
    # Every arrival order: the counts of trials that take part and have a final stay; kept and the
    # share of orders that stop the best vary with the order.
    many = replay.replay_sweep(curves, trials, [(10, 2)], orders=40, seed=0).iloc[0]
    assert (many["trials"], many["scored"], many["orders"]) == (5, 2, 40)
    assert 0 <= many["best_stopped"] <= 1 and many["compute_low"] <= many["compute"] <= 200


def test_sweep_replays_reports_the_unknown_and_scored_counts():
    curves, trials = tables()
    out = replay.sweep_replays(curves, trials, (10, 20, 40), orders=0).set_index("milestones")
    assert {"unknown", "scored", "compute_low"} <= set(out.columns)
    assert out.loc["10,20", ["trials", "scored", "unknown", "kept"]].tolist() == [5, 2, 1, 2]
    # one rung at 20: P has no value there (unknown, like G); C (4.2 > median[4.0, 3.9]) is stopped
    assert out.loc["20", ["unknown", "kept", "best_stopped"]].tolist() == [2, 2, 0.0]
