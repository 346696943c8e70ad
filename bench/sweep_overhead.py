"""Sweep overhead: where a small sweep's trial time goes, and how busy its slots are.

Runs a real sweep (`run_sweep`: Ray Tune, the Optuna searcher, the trial function, its checkpoints)
on the demo corpus, then splits each trial's time with the seconds per phase that every trainer
report carries (`time_setup_s`: data, model build, compile; `time_train_s`: optimiser steps;
`time_eval_s`; `time_ckpt_s`); the rest of the trial (`other`) is the trial function's own work
(imports, temp folders, waiting on the driver at each report). The slot-time table accounts for
every second of `slots x wall`: the trials, and what lies outside them (Ray starting the worker
processes and importing torch there, scheduling, the driver writing the tables at the end).
Utilisation is training time / (slots x wall time).

    python bench/sweep_overhead.py                     # 4 one-minute trials of the demo model, 2 at a time
    python bench/sweep_overhead.py --asha --samples 8   # the default ASHA sweep instead: pruned trials too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Ray workers

from jepatune.corpora import build_demo  # noqa: E402
from jepatune.experiment.ray_files import metric_reports, read_trials  # noqa: E402
from jepatune.experiment.settings import SweepSettings  # noqa: E402
from jepatune.search.sweep import run_sweep  # noqa: E402

PHASES = ("setup", "train", "eval", "ckpt")
TARGET_TRAIN_SHARE = 0.90


# --- shared by the benchmarks of the search ---------------------------------------------------

def machine() -> str:
    """CPU model and cores (from lscpu), date, load averages: what every recorded figure needs beside it."""
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                  check=True).stdout.splitlines() if ":" in line)
        cpu = f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.SubprocessError):
        cpu = f"{platform.processor() or '?'}, {os.cpu_count()} CPUs"
    return f"{cpu}, {time.strftime('%Y-%m-%d %H:%M %Z')}, Python {platform.python_version()}, {load()}"


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def start_ray(cpus: int) -> None:
    """A new local Ray of `cpus` slots (never another job's cluster), quiet: the benchmarks print their own tables."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, log_to_driver=False, configure_logging=False,
                 include_dashboard=False)


def fmt(v: Any, column: str = "") -> str:
    """Shares as percentages, floats to 0.1 (4 significant digits below 10), counts with separators."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1%}" if "share" in column else f"{v:.4g}" if abs(v) < 10 else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table (pastes into bench/README.md as it is): text left, numbers right."""
    cells = [[fmt(r.get(c), c) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("| " + " | ".join(("-" * (w - 1) + ":") if n else "-" * w for w, n in zip(widths, numeric, strict=True))
          + " |")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(row, widths, numeric, strict=True))
              + " |", flush=True)


def demo_data(folder: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    build_demo(folder / "data")
    return folder / "data"


def run_in_temp(bench: Callable[[argparse.Namespace, Path], dict[str, Any]], args: argparse.Namespace) -> int:
    """Run `bench` in a temp folder (deleted after) and write what it returns to `--json`."""
    with tempfile.TemporaryDirectory(prefix="jepatune-bench-") as tmp:
        out = bench(args, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


# --- this benchmark ---------------------------------------------------------------------------

def trial_rows(experiment: str) -> list[dict[str, Any]]:
    """One row per trial from its last report: steps and seconds per phase."""
    rows = []
    for t in read_trials(experiment):
        reports = [r for r in metric_reports(t["reports"]) if "time_train_s" in r]
        if not reports:
            continue
        last = reports[-1]
        row: dict[str, Any] = {"trial": t["trial_id"], "steps": int(last["step"]), "status": last.get("status")}
        row.update({f"{p}_s": float(last[f"time_{p}_s"]) for p in PHASES})
        row["trial_s"] = float(last["device_s"])
        row["other_s"] = row["trial_s"] - sum(row[f"{p}_s"] for p in PHASES)
        row["train_share"] = row["train_s"] / row["trial_s"]
        row["began"] = float(reports[0]["timestamp"]) - float(reports[0]["device_s"])  # when the trial function began
        rows.append(row)
    return rows


def slot_rows(trials: list[dict[str, Any]], slots: int, wall: float) -> list[dict[str, Any]]:
    """Every second of slots x wall: the phases summed over trials, then what lies outside the trials."""
    capacity = slots * wall
    parts = {f"trials: {p}": sum(t[f"{p}_s"] for t in trials) for p in (*PHASES, "other")}
    parts["outside trials (worker start, scheduling, tables)"] = capacity - sum(t["trial_s"] for t in trials)
    rows = [{"where": k, "seconds": v, "share": v / capacity} for k, v in parts.items()]
    return rows + [{"where": "slots x wall", "seconds": capacity, "share": 1.0}]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = demo_data(work, args.data)
    settings = SweepSettings(data=str(data), out=str(work), name="overhead", space=args.space, samples=args.samples,
                             trial_steps=args.trial_steps, concurrency=args.concurrency, preset=args.preset,
                             startup_trials=args.samples, scheduler="asha" if args.asha else "none")
    start_ray(args.concurrency)
    print(f"{machine()}\nsweep: {settings.samples} trials of the '{settings.preset}' model, {settings.trial_steps} "
          f"steps each (evaluations and checkpoints at steps {list(settings.rungs)}), "
          f"{'ASHA' if args.asha else 'no early stopping'}, {settings.concurrency} at a time", flush=True)
    t0 = time.time()
    run_sweep(settings)  # the experiment's tables are written inside: the driver's end-of-sweep work counts
    wall = time.time() - t0
    trials = trial_rows(settings.experiment_path)
    print(f"\nper trial ({load()} after the sweep):")
    print_table(trials, ("trial", "status", "steps", "setup_s", "train_s", "eval_s", "ckpt_s", "other_s", "trial_s",
                         "train_share"))
    full = [t for t in trials if t["steps"] == settings.trial_steps]
    share = sum(t["train_s"] for t in full) / sum(t["trial_s"] for t in full)
    first = min(t["began"] for t in trials) - t0
    slots = slot_rows(trials, settings.concurrency, wall)
    util = slots[1]["share"]
    print(f"\nslot time: {settings.concurrency} slots x {wall:.1f} s wall (the first trial began {first:.1f} s "
          f"after the sweep started):")
    print_table(slots, ("where", "seconds", "share"))
    verdict = "met" if share >= TARGET_TRAIN_SHARE else "MISSED"
    print(f"\ntraining share of full-budget trials: {share:.1%} (target {TARGET_TRAIN_SHARE:.0%}: {verdict}); "
          f"cluster utilisation (training / slots x wall): {util:.1%}")
    return {"machine": machine(), "settings": vars(args) | {"data": str(data)}, "wall_s": wall,
            "trials": trials, "slots": slots, "train_share": share, "utilisation": util}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="trial model (default demo: about 80 ms a step on one core)")
    p.add_argument("--space", default="curriculum")
    p.add_argument("--samples", type=int, default=4, help="trials (default 4)")
    p.add_argument("--trial-steps", type=int, default=600, help="each trial's budget (default 600: about a minute)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray slots (default 2)")
    p.add_argument("--asha", action="store_true", help="stop trials early with ASHA (default: every trial runs whole)")
    p.add_argument("--data", type=Path, help="byte-shard folder (default: build the demo corpus)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    if min(args.samples, args.trial_steps, args.concurrency) < 1:
        p.error("--samples, --trial-steps and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_in_temp(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
