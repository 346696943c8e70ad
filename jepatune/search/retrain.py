"""Final retrain: the best recipe and the reference, several seeds each, at full budget.

Each run is a Ray task (one per seed and recipe, in parallel) that trains, exports the
int8+zlib artifact and scores it after the round trip on the full val split. A finished
run is appended to `final/runs.jsonl` as soon as it ends and skipped on a rerun of the same
recipe, seed and config (a longer budget is a new run), so a crash loses no finished run;
a run cut by a crash starts again in a clean folder. `retrain_ddp` trains one run on
several workers through Ray Train's `TorchTrainer` (DDP) instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from jepatune.analysis import schema
from jepatune.analysis.explore import compare_final
from jepatune.analysis.tables import write_parquet
from jepatune.errors import ConfigError, JepatuneError
from jepatune.experiment.layout import BEST_NAME, FINAL_DIR, FINAL_RUNS, TABLES_DIR
from jepatune.experiment.settings import SweepSettings, publish
from jepatune.experiment.store import Store
from jepatune.experiment.trials import config_key
from jepatune.trainer.config import TrainConfig


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The completed trial with the lowest last val_bpb (trials stopped early are not comparable)."""
    return top_trials(trials, 1).iloc[0]


def top_trials(trials: pd.DataFrame, k: int) -> pd.DataFrame:
    """The `k` best completed trials by their score, best first: one per recipe (the tables fold
    trials of the same `config_key`), so the finalists are `k` distinct recipes."""
    done = trials[trials["status"] == "completed"]
    if done.empty:
        raise JepatuneError("no trial ran its whole budget; run more samples or lower the ASHA pruning")
    done = done.sort_values("last_val_bpb", kind="stable")
    return (done.drop_duplicates("config_key") if "config_key" in done else done).head(k)


def retrain_seeds(base_seed: int, n: int, used: set[int] = frozenset()) -> list[int]:
    """`n` seeds that no trial of the sweep trained with: base_seed + 1, + 2, ... skipping `used`. A
    retrain on the trials' own seed would rescore the very run a recipe won on (the winner's curse)."""
    seeds, s = [], base_seed
    while len(seeds) < n:
        s += 1
        if s not in used:
            seeds.append(s)
    return seeds


