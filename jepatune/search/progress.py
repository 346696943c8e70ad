"""One line per finished trial on the terminal, instead of Ray's full tables."""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback

from jepatune.search.trainable import METRIC, TIME_ATTR


class TrialLines(Callback):
    def __init__(self, total: int, trial_steps: int):
        self.total, self.trial_steps = total, trial_steps
        self.done, self.best = 0, math.inf
        self.t0 = time.perf_counter()

    def _line(self, trial, result: dict | None, error: str | None = None) -> None:
        self.done += 1
        result = result or {}
        value, step = result.get(METRIC), result.get(TIME_ATTR, 0)
        status = result.get("status", "?")
        if error is not None:
            status = "errored"
        elif status == "running" or (status != "completed" and step < self.trial_steps and status not in
                                     ("diverged", "infeasible")):
            status = f"pruned at step {step}"
        if status == "completed" and value is not None:
            self.best = min(self.best, value)
        shown = f"val_bpb {value:.4f}" if isinstance(value, float) else (error or "")[:80]
        best = f"best {self.best:.4f}" if math.isfinite(self.best) else "no trial finished yet"
        print(f"[{time.perf_counter() - self.t0:6.0f}s] trial {self.done}/{self.total} {trial.trial_id}: {status}, "
              f"{shown} | {best}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trial.last_result, error=str(getattr(trial, "error_file", "") or "error"))
