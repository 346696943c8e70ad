"""Offline ASHA replay: a hand-worked example, summaries, random orders and a sweep's tables."""

import math

import numpy as np
import pandas as pd
import pytest

from jepatune.analysis import replay, schema
from jepatune.errors import JepatuneError

# Five trials arriving A..E, rungs at steps 10 and 20 of a 40-step budget, rf = 2: a trial stops when
# its value is above the median (linear interpolation) of the values recorded at the rung before it.
#   A@10: first at the rung, never stopped (though the worst)      records 10: [9]
#   A@20: first there too                                          records 20: [8]
#   B@10: 6 <= median[9] = 9, continues;  B@20: 5 <= 8, continues
#   C@10: 4 <= median[9, 6] = 7.5;        C@20: 3 <= median[8, 5] = 6.5
#   D@10: 7 > median[9, 6, 4] = 6: stopped at 10 (yet its final is the lowest)
#   E@10: 6.5 == median[9, 6, 4, 7] = 6.5, a tie: continues;  E@20: 5.5 > median[8, 5, 3] = 5: stopped
VALUES = {"A": {10: 9.0, 20: 8.0}, "B": {10: 6.0, 20: 5.0}, "C": {10: 4.0, 20: 3.0}, "D": {10: 7.0, 20: 2.6},
          "E": {10: 6.5, 20: 5.5}}
FINALS = {"A": 7.5, "B": 4.6, "C": 2.9, "D": 2.5, "E": 4.0}


def test_replay_asha_by_hand():
    out = replay.replay_asha(VALUES, FINALS, "ABCDE", [10, 20], 2)
    assert list(out.columns) == ["trial", "stopped_at", "reached_end", "unknown", "furthest", "final"]
    assert list(out["trial"]) == list("ABCDE")
    assert out["stopped_at"].tolist() == [pd.NA, pd.NA, pd.NA, 10, 20]
    assert out["reached_end"].tolist() == [True, True, True, False, False]
    assert not out["unknown"].any()
    assert out["furthest"].tolist() == [20, 20, 20, 10, 20]
    assert out["final"].tolist() == [7.5, 4.6, 2.9, 2.5, 4.0]
    # A DataFrame (trials x milestones) replays the same; the order decides: D first is never stopped.
    frame = pd.DataFrame.from_dict(VALUES, orient="index")
    assert replay.replay_asha(frame, FINALS, "ABCDE", [10, 20], 2).equals(out)
    assert replay.replay_asha(VALUES, FINALS, "DABCE", [10, 20], 2)["reached_end"].iloc[0]


def test_replay_asha_matches_an_independent_quantile_rule():
    # Minimising: stop when the value is above the (1/rf)-quantile of the earlier values at the rung.
    rng = np.random.default_rng(3)
    rungs = [5, 15, 45]
    values = {t: dict(zip(rungs, rng.normal(size=3), strict=True)) for t in range(40)}
    for rf in (2, 3, 4):
        order = list(rng.permutation(40))
        seen: dict[int, list[float]] = {m: [] for m in rungs}
        expected = []
        for t in order:
            at = pd.NA
            for m in rungs:
                v = values[t][m]
                stop = bool(seen[m]) and v > np.quantile(seen[m], 1 / rf)
                seen[m].append(v)
                if stop:
                    at = m
                    break
            expected.append(at)
        got = replay.replay_asha(values, {t: 0.0 for t in values}, order, rungs, rf)
        assert got["stopped_at"].tolist() == expected
        assert got["reached_end"].sum() == sum(a is pd.NA for a in expected)


def test_missing_data_makes_a_trial_unknown():
    values = {"A": {10: 5.0, 20: 4.0}, "F": {10: 4.0}, "G": {10: 3.0, 20: 3.0}, "H": {10: 9.0}}
    finals = {"A": 4.0, "F": 3.5}  # G has no final; H is stopped before its data runs out
    out = replay.replay_asha(values, finals, "AFGH", [10, 20], 2).set_index("trial")
    assert out.loc["F", ["reached_end", "unknown", "furthest"]].tolist() == [False, True, 20]
    assert pd.isna(out.loc["F", "stopped_at"])
    assert out.loc["G", ["reached_end", "unknown"]].tolist() == [True, True]
    assert math.isnan(out.loc["G", "final"])
    assert out.loc["H", ["stopped_at", "unknown"]].tolist() == [10, False]
    # F recorded nothing at 20, so G is the second value there and is judged against A's 4.0 alone.
    summary = replay.replay_summary(out.reset_index(), {10: 10.0, 20: 20.0}, 40.0)
    assert summary["unknown"] == 2 and summary["kept"] == 2 and summary["scored"] == 2
    # F might have been stopped at 20 or run on: counted to the end (upper bound), or at 20 (lower)
    assert summary["compute"] == 40 + 40 + 40 + 10 and summary["compute_low"] == 40 + 20 + 40 + 10
    # A rung nobody reported: every order keeps no one, so there is no rank to average.
    s = replay.replay_orders(values, {t: finals.get(t, math.nan) for t in values}, [30], 2, {30: 30.0}, 40.0,
                             orders=3)
    assert (s["kept"], s["unknown"], s["scored"], s["best_stopped"]) == (0, 4, 2, 0)
    assert (s["compute"], s["compute_low"]) == (4 * 40, 4 * 30)
    assert math.isnan(s["best_kept_rank"]) and math.isnan(s["regret"])


