"""The Ray Tune function trainable: one search trial = one `jepatune.trainer.train` run.

It evaluates exactly at the ASHA rungs, reports a checkpoint with each rung's metrics
(so a failed trial restarts from its last rung), turns divergence and infeasible
configs into a penalty value the searcher can learn from, and keeps a cache of finished
trials beside the experiment so a trial that is suggested again after a driver crash
reports its result instead of training again. Each report is first added to the trial's own log
on the sweep's storage (`experiment.report_log`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from jepatune.atomic import atomic_write_text
from jepatune.experiment.fidelity import SNAPSHOT, Fidelity
from jepatune.experiment.layout import CACHE_DIR
from jepatune.experiment.report_log import ReportLog
from jepatune.experiment.store import Store, join
from jepatune.experiment.trials import METRIC, PENALTY_BPB, TIME_ATTR, config_key, trial_config, trial_key
from jepatune.spaces import memory_violation
from jepatune.trainer.checkpoint import CHECKPOINT_NAME
from jepatune.trainer.config import TrainConfig

RESTART_STATE = "restart_state.json"
RESULT_NAME = "trial_result.json"  # a completed trial's final report, in its last checkpoint
RUNG_RESULT = "rung_result.json"  # the report a rung checkpoint came with
# Test hook: a path; the first trial to start training while no file is there creates it and fails
# with an allocation error, as a machine out of memory would (tests of the retry and of resume).
INJECT_OOM_ENV = "JEPATUNE_INJECT_OOM"


def estimated_flops(config: TrainConfig, params: int, tokens: int) -> float:
    """6 N per token for the weights, plus attention's 6 L T D (forward and backward)."""
    return float(tokens) * (6 * params + 6 * config.num_layers * config.train_seq_len * config.model_dim)


class FinishedCache:
    """A recipe's entry in the cache of finished trials, kept where the sweep lives, so that the node
    that trains a recipe and a driver resumed on another machine see the same entry."""

    def __init__(self, cache_dir: str, key: str):
        self.store, self.rel = Store(cache_dir), f"{key}.json"

    def read(self) -> str | None:
        return self.store.read_text(self.rel)

    def write(self, result: dict[str, Any]) -> None:
        self.store.write_text(self.rel, json.dumps(result))


class Reporter:
    """`tune.report`, each report first added to the trial's log on the sweep's storage
    (`experiment.report_log`: what the tables read where Ray's copy lags)."""

    def __init__(self, experiment: str, suggestion: dict[str, Any]):
        context = tune.get_context()
        self.log = ReportLog(experiment, Path(context.get_trial_dir()).name, context.get_trial_id())
        self.log.start(suggestion)

    def __call__(self, out: dict[str, Any], checkpoint: tune.Checkpoint | None = None) -> None:
        self.log.add(out)
        tune.report(out, checkpoint=checkpoint)

    def if_finished(self, saved: str | None) -> bool:
        """Report a finished result saved before (JSON text) again, with no training, if there is one."""
        if saved is None:
            return False
        self({**json.loads(saved), "cached": True})
        return True


