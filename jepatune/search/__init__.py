"""Ray Tune + Optuna + ASHA sweeps wrapping `jepatune.trainer.train` (to come)."""
