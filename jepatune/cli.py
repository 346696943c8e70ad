"""The `jepatune` command. Each subcommand parses its arguments and calls the library.

Errors a user can cause end with one line on stderr and exit status 2. Heavy modules
(torch, Ray) are imported only by the subcommand that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, NoReturn

from jepatune.atomic import creation_problem
from jepatune.errors import ConfigError, JepatuneError
from jepatune.experiment.layout import BEST_NAME, FIGURES_DIR, SETTINGS_NAME, TABLES_DIR
from jepatune.experiment.settings import AblationSettings, SweepSettings, default_of, read_settings_toml
from jepatune.experiment.store import is_uri

DEMO_OUT = "runs/demo"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="flat TOML file of TrainConfig knobs")
    p.add_argument("--preset", help="a named starting config: " + ", ".join(_preset_names()))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one knob, e.g. --set model_dim=256 (repeatable)")
    p.add_argument("--data", type=Path, help="byte-shard folder (sets data_path)")


def _preset_names() -> list[str]:
    from jepatune.trainer.config import PRESETS

    return sorted(PRESETS)


def _config_from_args(args: argparse.Namespace):
    from jepatune.trainer.config import load_config, parse_set_args

    overrides = {}
    if args.preset is not None:
        from jepatune.trainer.config import PRESETS

        if args.preset not in PRESETS:
            raise ConfigError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
        overrides.update(PRESETS[args.preset])
    if args.data is not None:
        overrides["data_path"] = str(args.data.resolve())
    overrides.update(parse_set_args(args.overrides))
    return load_config(args.config, overrides)


def _prepare_out(out: Path, resume: bool = False) -> Path:
    """Check that `out` can be written before any work starts (it is created later,
    once the inputs are checked, so bad input leaves nothing behind)."""
    out = out.resolve()
    if os.path.lexists(out) and not os.path.isdir(out):
        raise JepatuneError(f"--out {out} is a file; give a folder")
    if (problem := creation_problem(out)) is not None:  # every reason mkdir would fail for, checked up front
        raise JepatuneError(f"--out {out}: {problem}; choose another folder")
    if not resume and out.is_dir() and any(out.glob("summary.json")):
        raise JepatuneError(f"--out {out} already holds a finished run; choose a new folder or delete it")
    return out


# --- options built from the settings dataclasses ---------------------------------------------

def _add_settings_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `cls`, with the field's help and default (`experiment.settings`).
    Options left out keep argparse's SUPPRESS, so `_settings_from_args` can tell a given one from a
    default (a value from `--config` then stands)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, hints[f.name]
        default = default_of(f)
        shown = f" (default: {default})" if default not in (None, "", (), {}) else ""
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        origin = typing.get_origin(tp)
        if origin in (dict, tuple):  # --set KEY=VALUE, --factor ...: repeatable
            kwargs["action"] = "append"
        elif tp in (int, float):
            kwargs["type"] = tp
            kwargs.setdefault("metavar", "N" if tp is int else "X")
        p.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kwargs)


def _settings_from_args(cls: type, args: argparse.Namespace, paths: tuple[str, ...] = (),
                        **from_file: Any) -> Any:
    """`cls` from the defaults, then `from_file` (a --config TOML), then the options given. The
    fields named in `paths` are folders or files given relative to the working directory."""
    from jepatune.trainer.config import parse_set_args

    values = dict(from_file)
    for f in dataclasses.fields(cls):
        if f.name not in vars(args):
            continue
        value = getattr(args, f.name)
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is dict:
            value = {**values.get(f.name, {}), **parse_set_args(value)}
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    for name in paths:
        if values.get(name) and "://" not in str(values[name]):
            values[name] = str(Path(values[name]).resolve())
    return cls(**values)


# --- data ---------------------------------------------------------------------------------

def cmd_data(args: argparse.Namespace) -> int:
    from jepatune import corpora

    out = _prepare_out(args.out)
    t0 = time.perf_counter()
    if args.source == "demo":
        info = corpora.build_demo(out, train_mb=args.train_mb, val_mb=args.val_mb)
    elif args.source == "text":
        info = corpora.build_from_text(args.files, out, val_frac=args.val_frac)
    elif args.source == "transpile":
        info = corpora.transpile_sentencepiece(args.sp_dir, args.tokenizer, out)
    else:
        info = corpora.fetch_fineweb(out, train_shards=args.train_shards, variant=args.variant)
    print(f"wrote byte shards to {out} in {time.perf_counter() - t0:.1f}s: {json.dumps(info, default=str)}")
    return 0


# --- benchmark ----------------------------------------------------------------------------

def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 2,3") from None


def _add_record_options(b: argparse.ArgumentParser) -> None:
    from jepatune.benchmark.settings import RecordSettings

    d = RecordSettings(out="", data="")
    b.add_argument("--out", type=Path, required=True, help="the benchmark folder")
    b.add_argument("--data", type=Path, default=None, help="byte-shard folder (default OUT/data: the demo corpus, "
                                                           "built there when missing)")
    b.add_argument("--space", default=d.space, help=f"search space ({d.space})")
    b.add_argument("--preset", default=d.preset, help=f"model preset, or none for the reference's shape ({d.preset})")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix one knob of the base recipe (repeatable)")
    for name, help_ in (("recipes", "recipes, the reference and CE from step 0 included"),
                        ("seeds", "seeds per recipe"), ("trial_steps", "the trial budget in steps"),
                        ("transfer_recipes", "recipes also trained at the longer budget"),
                        ("transfer_factor", "the longer budget, in trial budgets"),
                        ("transfer_seeds", "seeds of each longer run"),
                        ("fidelity_seeds", "seeds of every recipe's restart runs"),
                        ("probe_steps", "cool-down steps of the probe fidelity, branched off at every rung (0: none)"),
                        ("seed", "the design's seed"), ("workers", "training processes, one torch thread each")):
        b.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name), help=f"{help_} "
                       f"({getattr(d, name)})")
    b.add_argument("--factors", type=_int_tuple, default=d.factors, help="ASHA reduction factors whose rungs are "
                   "recorded (2,3)")
    b.add_argument("--refine-recipes", type=int, default=d.refine_recipes, help="recipes drawn near the best ones "
                   f"once the main runs are in ({d.refine_recipes})")
    b.add_argument("--refine-width", type=float, default=d.refine_width, help="their half-width around each best "
                   f"recipe, in the unit cube ({d.refine_width})")
    b.add_argument("--fidelity-rungs", type=_int_tuple, default=d.fidelity_rungs, help="the rungs each recipe is also "
                   "trained to from scratch (the restart fidelity; default every recorded rung)")
    b.add_argument("--ray", action="store_true", help="train each run as a Ray task, on the cluster RAY_ADDRESS "
                   "names or a local Ray (default: --workers local processes)")
    for name, default, what in (("cpus_per_run", d.cpus_per_run, "CPUs"), ("gpus_per_run", d.gpus_per_run, "GPUs")):
        b.add_argument(f"--{name.replace('_', '-')}", type=float, default=default,
                       help=f"with --ray: {what} each run's task holds ({default:g})")
    b.add_argument("--resume", action="store_true", help="finish a recording that stopped: trains only what is missing")


def cmd_benchmark(args: argparse.Namespace) -> int:
    from jepatune.benchmark.record import record_benchmark
    from jepatune.benchmark.settings import RecordSettings
    from jepatune.benchmark.tables import load_benchmark
    from jepatune.trainer.config import parse_set_args

    settings = RecordSettings(
        out=str(args.out), data=str(args.data or args.out / "data"), space=args.space,
        preset=None if args.preset == "none" else args.preset,
        overrides=parse_set_args(args.overrides), recipes=args.recipes, seeds=args.seeds,
        trial_steps=args.trial_steps, factors=args.factors, transfer_recipes=args.transfer_recipes,
        transfer_factor=args.transfer_factor, transfer_seeds=args.transfer_seeds,
        fidelity_seeds=args.fidelity_seeds, probe_steps=args.probe_steps, fidelity_rungs=args.fidelity_rungs,
        refine_recipes=args.refine_recipes, refine_width=args.refine_width, seed=args.seed, workers=args.workers,
        ray=args.ray, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    runner = None
    if args.ray:
        from jepatune.search.record_on_ray import ray_runner

        settings.check()  # before Ray starts
        runner = ray_runner(settings.cpus_per_run, settings.gpus_per_run)
    t0 = time.perf_counter()
    folder = record_benchmark(settings, resume=args.resume, runner=runner)
    print(f"benchmark in {folder} ({time.perf_counter() - t0:.0f}s): {load_benchmark(folder).describe()}")
    return 0


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_simulate_options(p: argparse.ArgumentParser) -> None:
    from jepatune.benchmark.strategy import Strategy

    d = Strategy()
    p.add_argument("source", help="a benchmark folder (`jepatune benchmark record`), or a finished sweep (its folder "
                                  "or storage URI): its own completed trials, one seed, its rungs")
    p.add_argument("--sampler", type=_str_tuple, default=(d.sampler,), help="samplers, comma-separated (tpe)")
    p.add_argument("--startup-trials", type=_int_tuple, default=(d.startup_trials,), help="random trials before the "
                   f"sampler models the space ({d.startup_trials})")
    p.add_argument("--scheduler", type=_str_tuple, default=(d.scheduler,), help="asha, none, or both (asha)")
    p.add_argument("--grace-steps", type=_int_tuple, default=(d.grace_steps,), help="ASHA's first rung in steps "
                   "(0 = a quarter of the budget)")
    p.add_argument("--reduction-factor", type=_int_tuple, default=(d.reduction_factor,), help="ASHA's reduction "
                   f"factors ({d.reduction_factor})")
    p.add_argument("--fidelity", type=_str_tuple, default=(d.fidelity,), help="snapshot, probe, restart (snapshot)")
    p.add_argument("--audit-frac", type=float, default=d.audit_frac, help=f"ASHA's audits ({d.audit_frac})")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help=f"trials at once ({d.concurrency})")
    p.add_argument("--compute", type=float, default=64, help="each sweep's compute, in trial budgets (64)")
    p.add_argument("--repetitions", type=int, default=20, help="sweeps per strategy (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repetition's sampler (0)")
    p.add_argument("--neighbours", type=int, default=None, help="recipes the surrogate interpolates (default: "
                   "fitted by leave-one-out; 1 = the nearest recorded recipe)")
    p.add_argument("--out", type=Path, default=None, help="write every simulated point to this Parquet file")


def cmd_simulate(args: argparse.Namespace) -> int:
    import itertools

    import pandas as pd

    from jepatune.analysis.tables import write_parquet
    from jepatune.benchmark.answers import strategy_table
    from jepatune.benchmark.from_sweep import load_source
    from jepatune.benchmark.simulate import simulate
    from jepatune.benchmark.strategy import Strategy
    from jepatune.benchmark.surrogate import Surrogate

    bench = load_source(args.source)
    strategies = []
    for sampler, startup, scheduler, grace, rf, fidelity in itertools.product(
            args.sampler, args.startup_trials, args.scheduler, args.grace_steps, args.reduction_factor, args.fidelity):
        s = Strategy(sampler=sampler, startup_trials=startup, scheduler=scheduler, grace_steps=grace,
                     reduction_factor=rf, fidelity=fidelity, audit_frac=args.audit_frac, concurrency=args.concurrency)
        s.check()
        if s.label() not in {x.label() for x in strategies}:  # without ASHA, ladders and fidelities are one
            strategies.append(s)
    surrogates = {f: Surrogate(bench, f, args.neighbours) for f in dict.fromkeys(s.fidelity for s in strategies)}
    print(f"benchmark: {bench.describe()}")
    frames = []
    for fidelity, surrogate in surrogates.items():
        chosen = [s for s in strategies if s.fidelity == fidelity]
        frames.append(simulate(surrogate, chosen, repetitions=args.repetitions, compute_trials=args.compute,
                               seed=args.seed, log=print))
    sim = pd.concat(frames, ignore_index=True)
    floor = surrogates[strategies[0].fidelity].noise_floor()
    best = surrogates[strategies[0].fidelity].best_true()
    table = strategy_table(sim, floor)
    print(f"best recipe's mean score {best:.4f}; noise floor (median seed-to-seed std) {floor:.4f}; "
          f"{args.compute:g} trial budgets of compute per sweep, {args.concurrency} at once")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out is not None:
        write_parquet(sim, args.out)
        print(f"wrote {len(sim)} points to {args.out}")
    return 0


# --- train --------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        from jepatune.trainer.config import describe_knobs

        print(describe_knobs())
        return 0
    config = _config_from_args(args)
    out = _prepare_out(args.out, resume=args.resume)
    return _run_training(config, out, resume=args.resume)


def _run_training(config, out: Path, resume: bool = False) -> int:
    from jepatune.atomic import atomic_write_text
    from jepatune.trainer.checkpoint import CHECKPOINT_NAME
    from jepatune.trainer.loop import train

    ckpt = out / CHECKPOINT_NAME
    if resume and not ckpt.exists():
        raise JepatuneError(f"--resume: {ckpt} does not exist; run without --resume to start fresh")
    t0 = time.perf_counter()
    result = train(config, out_dir=out, checkpoint_dir=out, resume_from=ckpt if resume else None,
                   verbose=True, on_start=lambda: atomic_write_text(out / "config.toml", config.to_toml()))
    s = result.summary
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0 if result.status == "completed" else 1
    print(f"{result.status}: {s['step']} steps in {time.perf_counter() - t0:.0f}s; "
          f"val_bpb {s['val_bpb']:.4f} after the int8+zlib round trip"
          + (f" ({s['prequant_bpb']:.4f} before); artifact {s['artifact_bytes']:,} bytes, "
             f"fits 16 MB cap: {s['fits_cap']}" if result.status == "completed" else ""))
    print(f"outputs in {out}: metrics.jsonl, summary.json, config.toml"
          + (", final_model.pt, final_model.int8.ptz" if result.status == "completed" else ""))
    return 0 if result.status == "completed" else 1


# --- search and retrain ----------------------------------------------------------------------

def _sweep_settings(args: argparse.Namespace) -> SweepSettings:
    """--config FILE (the same names as the options), then the options given; --no-pruning last."""
    from_file = read_settings_toml(SweepSettings, args.config) if args.config is not None else {}
    if args.no_pruning:
        args.scheduler = "none"
    return _settings_from_args(SweepSettings, args, ("data",), **from_file)


def cmd_search(args: argparse.Namespace) -> int:
    from jepatune.analysis.summary import sweep_summary
    from jepatune.experiment.settings import read_settings
    from jepatune.search.sweep import finalize, run_sweep

    settings = _sweep_settings(args)
    if not args.resume:
        settings.validate()
        _prepare_out(settings.folder)
    t0 = time.perf_counter()
    run_sweep(settings, resume=args.resume)
    print(f"sweep finished in {time.perf_counter() - t0:.0f}s")
    settings = read_settings(settings.folder)  # on --resume, the settings the sweep started with
    if settings.final_steps:
        finalize(settings.folder)
    print(sweep_summary(settings.folder))
    print(f"experiment folder: {settings.folder} (tables in {TABLES_DIR}/, best recipe in {BEST_NAME})")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from jepatune.analysis.summary import sweep_summary
    from jepatune.experiment.settings import local_folder, read_settings
    from jepatune.search.sweep import ensure_ray, finalize

    if is_uri(args.target):  # a sweep on storage, opened from any machine
        target = str(args.target)
        local_folder(read_settings(target, out=args.out))
        finalize(target, final_steps=args.final_steps, final_seeds=args.final_seeds, finalists=args.finalists)
        print(sweep_summary(target))
        return 0
    target = Path(args.target).resolve()
    if target.is_file():  # a recipe: it and the reference beside it
        from jepatune.search.retrain import retrain_recipe
        from jepatune.trainer.config import load_config

        overrides = {"data_path": str(args.data.resolve())} if args.data else {}
        if args.final_steps:
            overrides["iterations"] = args.final_steps
        config = load_config(target, overrides)
        out = _prepare_out(args.out)
        from jepatune.trainer.data import find_shards

        find_shards(config.data_path, "train")
        out.mkdir(parents=True, exist_ok=True)
        ensure_ray()
        print(retrain_recipe(config, out, args.final_seeds or 3).to_string(index=False))
        print(f"runs and tables in {out}")
        return 0
    if not target.is_dir():
        raise JepatuneError(f"{target} does not exist; give a sweep folder or a TOML recipe")
    finalize(target, final_steps=args.final_steps, final_seeds=args.final_seeds, finalists=args.finalists)
    print(sweep_summary(target))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The leaderboard, then what each knob is worth and how far the pruning can be trusted; then
    report.md with its figures. An ablation folder gets its report only."""
    from jepatune.analysis import explore
    from jepatune.analysis.report import write_report
    from jepatune.analysis.summary import storage_use, sweep_summary
    from jepatune.analysis.tables import load
    from jepatune.experiment.layout import ABLATION_NAME
    from jepatune.experiment.settings import local_folder, read_settings

    if is_uri(args.folder):  # a sweep on storage, opened from any machine: its report goes to --out/NAME
        folder = local_folder(read_settings(args.folder, out=args.out))
    else:
        given = Path(args.folder)
        if (given / ABLATION_NAME).is_file() and not (given / SETTINGS_NAME).is_file():
            _print_report(write_report(given, log=print))
            return 0
        folder = read_settings(given).folder  # a clear error when it is not a sweep
    use = storage_use(folder)  # listed once, for the summary and the report
    print(sweep_summary(folder, k=args.top, storage=use))
    tables = load(folder)
    fmt = {"index": False, "float_format": lambda v: f"{v:.4g}"}
    for knob in explore.knob_columns(tables.trials):
        m = explore.marginals(tables.trials, knob)
        print(f"\nBPB by {knob} (completed trials):\n" + (m.to_string(**fmt) if len(m) else "no completed trial yet"))
    contents: dict = {}  # the report's tables, printed here rather than computed twice
    path = write_report(folder, log=print, contents=contents, storage=use)
    for title, heading in (
            ("Hyperparameter importance", "knob importance (Optuna PED-ANOVA)"),
            ("Rung correlation", "how well each ASHA rung predicts the final BPB (Spearman over completed trials)"),
            ("False stops (audit trials)",
             "false stops, from audit trials (stopped by ASHA, run to the end anyway; Wilson 95% interval)"),
            ("Other pruning settings, replayed",
             "other ASHA settings replayed on the completed trials' curves (100 random orders)")):
        shown = contents.get(title, "")
        print(f"\n{heading}:\n" + (shown if isinstance(shown, str) else shown.to_string(**fmt)))
    _print_report(path)
    return 0


