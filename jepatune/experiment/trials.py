"""What one search trial is: the recipe it trains, the name of that recipe, the values it reports.

Pure functions over `TrainConfig`; the Ray trial function (`jepatune.search.trainable`) and the
tables (`jepatune.analysis.tables`) both use them, so a table names a recipe exactly as the
trial that trained it did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from typing import Any

from jepatune.experiment.fidelity import Fidelity
from jepatune.trainer.config import TrainConfig

METRIC = "val_bpb"  # what a trial reports, ASHA judges and the searcher minimises
TIME_ATTR = "step"
# Reported instead of a real BPB when a trial diverges or is infeasible: worse than the
# uniform model's 8 bits, finite so ASHA and Optuna can rank it (NaN would stall both).
PENALTY_BPB = 10.0
KNOBS = frozenset(f.name for f in fields(TrainConfig))
# Trial statuses: ran its whole budget / stopped by ASHA at a rung / non-finite loss / refused
# before training (a space constraint, or a shape over the device's memory) / failed on memory in
# every try (the machine's: retried) / raised another error / still running when its driver stopped.
# Statuses whose report is final although the trial did not train to its budget: the value is the
# penalty the searcher was told (with a failed constraint), not a measured BPB.
PENALIZED = ("diverged", "infeasible")


def trial_config(base: dict[str, Any], suggestion: dict[str, Any], trial_steps: int,
                 rungs: tuple[int, ...], probe_steps: int = 0) -> TrainConfig:
    """The base recipe with the searcher's knobs, evaluated exactly at the rungs."""
    knobs = {k: v for k, v in suggestion.items() if k in KNOBS}
    return TrainConfig.from_dict({**base, **knobs, "iterations": trial_steps, "eval_steps": rungs,
                                  "val_loss_every": 0, "max_wallclock_seconds": 0.0, "probe_steps": probe_steps})


def config_key(config: TrainConfig) -> str:
    """A stable name for a trial's recipe: the same recipe finds the same cached result."""
    text = json.dumps({k: v for k, v in config.to_dict().items() if k != "data_path"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def trial_key(config: TrainConfig, fidelity: Fidelity) -> str:
    """A trial's cache key: the recipe's, as the fidelity names it."""
    return fidelity.cache_key(config_key(config))
