"""`run_sweep`: Ray Tune + OptunaSearch (TPE) + ASHA over a named space.

The experiment folder `OUT/NAME` holds Ray's own files (the source of truth), then
`sweep.json` (settings, base recipe, versions), `decisions.jsonl` (every ASHA decision),
`finished/` (a cache of finished trials, so none is trained twice), `tables/` (Parquet)
and `best.toml`. With `storage` set (an s3:// URI or a shared folder), Ray writes its
files there and the driver keeps its own files in `OUT/NAME`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jepatune.atomic import atomic_write_text, unwritable_ancestor
from jepatune.errors import JepatuneError

SETTINGS_NAME = "sweep.json"
CACHE_DIR = "finished"
# Ray snapshots the experiment (trial states, the checkpoint each trial restarts from, the searcher)
# every TUNE_GLOBAL_CHECKPOINT_S ("auto": 10 s or more). `--resume` starts from the last snapshot, so
# a hard kill costs each running trial its work since the checkpoint that snapshot names: at most
# this period more than its current rung (finished trials cost nothing: trainable.py caches them).
# Checkpoints are all kept until the sweep ends: with num_to_keep=1 Ray deletes a trial's previous
# checkpoint when it registers the next, while the snapshot on disk (copied in the background) can
# still name it, and the trial then fails to restore ("does not exist on storage anymore": 2 of 9
# killed test sweeps). num_to_keep also forced a snapshot at every checkpoint, each waiting for the
# previous copy; a 2 s period costs less when many trials run.
SNAPSHOT_PERIOD_S = "2"
SAMPLERS = ("tpe", "random")
SCHEDULERS = ("asha", "none")
# What a trial's value at an ASHA rung measures: snapshot = the running model's BPB mid-curriculum;
# restart = a whole curriculum compressed to the rung's budget, retrained from scratch at each rung;
# probe = a short pure-CE cool-down branched off the running model (see trainable.py).
FIDELITIES = ("snapshot", "restart", "probe")
# The defaults by evidence (bench/README.md, fidelity_study.py): with the first rung at a quarter of
# the budget, ASHA on the snapshot value never stopped the best of 24 curriculum configs in 200
# replayed orders and spent 55% of the compute; at an eighth the snapshot ranks poorly (Spearman
# 0.36 with the final BPB). Probe and restart cost more and stopped the best more often.
GRACE_DEFAULT_FRAC = 0.25


def rung_steps(trial_steps: int, grace_steps: int, reduction_factor: float) -> tuple[int, ...]:
    """ASHA's milestones grace * rf^k below the budget, then the budget itself."""
    rungs, s = [], grace_steps
    while s < trial_steps:
        rungs.append(int(s))
        s *= reduction_factor
    return (*rungs, trial_steps)