def _print_report(path: Path) -> None:
    print(f"\nreport: {path} (figures in {path.parent / FIGURES_DIR}/)")


# --- ablate ---------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> int:
    from jepatune.search.ablate import describe, run_ablation

    paths = ("sweep", "data", "out") + (() if getattr(args, "base", None) in (None, "best", "reference") else ("base",))
    settings = _settings_from_args(AblationSettings, args, paths)
    _prepare_out(settings.folder, resume=True)
    t0 = time.perf_counter()
    table = run_ablation(settings, resume=args.resume)
    print(describe(table))
    print(f"ablation finished in {time.perf_counter() - t0:.0f}s; folder {settings.folder} (tables in tables/)")
    from jepatune.analysis.report import write_report

    _print_report(write_report(settings.folder))
    return 0


# --- demo -----------------------------------------------------------------------------------

# 12 trials of 120 steps, then the 2 best recipes (the reference among them, or beside them) retrained at
# 200 steps with 4 seeds each: under 5 minutes on 2 idle cores; 3 seeds left a 0.12 BPB gain unresolved.
DEMO_SWEEP = dict(name="sweep", space="curriculum", samples=12, trial_steps=120, concurrency=2, preset="demo",
                  startup_trials=6, final_steps=200, final_seeds=4, finalists=2)
