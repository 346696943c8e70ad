"""`run_ablation`: a base recipe and single-factor changes of it, several seeds each, paired by seed.

A Ray Tune grid over variants x seeds (no searcher, no scheduler: every run trains its whole budget).
Seed k of every variant is the base config's seed + k, so the runs of one seed share their
initialisation (every run reads the data in the same order) and differ only in the variant's
change. Each run is scored like the final retrain: on the full val split after the int8+zlib
round trip.

The folder OUT/NAME holds `ablation.json` (settings, base, variants, planned runs), Ray's trial
folders, `finished/` (one JSON per finished run, named by config key, written before the run reports,
so a re-run or `--resume` trains only what had not finished) and `tables/`
(`jepatune.analysis.ablation`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from jepatune.analysis.ablation import BASE, load_ablation, read_plan, write_ablation_tables
from jepatune.analysis.tables import load_tables
from jepatune.errors import ConfigError, JepatuneError
from jepatune.experiment.layout import ABLATION_NAME, BEST_NAME, CACHE_DIR
from jepatune.experiment.settings import AblationSettings, base_config, provenance, read_settings, write_record
from jepatune.experiment.store import join
from jepatune.experiment.trials import KNOBS, config_key
from jepatune.search.retrain import best_trial, recipe_config, reference_of
from jepatune.search.sweep import ensure_ray
from jepatune.search.trainable import FinishedCache, trial_resources
from jepatune.trainer.config import PRESETS, REGULARIZERS, TrainConfig, load_config

# Knobs that are not factors of an ablation, and where they are set instead.
NOT_FACTORS = {"seed": "--seeds (runs are paired by seed)", "data_path": "--data"}


@dataclass(frozen=True)
class Variant:
    name: str  # "base" for the base
    change: str  # the knobs it changes, "key=value, ..."; "" for the base
    config: TrainConfig


# --- the base and its variants ----------------------------------------------------------------

def sweep_best(folder: str | os.PathLike) -> TrainConfig:
    """A sweep's best recipe: its best.toml (the winner of its retrain), else its best completed trial."""
    settings = read_settings(folder)  # a clear error when it is not a sweep
    if (best := settings.store.read_text(BEST_NAME)) is not None:
        return load_config(None, tomllib.loads(best))
    trials = load_tables(folder)["trials"]
    best = best_trial(trials)
    knobs = {k: best[k] for k in trials.columns if k in KNOBS}
    return recipe_config(base_config(settings), knobs, settings.final_steps or settings.trial_steps)


def load_base(settings: AblationSettings) -> tuple[TrainConfig, TrainConfig | None]:
    """(the base recipe with --set and --data applied, the sweep's best recipe or None)."""
    best = sweep_best(settings.sweep) if settings.sweep is not None else None
    kind = settings.base_kind
    if kind == "best":
        config = best
    elif kind == "reference":
        if settings.preset is not None:
            config = load_config(None, PRESETS[settings.preset])
        else:  # the reference recipe at the sweep's shape, or the reference's own
            config = reference_of(best) if best is not None else TrainConfig()
    elif Path(kind).is_file():
        config = load_config(kind)
    else:
        raise JepatuneError(f"--base {kind!r}: not best, reference or an existing TOML recipe file")
    overrides = dict(settings.overrides)
    if settings.data is not None:
        overrides["data_path"] = str(Path(settings.data).resolve())
    return config.replace(**overrides), best


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unset"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _change(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in knobs.items())


def set_variants(name: str, base: TrainConfig, searched: TrainConfig | None,
                 log=print) -> list[tuple[str, dict[str, Any]]]:
    """(name, knobs) of each variant of a built-in set (`VARIANT_SETS`)."""
    if name == "jepa-vs-ce":
        return [("ce-only", {"jepa_pure_frac": 0.0, "ce_pure_frac": 0.0}),
                ("no-bridge", {"ce_pure_frac": base.jepa_pure_frac})]
    if name == "regularizer":
        return [(f"regularizer={r}", {"regularizer": r}) for r in REGULARIZERS]
    variants = [("no-swa", {"swa_enabled": False}), ("swa-reference", {"swa_enabled": True, "swa_start_frac": None})]
    if searched is None:
        log("note: swa-searched skipped: there is no searched SWA start without --sweep")
    else:
        variants.append(("swa-searched", {"swa_enabled": searched.swa_enabled,
                                          "swa_start_frac": searched.swa_start_frac}))
    return variants


def factor_variants(text: str, base: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, knobs) of each value of a `--factor KEY=V1,V2`, each checked against the base."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--factor {text!r}: expected KEY=V1,V2, e.g. --factor regularizer=lejepa,none")
    if key in NOT_FACTORS:
        raise ConfigError(f"--factor {text!r}: {key} is not a factor; set it with {NOT_FACTORS[key]}")
    variants = []
    for value in values.split(","):
        try:
            knob = getattr(base.replace(**{key: value.strip()}), key)
        except ConfigError as e:
            raise ConfigError(f"--factor {text!r}: {e}") from None
        variants.append((f"{key}={_fmt(knob)}", {key: knob}))
    return variants