@dataclass(frozen=True)
class SweepSettings:
    """One sweep. Defaults suit a laptop; a cluster raises samples, steps and concurrency."""

    data: str  # byte-shard folder, the same path on every node
    out: str = "runs/sweep"
    name: str = "sweep"
    space: str = "curriculum"  # a named space or a TOML file
    samples: int = 16  # trials, the reference recipe first
    trial_steps: int = 200  # each trial's full budget in optimiser steps
    grace_steps: int = 0  # first ASHA rung; 0 = GRACE_DEFAULT_FRAC of trial_steps
    reduction_factor: int = 2
    concurrency: int = 2  # trials at once (always set: see the Ray notes on custom searchers)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # 0.5 packs two trials on one GPU
    storage: str | None = None  # where Ray keeps trials: s3://bucket/path or a shared folder
    preset: str | None = None  # a TrainConfig preset for every trial, e.g. "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed knobs for every trial
    seed: int = 0  # the sampler's seed
    startup_trials: int = 10  # random trials before TPE models the space
    sampler: str = "tpe"  # tpe, or random (a baseline for the search itself)
    scheduler: str = "asha"  # asha, or none: every trial runs its full budget
    fidelity: str = "snapshot"  # what a rung measures: snapshot, restart or probe (trainable.FIDELITIES)
    probe_steps: int = 0  # probe fidelity: the cool-down's length; 0 = half the first rung
    audit_frac: float = 0.05  # share of ASHA's stops run to the end anyway, to measure false stops
    max_failures: int = 2  # restarts of a failed trial from its last checkpoint
    checkpoint_every: int = 1  # checkpoint every Nth rung (and always the last); 0 = only the last
    final_steps: int = 0  # retrain budget; 0 = no retrain
    final_seeds: int = 3  # seeds per retrained recipe, none of them a trial's seed
    finalists: int = 3  # the top distinct recipes by trial score retrained (and the reference)

    @property
    def rungs(self) -> tuple[int, ...]:
        grace = self.grace_steps or max(1, round(self.trial_steps * GRACE_DEFAULT_FRAC))
        return rung_steps(self.trial_steps, grace, self.reduction_factor)

    @property
    def probe_length(self) -> int:
        """Steps of each probe branch (0 unless the fidelity is probe)."""
        if self.fidelity != "probe":
            return 0
        return self.probe_steps or max(1, self.rungs[0] // 2)

    @property
    def folder(self) -> Path:
        return Path(self.out).resolve() / self.name

    def validate(self) -> None:
        for key in ("samples", "trial_steps", "concurrency", "final_seeds", "finalists"):
            if getattr(self, key) < 1:
                raise JepatuneError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be at least 1")
        if self.checkpoint_every < 0:
            raise JepatuneError(f"--checkpoint-every={self.checkpoint_every}: must be 0 (last rung only) or more")
        if self.reduction_factor < 2:
            raise JepatuneError(f"--reduction-factor={self.reduction_factor}: must be at least 2")
        if self.grace_steps < 0 or self.grace_steps > self.trial_steps:
            raise JepatuneError(f"--grace-steps={self.grace_steps}: must be in [1, trial_steps]")
        if self.probe_steps < 0 or not 0.0 <= self.audit_frac <= 1.0:
            raise JepatuneError(f"--probe-steps={self.probe_steps} / --audit-frac={self.audit_frac}: need "
                                "probe steps >= 0 and an audit share in [0, 1]")
        for key, allowed in (("sampler", SAMPLERS), ("scheduler", SCHEDULERS), ("fidelity", FIDELITIES)):
            if getattr(self, key) not in allowed:
                raise JepatuneError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise JepatuneError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if self.storage is not None:
            check_storage(self.storage)


def check_storage(storage: str) -> None:
    """A URI with a scheme and a bucket (s3://bucket/path, gs://...), or a writable folder."""
    parsed = urllib.parse.urlparse(storage)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        if not storage.startswith(f"{parsed.scheme}://") or not parsed.netloc:
            raise JepatuneError(f"--storage {storage!r}: malformed URI; write it as {parsed.scheme}://bucket/path")
        return
    if (probe := unwritable_ancestor(storage)) is not None:
        raise JepatuneError(f"--storage {storage!r}: {probe} is not a writable folder; choose a shared folder you "
                            "can write")


def base_config(settings: SweepSettings):
    """The recipe every trial starts from: the reference, a preset, the fixed knobs, the data."""
    from jepatune.errors import ConfigError
    from jepatune.trainer.config import PRESETS, load_config

    overrides: dict[str, Any] = {}
    if settings.preset is not None:
        if settings.preset not in PRESETS:
            raise ConfigError(f"preset {settings.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
        overrides.update(PRESETS[settings.preset])
    overrides.update(settings.overrides)
    overrides["data_path"] = str(Path(settings.data).resolve())
    return load_config(None, overrides)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import optuna
    import ray
    import torch

    import jepatune

    return {"jepatune": jepatune.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def write_metadata(settings: SweepSettings, config, space) -> None:
    meta = {"settings": dataclasses.asdict(settings), "base": config.to_dict(), "space": space.name,
            "space_params": list(space.params), "rungs": list(settings.rungs), "versions": _versions(),
            "git_commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(settings.folder / SETTINGS_NAME, json.dumps(meta, indent=1, default=str) + "\n")


def read_settings(folder: str | os.PathLike) -> SweepSettings:
    """The settings a sweep started with, located where the folder is now: the recorded `--out`
    may be relative to another working directory, or the folder may have moved since."""
    folder = Path(folder).resolve()
    path = folder / SETTINGS_NAME
    if not path.is_file():
        raise JepatuneError(f"{folder} is not a jepatune sweep (no {SETTINGS_NAME}); give the folder `search` made")
    settings = SweepSettings(**json.loads(path.read_text())["settings"])
    # With --storage, Ray's experiment is STORAGE/NAME: keep the recorded name.
    return dataclasses.replace(settings, out=str(folder.parent),
                               name=folder.name if settings.storage is None else settings.name)


def ray_experiment_path(settings: SweepSettings) -> str:
    if settings.storage is None:
        return str(settings.folder)
    return settings.storage.rstrip("/") + "/" + settings.name


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins a cluster when RAY_ADDRESS is set (ray submit / ray job submit), else starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, configure_logging=False)


def make_trainable(settings: SweepSettings, config):
    """The trial function with the sweep's fixed arguments and per-trial resources."""
    from ray import tune

    from jepatune.search.trainable import run_trial, trial_resources

    return tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), trial_steps=settings.trial_steps,
                             rungs=settings.rungs, cache_dir=str(settings.folder / CACHE_DIR),
                             checkpoint_every=settings.checkpoint_every, fidelity=settings.fidelity,
                             probe_steps=settings.probe_length),
        trial_resources(settings.cpus_per_trial, settings.gpus_per_trial))


