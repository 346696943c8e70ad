"""The settings of a sweep and of an ablation: the one place each setting, its default and its help live.

The CLI builds its options from these fields (`jepatune.cli`), `search --config FILE` reads the
same names from TOML, and `sweep.json` / `ablation.json` record them; `read_settings` gives a
sweep's settings back from its folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jepatune.atomic import atomic_write_text, unwritable_ancestor
from jepatune.errors import ConfigError, JepatuneError
from jepatune.experiment.fidelity import FIDELITIES, Fidelity, default_grace, get_fidelity, rung_steps
from jepatune.experiment.layout import SETTINGS_NAME
from jepatune.experiment.sampling import SAMPLERS
from jepatune.experiment.store import Store, is_uri, join
from jepatune.trainer.config import PRESETS, TrainConfig, check_type, load_config, read_toml

SCHEDULERS = ("asha", "none")
# The built-in sets of ablation variants (`jepatune ablate --variants NAME`).
VARIANT_SETS = {
    "jepa-vs-ce": "the curriculum vs cross-entropy from step 0 (ce-only) and vs JEPA with no bridge (no-bridge)",
    "regularizer": "regularizer=none, varcov (the reference's) and lejepa (SIGReg)",
    "swa": "no SWA vs the reference's start (with the CE stage) vs the sweep's searched start",
}


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            **cli: Any) -> Any:
    """A settings field with its help, and how the CLI spells it where that differs from
    `--field-name` (`flag`, `metavar`, `choices`, `cli=False` for a field with no option)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **cli})


