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
        "rung_correlation", "compare_final")},
    **{name: "jepatune.analysis.optuna_io" for name in ("export_study", "import_study", "journal_storage")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jepatune.analysis' has no attribute {name!r}")