def make_search(settings: SweepSettings, space):
    """(searcher, scheduler) of a new sweep: TPE or random suggestions, ASHA or no early stopping
    (scheduler None: Tune's FIFO, every trial runs its full budget)."""
    import optuna

    from jepatune.search.searcher import DECISIONS_NAME, RecordingASHA, RungAwareOptunaSearch
    from jepatune.search.trainable import METRIC, asha_milestones

    if settings.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials,
                                             multivariate=True)  # reads the constraints the space sets
    searcher = RungAwareOptunaSearch(space=space.sample, metric=METRIC, mode="min", sampler=sampler,
                                     points_to_evaluate=[space.reference_point()],
                                     trial_steps=settings.trial_steps)
    if settings.scheduler == "none":
        return searcher, None
    time_attr, milestones = asha_milestones(settings.fidelity, settings.rungs)
    scheduler = RecordingASHA(time_attr=time_attr, max_t=milestones[-1], grace_period=milestones[0],
                              reduction_factor=settings.reduction_factor, milestones=milestones,
                              decisions_path=str(settings.folder / DECISIONS_NAME),
                              audit_frac=settings.audit_frac, audit_seed=settings.seed)
    return searcher, scheduler


def _build_tuner(settings: SweepSettings, config, space, restore: bool):
    from ray import tune

    from jepatune.search.progress import TrialLines
    from jepatune.search.trainable import METRIC

    trainable = make_trainable(settings, config)
    path = ray_experiment_path(settings)
    if restore:
        if not tune.Tuner.can_restore(path):
            raise JepatuneError(f"--resume: {path} holds no Ray experiment state (the sweep stopped before its first "
                                f"snapshot); delete {settings.folder} and start the sweep again")
        # Ray resumes from its last snapshot: trials running then continue from the checkpoint it names
        # under the same id; trials started after it are lost to Ray (their folders stay, as orphans)
        # and the restored, seeded searcher suggests their recipes again under new ids (the very same
        # while in its random startup trials); the finished-trial cache answers those that had finished.
        # The scheduler is not in the snapshot: Ray unpickles the one the sweep started with, and
        # RecordingASHA refills it from decisions.jsonl.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    # Ray's own console tables are off (verbose=0); TrialLines prints one line per trial.
    searcher, scheduler = make_search(settings, space)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", search_alg=searcher, scheduler=scheduler,
                                    num_samples=settings.samples, max_concurrent_trials=settings.concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=settings.name, storage_path=str(Path(path).parent)
                                  if settings.storage is None else settings.storage.rstrip("/"),
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                  # num_to_keep unset: see SNAPSHOT_PERIOD_S
                                  checkpoint_config=tune.CheckpointConfig(), verbose=0,
                                  callbacks=[TrialLines(settings.samples, settings.trial_steps)]),
    )


def run_sweep(settings: SweepSettings, *, resume: bool = False):
    """Run (or resume) a sweep, then write its tables. Returns Ray's ResultGrid."""
    from jepatune.spaces import get_space
    from jepatune.trainer.data import check_data

    settings.validate()
    if resume:
        settings = read_settings(settings.folder)
    config = base_config(settings)
    from jepatune.trainer.loop import trainer_code_bytes

    space = get_space(settings.space, base=config, code_bytes=trainer_code_bytes())
    check_data(config.data_path, config.train_seq_len, config.val_tokens)
    folder = settings.folder
    if not resume and (folder / SETTINGS_NAME).exists():
        raise JepatuneError(f"{folder} already holds a sweep; resume it with --resume or choose another --name/--out")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_metadata(settings, config, space)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_PERIOD_S)  # read when the Tuner starts
    _ensure_ray()
    tuner = _build_tuner(settings, config, space, restore=resume)
    grid = tuner.fit()  # ends with a last snapshot, which names each trial's newest checkpoint
    prune_checkpoints(ray_experiment_path(settings))
    from jepatune.analysis.tables import write_tables

    write_tables(folder)
    return grid


def prune_checkpoints(experiment: str) -> int:
    """Delete every trial checkpoint but the newest of its trial; return how many went. Only
    once a sweep has ended: during it, the last snapshot may still name an older one."""
    import pyarrow.fs as pafs

    from jepatune.analysis.tables import filesystem

    fs, root = filesystem(experiment)
    removed = 0
    for trial in fs.get_file_info(pafs.FileSelector(root)):
        if trial.type != pafs.FileType.Directory:
            continue
        checkpoints = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(trial.path))
                             if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        for path in checkpoints[:-1]:  # checkpoint_000000, _000001, ...: the name orders them
            fs.delete_dir(path)
            removed += 1
    return removed