def _hold_swa_start(base: TrainConfig, knobs: dict[str, Any]) -> dict[str, Any]:
    """A variant that moves the CE stage keeps the base's SWA start: left unset, the start would
    follow ce_pure_frac and the variant would change two things at once."""
    moves_ce = "ce_pure_frac" in knobs and "swa_start_frac" not in knobs
    if moves_ce and base.swa_enabled and knobs.get("swa_enabled", True) and base.swa_start_frac is None:
        return {**knobs, "swa_start_frac": base.ce_pure_frac}
    return knobs


def _behaviour(config: TrainConfig) -> str:
    """What a config trains: an unset SWA start is its CE stage's start, and SWA knobs are moot without SWA."""
    values = config.to_dict()
    values["swa_start_frac"] = config.swa_start if config.swa_enabled else None
    if not config.swa_enabled:
        values["swa_decay"] = values["swa_fp32_shadow"] = None
    return json.dumps(values, sort_keys=True, default=str)


def plan_variants(settings: AblationSettings, log=print) -> tuple[Variant, ...]:
    """The base at the ablation's budget, then every distinct variant, each config validated.
    Variants that train the same as the base or as an earlier variant are dropped with a note."""
    settings.validate()
    base, searched = load_base(settings)
    base = recipe_config(base, {"max_wallclock_seconds": 0.0}, settings.steps or base.iterations)
    candidates = [v for n in settings.variant_sets for v in set_variants(n, base, searched, log)]
    candidates += [v for text in settings.factors for v in factor_variants(text, base)]
    kept = [Variant(BASE, "", base)]
    seen = {_behaviour(base): BASE}
    for name, knobs in candidates:
        knobs = _hold_swa_start(base, knobs)
        try:
            config = base.replace(**knobs)
        except ConfigError as e:
            raise ConfigError(f"variant {name} ({_change(knobs)}): {e}") from None
        same = seen.setdefault(_behaviour(config), name)
        if same != name:
            log(f"note: {name} ({_change(knobs)}) " + ("equals the base" if same == BASE
                                                       else f"trains the same as {same}") + "; skipped")
            continue
        kept.append(Variant(name, _change(knobs), config))
    if len(kept) == 1:
        raise JepatuneError("nothing to ablate: every variant equals the base; choose other --factor values")
    return tuple(kept)


def seeded(config: TrainConfig, k: int) -> TrainConfig:
    """Run k of a variant: the same seed offset in every variant, so runs pair by k."""
    return config.replace(seed=config.seed + k)


def plan_json(settings: AblationSettings, variants: tuple[Variant, ...]) -> dict[str, Any]:
    """What `ablation.json` records (JSON-normalised, so a plan compares equal to a stored one)."""
    steps = variants[0].config.iterations
    plan = {
        "settings": dataclasses.asdict(settings), "seeds": settings.seeds, "steps": steps,
        "base": variants[0].config.to_dict(),
        "variants": [{"name": v.name, "change": v.change, "config": v.config.to_dict()} for v in variants],
        "runs": [{"variant": v.name, "change": v.change, "seed": k, "steps": v.config.iterations,
                  "config_key": config_key(seeded(v.config, k))} for v in variants for k in range(settings.seeds)],
    }
    return json.loads(json.dumps(plan, default=str))


def _same_plan(stored: dict[str, Any], plan: dict[str, Any]) -> bool:
    return all(stored.get(k) == plan[k] for k in ("seeds", "variants"))


# --- running ----------------------------------------------------------------------------------

def ablation_run(params: dict[str, Any], *, configs: dict[str, dict[str, Any]], cache_dir: str) -> None:
    """The function Ray runs for each (variant, seed): train, score after the round trip, cache (where
    the ablation lives), report."""
    from jepatune.trainer.loop import train

    variant, k = params["variant"], int(params["seed"])
    config = seeded(TrainConfig.from_dict(configs[variant]), k)
    cache = FinishedCache(cache_dir, config_key(config))
    if (saved := cache.read()) is not None:  # finished in an earlier session: report it again, do not retrain
        tune.report({**_for_ray(json.loads(saved)), "cached": True})
        return
    result = train(config, final_score=True)
    s = result.summary
    row = {"variant": variant, "seed": k, "status": result.status, "steps": s["step"],
           "trial_id": tune.get_context().get_trial_id(), "config_key": config_key(config),
           **{key: s.get(key) for key in ("val_bpb", "prequant_bpb", "raw_bpb", "raw_q_bpb", "avg_bpb", "avg_q_bpb",
                                          "artifact_bytes", "elapsed_s")}}
    if not math.isfinite(row["val_bpb"] or math.nan):
        row["val_bpb"] = None  # diverged: no score (a table NaN), never a non-finite number in JSON
    cache.write(row)  # before the report: nothing after it is sure to run
    tune.report({**_for_ray(row), "cached": False})


