"""`run_sweep`: Ray Tune + OptunaSearch (TPE) + ASHA over a named space, then `finalize`: the retrain.

What a sweep folder holds, and its settings, are `jepatune.experiment`'s. With `storage` set (an
s3:// URI or a shared folder), the whole sweep lives at STORAGE/NAME, Ray's files and ours; the
local `OUT/NAME` keeps the record that points there, best.toml and the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jepatune.errors import JepatuneError
from jepatune.experiment.layout import DECISIONS_NAME, SETTINGS_NAME
from jepatune.experiment.sampling import make_sampler
from jepatune.experiment.settings import (
    SweepSettings,
    base_config,
    local_folder,
    read_settings,
    swa_choices,
    write_metadata,
)
from jepatune.experiment.store import is_uri, join
from jepatune.experiment.trials import KNOBS, METRIC

# Ray snapshots the experiment (trial states, the checkpoint each trial restarts from, the searcher)
# with its own back-off: every max(10 s, 19 x the last snapshot's write time), so that the snapshot,
# which grows with the trial count, takes at most a twentieth of the driver's time
# (TUNE_GLOBAL_CHECKPOINT_S, when set, wins). What the period does not cost:
# - curve points: each trial logs its reports itself on the storage (experiment.report_log), so a
#   trial restarted after a lost node, from Ray's older copy of its result.json, keeps every one;
# - finished results: the finished-trial cache, written by the trial before its last report;
# - ASHA's decisions: logged as they are taken, not snapshotted.
# What it costs, after a hard kill of the driver (`--resume` starts from the last snapshot): each
# trial running then redoes its work since the checkpoint that snapshot names, at most one period
# and one rung; a trial started after it is lost to Ray and to the searcher (its folder and log stay,
# and the tables keep it; the searcher suggests again, and the cache answers a recipe that had
# finished). A trial keeps its rung checkpoints while it runs (with num_to_keep=1 Ray deletes the
# previous one while the snapshot on storage can still name it: 2 of 9 killed test sweeps failed to
# restore); once it ends, retention.py drops their training state.


def ensure_ray() -> None:
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
                             rungs=settings.rungs, experiment=settings.experiment_path,
                             checkpoint_every=settings.checkpoint_every, fidelity=settings.rung_fidelity,
                             probe_steps=settings.probe_length),
        trial_resources(settings.cpus_per_trial, settings.gpus_per_trial))


def make_search(settings: SweepSettings, space):
    """(searcher, scheduler) of a new sweep: the sampler's suggestions (`experiment.sampling`), ASHA or
    no early stopping (scheduler None: Tune's FIFO, every trial runs its full budget)."""
    from jepatune.search.searcher import RecordingASHA, RungAwareOptunaSearch

    sampler = make_sampler(settings.sampler, seed=settings.seed, startup_trials=settings.startup_trials)
    searcher = RungAwareOptunaSearch(space=space.sample, metric=METRIC, mode="min", sampler=sampler,
                                     points_to_evaluate=[space.reference_point()],
                                     trial_steps=settings.trial_steps)
    if settings.scheduler == "none":
        return searcher, None
    fidelity = settings.rung_fidelity
    milestones = fidelity.milestones(settings.rungs)
    scheduler = RecordingASHA(time_attr=fidelity.time_attr, max_t=milestones[-1], grace_period=milestones[0],
                              reduction_factor=settings.reduction_factor, milestones=milestones,
                              decisions_path=join(settings.experiment_path, DECISIONS_NAME),
                              audit_frac=settings.audit_frac, audit_seed=settings.seed)
    return searcher, scheduler


def _build_tuner(settings: SweepSettings, config, space, restore: bool):
    from ray import tune

    from jepatune.search.progress import TrialLines
    from jepatune.search.retention import DropEndedState

    trainable = make_trainable(settings, config)
    path = settings.experiment_path
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
                                  # num_to_keep unset: see the snapshot note above
                                  checkpoint_config=tune.CheckpointConfig(), verbose=0,
                                  callbacks=[TrialLines(settings.samples, settings.trial_steps), DropEndedState()]),
    )


def run_sweep(settings: SweepSettings, *, resume: bool = False):
    """Run (or resume) a sweep, then write its tables. Returns Ray's ResultGrid."""
    from jepatune.analysis.tables import write_tables
    from jepatune.search.retention import prune_after_sweep
    from jepatune.spaces import get_space
    from jepatune.trainer.data import check_data
    from jepatune.trainer.final import trainer_code_bytes

    if resume:
        settings = resumed_settings(settings)
    settings.validate()
    config = base_config(settings)
    space = get_space(settings.space, base=config, code_bytes=trainer_code_bytes())
    check_data(config.data_path, config.train_seq_len, config.val_tokens)
    folder = settings.folder
    if not resume and settings.store.exists(SETTINGS_NAME):
        raise JepatuneError(f"{settings.experiment_path} already holds a sweep; resume it with --resume or choose "
                            "another --name/--out")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_metadata(settings, config, space)
    else:  # resumed on another machine from the storage URI alone: the local folder is made anew
        local_folder(settings)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ensure_ray()
    tuner = _build_tuner(settings, config, space, restore=resume)
    grid = tuner.fit()  # ends with a last snapshot, which names each trial's newest checkpoint
    prune_after_sweep(settings.experiment_path)
    write_tables(folder)
    return grid


def resumed_settings(given: SweepSettings) -> SweepSettings:
    """The settings a sweep started with, for `--resume`: from its local folder, or with `--storage`
    from STORAGE/NAME alone (a driver on another machine: the local folder is made anew under --out)."""
    if given.storage is not None:
        return read_settings(given.experiment_path, out=given.out)
    return read_settings(given.folder)


def finalize(folder: str | os.PathLike, *, final_steps: int = 0, final_seeds: int = 0, finalists: int = 0,
             log=print):
    """Retrain the sweep's finalists (its top `finalists` distinct recipes by trial score) and the
    reference at the final budget, with seeds no trial used; the winner, written to best.toml, is
    the recipe with the best retrain mean (the reference when no finalist beats it). Rebuilds the
    tables; returns the finalists table."""
    from jepatune.analysis.tables import load_tables, write_tables
    from jepatune.search.retrain import recipe_config, retrain, retrain_seeds, top_trials, write_best

    folder = str(folder) if is_uri(folder) else Path(folder).resolve()
    settings = read_settings(folder)
    write_tables(folder)
    trials = load_tables(folder)["trials"]
    base = base_config(settings).replace(swa_start_choices=swa_choices(settings.final_swa_choices))
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
    ensure_ray()
    retrain(settings.store, runs, seeds, settings.cpus_per_trial, settings.gpus_per_trial, log=log, about=about)
    write_tables(folder)
    table = load_tables(folder)["finalists"]
    winner = table[table["winner"]].iloc[0]["recipe"]
    log(f"winner: {winner} (the best retrain mean); its recipe in {write_best(settings, runs[winner])}")
    return table
