"""The Ray Tune function trainable: one search trial = one `jepatune.trainer.train` run.

It evaluates exactly at the ASHA rungs, reports a checkpoint with each rung's metrics
(so a failed trial restarts from its last rung), turns divergence and infeasible
configs into a penalty value the searcher can learn from, and keeps a cache of finished
trials beside the experiment so a trial that is suggested again after a driver crash
reports its result instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ray import tune

from jepatune.atomic import atomic_write_text
from jepatune.trainer.checkpoint import CHECKPOINT_NAME
from jepatune.trainer.config import TrainConfig

METRIC = "val_bpb"
TIME_ATTR = "step"
# Reported instead of a real BPB when a trial diverges or is infeasible: worse than the
# uniform model's 8 bits, finite so ASHA and Optuna can rank it (NaN would stall both).
PENALTY_BPB = 10.0
RESULT_NAME = "trial_result.json"
KNOBS = frozenset(f.name for f in fields(TrainConfig))


def rung_steps(trial_steps: int, grace_steps: int, reduction_factor: int) -> tuple[int, ...]:
    """ASHA's milestones grace * rf^k below the budget, then the budget itself."""
    rungs, s = [], grace_steps
    while s < trial_steps:
        rungs.append(s)
        s *= reduction_factor
    return (*rungs, trial_steps)


def trial_config(base: dict[str, Any], suggestion: dict[str, Any], trial_steps: int,
                 rungs: tuple[int, ...]) -> TrainConfig:
    """The base recipe with the searcher's knobs, evaluated exactly at the rungs."""
    knobs = {k: v for k, v in suggestion.items() if k in KNOBS}
    return TrainConfig.from_dict({**base, **knobs, "iterations": trial_steps, "eval_steps": rungs,
                                  "val_loss_every": 0, "max_wallclock_seconds": 0.0})


def config_key(config: TrainConfig) -> str:
    """A stable name for a trial's recipe: the same recipe finds the same cached result."""
    text = json.dumps({k: v for k, v in config.to_dict().items() if k != "data_path"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def estimated_flops(config: TrainConfig, params: int, tokens: int) -> float:
    """6 N per token for the weights, plus attention's 6 L T D (forward and backward)."""
    return float(tokens) * (6 * params + 6 * config.num_layers * config.train_seq_len * config.model_dim)


def _report_cached(cached: dict[str, Any]) -> None:
    tune.report({**cached, "cached": True})


def run_trial(suggestion: dict[str, Any], *, base: dict[str, Any], trial_steps: int, rungs: tuple[int, ...],
              cache_dir: str, checkpoint_every: int = 1) -> None:
    """The function Ray runs for each trial (see module docstring). A checkpoint travels with
    every `checkpoint_every`-th rung's report and always with the last."""
    node = _node_id()
    if "_infeasible" in suggestion:  # rejected by the space's constraints: no training spent
        tune.report({METRIC: PENALTY_BPB, TIME_ATTR: 0, "tokens": 0, "status": "infeasible",
                     "reason": suggestion["_infeasible"], "trial_steps": trial_steps, "node": node})
        return
    config = trial_config(base, suggestion, trial_steps, rungs)
    cache = Path(cache_dir) / f"{config_key(config)}.json"
    if cache.exists():
        _report_cached(json.loads(cache.read_text()))
        return

    checkpoint = tune.get_checkpoint()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jepatune-trial-") as work:
        work_dir = Path(work)
        resume_from = None
        if checkpoint is not None:
            restored = Path(checkpoint.to_directory(str(work_dir / "restored")))
            saved = restored / RESULT_NAME
            if saved.exists():  # the trial had finished: report its result again, do not retrain
                _report_cached(json.loads(saved.read_text()))
                return
            resume_from = restored / CHECKPOINT_NAME
        ckpt_dir = work_dir / "ckpt"

        def report(metrics: dict[str, Any]) -> None:
            if metrics.get("final"):
                return  # the last rung was already reported
            done = metrics["step"] >= trial_steps
            out = {**_common(metrics, config, node, trial_steps, started), "status": "completed" if done else "running"}
            if done:  # a restart from this checkpoint, or a re-suggestion of the recipe, re-reports instead
                atomic_write_text(ckpt_dir / RESULT_NAME, json.dumps(out))
                atomic_write_text(cache, json.dumps(out))
            rung = rungs.index(metrics["step"]) + 1 if metrics["step"] in rungs else 0
            keep = done or (checkpoint_every > 0 and rung % checkpoint_every == 0)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)) if keep else None)

        # Every write happens before its `tune.report`: a report blocks until the driver asks for
        # more, and ASHA stops a trial at its last report (step >= max_t), so code after the final
        # report never runs.
        result = _train(config, report, ckpt_dir, resume_from)
        if result.status == "diverged":
            final = {**_common(result.summary, config, node, trial_steps, started), METRIC: PENALTY_BPB,
                     "status": "diverged"}
            atomic_write_text(cache, json.dumps(final))
            tune.report(final)


def _train(config: TrainConfig, report, ckpt_dir: Path, resume_from: Path | None):
    from jepatune.trainer.loop import train

    return train(config, report=report, checkpoint_dir=ckpt_dir, resume_from=resume_from, final_score=False)


def _common(metrics: dict[str, Any], config: TrainConfig, node: str, trial_steps: int,
            started: float) -> dict[str, Any]:
    """What every report of a trial carries, for the tables and the scheduler."""
    value = metrics.get(METRIC)
    keep = {k: v for k, v in metrics.items() if k not in ("checkpoint", "final") and not isinstance(v, dict)}
    params = metrics.get("params")
    return {
        **keep,
        METRIC: value if value is not None and math.isfinite(value) else PENALTY_BPB,
        "trial_steps": trial_steps,
        "node": node,
        "device_s": round(time.perf_counter() - started, 3),
        "flops": estimated_flops(config, params, metrics["tokens"]) if params else None,
        "config_key": config_key(config),
    }


def _node_id() -> str:
    """The Ray node running this trial (hostnames repeat when several nodes share a machine)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # outside Ray (tests of the function itself)
        return socket.gethostname()


def trial_resources(cpus: float, gpus: float) -> dict[str, float]:
    """Ray counts an omitted CPU as 0: always name both."""
    return {"cpu": cpus, "gpu": gpus}