def _for_ray(row: dict[str, Any]) -> dict[str, Any]:
    """Ray fills its own trial_id; the cache keeps the one of the trial that trained the run."""
    return {k: v for k, v in row.items() if k != "trial_id"}


class RunLines(tune.Callback):
    """One line per finished run on stderr, instead of Ray's tables."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def setup(self, **info) -> None:
        self.t0 = time.perf_counter()

    def _line(self, trial, text: str) -> None:
        self.done += 1
        print(f"[{time.perf_counter() - self.t0:6.0f}s] run {self.done}/{self.total} {trial.config['variant']} "
              f"seed {trial.config['seed']}: {text}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        value = r.get("val_bpb")
        score = f"val_bpb {value:.4f}" if isinstance(value, float) else "no score"
        self._line(trial, f"{r.get('status')}, {score}" + (" (finished before)" if r.get("cached") else ""))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, f"errored (see {trial.path})")


def _tuner(settings: AblationSettings, variants: tuple[Variant, ...]):
    root = settings.experiment_path
    trainable = tune.with_resources(
        tune.with_parameters(ablation_run, configs={v.name: v.config.to_dict() for v in variants},
                             cache_dir=join(root, CACHE_DIR)),
        trial_resources(settings.cpus_per_trial, settings.gpus_per_trial))
    return tune.Tuner(
        trainable,
        param_space={"variant": tune.grid_search([v.name for v in variants]),
                     "seed": tune.grid_search(list(range(settings.seeds)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=settings.concurrency, reuse_actors=True),
        # A fresh experiment each session, in the same folder: what had finished answers from finished/.
        run_config=tune.RunConfig(name=settings.folder.name, verbose=0,
                                  storage_path=settings.storage or str(settings.folder.parent),
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                  callbacks=[RunLines(len(variants) * settings.seeds)]))


def _restore(given: AblationSettings) -> tuple[AblationSettings, tuple[Variant, ...]]:
    """The recorded plan: from the local folder, or with --storage from STORAGE/NAME alone."""
    stored = read_plan(given.experiment_path)
    settings = AblationSettings.from_record(stored["settings"])
    if given.storage is not None:  # resumed on another machine: the local folder is the one given here
        settings = dataclasses.replace(settings, out=str(given.folder.parent), name=given.folder.name)
    variants = tuple(Variant(v["name"], v["change"], TrainConfig.from_dict(v["config"])) for v in stored["variants"])
    return settings, variants


def run_ablation(settings: AblationSettings, *, resume: bool = False, log=print) -> pd.DataFrame:
    """Plan, validate, run (or continue) the ablation, write its tables; return the ablation table.
    With `resume`, the folder's recorded plan runs as it was; without, a folder that holds the same
    plan continues and one that holds another is an error."""
    from jepatune.trainer.data import check_data

    if resume:
        settings, variants = _restore(settings)
    else:
        variants = plan_variants(settings, log)
    base = variants[0].config
    check_data(base.data_path, base.train_seq_len, base.val_tokens)
    plan = plan_json(settings, variants)
    store, where = settings.store, settings.experiment_path
    if store.exists(ABLATION_NAME):
        if not _same_plan(read_plan(where), plan):
            raise JepatuneError(f"{where} holds another ablation (other variants or seeds); continue it with "
                                f"--resume, or choose another --name or --out")
        if not (settings.folder / ABLATION_NAME).is_file():  # continued on another machine
            write_record(settings, ABLATION_NAME, read_plan(where))
    else:
        write_record(settings, ABLATION_NAME, {**plan, **provenance()})
    done = set(store.names(CACHE_DIR, ".json"))
    finished = sum(f"{r['config_key']}.json" in done for r in plan["runs"])
    log(f"{len(variants)} variants x {settings.seeds} seeds at {plan['steps']} steps: {len(plan['runs'])} runs, "
        f"{finished} finished before; folder {where}")
    for v in variants:
        log(f"  {v.name}: {v.change or '(the base recipe)'}")
    if finished < len(plan["runs"]):  # else no Ray at all: the tables are rebuilt from the folder
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        ensure_ray()
        _tuner(settings, variants).fit()
    write_ablation_tables(where)
    return load_ablation(where)[0]


def describe(table: pd.DataFrame) -> str:
    """The ablation table as text for the terminal."""
    return ("ablation (val_bpb after the int8+zlib round trip, full val split; delta vs base over the seeds both "
            "ran, with a paired 95% CI):\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