def _saved(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def run_trial(suggestion: dict[str, Any], *, base: dict[str, Any], trial_steps: int, rungs: tuple[int, ...],
              experiment: str, checkpoint_every: int = 1, fidelity: Fidelity = SNAPSHOT, probe_steps: int = 0) -> None:
    """The function Ray runs for each trial of the sweep at `experiment` (see module docstring). A
    checkpoint travels with every `checkpoint_every`-th rung's report and always with the last. Every
    report carries `compute_steps`, the optimiser steps the trial has spent (probe branches and
    restarts included)."""
    node = _node_id()
    publish = Reporter(experiment, suggestion)
    if "_infeasible" in suggestion:  # rejected by the space's constraints: no training spent
        publish({METRIC: PENALTY_BPB, TIME_ATTR: 0, "tokens": 0, "status": "infeasible",
                     "reason": suggestion["_infeasible"], "trial_steps": trial_steps, "node": node})
        return
    config = trial_config(base, suggestion, trial_steps, rungs, probe_steps)
    if (reason := memory_violation(config, device_memory_bytes(config.device))) is not None:
        publish({METRIC: PENALTY_BPB, TIME_ATTR: 0, "tokens": 0, "status": "infeasible", "reason": reason,
                     "trial_steps": trial_steps, "node": node, "config_key": config_key(config)})
        return
    cache = FinishedCache(join(experiment, CACHE_DIR), trial_key(config, fidelity))
    if publish.if_finished(cache.read()):
        return
    if fidelity.restarts:
        _run_restart(config, rungs, cache, node, fidelity, publish)
        return

    checkpoint = tune.get_checkpoint()
    started = time.perf_counter()
    with work_dir() as work:
        scratch = Path(work)
        resume_from = None
        if checkpoint is not None:
            restored = Path(checkpoint.to_directory(str(scratch / "restored")))
            if publish.if_finished(_saved(restored / RESULT_NAME)):  # the trial had finished: do not retrain
                return
            resume_from = restored / CHECKPOINT_NAME
            if not resume_from.exists():  # the trial had ended and its state was dropped (retention.py)
                if publish.if_finished(_saved(restored / RUNG_RESULT)):  # the rung it was stopped at
                    return
                resume_from = None
        ckpt_dir = scratch / "ckpt"
        reached = [0]  # the last step reported, for an out-of-memory report

        def report(metrics: dict[str, Any]) -> None:
            if metrics.get("final"):
                if metrics["status"] == "completed":  # the trial's value: what a retrain would ship
                    out = {**_common(metrics, config, node, trial_steps, started), **_scores(metrics, last),
                           "status": "completed"}
                    atomic_write_text(ckpt_dir / RESULT_NAME, json.dumps(out))  # a restart re-reports it
                    cache.write(out)  # and so does a re-suggestion of the recipe
                    publish(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
                return
            reached[0] = metrics["step"]
            last.clear()
            last.update(metrics)
            if metrics["step"] >= trial_steps:
                return  # the budget's end: the final scoring reports it
            out = {**_common(metrics, config, node, trial_steps, started), "status": "running",
                   "live_bpb": _finite(metrics[METRIC])}
            if "probe_bpb" in metrics:  # the probe fidelity: ASHA and the searcher see the cool-down's value
                out["snapshot_bpb"], out[METRIC] = out[METRIC], _finite(metrics["probe_bpb"])
            rung = rungs.index(metrics["step"]) + 1 if metrics["step"] in rungs else 0
            keep = checkpoint_every > 0 and rung % checkpoint_every == 0
            if keep:
                atomic_write_text(ckpt_dir / RUNG_RESULT, json.dumps(out))  # what outlives the state
            publish(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)) if keep else None)

        # Every write happens before its `tune.report`: a report blocks until the driver asks for
        # more, and ASHA stops a trial at its last report (step >= max_t), so code after the final
        # report never runs.
        last: dict[str, Any] = {}  # the newest evaluation: the live weights' value at the end
        result = _train_retrying_oom(config, report, ckpt_dir, resume_from, lambda: f"step {reached[0]}")
        if result.status == "diverged":
            final = {**_common(result.summary, config, node, trial_steps, started), METRIC: PENALTY_BPB,
                     "status": "diverged"}
            cache.write(final)
            publish(final)


class MachineOutOfMemory(RuntimeError):
    """An allocation failed although the recipe's shape fits the device: retried by Ray."""


