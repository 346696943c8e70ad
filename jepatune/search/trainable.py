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
import os
import shutil
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
RESTART_STATE = "restart_state.json"
# Reported instead of a real BPB when a trial diverges or is infeasible: worse than the
# uniform model's 8 bits, finite so ASHA and Optuna can rank it (NaN would stall both).
PENALTY_BPB = 10.0
RESULT_NAME = "trial_result.json"
KNOBS = frozenset(f.name for f in fields(TrainConfig))


def asha_milestones(fidelity: str, rungs: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """(time attribute, milestones ending with the budget) that ASHA judges trials at. A `restart`
    trial retrains at each rung, so its clock counts every step spent: it reaches rung k after
    r1 + ... + rk steps."""
    if fidelity == "restart":
        return "compute_steps", tuple(sum(rungs[: k + 1]) for k in range(len(rungs)))
    return TIME_ATTR, rungs


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


def trial_key(config: TrainConfig, fidelity: str) -> str:
    """A trial's cache key: a restart trial's values differ from a snapshot trial's of the same recipe."""
    return config_key(config) + ("-restart" if fidelity == "restart" else "")


def estimated_flops(config: TrainConfig, params: int, tokens: int) -> float:
    """6 N per token for the weights, plus attention's 6 L T D (forward and backward)."""
    return float(tokens) * (6 * params + 6 * config.num_layers * config.train_seq_len * config.model_dim)


def _report_if_finished(result_file: Path) -> bool:
    """Report the finished result saved in `result_file` again (no training), if there is one."""
    if not result_file.exists():
        return False
    tune.report({**json.loads(result_file.read_text()), "cached": True})
    return True


def run_trial(suggestion: dict[str, Any], *, base: dict[str, Any], trial_steps: int, rungs: tuple[int, ...],
              cache_dir: str, checkpoint_every: int = 1, fidelity: str = "snapshot", probe_steps: int = 0) -> None:
    """The function Ray runs for each trial (see module docstring). A checkpoint travels with
    every `checkpoint_every`-th rung's report and always with the last. Every report carries
    `compute_steps`, the optimiser steps the trial has spent (probe branches and restarts included)."""
    node = _node_id()
    if "_infeasible" in suggestion:  # rejected by the space's constraints: no training spent
        tune.report({METRIC: PENALTY_BPB, TIME_ATTR: 0, "tokens": 0, "status": "infeasible",
                     "reason": suggestion["_infeasible"], "trial_steps": trial_steps, "node": node})
        return
    config = trial_config(base, suggestion, trial_steps, rungs, probe_steps if fidelity == "probe" else 0)
    cache = Path(cache_dir) / f"{trial_key(config, fidelity)}.json"
    if _report_if_finished(cache):
        return
    if fidelity == "restart":
        _run_restart(config, rungs, cache, node)
        return

    checkpoint = tune.get_checkpoint()
    started = time.perf_counter()
    with work_dir() as work:
        scratch = Path(work)
        resume_from = None
        if checkpoint is not None:
            restored = Path(checkpoint.to_directory(str(scratch / "restored")))
            if _report_if_finished(restored / RESULT_NAME):  # the trial had finished: do not retrain
                return
            resume_from = restored / CHECKPOINT_NAME
        ckpt_dir = scratch / "ckpt"
        reached = [0]  # the last step reported, for an out-of-memory report

        def report(metrics: dict[str, Any]) -> None:
            if metrics.get("final"):
                return  # the last rung was already reported
            reached[0] = metrics["step"]
            done = metrics["step"] >= trial_steps
            out = {**_common(metrics, config, node, trial_steps, started), "status": "completed" if done else "running"}
            if "probe_bpb" in metrics:  # the probe fidelity: ASHA and the searcher see the cool-down's value
                out["snapshot_bpb"], out[METRIC] = out[METRIC], _finite(metrics["probe_bpb"])
            if done:  # a restart from this checkpoint, or a re-suggestion of the recipe, re-reports instead
                atomic_write_text(ckpt_dir / RESULT_NAME, json.dumps(out))
                atomic_write_text(cache, json.dumps(out))
            rung = rungs.index(metrics["step"]) + 1 if metrics["step"] in rungs else 0
            keep = done or (checkpoint_every > 0 and rung % checkpoint_every == 0)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)) if keep else None)

        # Every write happens before its `tune.report`: a report blocks until the driver asks for
        # more, and ASHA stops a trial at its last report (step >= max_t), so code after the final
        # report never runs.
        try:
            result = _train(config, report, ckpt_dir, resume_from)
        except (RuntimeError, MemoryError) as error:
            _report_oom(error, reached[0], config_key(config), node, trial_steps)
            return
        if result.status == "diverged":
            final = {**_common(result.summary, config, node, trial_steps, started), METRIC: PENALTY_BPB,
                     "status": "diverged"}
            atomic_write_text(cache, json.dumps(final))
            tune.report(final)


