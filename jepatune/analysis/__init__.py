"""Parquet tables of sweeps and their analysis in pandas.

    from jepatune.analysis import load, leaderboard, marginals, importance
    tables = load("runs/sweep/sweep")          # trials, curves, decisions, final
    leaderboard(tables.trials, k=5)

Names are loaded on first use, so importing the package imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_tables": "jepatune.analysis.tables",
    "write_tables": "jepatune.analysis.tables",
    **{name: "jepatune.analysis.explore" for name in (
        "Tables", "load", "leaderboard", "knob_columns", "marginals", "importance", "spearman",
        "rung_correlation", "compare_final", "false_stops", "wilson_interval")},
    **{name: "jepatune.analysis.optuna_io" for name in ("export_study", "import_study", "journal_storage")},
    **{name: "jepatune.analysis.replay" for name in (
        "replay_asha", "replay_summary", "replay_permutations", "orders_summary", "replay_orders", "replay_sweep",
        "fidelity_cost")},
    **{name: "jepatune.analysis.ablation" for name in ("ablation_table", "load_ablation")},
    "write_report": "jepatune.analysis.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jepatune.analysis' has no attribute {name!r}")
