"""The sweep's sampler and scheduler options: random suggestions, and no early stopping."""

import optuna
import pytest

from jepatune.analysis.tables import load_tables
from jepatune.cli import _sweep_settings, build_parser
from jepatune.errors import JepatuneError
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import SweepSettings
from jepatune.search.sweep import run_sweep


def test_no_pruning_runs_every_trial_to_the_full_budget_with_random_suggestions(tmp_path, demo_data, sweep_knobs,
                                                                                 local_ray):
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), samples=4, trial_steps=8, grace_steps=2,
                             concurrency=2, overrides=sweep_knobs, sampler="random", scheduler="none")
    run_sweep(settings)
    tables = load_tables(settings.folder)
    trials, curves = tables["trials"], tables["curves"]
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    assert (trials["step"] == settings.trial_steps).all()
    assert tables["decisions"].empty  # no scheduler, no decisions
    # Every trial still reports at every rung, so the curves are whole.
    assert sorted(curves.groupby("trial_id")["step"].apply(tuple).unique()) == [(2, 4, 8)]
    study = load_study(settings.folder)
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


@pytest.mark.parametrize("key, value", [("sampler", "grid"), ("scheduler", "hyperband")])
def test_unknown_sampler_or_scheduler_is_refused_in_one_line(tmp_path, key, value):
    settings = SweepSettings(data=str(tmp_path), **{key: value})
    with pytest.raises(JepatuneError, match=f"{key}={value!r}: choose one of") as e:
        settings.validate()
    assert "\n" not in str(e.value)


def test_search_flags_reach_the_settings(tmp_path):
    parser = build_parser()
    default = _sweep_settings(parser.parse_args(["search", "--data", str(tmp_path)]))
    assert (default.sampler, default.scheduler) == ("tpe", "asha")
    chosen = _sweep_settings(parser.parse_args(["search", "--data", str(tmp_path), "--sampler", "random",
                                                "--no-pruning"]))
    assert (chosen.sampler, chosen.scheduler) == ("random", "none")
