"""Does this machine reproduce a recorded benchmark? Some of its main runs trained again, here.

A run's floats are its CPU's (`jepatune.trainer.runtime.cpu_kind`): on another kind, other vector
kernels round some sums differently in their last bits, and over a run's steps that grows into
another curve. This script retrains `--runs` main runs of a benchmark (spread over its recipes and
seeds) exactly as they were recorded, and sets |here - recorded| beside the seed-to-seed
difference |seed 0 - seed 1| of the same recipes: on the recording's kind of CPU the first is 0; on
another it says how much of a trial's noise is numerical.

    python bench/benchmark_reproduction.py                                  # the committed benchmark, 16 runs
    python bench/benchmark_reproduction.py --benchmark DIR --runs 40 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from jepatune.benchmark.record import main_jobs, process_pool  # noqa: E402
from jepatune.benchmark.settings import RecordSettings  # noqa: E402
from jepatune.benchmark.tables import RECORDS_NAME, read_records  # noqa: E402
from jepatune.corpora import build_demo  # noqa: E402
from jepatune.trainer.config import TrainConfig  # noqa: E402
from jepatune.trainer.runtime import cpu_kind, same_cpu_kind  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", type=Path, default=ROOT / "bench" / "benchmarks" / "curriculum-demo")
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, help="the benchmark's shards (default: the demo corpus, built "
                                                          "in a temp folder, as the recording built it)")
    args = p.parse_args()
    records = read_records(args.benchmark / RECORDS_NAME)
    meta = records[0]
    recorded = {(r["recipe"], r["seed"]): r for r in records[1:] if r.get("kind") == "main"}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if args.data is None:
            build_demo(data)
        s = RecordSettings(**{**meta["settings"], "data": str(data)})
        base = TrainConfig.from_dict({**meta["base"], "data_path": str(Path(data).resolve())})
        jobs = [j for j in main_jobs(s, base, meta["recipes"]) if j["kind"] == "main"]
        pick = np.linspace(0, len(jobs) - 1, args.runs).round().astype(int)
        chosen = [jobs[i] for i in dict.fromkeys(pick.tolist())]
        t0 = time.perf_counter()
        again = {(r["recipe"], r["seed"]): r for r in process_pool(args.workers)(chosen)}
    here, there = cpu_kind(), meta["machine"].get("cpu")
    diff = np.array([abs(again[k]["score"] - recorded[k]["score"]) for k in again])
    seeds = np.array([abs(recorded[(r, 0)]["score"] - recorded[(r, 1)]["score"])
                      for r in sorted({r for r, _ in again}) if (r, 1) in recorded])
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {len(again)} main runs of {args.benchmark} "
          f"trained again in {time.perf_counter() - t0:.0f}s\n"
          f"recorded on: {there or 'a CPU the recording did not name (format 1)'}\nhere: {here}"
          + ("" if there is None else f" ({'the same' if same_cpu_kind(there, here) else 'another'} kind)"))
    print(f"|here - recorded|: mean {diff.mean():.4f}, median {np.median(diff):.4f}, max {diff.max():.4f}, "
          f"equal to the bit {int((diff == 0).sum())} of {len(diff)}")
    print(f"|seed 0 - seed 1| of the same recipes, as recorded: mean {seeds.mean():.4f}, median "
          f"{np.median(seeds):.4f}, max {seeds.max():.4f} ({len(seeds)} recipes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