@dataclass(frozen=True)
class SweepSettings:
    """One sweep. Defaults suit a laptop; a cluster raises samples, steps and concurrency."""

    data: str = setting("", "byte-shard folder, the same path on every node", metavar="DIR")
    out: str = setting("runs", "where the experiment folder goes", metavar="DIR")
    name: str = setting("sweep", "experiment folder name under --out")
    space: str = setting("curriculum", "curriculum, regularizer, optimizer, full, or a TOML file")
    samples: int = setting(16, "trials (the reference recipe is always the first)")
    trial_steps: int = setting(200, "each trial's budget in optimiser steps")
    grace_steps: int = setting(0, "first ASHA rung in steps (0 = trial-steps / 4)")
    reduction_factor: int = setting(2, "ASHA keeps 1 / this at each rung")
    concurrency: int = setting(2, "trials at once (always set: see the Ray notes on custom searchers)")
    cpus_per_trial: float = setting(1.0, "CPUs Ray gives each trial")
    gpus_per_trial: float = setting(0.0, "GPUs Ray gives each trial; 0.5 packs two trials per GPU")
    storage: str | None = setting(None, "where Ray keeps trials on a cluster: s3://bucket/path or a shared folder",
                                  metavar="URI")
    preset: str | None = setting(None, "starting config for every trial: " + ", ".join(sorted(PRESETS)))
    overrides: dict[str, Any] = setting(factory=dict, help="fix a trainer knob for every trial (repeatable)",
                                        flag="--set", metavar="KEY=VALUE")
    seed: int = setting(0, "the sampler's seed")
    startup_trials: int = setting(10, "random trials before TPE models the space")
    sampler: str = setting("tpe", "how recipes are suggested: " + "; ".join(f"{k}: {v}" for k, v in SAMPLERS.items()),
                           choices=tuple(SAMPLERS))
    scheduler: str = setting("asha", "asha, or none: every trial runs its full budget (also: --no-pruning)",
                             choices=SCHEDULERS)
    fidelity: str = setting("snapshot", "what a rung measures: " + "; ".join(
        f"{f.name}: {f.help}" for f in FIDELITIES.values()), choices=tuple(FIDELITIES))
    probe_steps: int = setting(0, "probe fidelity: cool-down steps (0 = half the first rung)")
    audit_frac: float = setting(0.05, "share of ASHA's stops run to the end anyway, to estimate its false-stop rate")
    max_failures: int = setting(2, "restarts of a failed trial from its last checkpoint")
    checkpoint_every: int = setting(1, "checkpoint every Nth rung (always the last); 0 = the last only")
    final_steps: int = setting(0, "retrain the finalists and the reference at this budget; the best retrain wins "
                                  "(0 = no retrain)")
    final_seeds: int = setting(3, "seeds per retrained recipe, none a trial's seed (run in parallel)")
    # 12 by evidence (bench/README.md, search_payoff.py): on the recorded demo benchmark the trial-budget
    # ranking of the good recipes does not carry over to 4x the budget (Spearman 0.14 over 30); the best of
    # a sweep's top 8 is 0.072 BPB behind the best recipe there, of its top 12 0.024, inside the 4x seed
    # noise (0.027).
    finalists: int = setting(12, "the top distinct recipes by trial score to retrain (and the reference)")
    # By evidence (bench/README.md, transfer_study.py --longer): at 4x the trial budget, each run shipping
    # the average it judges best on unread train bytes scores 0.14 BPB better on average than shipping the
    # recipe's own SWA start (29 of 30 recipes).
    final_swa_choices: str = setting("0.5,0.6,0.7,0.8,0.9,0.95,1", "SWA starts every retrain keeps an average "
                                     "from and chooses among on train bytes no step read, the reference's retrain "
                                     "too (swa_start_choices); none = ship each recipe's own start", metavar="F,F,..")

    @property
    def rungs(self) -> tuple[int, ...]:
        return rung_steps(self.trial_steps, self.grace_steps or default_grace(self.trial_steps), self.reduction_factor)

    @property
    def rung_fidelity(self) -> Fidelity:
        return get_fidelity(self.fidelity)

    @property
    def probe_length(self) -> int:
        """Steps of each probe branch (0 unless the fidelity probes)."""
        return self.rung_fidelity.probe_length(self.rungs, self.probe_steps)

    @property
    def folder(self) -> Path:
        return Path(self.out).resolve() / self.name

    @property
    def experiment_path(self) -> str:
        """Where the sweep lives, Ray's trials and every file of ours: the folder itself, or STORAGE/NAME
        (then the local folder holds a copy of sweep.json, which points there, and the report)."""
        if self.storage is None:
            return str(self.folder)
        return join(self.storage, self.name)

    @property
    def store(self) -> Store:
        return Store(self.experiment_path)

    def validate(self) -> None:
        if not self.data:
            raise JepatuneError("--data is required: a byte-shard folder (build one with "
                                "`jepatune data demo --out DIR`)")
        for key in ("samples", "trial_steps", "concurrency", "final_seeds", "finalists"):
            if getattr(self, key) < 1:
                raise JepatuneError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be at least 1")
        swa_choices(self.final_swa_choices)  # a bad list fails here, before any trial trains
        if self.checkpoint_every < 0:
            raise JepatuneError(f"--checkpoint-every={self.checkpoint_every}: must be 0 (last rung only) or more")
        if self.reduction_factor < 2:
            raise JepatuneError(f"--reduction-factor={self.reduction_factor}: must be at least 2")
        if self.grace_steps < 0 or self.grace_steps > self.trial_steps:
            raise JepatuneError(f"--grace-steps={self.grace_steps}: must be in [1, trial_steps]")
        if self.probe_steps < 0 or not 0.0 <= self.audit_frac <= 1.0:
            raise JepatuneError(f"--probe-steps={self.probe_steps} / --audit-frac={self.audit_frac}: need "
                                "probe steps >= 0 and an audit share in [0, 1]")
        for key, allowed in (("sampler", tuple(SAMPLERS)), ("scheduler", SCHEDULERS), ("fidelity", tuple(FIDELITIES))):
            if getattr(self, key) not in allowed:
                raise JepatuneError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise JepatuneError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if self.storage is not None:
            check_storage(self.storage)


