"""Final retrain: the best recipe and the reference, several seeds each, at full budget.

Each run is a Ray task (one per seed and recipe, in parallel) that trains, exports the
int8+zlib artifact and scores it after the round trip on the full val split. A finished
run is appended to `final/runs.jsonl` as soon as it ends and skipped on a rerun, so a
crash loses no finished run. `retrain_ddp` trains one run on several workers through
Ray Train's `TorchTrainer` (DDP) instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from jepatune.atomic import atomic_write_text
from jepatune.errors import JepatuneError
from jepatune.trainer.config import TrainConfig

FINAL_DIR = "final"
RUNS_NAME = "runs.jsonl"
BEST_NAME = "best.toml"


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The completed trial with the lowest last val_bpb (trials stopped early are not comparable)."""
    done = trials[trials["status"] == "completed"]
    if done.empty:
        raise JepatuneError("no trial ran its whole budget; run more samples or lower the ASHA pruning")
    return done.sort_values("last_val_bpb", kind="stable").iloc[0]


def recipe_config(base: TrainConfig, knobs: dict[str, Any], steps: int) -> TrainConfig:
    """`base` with a trial's knobs, at `steps`, evaluated every tenth of the budget."""
    clean = {k: v.item() if hasattr(v, "item") else v for k, v in knobs.items()
             if v is not None and not pd.isna(v)}  # pandas gives numpy scalars and NA
    return TrainConfig.from_dict({**base.to_dict(), **clean, "iterations": steps, "eval_steps": (),
                                  "val_loss_every": max(1, steps // 10)})


def write_best(folder: Path, config: TrainConfig) -> Path:
    path = folder / BEST_NAME
    atomic_write_text(path, "# The best recipe of this sweep: jepatune train --config best.toml\n" + config.to_toml())
    return path


def _run_one(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    from jepatune.trainer.loop import train

    result = train(TrainConfig.from_dict(config), out_dir=out_dir)
    return result.summary


def retrain(folder: Path, runs: dict[str, TrainConfig], seeds: int, cpus: float, gpus: float,
            log=print) -> pd.DataFrame:
    """Train every recipe in `runs` with `seeds` seeds in parallel; return the final table rows."""
    import ray

    from jepatune.search.trainable import config_key

    final_dir = folder / FINAL_DIR
    final_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["recipe"], r["seed"]) for r in _read_runs(final_dir)}
    task = ray.remote(_run_one).options(num_cpus=cpus, num_gpus=gpus)
    pending = {}
    for recipe, config in runs.items():
        for seed in range(seeds):
            if (recipe, seed) in done:
                continue
            c = config.replace(seed=config.seed + seed)
            ref = task.remote(c.to_dict(), str(final_dir / f"{recipe}-seed{seed}"))
            pending[ref] = (recipe, seed, c)
    t0 = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        recipe, seed, c = pending.pop(ready[0])
        summary = ray.get(ready[0])
        row = {"recipe": recipe, "seed": seed, "steps": c.iterations, "config_key": config_key(c),
               **{k: summary.get(k) for k in ("status", "val_bpb", "prequant_bpb", "raw_bpb", "raw_q_bpb", "avg_bpb",
                                               "avg_q_bpb", "artifact_bytes", "total_bytes", "fits_cap",
                                               "elapsed_s")}}
        with open(final_dir / RUNS_NAME, "a", encoding="utf-8") as f:  # kept as soon as it ends
            f.write(json.dumps(row) + "\n")
        log(f"  retrain {recipe} seed {seed}: val_bpb {row['val_bpb']:.4f} after the int8+zlib round trip "
            f"({time.perf_counter() - t0:.0f}s, {len(pending)} left)")
    return pd.DataFrame(_read_runs(final_dir))


def _read_runs(final_dir: Path) -> list[dict[str, Any]]:
    from jepatune.analysis.tables import read_jsonl

    return read_jsonl(final_dir / RUNS_NAME)


def summarize_final(final: pd.DataFrame) -> pd.DataFrame:
    """Mean, spread and count of the post-quant val_bpb per recipe."""
    if final.empty:
        return final
    return (final.groupby("recipe")["val_bpb"].agg(["mean", "std", "min", "count"])
            .sort_values("mean").reset_index())


# --- several workers for one run: Ray Train -------------------------------------------------

def _ddp_loop(loop_config: dict[str, Any]) -> None:
    import tempfile

    import ray.train

    from jepatune.trainer.loop import train

    context = ray.train.get_context()
    out_dir = loop_config["out_dir"] if context.get_world_rank() == 0 else None
    result = train(TrainConfig.from_dict(loop_config["config"]), out_dir=out_dir)
    # Result.metrics is filled only from reports that carry a checkpoint: attach one on rank 0.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if context.get_world_rank() == 0:
            Path(tmp, "summary.json").write_text(json.dumps(result.summary, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in result.summary.items() if not isinstance(v, dict)},
                         checkpoint=checkpoint)


def retrain_ddp(config: TrainConfig, out_dir: str | Path, num_workers: int = 2, use_gpu: bool = False,
                storage: str | None = None) -> dict[str, Any]:
    """Train one run on `num_workers` DDP workers (gloo on CPU, NCCL on GPUs) with Ray Train."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).resolve()
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"config": config.to_dict(), "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"retrain-{out_dir.name}", storage_path=storage or str(out_dir.parent / "ray")),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
