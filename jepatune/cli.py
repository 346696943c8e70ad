"""The `jepatune` command. Each subcommand parses its arguments and calls the library.

Errors a user can cause end with one line on stderr and exit status 2. Heavy modules
(torch, Ray) are imported only by the subcommand that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from jepatune.atomic import creation_problem
from jepatune.errors import ConfigError, JepatuneError

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


# --- data ---------------------------------------------------------------------------------

def cmd_data(args: argparse.Namespace) -> int:
    from jepatune.trainer import corpora

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

def _sweep_settings(args: argparse.Namespace):
    from jepatune.search.sweep import SweepSettings
    from jepatune.trainer.config import parse_set_args

    if args.data is None and not args.resume:
        raise JepatuneError("--data is required: a byte-shard folder (build one with `jepatune data demo --out DIR`)")
    return SweepSettings(
        data=str(args.data.resolve()) if args.data else "", out=str(args.out), name=args.name, space=args.space,
        samples=args.samples, trial_steps=args.trial_steps, grace_steps=args.grace_steps,
        reduction_factor=args.reduction_factor, concurrency=args.concurrency, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, storage=args.storage, preset=args.preset,
        overrides=parse_set_args(args.overrides), seed=args.seed, startup_trials=args.startup_trials,
        max_failures=args.max_failures, checkpoint_every=args.checkpoint_every, fidelity=args.fidelity,
        probe_steps=args.probe_steps, audit_frac=args.audit_frac,
        final_steps=args.final_steps, final_seeds=args.final_seeds, finalists=args.finalists, sampler=args.sampler,
        scheduler="none" if args.no_pruning else "asha")


def cmd_search(args: argparse.Namespace) -> int:
    from jepatune.search.sweep import finalize, leaderboard, read_settings, run_sweep

    settings = _sweep_settings(args)
    if not args.resume:
        _prepare_out(settings.folder)
    t0 = time.perf_counter()
    run_sweep(settings, resume=args.resume)
    print(f"sweep finished in {time.perf_counter() - t0:.0f}s")
    settings = read_settings(settings.folder)  # on --resume, the settings the sweep started with
    if settings.final_steps:
        finalize(settings.folder)
    print(leaderboard(settings.folder))
    print(f"experiment folder: {settings.folder} (tables in tables/, best recipe in best.toml)")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from jepatune.search.sweep import _ensure_ray, finalize, leaderboard

    target = args.target.resolve()
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
        _ensure_ray()
        print(retrain_recipe(config, out, args.final_seeds or 3).to_string(index=False))
        print(f"runs and tables in {out}")
        return 0
    if not target.is_dir():
        raise JepatuneError(f"{target} does not exist; give a sweep folder or a TOML recipe")
    finalize(target, final_steps=args.final_steps, final_seeds=args.final_seeds, finalists=args.finalists)
    print(leaderboard(target))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The leaderboard, then what each knob is worth and how far the pruning can be trusted; then
    report.md with its figures. An ablation folder gets its report only."""
    from jepatune.analysis import explore
    from jepatune.analysis.report import ABLATION_NAME, SETTINGS_NAME, write_report
    from jepatune.search.sweep import leaderboard, read_settings

    if (args.folder / ABLATION_NAME).is_file() and not (args.folder / SETTINGS_NAME).is_file():
        _print_report(write_report(args.folder, log=print))
        return 0
    folder = read_settings(args.folder).folder  # a clear error when it is not a sweep
    print(leaderboard(folder, k=args.top))
    tables = explore.load(folder)
    fmt = {"index": False, "float_format": lambda v: f"{v:.4g}"}
    for knob in explore.knob_columns(tables.trials):
        m = explore.marginals(tables.trials, knob)
        print(f"\nBPB by {knob} (completed trials):\n" + (m.to_string(**fmt) if len(m) else "no completed trial yet"))
    contents: dict = {}  # the report's tables, printed here rather than computed twice
    path = write_report(folder, log=print, contents=contents)
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
    from jepatune.analysis.report import FIGURES_DIR

    print(f"\nreport: {path} (figures in {path.parent / FIGURES_DIR}/)")


