"""Ray: the trial function, Optuna + ASHA, sweeps, retrains and ablations (see docs/architecture.md)."""
