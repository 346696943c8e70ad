"""One line per finished trial on the terminal, instead of Ray's full tables."""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback

from jepatune.experiment.trials import METRIC, PENALIZED, TIME_ATTR


class TrialLines(Callback):
    def __init__(self, total: int, trial_steps: int):
        self.total, self.trial_steps = total, trial_steps
        self.t0 = time.perf_counter()

    def setup(self, **info) -> None:
        # A resumed sweep unpickles this callback from the first run: restart its clock here.
        self.t0 = time.perf_counter()

    def _line(self, trial, trials: list, result: dict | None, error: str | None = None) -> None:
        # From Ray's trial list, which after a resume includes the trials finished before it.
        finished = [t for t in trials if t is trial or t.status in (t.TERMINATED, t.ERROR)]
        values = [(t.last_result or {}).get(METRIC) for t in finished
                  if (t.last_result or {}).get("status") == "completed" and not (t is trial and error is not None)]
        best = min((v for v in values if isinstance(v, float)), default=math.inf)
        result = result or {}
        value, step = result.get(METRIC), result.get(TIME_ATTR, 0)
        status = result.get("status", "?")
        if error is not None:
            status = "errored"
        elif status == "running" or (status != "completed" and step < self.trial_steps
                                     and status not in PENALIZED):
            status = f"pruned at step {step}"
        shown = f"val_bpb {value:.4f}" if isinstance(value, float) else (error or "")[:80]
        shown_best = f"best {best:.4f}" if math.isfinite(best) else "no trial finished yet"
        print(f"[{time.perf_counter() - self.t0:6.0f}s] trial {len(finished)}/{self.total} {trial.trial_id}: {status}, "
              f"{shown} | {shown_best}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trials, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, trials, trial.last_result, error=str(getattr(trial, "error_file", "") or "error"))
