"""Parquet tables of sweeps and their analysis in pandas (to come)."""
