"""What a sweep keeps on storage: every trial's results, and training state only where a resume needs it.

A rung checkpoint holds a trial's training state (weights, Muon and Adam state, the SWA copy: about
200 MB at the reference shape, `bench/storage_size.py`) so that a failed or resumed trial goes on
from its last rung. Once a trial has ended (completed, or stopped by ASHA, audits included) nothing
resumes it from that state: a completed trial's result is in the finished-trial cache and in the
checkpoint's `trial_result.json`, a stopped one's last rung report in `rung_result.json`. So:

- `DropEndedState` deletes the state files of a trial as it ends; its checkpoint folders keep
  their small result files. A trial that errored keeps its checkpoints: Ray restarts it from the
  newest (`--max-failures`, and `--resume`).
- `prune_after_sweep`, once a sweep has ended: only the newest checkpoint folder of each trial
  (during the sweep Ray's last snapshot may still name an older one, so they stay until then), and
  no state in it when the trial ended (also for a straggler that saved after it was stopped).

A sweep's storage is then its running trials' checkpoints (at most concurrency x rungs of them)
plus a few kilobytes per ended trial, not a checkpoint per trial.
"""

from __future__ import annotations

import pyarrow.fs as pafs
from ray.tune import Callback

from jepatune.experiment.layout import filesystem
from jepatune.experiment.ray_files import TRIAL_FOLDER, trial_states
from jepatune.trainer.checkpoint import CHECKPOINT_NAME


def _checkpoint_dirs(fs: pafs.FileSystem, trial_path: str) -> list[str]:
    """checkpoint_000000, _000001, ...: the name orders them."""
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def drop_training_state(fs: pafs.FileSystem, trial_path: str) -> int:
    """Delete the training state in every checkpoint of the trial at `trial_path`; return the bytes freed."""
    freed = 0
    for folder in _checkpoint_dirs(fs, trial_path):
        state = fs.get_file_info(f"{folder}/{CHECKPOINT_NAME}")
        if state.type == pafs.FileType.File:
            fs.delete_file(state.path)
            freed += state.size or 0
    return freed


class DropEndedState(Callback):
    """Drop a trial's training state when it ends (see the module docstring)."""

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        drop_training_state(trial.storage.storage_filesystem, trial.storage.trial_fs_path)


def prune_after_sweep(experiment: str) -> int:
    """Once a sweep has ended: only the newest checkpoint of each trial (during the sweep Ray's last
    snapshot may still name an older one), and no training state in it when the trial ended; return
    the bytes freed."""
    fs, root = filesystem(experiment)
    ended = {trial_id for trial_id, (status, _) in trial_states(fs, root).items() if status == "TERMINATED"}
    freed = 0
    for trial in fs.get_file_info(pafs.FileSelector(root)):
        if trial.type != pafs.FileType.Directory:
            continue
        for path in _checkpoint_dirs(fs, trial.path)[:-1]:
            freed += sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
            fs.delete_dir(path)
        if (match := TRIAL_FOLDER.search(trial.base_name)) and match.group(1) in ended:
            freed += drop_training_state(fs, trial.path)
    return freed