@dataclass(frozen=True)
class AblationSettings:
    """One ablation: a base recipe and single-factor changes of it, several seeds each."""

    base: str | None = setting(None, "best (the --sweep's best recipe; the default with --sweep), reference (the "
                                     "default otherwise), or a TOML recipe")
    factors: tuple[str, ...] = setting((), "one variant per value of a knob, e.g. --factor regularizer=lejepa,none "
                                           "(repeatable)", flag="--factor", metavar="KEY=V1,V2")
    variant_sets: tuple[str, ...] = setting((), "built-in sets of variants: " + ", ".join(VARIANT_SETS) +
                                            " (repeatable, combinable with --factor)", flag="--variants",
                                            metavar="NAME")
    sweep: str | None = setting(None, "a sweep folder: its best recipe, its searched SWA start", metavar="DIR")
    data: str | None = setting(None, "byte-shard folder (default: the base recipe's)", metavar="DIR")
    preset: str | None = setting(None, "the model of --base reference: " + ", ".join(sorted(PRESETS)))
    overrides: dict[str, Any] = setting(factory=dict, help="set a knob of the base, hence of every variant "
                                        "(repeatable)", flag="--set", metavar="KEY=VALUE")
    seeds: int = setting(3, "runs per variant; seed k pairs the variants' runs")
    steps: int = setting(0, "each run's budget (0 = the base recipe's)")
    out: str | None = setting(None, "where the ablation folder goes (default: SWEEP/ablations with --sweep, else "
                                    "runs/ablations)", metavar="DIR")
    storage: str | None = setting(None, "where the runs keep their results on a cluster: s3://bucket/path or a "
                                        "shared folder (default: the folder itself)", metavar="URI")
    name: str | None = setting(None, "ablation folder name (default: the variant sets' names, else ablation)")
    concurrency: int = setting(2, "runs at once")
    cpus_per_trial: float = setting(1.0, "CPUs Ray gives each run")
    gpus_per_trial: float = setting(0.0, "GPUs Ray gives each run")
    max_failures: int = setting(1, "restarts of a run that raised")

    @property
    def base_kind(self) -> str:
        return self.base or ("best" if self.sweep else "reference")

    @property
    def folder(self) -> Path:
        out = self.out or (str(Path(self.sweep) / "ablations") if self.sweep else "runs/ablations")
        return Path(out).resolve() / (self.name or "_".join(self.variant_sets) or "ablation")

    @property
    def experiment_path(self) -> str:
        """Where the runs and their results live: the folder, or STORAGE/NAME."""
        return str(self.folder) if self.storage is None else join(self.storage, self.folder.name)

    @property
    def store(self) -> Store:
        return Store(self.experiment_path)

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            hint = f" (a set of variants: give --variants {self.preset})" if self.preset in VARIANT_SETS else ""
            raise JepatuneError(f"--preset {self.preset!r} is unknown{hint}; choose one of "
                                f"{', '.join(sorted(PRESETS))}")
        for key, low in (("seeds", 1), ("steps", 0), ("concurrency", 1), ("max_failures", 0)):
            if getattr(self, key) < low:
                raise JepatuneError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be at least {low}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise JepatuneError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if self.storage is not None:
            check_storage(self.storage)
        for name in self.variant_sets:
            if name not in VARIANT_SETS:
                raise JepatuneError(f"--variants {name!r} is unknown; choose one of {', '.join(VARIANT_SETS)}")
        if not self.variant_sets and not self.factors:
            raise JepatuneError("nothing to ablate: give --variants NAME or --factor KEY=V1,V2")
        if self.base_kind == "best" and self.sweep is None:
            raise JepatuneError("--base best needs --sweep DIR, the sweep folder whose best recipe is the base")
        if self.base_kind == "reference" and self.data is None and self.sweep is None:
            raise JepatuneError("--base reference needs --data DIR (a byte-shard folder) or --sweep DIR")

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> AblationSettings:
        """The settings `ablation.json` recorded (JSON lists back to tuples; the names older folders used)."""
        renamed = {"presets": "variant_sets", "model_preset": "preset"}
        values = {renamed.get(k, k): v for k, v in recorded.items()}
        return cls(**{**values, "factors": tuple(values.get("factors", ())),
                      "variant_sets": tuple(values.get("variant_sets", ()))})



def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def read_settings_toml(cls: type, path: Path) -> dict[str, Any]:
    """The settings in a flat TOML file, each checked against its field's type (`search --config FILE`)."""
    doc = read_toml(path, f"--config {cls.__name__}", ConfigError)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in doc.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"--config {path}: unknown setting {key!r}" + (f"; did you mean {close[0]}?" if close
                              else f"; the settings are {', '.join(names)}"))
        if typing.get_origin(hints[key]) is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: {key} must be a table, e.g. [{key}] with one knob per line")
            continue
        check_type(f"--config {path}: {key}", tuple(value) if isinstance(value, list) else value, hints[key])
    return doc


# --- the sweep's record -----------------------------------------------------------------------

class RecipeBase(Protocol):
    """What names a base recipe: a sweep's settings, a benchmark recording's."""

    preset: str | None
    overrides: dict[str, Any]
    data: str


