"""Optuna and ASHA, adapted so that the search learns the truth and leaves a record.

Ray's stock `OptunaSearch` tells Optuna that a trial ASHA stopped is COMPLETE with its
early, low-budget value, so TPE mistakes a rung value for a final one. Here such a
trial is PRUNED, with its intermediate values reported at their step counts; Optuna then
ranks it below trials that ran to the end. `RecordingASHA` writes every decision it takes
(trial, rung, value, cut-off, continue or stop) to a JSON-lines file for the tables, and
runs a random share of the trials it would stop to the end anyway (audits), so that every
sweep measures how often its pruning is wrong.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from jepatune.analysis.schema import PENALIZED
from jepatune.analysis.tables import read_jsonl
from jepatune.search.trainable import METRIC, TIME_ATTR

log = logging.getLogger(__name__)
DECISIONS_NAME = "decisions.jsonl"


class RungAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, trial_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_steps = trial_steps
        self._reported: dict[str, set[int]] = {}  # steps already reported, per trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or METRIC not in result:
            return
        step = int(result.get(TIME_ATTR, 0))
        if step not in self._reported.setdefault(trial_id, set()):  # a restored trial may report a step again
            self._reported[trial_id].add(step)
            ot_trial.report(float(result[METRIC]), step)  # by step, not by report count

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        if error or not result or METRIC not in result:
            state, value = optuna.trial.TrialState.FAIL, None
        elif result.get(TIME_ATTR, 0) < self.trial_steps and result.get("status") not in PENALIZED:
            # Stopped at a rung: not a final value. Ray hands the stopping result to on_trial_complete
            # without on_trial_result, so record it as an intermediate value first.
            self.on_trial_result(trial_id, result)
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state, value = optuna.trial.TrialState.COMPLETE, float(result[METRIC])
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. told twice after a restore
            log.warning("optuna refused the result of %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


class RecordingASHA(ASHAScheduler):
    """ASHA that records its decisions, judges at explicit `milestones` when given (the `restart`
    fidelity's cumulative step counts), and audits: with probability `audit_frac` a trial it would
    stop runs to the end instead, recorded as decision "audit" (its value still counts in the
    rung's cut-off, as for any judged trial)."""

    def __init__(self, *args, decisions_path: str, milestones: tuple[int, ...] | None = None,
                 audit_frac: float = 0.0, audit_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if milestones is not None:  # instead of grace * rf^k; the last one is max_t
            for bracket in self._brackets:
                bracket._rungs = [(m, {}) for m in sorted(milestones[:-1], reverse=True)]
        self.decisions_path = decisions_path
        self.audit_frac = audit_frac
        self._audit_rng = random.Random(audit_seed)
        self._replayed = False  # pickled False into tuner.pkl, so a resumed driver replays once
        self._stopped: set[str] = set()
        self._audited: set[str] = set()

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._replayed:
            self._replay_decisions()
        super().on_trial_add(tune_controller, trial)

    def _replay_decisions(self) -> None:
        """Ray does not snapshot the scheduler: a resumed sweep gets the one pickled when the sweep
        started, with empty rungs. Refill them from the decisions file so the cut-offs carry on, and
        stop again a trial that was stopped after the last snapshot (it resumes as running)."""
        self._replayed = True
        rows = [r for r in read_jsonl(Path(self.decisions_path)) if {"trial_id", "rung", "value"} <= r.keys()]
        for bracket in self._brackets:  # one bracket (Ray's default), so every trial is in it
            for milestone, recorded in bracket._rungs:
                recorded.update({r["trial_id"]: self._metric_op * r["value"] for r in rows if r["rung"] == milestone})
        self._stopped = {r["trial_id"] for r in rows if r.get("decision") == "stop"}
        self._audited = {r["trial_id"] for r in rows if r.get("decision") == "audit"}
        if rows:
            log.info("resumed ASHA with %d earlier decisions", len(rows))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopped:  # decided (and recorded) before the driver's crash
            return TrialScheduler.STOP
        if trial.trial_id in self._audited:  # runs to the end, judged no more
            done = result.get(self._time_attr, 0) >= self._max_t
            return TrialScheduler.STOP if done else TrialScheduler.CONTINUE
        rung, cutoff = self._rung_and_cutoff(trial.trial_id, result)
        action = super().on_trial_result(tune_controller, trial, result)
        if rung is None:
            return action
        decision = "continue"
        if action == TrialScheduler.STOP:
            decision = "stop"
            if self.audit_frac > 0 and self._audit_rng.random() < self.audit_frac:
                decision, action = "audit", TrialScheduler.CONTINUE
                self._audited.add(trial.trial_id)
        self._record(trial.trial_id, rung, result, cutoff, decision)
        return action

    def _rung_and_cutoff(self, trial_id: str, result: dict) -> tuple[float | None, float | None]:
        """The rung this result will be judged at, and the cut-off it will be held against."""
        bracket = self._trial_info.get(trial_id)
        t, v = result.get(self._time_attr), result.get(self._metric)
        if bracket is None or t is None or v is None or t >= self._max_t:
            return None, None
        for milestone, recorded in bracket._rungs:
            if t < milestone or trial_id in recorded:
                continue
            cutoff = bracket.cutoff(recorded)
            return milestone, (None if cutoff is None else float(self._metric_op * cutoff))
        return None, None

    def _record(self, trial_id: str, rung: float, result: dict, cutoff: float | None, decision: str) -> None:
        # `rung` is in the scheduler's time unit; `step` is the trial's budget position the value was
        # measured at (the same but for `restart`, whose clock also counts the earlier rungs' runs).
        row = {"trial_id": trial_id, "rung": int(rung), "step": int(result.get(TIME_ATTR, result[self._time_attr])),
               "value": float(result[self._metric]), "cutoff": cutoff, "decision": decision, "time": time.time()}
        path = Path(self.decisions_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # one line, appended whole
            f.write(json.dumps(row) + "\n")