def recipe_config(base: TrainConfig, knobs: dict[str, Any], steps: int) -> TrainConfig:
    """`base` with a trial's knobs, at `steps`, evaluated every tenth of the budget."""
    clean = {k: v.item() if hasattr(v, "item") else v for k, v in knobs.items()
             if v is not None and not pd.isna(v)}  # pandas gives numpy scalars and NA
    return TrainConfig.from_dict({**base.to_dict(), **clean, "iterations": steps, "eval_steps": (),
                                  "val_loss_every": max(1, steps // 10)})


def write_best(settings: SweepSettings, config: TrainConfig) -> str:
    """best.toml where the sweep lives (and in its local folder); returns the local one when there is one."""
    return publish(settings, BEST_NAME, "# The best recipe of this sweep: jepatune train --config best.toml\n"
                   + config.to_toml())


# The knobs that make a ByteJEPA recipe rather than a model or a budget: resetting them to the
# TrainConfig defaults turns any config into the reference recipe at the same shape and budget.
RECIPE_KNOBS = ("jepa_pure_frac", "ce_pure_frac", "jepa_weight", "regularizer", "sigreg_weight", "swa_enabled",
                "swa_start_frac", "swa_decay")


def reference_of(config: TrainConfig) -> TrainConfig:
    defaults = TrainConfig()
    return config.replace(**{k: getattr(defaults, k) for k in RECIPE_KNOBS})


def retrain_recipe(config: TrainConfig, out: Path, seeds: int, cpus: float = 1.0, gpus: float = 0.0,
                   log=print) -> pd.DataFrame:
    """`jepatune retrain CONFIG`: the config and its reference (same shape, data and budget), `seeds`
    seeds each in parallel; rows in OUT/final/runs.jsonl and OUT/tables/final.parquet."""
    frame = retrain(Store(out), {"recipe": config, "reference": reference_of(config)},
                    retrain_seeds(config.seed, seeds), cpus, gpus, log=log)
    write_parquet(pd.DataFrame(frame, columns=list(schema.FINAL)).astype(schema.FINAL),
                  out / TABLES_DIR / "final.parquet")
    return compare_final(frame)


def _run_one(config: dict[str, Any], store: Store, rel: str) -> dict[str, Any]:
    """Train in a fresh local folder on whichever node runs this, then put the run's files where the
    experiment lives (what was there is not a finished run of this config: a run cut by a crash, or
    one at another budget)."""
    from jepatune.search.trainable import work_dir
    from jepatune.trainer.loop import train

    with work_dir() as out_dir:
        result = train(TrainConfig.from_dict(config), out_dir=out_dir)
        store.put_dir(out_dir, rel)
    return result.summary


def retrain(store: Store, runs: dict[str, TrainConfig], seeds: Sequence[int], cpus: float, gpus: float,
            log=print, about: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Train every recipe in `runs` with each of `seeds` in parallel, skipping runs finished before;
    return the final table rows of these runs. `about` adds columns to a recipe's rows (its trial).
    Rows go to `store`'s final/runs.jsonl as each run ends; each run's files to final/RECIPE-seedK."""
    import ray

    done = {_run_key(r["recipe"], r["seed"], r.get("config_key")) for r in store.read_rows(FINAL_RUNS)}
    task = ray.remote(_run_one).options(num_cpus=cpus, num_gpus=gpus)
    pending, wanted = {}, set()
    for recipe, config in runs.items():
        for seed in seeds:
            c = config.replace(seed=seed)
            wanted.add(key := _run_key(recipe, seed, config_key(c)))
            if key in done:
                continue
            ref = task.remote(c.to_dict(), store, f"{FINAL_DIR}/{recipe}-seed{seed}")
            pending[ref] = (recipe, seed, c)
    t0 = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        recipe, seed, c = pending.pop(ready[0])
        summary = ray.get(ready[0])
        row = {"recipe": recipe, "seed": seed, "steps": c.iterations, "config_key": config_key(c),
               "recipe_key": config_key(runs[recipe].replace(seed=0)),  # the recipe, whatever the seed
               **{k: summary.get(k) for k in ("status", "val_bpb", "prequant_bpb", "raw_bpb", "raw_q_bpb", "avg_bpb",
                                               "avg_q_bpb", "artifact_bytes", "total_bytes", "fits_cap",
                                               "elapsed_s", "swa_start_shipped")},
               **(about or {}).get(recipe, {})}
        store.append_row(FINAL_RUNS, row)  # kept as soon as it ends
        log(f"  retrain {recipe} seed {seed}: val_bpb {row['val_bpb']:.4f} after the int8+zlib round trip "
            f"({time.perf_counter() - t0:.0f}s, {len(pending)} left)")
    rows = [r for r in store.read_rows(FINAL_RUNS) if _run_key(r["recipe"], r["seed"], r.get("config_key")) in wanted]
    return pd.DataFrame(rows)


def _run_key(recipe: str, seed: int, key: str | None) -> tuple[str, int, str | None]:
    return recipe, int(seed), key


# --- several workers for one run: Ray Train -------------------------------------------------

def _ddp_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker. Ray has set RANK, WORLD_SIZE and LOCAL_RANK and joined the process
    group, so `setup_runtime` runs DDP. Rank 0 writes the run's files to a local folder and reports
    them as the checkpoint (which also fills `Result.metrics`); the driver copies them to `out_dir`,
    so rank 0 may run on any node."""
    import tempfile

    import ray.train

    from jepatune.trainer.loop import train
    from jepatune.trainer.runtime import setup_runtime

    config = TrainConfig.from_dict(loop_config["config"])
    if config.device == "cuda":  # the GPU Ray gave this worker; setup_runtime takes cuda:LOCAL_RANK
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index)
    runtime = setup_runtime(config)  # what the trainer sees: the group is joined already
    with tempfile.TemporaryDirectory(prefix="jepatune-ddp-") as tmp:
        result = train(config, out_dir=tmp if runtime.main else None)
        metrics = {**{k: v for k, v in result.summary.items() if not isinstance(v, dict)},
                   "rank": runtime.rank, "world_size": runtime.world_size}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if runtime.main else None)


def retrain_ddp(config: TrainConfig, out_dir: str | Path, num_workers: int = 2, use_gpu: bool = False,
                storage: str | None = None) -> dict[str, Any]:
    """Train one run on `num_workers` DDP workers (gloo on CPU, NCCL on GPUs) with Ray Train; write
    its files (artifact, summary.json, metrics.jsonl) to `out_dir` and return rank 0's summary.

    Ray keeps the run under `storage` (default: beside `out_dir`); on several nodes it must be
    shared (s3://... or NFS). `grad_accum_steps` is the global count of micro-batches per step, so
    the result matches one process with the same config.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    device = "cuda" if use_gpu else "cpu"
    if config.device not in ("auto", device):
        raise ConfigError(f"device={config.device!r} but use_gpu={use_gpu}; set device={device} or auto")
    if config.grad_accum_steps % num_workers:
        raise ConfigError(f"grad_accum_steps={config.grad_accum_steps} must be divisible by num_workers={num_workers}")
    out_dir = Path(out_dir).resolve()
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"config": config.replace(device=device).to_dict()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"retrain-{out_dir.name}", storage_path=storage or str(out_dir.parent / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise JepatuneError(f"retrain_ddp {out_dir.name}: rank 0 reported no result")
    result.checkpoint.to_directory(str(out_dir))
    return dict(result.metrics or {})
