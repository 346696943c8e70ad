"""A sweep's answer as text for the terminal: the top trials, the finalists' retrain, the conclusion."""

from __future__ import annotations

import os
from typing import Any

from jepatune.analysis import explore
from jepatune.analysis.finalists import conclusion
from jepatune.analysis.tables import load
from jepatune.experiment.layout import REPORTS_DIR
from jepatune.experiment.report_log import log_owner
from jepatune.experiment.settings import read_settings

TRIAL_PREFIX = "run_trial_"  # Ray's trial folders of a sweep (the trainable's name)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _trial_of(rel: str) -> str | None:
    """The trial folder a file of the sweep belongs to: one in Ray's trial folder, or in the trial's
    report log (`reports/<trial folder>.jsonl`, or its folder of rows on an object store)."""
    head, _, rest = rel.partition("/")
    if head.startswith(TRIAL_PREFIX):
        return head
    if head == REPORTS_DIR and rest:
        return log_owner(rest.split("/", 1)[0])
    return None


def storage_use(folder: str | os.PathLike) -> dict[str, Any]:
    """Bytes the sweep takes where it lives: in all, in trials (their folders and report logs; of
    those, in checkpoints), per trial; one listing of its storage."""
    settings = read_settings(folder)
    files = settings.store.files("", recursive=True)
    root = settings.store.path()
    owner = {f.path: _trial_of(f.path[len(root):].lstrip("/")) for f in files}
    in_trials = [f for f in files if owner[f.path] is not None]
    trials = {owner[f.path] for f in in_trials}
    total, trial_bytes = sum(f.size or 0 for f in files), sum(f.size or 0 for f in in_trials)
    return {"where": settings.experiment_path, "bytes": total, "trial_bytes": trial_bytes, "trials": len(trials),
            "checkpoint_bytes": sum(f.size or 0 for f in in_trials if "/checkpoint_" in f.path),
            "bytes_per_trial": trial_bytes / len(trials) if trials else 0.0}


def storage_text(use: dict[str, Any]) -> str:
    """`storage_use` in words."""
    return (f"{human_bytes(use['bytes'])} at {use['where']}, "
            f"{human_bytes(use['bytes_per_trial'])} per trial over {use['trials']} trials, of which "
            f"{human_bytes(use['checkpoint_bytes'])} in checkpoint folders (an ended trial's keeps its results, "
            "not its training state)")


def sweep_summary(folder: str | os.PathLike, k: int = 5, storage: dict[str, Any] | None = None) -> str:
    """The top `k` trials, then the finalists' retrain and the sweep's answer, then `storage` (the
    sweep's `storage_use`, listed here when not given: a caller that also writes the report lists it
    once for both)."""
    tables = load(folder)
    trials = tables.trials
    counts = trials["status"].value_counts().to_dict()
    top = explore.leaderboard(trials, k=k).drop(columns=["status", "device_s"])
    lines = [f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
             "top trials (full budget; val_bpb of the weights a retrain would ship, on the val prefix; "
             "is_reference marks the reference recipe):",
             top.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if not tables.finalists.empty:
        shown = tables.finalists[["recipe", "winner", "trial_id", "trial_bpb", "n", "mean", "std", "delta_ref",
                                  "ref_ci_low", "ref_ci_high", "excess_drift"]]
        lines += ["finalists retrained with seeds no trial used (val_bpb after the int8+zlib round trip, full val "
                  "split; delta vs the reference with a paired 95% CI):",
                  shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"), conclusion(tables.finalists)]
    return "\n".join([*lines, "storage: the sweep takes " + storage_text(storage or storage_use(folder))])
