"""Optuna and ASHA, adapted so that the search learns the truth and leaves a record.

Ray's stock `OptunaSearch` tells Optuna that a trial ASHA stopped is COMPLETE with its
early, low-budget value, so TPE mistakes a rung value for a final one. Here such a
trial is PRUNED, with its intermediate values reported at their step counts; Optuna then
ranks it below trials that ran to the end. `RecordingASHA` writes every decision it takes
(trial, rung, value, cut-off, continue or stop) to a JSON-lines file for the tables, and
runs the first trial it would stop and a random share of the later ones to the end anyway
(audits), so that every sweep measures how often its pruning is wrong. A diverged or refused
trial is told to Optuna with a positive constraint (TPE then ranks it below every completed and
pruned trial) and never enters ASHA's cut-offs.
"""

from __future__ import annotations

import logging
import time

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from jepatune.analysis.replay import AuditRule
from jepatune.experiment.store import file_store
from jepatune.experiment.trials import METRIC, PENALIZED, TIME_ATTR
from jepatune.spaces import FAILURE_CONSTRAINT

log = logging.getLogger(__name__)


class RungAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, trial_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_steps = trial_steps
        self._reported: dict[str, set[int]] = {}  # steps already reported, per trial
        self._retold: set[str] = set()  # errored trials whose rerun's outcome was added (once)
        self._rerun_results: dict[str, list[dict]] = {}  # rung results of such reruns, until they end
        self._max_live, self._live = 0, set()  # concurrency, kept here: see set_max_concurrency

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Limit concurrency here rather than in Ray's ConcurrencyLimiter, which drops the completion
        of a trial it no longer counts as live: a resumed errored trial would never be told."""
        self._max_live = max_concurrent
        return True

    def suggest(self, trial_id: str):
        if self._max_live and len(self._live) >= self._max_live:
            return None
        suggestion = super().suggest(trial_id)
        if isinstance(suggestion, dict):
            self._live.add(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or METRIC not in result:
            return
        if trial_id in self._completed_trials:  # a resumed errored trial: kept for `_tell_rerun`
            self._rerun_results.setdefault(trial_id, []).append({k: result.get(k) for k in (TIME_ATTR, METRIC)})
            return
        step = int(result.get(TIME_ATTR, 0))
        if step not in self._reported.setdefault(trial_id, set()):  # a restored trial may report a step again
            self._reported[trial_id].add(step)
            ot_trial.report(float(result[METRIC]), step)  # by step, not by report count

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        if trial_id in self._completed_trials:
            self._tell_rerun(trial_id, ot_trial, result, error)
            return
        state, value = self._outcome(trial_id, result, error)
        if _penalized(state, result):
            ot_trial.set_constraint(FAILURE_CONSTRAINT, 1.0)
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. told twice after a restore
            log.warning("optuna refused the result of %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)

    def _outcome(self, trial_id: str, result: dict | None, error: bool) -> tuple[optuna.trial.TrialState, float | None]:
        if error or not result or METRIC not in result:
            return optuna.trial.TrialState.FAIL, None
        if result.get(TIME_ATTR, 0) < self.trial_steps and result.get("status") not in PENALIZED:
            # Stopped at a rung: not a final value. Ray hands the stopping result to on_trial_complete
            # without on_trial_result, so record it as an intermediate value first.
            self.on_trial_result(trial_id, result)
            return optuna.trial.TrialState.PRUNED, None
        return optuna.trial.TrialState.COMPLETE, float(result[METRIC])

    def _tell_rerun(self, trial_id: str, ot_trial, result: dict | None, error: bool) -> None:
        """A trial that ended in an error was told FAIL; resumed (`resume_errored`), it runs again
        under the same id, and Optuna cannot be told twice. Its new outcome is added once, as a new
        trial with the same parameters (the FAIL stays as the record of the error)."""
        frozen = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        if frozen.state != optuna.trial.TrialState.FAIL or trial_id in self._retold or error:
            return
        state, value = self._outcome(trial_id, result, error)
        intermediate = {int(r[TIME_ATTR]): float(r[METRIC]) for r in self._rerun_results.pop(trial_id, [])}
        if state == optuna.trial.TrialState.PRUNED:
            intermediate[int(result.get(TIME_ATTR, 0))] = float(result[METRIC])
        attrs = {"jepatune:rerun_of": frozen.number, "jepatune:ray_trial_id": trial_id}
        rerun = optuna.trial.create_trial(params=frozen.params, distributions=frozen.distributions, value=value,
                                          state=state, intermediate_values=intermediate, user_attrs=attrs)
        if _penalized(state, result):
            rerun.set_constraint(FAILURE_CONSTRAINT, 1.0)
        self._ot_study.add_trial(rerun)
        self._retold.add(trial_id)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def _penalized(state: optuna.trial.TrialState, result: dict | None) -> bool:
    """A final penalty (diverged, or refused before training), not a measured BPB: told with a failed
    constraint, which TPE ranks after every completed and pruned trial."""
    return state == optuna.trial.TrialState.COMPLETE and bool(result) and result.get("status") in PENALIZED


class RecordingASHA(ASHAScheduler):
    """ASHA that records its decisions, judges at explicit `milestones` when given (the `restart`
    fidelity's cumulative step counts), and audits: the first trial it would stop, and then each
    with probability `audit_frac`, runs to the end instead, recorded as decision "audit" (its value
    still counts in the rung's cut-off, as for any judged trial; it is judged at no later rung).
    Every value in its rungs is in the decisions file, so a resumed sweep rebuilds the same cut-offs."""

    def __init__(self, *args, decisions_path: str, milestones: tuple[int, ...] | None = None,
                 audit_frac: float = 0.0, audit_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if milestones is not None:  # instead of grace * rf^k; the last one is max_t
            for bracket in self._brackets:
                bracket._rungs = [(m, {}) for m in sorted(milestones[:-1], reverse=True)]
        self.decisions_path = decisions_path
        self._decisions = file_store(decisions_path)  # (store, name): where the sweep lives
        self.audit_frac = audit_frac
        self._audits = AuditRule(audit_frac, audit_seed)
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
        store, name = self._decisions
        rows = [r for r in store.read_rows(name) if {"trial_id", "rung", "value"} <= r.keys()]
        for bracket in self._brackets:  # one bracket (Ray's default), so every trial is in it
            for milestone, recorded in bracket._rungs:
                recorded.update({r["trial_id"]: self._metric_op * r["value"] for r in rows if r["rung"] == milestone})
        self._stopped = {r["trial_id"] for r in rows if r.get("decision") == "stop"}
        self._audited = {r["trial_id"] for r in rows if r.get("decision") == "audit"}
        self._audits.audited = len(self._audited)  # the first stop after a resume is no longer "the first"
        if rows:
            log.info("resumed ASHA with %d earlier decisions", len(rows))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("status") in PENALIZED:  # a penalty, no measured BPB: kept out of every cut-off
            return TrialScheduler.STOP
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
            # The first stop is always audited, so that every sweep with stops measures its pruning at
            # least once; each later one with probability audit_frac.
            if self._audits.audit():
                decision, action = "audit", TrialScheduler.CONTINUE
                self._audited.add(trial.trial_id)
        self._record(trial.trial_id, rung, result, cutoff, decision)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """Ray's ASHA records the last result once more here, into the first rung the trial has no
        value in: for an audited trial, a rung it skipped, with its final value, in no decision.
        Every value ASHA holds is recorded (and written) when it is judged, so nothing is added."""
        self._trial_info.pop(trial.trial_id, None)

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
        store, name = self._decisions
        store.append_row(name, row)

