"""A sweep's answer as text for the terminal: the top trials, the finalists' retrain, the conclusion."""

from __future__ import annotations

import os

from jepatune.analysis import explore
from jepatune.analysis.finalists import conclusion
from jepatune.analysis.tables import load


def sweep_summary(folder: str | os.PathLike, k: int = 5) -> str:
    """The top `k` trials, then the finalists' retrain and the sweep's answer."""
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
    return "\n".join(lines)