def _scores(summary: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The value columns of a trial's final report: `val_bpb` (what the searcher and the tables rank)
    is the shipped weights' BPB after the int8+zlib round trip; `live_bpb` the running weights' at
    the same step, before any averaging or quantisation; the raw and averaged weights each before
    and after the round trip. All on the trial's val prefix."""
    scores = {k: summary.get(k) for k in ("raw_bpb", "raw_q_bpb", "avg_bpb", "avg_q_bpb", "prequant_bpb")}
    return {**scores, METRIC: _finite(summary[METRIC]), "shipped_bpb": _finite(summary[METRIC]),
            # None when the trial resumed at its very end (the last evaluation ran before the restart)
            "live_bpb": last.get(METRIC), "artifact_bytes": summary.get("artifact_bytes")}


def out_of_memory(error: BaseException) -> str | None:
    """One line naming the failed allocation when `error` is one (CUDA's OutOfMemoryError, the CPU
    allocator's RuntimeError, Python's MemoryError); None for any other error."""
    import torch

    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not (isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text):
        return None
    return "out of memory: " + text.split("] ", 1)[-1][:300]  # without the allocator's source location


def _run_restart(config: TrainConfig, rungs: tuple[int, ...], cache: FinishedCache, node: str,
                 fidelity: Fidelity, publish: Reporter) -> None:
    """The `restart` fidelity: at each rung, a fresh run of the whole curriculum compressed to the
    rung's budget; its last evaluation is the rung's value. A checkpoint after each rung records
    how far the trial got, so a restarted trial goes on with the next rung."""
    started = time.perf_counter()
    done_rungs, spent = 0, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = Path(folder)
            if publish.if_finished(_saved(saved / RESULT_NAME)):
                return
            state = json.loads((saved / RESTART_STATE).read_text())
            done_rungs, spent = state["rungs_done"], state["compute_steps"]
    with work_dir() as work:
        ckpt_dir = Path(work)
        for k in range(done_rungs, len(rungs)):
            budget = rungs[k]
            result = _train_retrying_oom(config.replace(iterations=budget, eval_steps=(), probe_steps=0), None,
                                         None, None, f"rung {k + 1}")
            spent += result.step
            out = {**_common({**result.summary, "compute_steps": spent, "tokens": spent * config.train_batch_tokens},
                             config, node, rungs[-1], started),
                   TIME_ATTR: budget, "rung_budget": budget, "config_key": trial_key(config, fidelity)}
            if result.status == "diverged":
                out.update({METRIC: PENALTY_BPB, "status": "diverged"})
                cache.write(out)
                publish(out)
                return
            done = budget >= rungs[-1]
            out["status"] = "completed" if done else "running"
            atomic_write_text(ckpt_dir / RESTART_STATE, json.dumps({"rungs_done": k + 1, "compute_steps": spent}))
            if done:
                atomic_write_text(ckpt_dir / RESULT_NAME, json.dumps(out))
                cache.write(out)
            publish(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))


WORK_PREFIX = "jepatune-trial-"


def work_dir() -> tempfile.TemporaryDirectory:
    """A trial's or a retrain run's scratch folder (files before they go where the sweep lives), named
    after this process. A trial that Ray stops while it trains on, past the report ASHA judged, or a
    run whose driver was killed, can end with its worker process before its folder is removed: clear
    such folders of dead processes first, so a long sweep does not fill the node's disk with them."""
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

    if (marker := os.environ.get(INJECT_OOM_ENV)) and not os.path.exists(marker):
        Path(marker).touch()  # once per marker: the retry finds it and trains
        raise MemoryError(f"injected by {INJECT_OOM_ENV} (can't allocate memory)")
    return train(config, report=report, checkpoint_dir=ckpt_dir, resume_from=resume_from, final_score=False)


def _train_retrying_oom(config: TrainConfig, report, ckpt_dir, resume_from, where):
    """`_train`, with an allocation failure raised as `MachineOutOfMemory`: shapes that cannot fit the
    device were refused before training (`memory_floor_bytes`), so what is left is the machine's
    memory (a neighbour on a shared GPU, a fragmented allocator), not the recipe's. Ray retries the
    trial from its last checkpoint (--max-failures); the tables say `oom` if every try failed."""
    try:
        return _train(config, report, ckpt_dir, resume_from)
    except (RuntimeError, MemoryError) as error:
        if (reason := out_of_memory(error)) is None:
            raise
        at = where() if callable(where) else where
        raise MachineOutOfMemory(f"{reason} (at {at}; Ray retries it from the last checkpoint)") from error


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
        "node_id": _node_id(full=True),
        "device_s": round(time.perf_counter() - started, 3),
        "flops": estimated_flops(config, params, metrics["tokens"]) if params else None,
        "config_key": config_key(config),
    }


def device_memory_bytes(device: str) -> int:
    """Memory of the device a trial trains on: the GPU's (all of it: what a shape needs can never
    exceed this), else the machine's physical memory."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _node_id(full: bool = False) -> str:
    """The Ray node running this trial (hostnames repeat when several nodes share a machine): its id's
    first 12 hex digits, which name it in the tables, or all of it (what `ray logs --node-id` takes)."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return node if full else node[:12]
    except Exception:  # outside Ray (tests of the function itself)
        return socket.gethostname()


def trial_resources(cpus: float, gpus: float) -> dict[str, float]:
    """Ray counts an omitted CPU as 0: always name both."""
    return {"cpu": cpus, "gpu": gpus}