def test_replay_summary_counts_and_compute():
    out = replay.replay_asha(VALUES, FINALS, "ABCDE", [10, 20], 2)
    cost, end = replay.fidelity_cost("snapshot", [10, 20], 40)
    s = replay.replay_summary(out, cost, end)
    assert s == {"trials": 5, "kept": 3, "unknown": 0, "scored": 5, "best_stopped": True, "best_kept_rank": 2,
                 "regret": pytest.approx(0.4), "compute": 3 * 40 + 10 + 20, "compute_low": 3 * 40 + 10 + 20,
                 "compute_all": 200.0, "compute_frac": pytest.approx(150 / 200)}
    # Probes add k per rung reached; restarts pay every earlier rung's compressed run.
    assert replay.fidelity_cost("probe", [10, 20], 40, probe_steps=2) == ({10: 12.0, 20: 24.0}, 44.0)
    assert replay.fidelity_cost("restart", [10, 20], 40) == ({10: 10.0, 20: 30.0}, 70.0)
    restart = replay.replay_summary(out, *replay.fidelity_cost("restart", [10, 20], 40), full_cost=40)
    assert restart["compute"] == 3 * 70 + 10 + 30 and restart["compute_all"] == 200.0
    # A tie for the lowest final: the best is lost only when every trial sharing it is stopped.
    tied = out.assign(final=[7.5, 4.6, 2.5, 2.5, 4.0])
    assert not replay.replay_summary(tied, cost, end)["best_stopped"]
    assert replay.replay_summary(tied.assign(final=[7.5, 4.6, 2.9, 2.5, 2.5]), cost, end)["best_stopped"]
    # Nobody kept: no rank, no regret.
    none_kept = out.assign(reached_end=False, stopped_at=10, furthest=10)
    s = replay.replay_summary(none_kept, cost, end)
    assert s["kept"] == 0 and s["best_kept_rank"] is pd.NA and math.isnan(s["regret"])


def test_replay_orders_averages_over_arrival_orders():
    # Q is truly best but worse at the rung: it is stopped exactly when it arrives after P.
    values, finals = {"P": {10: 1.0}, "Q": {10: 2.0}}, {"P": 5.0, "Q": 4.0}
    s = replay.replay_orders(values, finals, [10], 2, {10: 10.0}, 20.0, orders=200, seed=1)
    f = s["best_stopped"]
    assert 0.35 < f < 0.65 and s["orders"] == 200 and s["trials"] == 2
    assert s["kept"] == pytest.approx(2 - f)
    assert s["compute"] == pytest.approx(40 - 10 * f)
    assert s["best_kept_rank"] == pytest.approx(1 + f)
    assert s == replay.replay_orders(values, finals, [10], 2, {10: 10.0}, 20.0, orders=200, seed=1)


def test_milestones_and_bad_input():
    assert replay.milestones(120, 15, 2) == (15, 30, 60)
    assert replay.milestones(120, 15, 3) == (15, 45)
    assert replay.milestones(120, 30, 3) == (30, 90)
    assert replay.milestones(120, 120, 2) == ()
    with pytest.raises(JepatuneError, match="reduction_factor=1"):
        replay.milestones(120, 15, 1)
    with pytest.raises(JepatuneError, match="grace=0"):
        replay.milestones(120, 0, 2)
    with pytest.raises(JepatuneError, match="twice"):
        replay.replay_asha(VALUES, FINALS, "ABA", [10, 20], 2)
    with pytest.raises(JepatuneError, match="increasing"):
        replay.replay_asha(VALUES, FINALS, "AB", [20, 10], 2)
    with pytest.raises(JepatuneError, match="fidelity 'warm'"):
        replay.fidelity_cost("warm", [10], 40)
    with pytest.raises(JepatuneError, match="orders=0"):
        replay.replay_orders(VALUES, FINALS, [10], 2, {10: 10.0}, 40.0, orders=0)


