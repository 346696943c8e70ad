"""The Optuna samplers a sweep can use, built in one place: the sweep (through Ray's OptunaSearch)
and the simulator (`jepatune.benchmark.simulate`, through ask and tell) get the same objects."""

from __future__ import annotations

import warnings
from typing import Any

from jepatune.errors import JepatuneError

SAMPLERS = {
    "tpe": "Optuna's multivariate TPE after the start-up trials (it reads the constraints the space sets)",
    "random": "independent uniform draws (a baseline for the search itself)",
    "gp": "Optuna's Gaussian-process sampler after the start-up trials (needs scipy)",
    "cmaes": "CMA-ES after the start-up trials (needs the cmaes package)",
}


def make_sampler(name: str, *, seed: int, startup_trials: int) -> Any:
    """A fresh, seeded Optuna sampler by name."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials, warn_independent_sampling=False)
    if name == "cmaes":
        # The space sets a feasibility constraint on every trial; CMA-ES cannot use it and warns on
        # every tell. Infeasible points still get the penalty value, which it does learn from.
        warnings.filterwarnings("ignore", message="Constraints have been set, but CmaEsSampler", category=UserWarning)
        warnings.filterwarnings("ignore", message="Argument ``consider_pruned_trials``",
                                category=optuna.exceptions.ExperimentalWarning)
        start = optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup_trials, independent_sampler=start,
                                            warn_independent_sampling=False, consider_pruned_trials=True)
    raise JepatuneError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