def out_of_memory(error: BaseException) -> str | None:
    """One line naming the failed allocation when `error` is one (CUDA's OutOfMemoryError, the CPU
    allocator's RuntimeError, Python's MemoryError); None for any other error."""
    import torch

    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not (isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text):
        return None
    return "out of memory: " + text.split("] ", 1)[-1][:300]  # without the allocator's source location


def _report_oom(error: BaseException, step: int, key: str, node: str, trial_steps: int) -> None:
    """Report an allocation failure as a final penalty (PENALIZED), as for divergence, so Optuna
    learns to avoid the recipe; re-raise any other error. Not cached: memory is the machine's, not
    the recipe's."""
    if (reason := out_of_memory(error)) is None:
        raise error
    tune.report({METRIC: PENALTY_BPB, TIME_ATTR: step, "status": "oom", "reason": reason,
                 "trial_steps": trial_steps, "node": node, "config_key": key})


def _run_restart(config: TrainConfig, rungs: tuple[int, ...], cache: Path, node: str) -> None:
    """The `restart` fidelity: at each rung, a fresh run of the whole curriculum compressed to the
    rung's budget; its last evaluation is the rung's value. A checkpoint after each rung records
    how far the trial got, so a restarted trial goes on with the next rung."""
    started = time.perf_counter()
    done_rungs, spent = 0, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = Path(folder)
            if _report_if_finished(saved / RESULT_NAME):
                return
            state = json.loads((saved / RESTART_STATE).read_text())
            done_rungs, spent = state["rungs_done"], state["compute_steps"]
    with work_dir() as work:
        ckpt_dir = Path(work)
        for k in range(done_rungs, len(rungs)):
            budget = rungs[k]
            try:
                result = _train(config.replace(iterations=budget, eval_steps=(), probe_steps=0), None, None, None)
            except (RuntimeError, MemoryError) as error:
                _report_oom(error, rungs[k - 1] if k else 0, trial_key(config, "restart"), node, rungs[-1])
                return
            spent += result.step
            out = {**_common({**result.summary, "compute_steps": spent, "tokens": spent * config.train_batch_tokens},
                             config, node, rungs[-1], started),
                   TIME_ATTR: budget, "rung_budget": budget, "config_key": trial_key(config, "restart")}
            if result.status == "diverged":
                out.update({METRIC: PENALTY_BPB, "status": "diverged"})
                atomic_write_text(cache, json.dumps(out))
                tune.report(out)
                return
            done = budget >= rungs[-1]
            out["status"] = "completed" if done else "running"
            atomic_write_text(ckpt_dir / RESTART_STATE, json.dumps({"rungs_done": k + 1, "compute_steps": spent}))
            if done:
                atomic_write_text(ckpt_dir / RESULT_NAME, json.dumps(out))
                atomic_write_text(cache, json.dumps(out))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))


WORK_PREFIX = "jepatune-trial-"


def work_dir() -> tempfile.TemporaryDirectory:
    """A trial's scratch folder (checkpoints before Ray copies them), named after this process. A
    trial that Ray stops while it trains on, past the report ASHA judged, can be ended with its worker
    process before its folder is removed: clear such folders of dead processes first, so a long sweep
    does not fill the node's disk with them."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{WORK_PREFIX}*-*"):
        pid = old.name[len(WORK_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _finite(value: Any) -> float:
    return value if value is not None and math.isfinite(value) else PENALTY_BPB


def _train(config: TrainConfig, report, ckpt_dir: Path | None, resume_from: Path | None):
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
        METRIC: _finite(value),
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