# --- ablate ---------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> int:
    from jepatune.search.ablate import AblationSettings, describe, run_ablation
    from jepatune.trainer.config import parse_set_args

    def resolved(path: Path | None) -> str | None:
        return str(path.resolve()) if path is not None else None

    base = args.base if args.base in (None, "best", "reference") else resolved(Path(args.base))
    settings = AblationSettings(
        base=base, factors=tuple(args.factors), presets=tuple(args.presets), sweep=resolved(args.sweep),
        data=resolved(args.data), model_preset=args.model_preset, overrides=parse_set_args(args.overrides),
        seeds=args.seeds, steps=args.steps, out=resolved(args.out), name=args.name, concurrency=args.concurrency,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures)
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
    from jepatune.analysis.finalists import conclusion
    from jepatune.analysis.report import write_report
    from jepatune.analysis.tables import load_tables
    from jepatune.search.sweep import SweepSettings, finalize, leaderboard, run_sweep
    from jepatune.trainer import corpora

    out = _prepare_out(args.out)
    sizes, corpus = (SMOKE_SWEEP, SMOKE_CORPUS) if args.smoke_test else (DEMO_SWEEP, DEMO_CORPUS)
    settings = SweepSettings(data=str(out / "data"), out=str(out), **sizes)
    if (settings.folder / "sweep.json").exists():
        raise JepatuneError(f"{settings.folder} already holds a demo sweep; use another --out or delete it")
    t0 = time.perf_counter()
    info = corpora.build_demo(settings.data, **corpus)
    print(f"demo corpus: {settings.data} ({info['train_bytes']:,} train / {info['val_bytes']:,} val bytes)")
    print(f"sweep: {settings.samples} trials of the '{settings.preset}' model, {settings.trial_steps} steps each, "
          f"ASHA rungs at {list(settings.rungs)}, {settings.concurrency} at a time")
    run_sweep(settings)
    print(f"sweep done in {time.perf_counter() - t0:.0f}s")
    finalize(settings.folder)
    print(leaderboard(settings.folder))
    print(f"experiment folder: {settings.folder}\n  tables: {settings.folder / 'tables'}/"
          f"{{trials,curves,decisions,final,finalists}}.parquet\n  best recipe: {settings.folder / 'best.toml'}")
    print(f"  report: {write_report(settings.folder, log=print)} (figures in report/)")
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
    from jepatune.search.sweep import FIDELITIES  # a light module: no Ray, no torch

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
    p.add_argument("--space", default="curriculum", help="curriculum, regularizer, optimizer, full, or a TOML file")
    p.add_argument("--samples", type=int, default=16, help="trials (the reference recipe is always the first)")
    p.add_argument("--trial-steps", type=int, default=200, help="each trial's budget in optimiser steps")
    p.add_argument("--data", type=Path, help="byte-shard folder, the same path on every node")
    p.add_argument("--out", type=Path, default=Path("runs"), help="where the experiment folder goes")
    p.add_argument("--name", default="sweep", help="experiment folder name under --out")
    p.add_argument("--storage", help="where Ray keeps trials on a cluster: s3://bucket/path or a shared folder")
    p.add_argument("--preset", help="starting config for every trial, e.g. tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a trainer knob for every trial (repeatable)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="0.5 packs two trials per GPU")
    p.add_argument("--grace-steps", type=int, default=0, help="first ASHA rung in steps (0 = trial-steps / 4)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA keeps 1 / this at each rung")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--startup-trials", type=int, default=10, help="random trials before TPE models the space")
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="how recipes are suggested")
    p.add_argument("--no-pruning", action="store_true", help="no ASHA: every trial runs its full budget")
    p.add_argument("--fidelity", default="snapshot", choices=FIDELITIES,
                   help="what a rung measures: the running model (snapshot), a whole curriculum compressed to the "
                        "rung's budget (restart), or a short pure-CE cool-down branch (probe)")
    p.add_argument("--probe-steps", type=int, default=0, help="probe fidelity: cool-down steps (0 = half the "
                   "first rung)")
    p.add_argument("--audit-frac", type=float, default=0.05,
                   help="share of ASHA's stops run to the end anyway, to estimate its false-stop rate")
    p.add_argument("--max-failures", type=int, default=2, help="restarts of a failed trial from its checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint every Nth rung (always the last); 0 = the last only")
    p.add_argument("--final-steps", type=int, default=0,
                   help="retrain the finalists and the reference at this budget; the best retrain wins (0 = none)")
    p.add_argument("--final-seeds", type=int, default=3,
                   help="seeds per retrained recipe, none a trial's seed (run in parallel)")
    p.add_argument("--finalists", type=int, default=3, help="the top distinct recipes by trial score to retrain")
    p.add_argument("--resume", action="store_true", help="continue the sweep in OUT/NAME after a crash")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("retrain", help="retrain a sweep's finalists and the reference, several seeds; the best "
                                       "retrain wins")
    p.add_argument("target", type=Path, help="a sweep folder, or a TOML recipe (e.g. a sweep's best.toml)")
    p.add_argument("--final-steps", type=int, default=0, help="budget (default: the sweep's, or the recipe's)")
    p.add_argument("--final-seeds", type=int, default=0, help="seeds (default: the sweep's, or 3)")
    p.add_argument("--finalists", type=int, default=0, help="for a sweep: recipes to retrain (default: the sweep's)")
    p.add_argument("--data", type=Path, help="for a recipe: its byte-shard folder (default: the recipe's)")
    p.add_argument("--out", type=Path, default=Path("runs/retrain"), help="for a recipe: the output folder")
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser("analyze", help="print a sweep's leaderboard, knob marginals, importance, rung correlation; "
                                       "write DIR/report.md with its figures")
    p.add_argument("folder", type=Path, help="a sweep folder, or an ablation folder (its report only)")
    p.add_argument("--top", type=int, default=10, help="trials on the leaderboard")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("ablate", help="a recipe and single-factor changes of it, several seeds each, paired by seed")
    p.add_argument("--base", help="best (the --sweep's best recipe; the default with --sweep), reference (the "
                   "default otherwise), or a TOML recipe")
    p.add_argument("--factor", dest="factors", action="append", default=[], metavar="KEY=V1,V2",
                   help="one variant per value of a knob, e.g. --factor regularizer=lejepa,none (repeatable)")
    p.add_argument("--preset", dest="presets", action="append", default=[], metavar="NAME",
                   help="built-in variants: jepa-vs-ce, regularizer, swa (repeatable, combinable with --factor)")
    p.add_argument("--sweep", type=Path, help="a sweep folder: its best recipe, its searched SWA start")
    p.add_argument("--data", type=Path, help="byte-shard folder (default: the base recipe's)")
    p.add_argument("--model-preset", help="the model of --base reference: " + ", ".join(_preset_names()))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a knob of the base, hence of every variant (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="runs per variant; seed k pairs the variants' runs")
    p.add_argument("--steps", type=int, default=0, help="each run's budget (default: the base recipe's)")
    p.add_argument("--out", type=Path, help="where the ablation folder goes (default: SWEEP/ablations with "
                   "--sweep, else runs/ablations)")
    p.add_argument("--name", help="ablation folder name (default: the preset names, else ablation)")
    p.add_argument("--concurrency", type=int, default=2, help="runs at once")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a run that raised")
    p.add_argument("--resume", action="store_true", help="continue the ablation recorded in the folder")
    p.set_defaults(fn=cmd_ablate)

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
