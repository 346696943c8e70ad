"""Column names and dtypes of every Parquet table: the one place they are declared.

Hyperparameter columns of `trials` are the TrainConfig knobs a sweep searched; their
dtypes follow the knob's type (float64, Int64, boolean, string).
"""

from __future__ import annotations

TRIALS = {
    "trial_id": "string", "status": "string", "is_reference": "boolean", "config_key": "string",
    "best_val_bpb": "float64", "last_val_bpb": "float64", "step": "Int64", "trial_steps": "Int64",
    "tokens": "Int64", "train_s": "float64", "device_s": "float64", "flops": "float64", "params": "Int64",
    "node": "string", "error": "string", "reports": "Int64", "cached": "boolean", "restarts": "Int64",
    "compute_steps": "Int64", "audited": "boolean", "live_bpb": "float64", "avg_bpb": "float64",
}
CURVES = {
    "trial_id": "string", "training_iteration": "Int64", "step": "Int64", "tokens": "Int64", "val_bpb": "float64",
    "train_loss": "float64", "loss_ce": "float64", "loss_jepa": "float64", "loss_reg": "float64",
    "w_jepa": "float64", "w_ce": "float64", "w_reg": "float64", "stage": "Int64", "lr_mult": "float64",
    "elapsed_s": "float64", "time": "float64", "compute_steps": "Int64", "snapshot_bpb": "float64",
    "probe_bpb": "float64", "live_bpb": "float64", "avg_bpb": "float64", "avg_q_bpb": "float64",
    "raw_q_bpb": "float64", "shipped_bpb": "float64",
}
DECISIONS = {
    "trial_id": "string", "rung": "Int64", "step": "Int64", "value": "float64", "cutoff": "float64",
    "decision": "string", "time": "float64",
}
FINAL = {
    "recipe": "string", "seed": "Int64", "steps": "Int64", "status": "string", "val_bpb": "float64",
    "prequant_bpb": "float64", "raw_bpb": "float64", "raw_q_bpb": "float64", "avg_bpb": "float64",
    "avg_q_bpb": "float64", "artifact_bytes": "Int64", "total_bytes": "Int64", "fits_cap": "boolean",
    "elapsed_s": "float64", "swa_start_shipped": "float64", "config_key": "string", "recipe_key": "string",
    "trial_id": "string", "trial_bpb": "float64", "trial_rank": "Int64", "finalist": "boolean",
}
# One row per retrained recipe of the newest retrain (jepatune.analysis.finalists).
FINALISTS = {
    "recipe": "string", "finalist": "boolean", "winner": "boolean", "trial_id": "string", "trial_rank": "Int64",
    "trial_bpb": "float64", "n": "Int64", "mean": "float64", "std": "float64", "final_rank": "Int64",
    "delta_ref": "float64", "ref_ci_low": "float64", "ref_ci_high": "float64", "delta_winner": "float64",
    "win_ci_low": "float64", "win_ci_high": "float64", "drift": "float64", "excess_drift": "float64",
    "missing": "string",
}
TABLES = {"trials": TRIALS, "curves": CURVES, "decisions": DECISIONS, "final": FINAL, "finalists": FINALISTS}
# An ablation folder's tables (jepatune.analysis.ablation): one row per run, then one per variant.
ABLATION_RUNS = {
    "variant": "string", "change": "string", "seed": "int64", "val_bpb": "float64", "prequant_bpb": "float64",
    "steps": "int64", "status": "string", "trial_id": "string",
}
ABLATION = {
    "variant": "string", "change": "string", "n": "int64", "mean_bpb": "float64", "std_bpb": "float64",
    "delta": "float64", "ci_low": "float64", "ci_high": "float64", "significant": "bool", "missing": "string",
}
ABLATION_TABLES = {"ablation_runs": ABLATION_RUNS, "ablation": ABLATION}
# Run statuses of an ablation: scored / non-finite loss / raised an error.
ABLATION_STATUSES = ("completed", "diverged", "errored")


def knob_dtype(py_type: object) -> str:
    """The pandas dtype of a TrainConfig knob's annotation."""
    text = str(py_type)
    if "bool" in text:
        return "boolean"
    if "float" in text:
        return "float64"
    if "int" in text and "tuple" not in text:
        return "Int64"
    return "string"