DEMO_CORPUS = dict(train_mb=4.0, val_mb=0.5)
# --smoke-test: the same pipeline at a size that checks an install (and the tests) in seconds.
SMOKE_SWEEP = {**DEMO_SWEEP, "samples": 4, "trial_steps": 16, "startup_trials": 2, "final_steps": 24,
               "final_seeds": 2}
SMOKE_CORPUS = dict(train_mb=0.6, val_mb=0.1)


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on CPU in a few minutes: corpus, sweep, finalists' retrain, tables, report, answer."""
    from jepatune import corpora
    from jepatune.analysis.finalists import conclusion
    from jepatune.analysis.report import write_report
    from jepatune.analysis.summary import storage_use, sweep_summary
    from jepatune.analysis.tables import load_tables
    from jepatune.search.sweep import finalize, run_sweep

    out = _prepare_out(args.out)
    sizes, corpus = (SMOKE_SWEEP, SMOKE_CORPUS) if args.smoke_test else (DEMO_SWEEP, DEMO_CORPUS)
    settings = SweepSettings(data=str(out / "data"), out=str(out), **sizes)
    if (settings.folder / SETTINGS_NAME).exists():
        raise JepatuneError(f"{settings.folder} already holds a demo sweep; use another --out or delete it")
    t0 = time.perf_counter()
    info = corpora.build_demo(settings.data, **corpus)
    print(f"demo corpus: {settings.data} ({info['train_bytes']:,} train / {info['val_bytes']:,} val bytes)")
    print(f"sweep: {settings.samples} trials of the '{settings.preset}' model, {settings.trial_steps} steps each, "
          f"ASHA rungs at {list(settings.rungs)}, {settings.concurrency} at a time")
    run_sweep(settings)
    print(f"sweep done in {time.perf_counter() - t0:.0f}s")
    finalize(settings.folder)
    use = storage_use(settings.folder)  # listed once, for the summary and the report
    print(sweep_summary(settings.folder, storage=use))
    print(f"experiment folder: {settings.folder}\n  tables: {settings.folder / TABLES_DIR}/"
          f"{{trials,curves,decisions,final,finalists}}.parquet\n  best recipe: {settings.folder / BEST_NAME}")
    print(f"  report: {write_report(settings.folder, log=print, storage=use)} (figures in report/)")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(conclusion(load_tables(settings.folder)["finalists"]))
    return 0