# --- a sweep's tables ----------------------------------------------------------------------------

PROBE = {"A": {10: 3.0, 20: 2.9}, "B": {10: 5.0, 20: 4.8}, "C": {10: 4.0, 20: 3.5}, "D": {10: 2.0, 20: 1.9},
         "E": {10: 6.0, 20: 5.5}}


def sweep_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The example above as a probe-mode sweep: D was pruned at 10 but audited (run to the end);
    F was pruned at 10 and never audited: it takes part with its value at 10, its final unknown;
    G diverged at 10: its one report is the penalty, not a measured value, so it takes no part."""
    curves = []
    for t, v in VALUES.items():
        curves += [{"trial_id": t, "step": s, "val_bpb": v[s], "probe_bpb": PROBE[t][s]} for s in (10, 20)]
        curves.append({"trial_id": t, "step": 40, "val_bpb": FINALS[t], "probe_bpb": None})
    curves += [{"trial_id": "F", "step": 10, "val_bpb": 1.0, "probe_bpb": 1.0},
               {"trial_id": "G", "step": 10, "val_bpb": 10.0, "probe_bpb": None}]
    curves.insert(1, {**curves[0], "val_bpb": 99.0})  # a rung reported twice (a restart): the last counts
    curves[0], curves[1] = curves[1], curves[0]
    status = {"D": "pruned", "F": "pruned", "G": "diverged"}
    last = {**FINALS, "D": 7.0, "F": 1.0, "G": 10.0}
    trials = [{"trial_id": t, "status": status.get(t, "completed"), "last_val_bpb": last[t], "trial_steps": 40}
              for t in "ABCDEFG"]
    return (pd.DataFrame(curves).astype({k: schema.CURVES[k] for k in ("trial_id", "step", "val_bpb")}),
            pd.DataFrame(trials).astype({k: schema.TRIALS[k] for k in trials[0]}))


def test_replay_sweep_settings_and_skips():
    curves, trials = sweep_tables()
    settings = [(10, 2), (10, 2, "probe_bpb"), replay.Setting(20, 2), (5, 2), (10, 2, "snapshot_bpb"),
                (10, 2, "val_bpb", "restart")]
    out = replay.replay_sweep(curves, trials, settings, probe_steps=2)
    assert len(out) == 6
    assert out["milestones"].tolist() == ["10,20", "10,20", "20", "5,10,20", "10,20", "10,20"]
    assert out["fidelity"].tolist() == ["snapshot", "probe", "snapshot", "snapshot", "snapshot", "restart"]
    snap, probe, late, early, missing, restart = (out.iloc[i] for i in range(6))
    # The hand-worked example: D (audited, final 2.5) is the best and is stopped at 10. F arrives last,
    # passes 10 (1.0) and has no value at 20: unknown, counted to the end (40) or to 20 at the least.
    assert (snap["trials"], snap["kept"], snap["unknown"], snap["scored"]) == (6, 3, 1, 5)
    assert (snap["best_stopped"], snap["best_kept_rank"]) == (1.0, 2)
    assert (snap["compute"], snap["compute_low"], snap["compute_all"], snap["note"]) == (190, 170, 240, "")
    # Probe values at 10: A3 B5(>3 stop) C4(=median 4, on) D2 E6(>3.5 stop) F1; at 20: C3.5 > 2.9 stops.
    assert (probe["kept"], probe["best_stopped"], probe["best_kept_rank"], probe["regret"]) == (2, 0.0, 1, 0.0)
    assert probe["compute"] == 44 + 12 + 24 + 44 + 12 + 44 and probe["compute_low"] == probe["compute"] - 20
    # One rung at 20: only E (5.5 > median of 8, 5, 3, 2.6 = 4) stops; F has no value there.
    assert (late["kept"], late["unknown"], late["compute"], late["best_stopped"]) == (4, 1, 4 * 40 + 20 + 40, 0.0)
    assert restart["compute"] == 3 * 70 + 10 + 30 + 70
    assert early["note"] == "milestones 5 of val_bpb not recorded" and pd.isna(early["kept"])
    assert missing["note"] == "no column 'snapshot_bpb' in the curves" and pd.isna(missing["compute"])
    many = replay.replay_sweep(curves, trials, [(10, 2)], orders=50, seed=0).iloc[0]
    assert many["orders"] == 50 and 0 <= many["best_stopped"] <= 1 and many["trials"] == 6


def test_replay_sweep_needs_one_budget():
    curves, trials = sweep_tables()
    trials.loc[0, "trial_steps"] = 80
    with pytest.raises(JepatuneError, match=r"budgets \(trial_steps\) \[40, 80\]"):
        replay.replay_sweep(curves, trials, [(10, 2)])
