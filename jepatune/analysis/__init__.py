"""Parquet tables of sweeps and their analysis in pandas.

    from jepatune.analysis import load, leaderboard, marginals, importance
    tables = load("runs/sweep/sweep")          # trials, curves, decisions, final
    leaderboard(tables.trials, k=5)

Names are loaded on first use, so importing the package imports neither torch nor Ray.
"""

from __future__ import annotations

from jepatune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    **{name: "jepatune.analysis.tables" for name in ("Tables", "load", "load_tables", "write_tables")},
    **{name: "jepatune.analysis.explore" for name in (
        "leaderboard", "knob_columns", "marginals", "importance", "spearman",
        "rung_correlation", "compare_final", "false_stops", "wilson_interval")},
    **{name: "jepatune.analysis.optuna_io" for name in ("export_study", "import_study", "journal_storage")},
    **{name: "jepatune.analysis.replay" for name in (
        "replay_asha", "replay_summary", "replay_permutations", "orders_summary", "replay_orders", "replay_sweep",
        "fidelity_cost")},
    **{name: "jepatune.analysis.ablation" for name in ("ablation_table", "load_ablation")},
    "write_report": "jepatune.analysis.report",
    "sweep_summary": "jepatune.analysis.summary",
})
