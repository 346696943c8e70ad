"""Recorded benchmarks of a search space, and sweeps simulated against them.

- `settings` (`RecordSettings`) and `strategy` (`Strategy`): what a recording records and what a
  simulated sweep searches with; light, for the CLI's options.
- `record`: trains recipes drawn to cover a space (with several seeds, every rung's value in every
  fidelity, the final score as a sweep trial scores it, a subset at a longer budget) and writes the
  benchmark as Parquet tables (needs torch; no Ray).
- `tables`: reads a benchmark folder (pure pandas).
- `surrogate`: a recipe's curve and score at any point of the space, exact where it was recorded.
- `simulate`: a whole sweep (an Optuna sampler, ASHA or none, the sweep's concurrency) replayed
  against a benchmark in seconds.
"""