def finalize(folder: str | os.PathLike, *, final_steps: int = 0, final_seeds: int = 0, finalists: int = 0,
             log=print):
    """Retrain the sweep's finalists (its top `finalists` distinct recipes by trial score) and the
    reference at the final budget, with seeds no trial used; the winner, written to best.toml, is
    the recipe with the best retrain mean (the reference when no finalist beats it). Rebuilds the
    tables; returns the finalists table."""
    from jepatune.analysis.tables import load_tables, write_tables
    from jepatune.search.retrain import recipe_config, retrain, retrain_seeds, top_trials, write_best
    from jepatune.search.trainable import KNOBS

    folder = Path(folder).resolve()
    settings = read_settings(folder)
    write_tables(folder)
    trials = load_tables(folder)["trials"]
    base = base_config(settings)
    steps = final_steps or settings.final_steps or settings.trial_steps
    top = top_trials(trials, finalists or settings.finalists)
    ranks = trials[trials["status"] == "completed"]["last_val_bpb"].rank(method="min")
    runs: dict[str, Any] = {}
    about: dict[str, dict[str, Any]] = {}
    for row in top.itertuples():
        label = "reference" if row.is_reference else f"finalist-{len(runs) + 1}"
        runs[label] = recipe_config(base, {k: getattr(row, k) for k in trials.columns if k in KNOBS}, steps)
        about[label] = {"trial_id": row.trial_id, "trial_bpb": row.last_val_bpb, "trial_rank": int(ranks[row.Index]),
                        "finalist": True}
    if "reference" not in runs:
        runs["reference"] = recipe_config(base, {}, steps)
        ref = trials[trials["is_reference"].fillna(False).astype(bool) & trials["status"].eq("completed")]
        about["reference"] = {"finalist": False, **({"trial_id": ref.iloc[0]["trial_id"],
                                                      "trial_bpb": ref.iloc[0]["last_val_bpb"],
                                                      "trial_rank": int(ranks[ref.index[0]])} if len(ref) else {})}
    used = {base.seed} | (set(trials["seed"].dropna().astype(int)) if "seed" in trials else set())
    seeds = retrain_seeds(base.seed, final_seeds or settings.final_seeds, used)
    named = ", ".join(f"{label} = trial {a['trial_id']}" for label, a in about.items() if a["finalist"])
    log(f"retraining {len(top)} finalists ({named}) and the reference at {steps} steps, seeds "
        f"{', '.join(map(str, seeds))} (no trial trained with them)")
    _ensure_ray()
    retrain(folder, runs, seeds, settings.cpus_per_trial, settings.gpus_per_trial, log=log, about=about)
    write_tables(folder)
    table = load_tables(folder)["finalists"]
    winner = table[table["winner"]].iloc[0]["recipe"]
    log(f"winner: {winner} (the best retrain mean); its recipe in {write_best(folder, runs[winner])}")
    return table


def leaderboard(folder: str | os.PathLike, k: int = 5) -> str:
    """The top trials, then the finalists' retrain and the sweep's answer, as text for the terminal."""
    from jepatune.analysis import explore
    from jepatune.analysis.finalists import conclusion

    tables = explore.load(folder)
    trials = tables.trials
    counts = trials["status"].value_counts().to_dict()
    top = explore.leaderboard(trials, k=k).drop(columns=["status", "device_s"])
    lines = [f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
             "top trials (full budget; val_bpb of the weights a retrain would ship, on the val prefix; "
             "is_reference marks the reference recipe):",
             top.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if not tables.finalists.empty:
        shown = tables.finalists[["recipe", "winner", "trial_id", "trial_bpb", "n", "mean", "std", "delta_ref",
                                  "ref_ci_low", "ref_ci_high", "excess_drift"]]
        lines += ["finalists retrained with seeds no trial used (val_bpb after the int8+zlib round trip, full val "
                  "split; delta vs the reference with a paired 95% CI):",
                  shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"), conclusion(tables.finalists)]
    return "\n".join(lines)


def load_study(folder: str | os.PathLike):
    """The Optuna study behind a sweep, from the searcher state Ray saved (trusted folders only:
    it is a pickle)."""
    import pickle

    snaps = sorted(Path(ray_experiment_path(read_settings(folder))).glob("searcher-state-*.pkl"))
    for snap in reversed(snaps):  # one per driver session, the newest first
        try:
            with open(snap, "rb") as f:
                return pickle.load(f)["_ot_study"]
        except (EOFError, pickle.UnpicklingError):  # cut by a crash while Ray copied it
            continue
    raise JepatuneError(f"{folder}: no searcher state saved yet")
