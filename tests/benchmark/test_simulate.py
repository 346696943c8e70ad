"""The surrogate and the simulated sweeps, on a synthetic benchmark with a known landscape."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from jepatune.benchmark import answers
from jepatune.benchmark.simulate import anytime, simulate, simulate_sweep
from jepatune.benchmark.strategy import Strategy
from jepatune.benchmark.surrogate import Surrogate
from jepatune.benchmark.tables import Benchmark
from jepatune.errors import JepatuneError
from jepatune.spaces import get_space

BUDGET, RUNGS = 40, (5, 10, 15, 20, 30)


def landscape(u: np.ndarray) -> float:
    """A smooth bowl with its minimum at u = (0.2, 0.7, 0.5, 0.9) of the unit cube."""
    return 3.0 + float(((u - np.array([0.2, 0.7, 0.5, 0.9])) ** 2).sum())


def synthetic(n: int = 60, seeds: int = 2, noise: float = 0.01, seed: int = 0, long_noise: float = 0.0) -> Benchmark:
    """A benchmark shaped like a recorded one: rung values fall towards the final score as 1/step,
    each seed adds its own offset; a third of the recipes also has a longer-budget score."""
    space = get_space("curriculum")
    rng = np.random.default_rng(seed)
    recipes, runs, curves = [], [], []
    for i in range(n):
        u = rng.random(len(space.dims))
        params = {d.name: d.from_unit(x) for d, x in zip(space.dims, u, strict=True)}
        recipes.append({"recipe": i, "origin": "design", **params})
        final = landscape(np.array([d.to_unit(params[d.name]) for d in space.dims]))
        for s in range(seeds):
            off = noise * rng.standard_normal()
            runs.append({"kind": "main", "recipe": i, "seed": s, "iterations": BUDGET, "status": "completed",
                         "score": final + off, "compute_steps": BUDGET})
            curves += [{"kind": "main", "recipe": i, "seed": s, "iterations": BUDGET, "step": r,
                        "snapshot_bpb": final + off + 2.0 / r, "probe_bpb": math.nan} for r in RUNGS]
            if i % 3 == 0:
                runs.append({"kind": "transfer", "recipe": i, "seed": s, "iterations": 4 * BUDGET,
                             "status": "completed", "score": final - 0.3 + long_noise * rng.standard_normal(),
                             "compute_steps": 4 * BUDGET})
    info = {"settings": {"space": "curriculum", "trial_steps": BUDGET, "probe_steps": 5, "preset": "demo"},
            "rungs": list(RUNGS), "fidelity_rungs": [10, 20]}
    return Benchmark(info, pd.DataFrame(recipes), pd.DataFrame(runs), pd.DataFrame(curves))


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return synthetic()


def test_the_surrogate_returns_recorded_values_exactly(bench):
    s = Surrogate(bench)
    for i in (0, 17, 59):
        params = bench.recipes.set_index("recipe").loc[i, s.params].to_dict()
        for seed in (0, 1):
            values, score, diverged = s.predict(params, seed)
            run = bench.runs.query("kind == 'main' and recipe == @i and seed == @seed").iloc[0]
            curve = bench.curves.query("recipe == @i and seed == @seed").set_index("step")["snapshot_bpb"]
            assert score == run["score"] and not diverged
            assert values == curve.to_dict()
        scores = bench.runs.query("kind == 'main' and recipe == @i")["score"]
        assert s.true_score(params) == pytest.approx(scores.mean())


def test_the_surrogate_between_recipes_stays_within_its_neighbours(bench):
    s = Surrogate(bench, neighbours=4)
    rng = np.random.default_rng(5)
    for _ in range(20):
        params = {d.name: d.from_unit(x) for d, x in zip(s.space.dims, rng.random(4), strict=True)}
        dist = np.sqrt((((s.x - s.unit(params)) * s.scales) ** 2).sum(axis=1))
        near = np.argsort(dist)[:4]
        true = s.true_score(params)
        assert s.mean[near, -1].min() - 1e-12 <= true <= s.mean[near, -1].max() + 1e-12
        # one seed's prediction is the interpolated mean plus the nearest recipe's own seed offset
        _, score, _ = s.predict(params, 1)
        assert score - true == pytest.approx(s.residual[near[0], 1, -1])
    assert s.best_true() == pytest.approx(bench.main_scores().mean(axis=1).min())
    # the seed-to-seed spread of two seeds with offsets N(0, 0.01): a floor near 0.01
    assert 0.003 < s.noise_floor() < 0.02


def test_the_surrogates_metric_follows_what_moves_the_score():
    # a landscape that depends on the first parameter alone: the others' scales fall, and the fitted
    # metric predicts left-out recipes better than the plain unit-cube distance
    from jepatune.benchmark.surrogate import fit_metric, loo_error

    rng = np.random.default_rng(2)
    x = rng.random((120, 4))
    y = 3 + (x[:, 0] - 0.3) ** 2 * 4
    scales, k, error = fit_metric(x, y, None)
    assert scales[0] == 1 and (scales[1:] < 1).all() and k in (2, 4, 8)
    assert error < 0.5 * loo_error(x, y, np.ones(4), 4)


def test_a_simulated_sweep_with_a_fixed_seed_is_reproducible(bench):
    s = Surrogate(bench)
    strategy = Strategy(startup_trials=4)
    a = simulate_sweep(s, strategy, compute_trials=12, seed=3, seed_index=0)
    b = simulate_sweep(s, strategy, compute_trials=12, seed=3, seed_index=0)
    pd.testing.assert_frame_equal(a.trials, b.trials)
    pd.testing.assert_frame_equal(a.decisions, b.decisions)
    c = simulate_sweep(s, strategy, compute_trials=12, seed=4, seed_index=0)
    assert not a.trials[s.params].equals(c.trials[s.params])
    # the reference recipe is the first trial, as in a sweep
    first = a.trials.set_index("number").loc[0, s.params].to_dict()
    assert first == pytest.approx(s.space.reference_point())


def test_the_simulated_asha_takes_rays_decisions(bench):
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    s = Surrogate(bench)
    for rf, grace in ((2, 0), (3, 5), (2, 5)):
        strategy = Strategy(sampler="random", reduction_factor=rf, grace_steps=grace, audit_frac=0.2, concurrency=3)
        run = simulate_sweep(s, strategy, compute_trials=20, seed=1, seed_index=1)
        ladder = strategy.ladder(BUDGET)
        bracket = _Bracket(min_t=ladder[0], max_t=BUDGET, reduction_factor=rf, s=0)
        bracket._rungs = [(m, {}) for m in sorted(ladder, reverse=True)]  # as RecordingASHA sets them
        ray_says = [bracket.on_result(SimpleNamespace(trial_id=str(d.number)), d.milestone, -d.value)
                    for d in run.decisions.itertuples()]
        ours = ["STOP" if d in ("stop", "audit") else "CONTINUE" for d in run.decisions["decision"]]
        assert ray_says == [getattr(TrialScheduler, x) for x in ours]
        assert "stop" in set(run.decisions["decision"]) and "continue" in set(run.decisions["decision"])
        # the first stop is audited, and an audited trial runs to the end
        assert run.decisions.loc[run.decisions["decision"] != "continue", "decision"].iloc[0] == "audit"
        audited = run.trials[run.trials["audited"]]
        assert (audited["status"].isin(["completed", "unfinished"])).all() and len(audited)


def test_slots_and_compute(bench):
    s = Surrogate(bench)
    # no early stopping, one slot: trials one after another, each the whole budget
    one = simulate_sweep(s, Strategy(sampler="random", scheduler="none", concurrency=1), compute_trials=6, seed=0,
                         seed_index=0).trials
    assert one["status"].tolist() == ["completed"] * 6
    assert one["start"].tolist() == [BUDGET * k for k in range(6)]
    # ASHA with three slots: never more than three trials at once, stopped trials free their slot early
    three = simulate_sweep(s, Strategy(sampler="random", concurrency=3), compute_trials=30, seed=0, seed_index=0).trials
    times = sorted(set(three["start"]) | set(three["end"]))
    assert max(((three["start"] <= t) & (three["end"] > t)).sum() for t in times) == 3
    pruned = three[three["status"] == "pruned"]
    assert len(pruned) and ((pruned["end"] - pruned["start"]) < BUDGET).all()
    assert len(three) > 30  # more trials than full budgets: ASHA's point


def test_anytime_answers_with_the_best_observed_trial():
    log = pd.DataFrame({"status": ["completed", "pruned", "completed", "completed"], "end": [40.0, 50.0, 80.0, 120.0],
                        "score": [3.5, math.nan, 3.6, 3.4], "true": [3.55, 3.0, 3.45, 3.42]})
    out = anytime(log, [0.5, 1, 2, 3], 40)
    # 0.5 budgets: nothing ended; then the first trial; the second is worse as observed (kept: the first);
    # the third is better as observed
    assert out["true"].tolist()[1:] == [3.55, 3.55, 3.42] and math.isnan(out["true"].iloc[0])
    assert out["trials"].tolist() == [0, 1, 3, 4]
    # the best true score among the three best observed: the second trial's 3.45 once it ended
    assert out["true_finalists"].tolist()[1:] == [3.55, 3.45, 3.42]
    assert anytime(log, [3], 40, finalists=1)["true_finalists"].tolist() == [3.42]


def test_simulate_tables_and_the_search_pays_on_a_bowl():
    bench = synthetic(n=150, noise=0.002, seed=1)
    s = Surrogate(bench)
    sim = simulate(s, [Strategy(sampler="random", scheduler="none"), Strategy(startup_trials=8)],
                   repetitions=4, compute_trials=32, seed=0)
    table = answers.strategy_table(sim, s.noise_floor())
    assert table["strategy"].tolist() == ["random", "tpe(8)+asha(gB/4,rf2,snapshot)"]
    assert (table["sweeps"] == 4).all() and (table["regret"] >= 0).all()
    # ASHA tries more recipes in the same compute
    assert table.loc[1, "trials"] > table.loc[0, "trials"]
    assert set(sim.columns) >= {"compute", "true", "regret", "strategy", "repetition", "s:sampler"}


def test_rank_transfer_and_finalists():
    exact = synthetic(n=60, noise=0.0, long_noise=0.0)
    t = answers.rank_transfer(exact, resamples=200)
    assert t["recipes"] == 20 and t["spearman"] == pytest.approx(1.0)
    f = answers.finalists_needed(exact, draws=200)
    assert f.loc[f["enough"], "k"].tolist() == [1]  # no noise: the best at the trial budget is the best
    assert (f["regret"] == 0).all()
    # noise at the longer budget larger than the differences between recipes: more finalists are needed
    noisy = synthetic(n=60, noise=0.05, long_noise=0.0)
    for resample in (False, True):
        g = answers.finalists_needed(noisy, draws=400, resample=resample)
        assert g.loc[g["enough"], "k"].iloc[0] > 1 and g["prob"].is_monotonic_increasing
        assert g["prob"].iloc[-1] == pytest.approx(1.0)
        # the retrain's loss shrinks as it takes more finalists, to nothing once it takes them all
        assert g["regret"].is_monotonic_decreasing and g["regret"].iloc[0] > 0 and g["regret"].iloc[-1] == 0


def test_bad_strategies_are_one_line_errors(bench):
    s = Surrogate(bench)
    with pytest.raises(JepatuneError, match="sampler 'bayes'"):
        simulate_sweep(s, Strategy(sampler="bayes"), compute_trials=4, seed=0, seed_index=0)
    with pytest.raises(JepatuneError, match="no snapshot values at \\[7, 14, 28\\]; choose"):
        simulate_sweep(s, Strategy(grace_steps=7), compute_trials=4, seed=0, seed_index=0)
    with pytest.raises(JepatuneError, match="no probe values"):
        Surrogate(bench, "probe")


@pytest.mark.parametrize("name, cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("gp", "GPSampler"),
                                       ("cmaes", "CmaEsSampler")])
def test_every_sampler_a_sweep_offers_runs_in_the_simulator(bench, name, cls):
    from jepatune.experiment.sampling import SAMPLERS, make_sampler
    from jepatune.experiment.settings import SweepSettings

    assert type(make_sampler(name, seed=0, startup_trials=3)).__name__ == cls
    assert name in SAMPLERS and SweepSettings(data=".", sampler=name).sampler == name
    run = simulate_sweep(Surrogate(bench), Strategy(sampler=name, startup_trials=3), compute_trials=8, seed=0,
                         seed_index=0).trials
    assert (run["status"] == "completed").sum() >= 2
    # after the start-up trials the sampler models the space: its points are no longer the random ones
    random_run = simulate_sweep(Surrogate(bench), Strategy(sampler="random", startup_trials=3), compute_trials=8,
                                seed=0, seed_index=0).trials
    assert name == "random" or not run[["jepa_pure_frac"]].equals(random_run[["jepa_pure_frac"]])