# --- entry point ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing option, a bad number) as one line too: what is wrong, and
    where the usage is, rather than the usage printed ahead of it."""

    def error(self, message: str) -> NoReturn:
        raise JepatuneError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jepatune", description=__doc__.splitlines()[0].strip("`"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on CPU: demo corpus, a 12-trial sweep, retrain, tables")
    p.add_argument("--out", type=Path, default=Path(DEMO_OUT))
    p.add_argument("--smoke-test", action="store_true",
                   help="the same pipeline at a size that runs in seconds (checks an install)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train one ByteJEPA model and export the int8+zlib artifact")
    _add_config_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--help-config", action="store_true", help="list every config knob with its default")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("search", help="a Ray Tune + Optuna + ASHA sweep, then retrain the best")
    _add_settings_options(p, SweepSettings)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a flat TOML file of these settings by their field names (samples = 64, [overrides] ...); "
                        "options given here override it")
    p.add_argument("--no-pruning", action="store_true", help="no ASHA: every trial runs its full budget")
    p.add_argument("--resume", action="store_true", help="continue the sweep in OUT/NAME after a crash")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("retrain", help="retrain a sweep's finalists and the reference, several seeds; the best "
                                       "retrain wins")
    p.add_argument("target", help="a sweep folder or storage URI (STORAGE/NAME), or a TOML recipe (e.g. a sweep's "
                                  "best.toml)")
    p.add_argument("--final-steps", type=int, default=0, help="budget (default: the sweep's, or the recipe's)")
    p.add_argument("--final-seeds", type=int, default=0, help="seeds (default: the sweep's, or 3)")
    p.add_argument("--finalists", type=int, default=0, help="for a sweep: recipes to retrain (default: the sweep's)")
    p.add_argument("--data", type=Path, help="for a recipe: its byte-shard folder (default: the recipe's)")
    p.add_argument("--out", type=Path, default=Path("runs/retrain"), help="for a recipe: the output folder; for a "
                   "storage URI: where the sweep's local folder goes")
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser("analyze", help="print a sweep's leaderboard, knob marginals, importance, rung correlation; "
                                       "write DIR/report.md with its figures")
    p.add_argument("folder", help="a sweep folder or storage URI (STORAGE/NAME), or an ablation folder (its report "
                                  "only)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="for a storage URI: where the sweep's local folder "
                   "(and its report) goes")
    p.add_argument("--top", type=int, default=10, help="trials on the leaderboard")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("ablate", help="a recipe and single-factor changes of it, several seeds each, paired by seed")
    _add_settings_options(p, AblationSettings)
    p.add_argument("--resume", action="store_true", help="continue the ablation recorded in the folder")
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("benchmark", help="record a benchmark of a space: recipes drawn to cover it, trained for real")
    bsub = p.add_subparsers(dest="action", required=True)
    b = bsub.add_parser("record", help="train the recipes (several seeds, every rung in every fidelity, a subset "
                                       "at a longer budget) and write the Parquet tables")
    _add_record_options(b)
    p.set_defaults(fn=cmd_benchmark)

    p = sub.add_parser("simulate", help="what search settings would have cost and found: whole sweeps replayed "
                                        "against a recorded benchmark, in seconds")
    _add_simulate_options(p)
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("data", help="build byte-level shard folders")
    dsub = p.add_subparsers(dest="source", required=True)
    d = dsub.add_parser("demo", help="a few MB from the running Python's standard library")
    d.add_argument("--train-mb", type=float, default=4.0)
    d.add_argument("--val-mb", type=float, default=0.5)
    d = dsub.add_parser("text", help="byte shards from text files")
    d.add_argument("files", nargs="+", type=Path)
    d.add_argument("--val-frac", type=float, default=0.05)
    d = dsub.add_parser("transpile", help="SentencePiece shards -> byte shards, as the reference")
    d.add_argument("sp_dir", type=Path)
    d.add_argument("--tokenizer", type=Path, required=True)
    d = dsub.add_parser(
        "fineweb", help="download the challenge's FineWeb shards and convert them",
        description="Reads the export's manifest.json for the shard counts and the tokenizer, like the "
                    "challenge's downloader; MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf) "
                    "and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default datasets) pick another export.")
    d.add_argument("--train-shards", type=int, required=True,
                   help="how many train shards to fetch, the first N (the challenge's downloader takes 80)")
    d.add_argument("--variant", default="sp1024", help="sp1024 (or another sp<vocab> the manifest lists) or byte260")
    for d in dsub.choices.values():
        d.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except JepatuneError as e:
        print(f"jepatune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jepatune: interrupted", file=sys.stderr)
        return 130
