"""The one line per ended trial: its count and the best value so far, kept as trials end, and
recounted from Ray's trial list once after a resume."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial

from jepatune.search.progress import TrialLines


def ended(value: float | None, status: str = "completed", step: int = 100) -> Trial:
    trial = Trial("__fake", stub=True)  # Ray's own Trial, with no trainable behind it
    trial.set_status(Trial.TERMINATED)
    trial.run_metadata.last_result = {"status": status, "val_bpb": value, "step": step}
    return trial


def lines(capsys) -> list[str]:
    return [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]


def test_the_count_and_the_best_follow_the_trials_that_ended(capsys):
    progress = TrialLines(total=4, trial_steps=100)
    first, pruned, errored, second = ended(3.5), ended(3.1, "running", 25), ended(None, "running", 25), ended(3.2)
    trials = [first]
    progress.on_trial_complete(0, trials, first)
    trials.append(pruned)
    progress.on_trial_complete(0, trials, pruned)  # a pruned value is never the best
    trials.append(errored)
    progress.on_trial_error(0, trials, errored)
    trials.append(second)
    progress.on_trial_complete(0, trials, second)
    assert lines(capsys) == [
        f"trial 1/4 {first.trial_id}: completed, val_bpb 3.5000 | best 3.5000",
        f"trial 2/4 {pruned.trial_id}: pruned at step 25, val_bpb 3.1000 | best 3.5000",
        f"trial 3/4 {errored.trial_id}: errored, error | best 3.5000",
        f"trial 4/4 {second.trial_id}: completed, val_bpb 3.2000 | best 3.2000",
    ]


@pytest.mark.parametrize("before", [0, 3])
def test_a_resumed_sweep_counts_the_trials_that_ended_before_it(capsys, before):
    progress = TrialLines(total=5, trial_steps=100)
    earlier = [ended(3.0 + k) for k in range(before)]
    progress.setup()  # what Ray calls when the resumed sweep starts
    running = Trial("__fake", stub=True)
    new = ended(3.4)
    progress.on_trial_complete(0, [*earlier, running, new], new)
    best = "3.0000" if before else "3.4000"
    assert lines(capsys) == [f"trial {before + 1}/5 {new.trial_id}: completed, val_bpb 3.4000 | best {best}"]