def swa_choices(text: str) -> tuple[float, ...]:
    """--final-swa-choices as `swa_start_choices`: fractions, or none."""
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        return TrainConfig().replace(swa_start_choices=text).swa_start_choices
    except ConfigError as e:
        raise JepatuneError(f"--final-swa-choices={text!r}: give fractions in [0, 1] such as 0.7,0.9,1, or none "
                            f"({e})") from None


def base_config(settings: RecipeBase) -> TrainConfig:
    """The recipe every trial starts from: the reference, a preset, the fixed knobs, the data."""
    overrides: dict[str, Any] = {}
    if settings.preset is not None:
        if settings.preset not in PRESETS:
            raise ConfigError(f"preset {settings.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
        overrides.update(PRESETS[settings.preset])
    overrides.update(settings.overrides)
    overrides["data_path"] = str(Path(settings.data).resolve())
    return load_config(None, overrides)


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """The installed versions of what an experiment ran on (read from the packages' metadata: nothing is imported)."""
    found = {}
    for package in ("jepatune", "ray", "optuna", "torch"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return {**found, "python": platform.python_version()}


def provenance() -> dict[str, Any]:
    """What every experiment record starts with: versions, commit, start time."""
    return {"versions": versions(), "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def publish(settings: SweepSettings | AblationSettings, name: str, text: str) -> str:
    """Write the file `name` where the experiment lives and, with storage, in its local folder too (the
    record there says where the experiment is; best.toml is what a user opens). Returns where it is."""
    settings.store.write_text(name, text)
    if settings.storage is not None:
        atomic_write_text(settings.folder / name, text)
    return str(settings.folder / name) if settings.storage is not None else settings.store.uri(name)


def write_record(settings: SweepSettings | AblationSettings, name: str, record: dict[str, Any]) -> None:
    """An experiment's record (`sweep.json`, `ablation.json`)."""
    publish(settings, name, json.dumps(record, indent=1, default=str) + "\n")


def local_folder(settings: SweepSettings) -> Path:
    """The sweep's local folder, made when a driver on another machine opens the sweep by its URI: it
    gets the record (which says where the sweep lives) and later the report."""
    if not (settings.folder / SETTINGS_NAME).is_file():
        atomic_write_text(settings.folder / SETTINGS_NAME, settings.store.read_text(SETTINGS_NAME) or "")
    return settings.folder


def write_metadata(settings: SweepSettings, config: TrainConfig, space) -> None:
    write_record(settings, SETTINGS_NAME, {
        "settings": dataclasses.asdict(settings), "base": config.to_dict(), "space": space.name,
        "space_params": list(space.params), "rungs": list(settings.rungs), **provenance()})


def read_record(location: str | os.PathLike, name: str, what: str) -> dict[str, Any]:
    """The record `name` of the experiment at `location` (a local folder or a storage URI)."""
    where = str(location) if is_uri(location) else Path(location).resolve()
    record = Store(where).read_json(name)
    if record is None:
        raise JepatuneError(f"{where} is not a jepatune {what} (no {name}); give the folder "
                            f"`{'search' if what == 'sweep' else 'jepatune ablate'}` made (or its storage URI)")
    return record


def read_metadata(location: str | os.PathLike) -> dict[str, Any]:
    """Everything `sweep.json` records (settings, base recipe, space, rungs, versions), read where
    the sweep lives."""
    local = read_record(location, SETTINGS_NAME, "sweep")
    storage = local["settings"].get("storage")
    if is_uri(location) or storage is None:
        return local
    return read_record(join(storage, local["settings"]["name"]), SETTINGS_NAME, "sweep")


def read_settings(location: str | os.PathLike, out: str | os.PathLike | None = None) -> SweepSettings:
    """The settings a sweep started with, located where it is now: its local folder (the recorded
    `--out` may be relative to another working directory, or the folder may have moved since), or
    its storage URI (STORAGE/NAME), with the local folder under `out` (default: runs)."""
    if is_uri(location):
        settings = SweepSettings(**read_record(location, SETTINGS_NAME, "sweep")["settings"])
        storage, _, name = str(location).rstrip("/").rpartition("/")
        return dataclasses.replace(settings, storage=storage, name=name, out=str(out or "runs"))
    folder = Path(location).resolve()
    settings = SweepSettings(**read_record(folder, SETTINGS_NAME, "sweep")["settings"])
    # With --storage, the sweep is STORAGE/NAME: keep the recorded name.
    return dataclasses.replace(settings, out=str(folder.parent),
                               name=folder.name if settings.storage is None else settings.name)
