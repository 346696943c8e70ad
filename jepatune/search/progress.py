"""One line per finished trial on the terminal, instead of Ray's full tables."""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback

from jepatune.experiment.trials import METRIC, PENALIZED, TIME_ATTR


class TrialLines(Callback):
    """The count and the best value are kept as trials end, not recounted from Ray's trial list at
    each line (which made the lines cost the square of the trial count)."""

    def __init__(self, total: int, trial_steps: int):
        self.total, self.trial_steps = total, trial_steps
        self.setup()

    def setup(self, **info) -> None:
        # A resumed sweep unpickles this callback from the first run: restart its clock and its tally
        # here (the first line counts the trials Ray's list holds as finished before the resume).
        self.t0 = time.perf_counter()
        self._finished: set[str] = set()
        self._best = math.inf
        self._scanned = False

    def _count(self, trial, result: dict | None, error: str | None = None) -> None:
        result = result or {}
        if result.get("status") == "completed" and error is None and isinstance(result.get(METRIC), float):
            self._best = min(self._best, result[METRIC])
        self._finished.add(trial.trial_id)

    def _line(self, trial, trials: list, result: dict | None, error: str | None = None) -> None:
        if not self._scanned:
            for t in trials:
                if t is not trial and t.status in (t.TERMINATED, t.ERROR):
                    self._count(t, t.last_result)
            self._scanned = True
        self._count(trial, result, error)
        result = result or {}
        value, step = result.get(METRIC), result.get(TIME_ATTR, 0)
        status = result.get("status", "?")
        if error is not None:
            status = "errored"
        elif status == "running" or (status != "completed" and step < self.trial_steps
                                     and status not in PENALIZED):
            status = f"pruned at step {step}"
        shown = f"val_bpb {value:.4f}" if isinstance(value, float) else (error or "")[:80]
        shown_best = f"best {self._best:.4f}" if math.isfinite(self._best) else "no trial finished yet"
        print(f"[{time.perf_counter() - self.t0:6.0f}s] trial {len(self._finished)}/{self.total} {trial.trial_id}: "
              f"{status}, {shown} | {shown_best}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trials, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trials, trial.last_result, error=str(getattr(trial, "error_file", "") or "error"))
