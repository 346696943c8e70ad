"""Does the search pay? Strategies compared on a recorded benchmark by simulated sweeps.

For each strategy (sampler x scheduler settings), `--repetitions` simulated sweeps of up to
`--compute` trial budgets each (`jepatune.benchmark.simulate`): the anytime curve (the true score of
each sweep's answer against the compute spent, mean regret with a 95% interval), the compute to
come within the noise floor of the benchmark's best recipe; then the fidelities on the recipes and
seeds that have values in all three (every one from format 2 on; the transfer subset with one seed
in format 1), the rank transfer from the trial
budget to the longer one, and the finalists a retrain needs.

    python bench/search_payoff.py                              # the full comparison
    python bench/search_payoff.py --quick                      # 4 strategies, 3 repetitions, 32 budgets
    python bench/search_payoff.py --main --compute 512 --repetitions 20   # the 4 main ones, further
    python bench/search_payoff.py --figure docs/figures/search-anytime.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
from jepatune.analysis.report import markdown_table  # noqa: E402
from jepatune.benchmark import answers  # noqa: E402
from jepatune.benchmark.simulate import simulate  # noqa: E402
from jepatune.benchmark.strategy import Strategy  # noqa: E402
from jepatune.benchmark.surrogate import Surrogate  # noqa: E402
from jepatune.benchmark.tables import load_benchmark  # noqa: E402
from jepatune.experiment.fidelity import default_grace  # noqa: E402

POINTS = (16, 32, 64, 128, 256, 512, 1024)
KS = [1, 2, 3, 5, 8, 10, 12, 15, 20]  # finalists counts reported


def plan(main_only: bool, reps: int, compute: float) -> list[tuple[Strategy, int, float]]:
    """(strategy, repetitions, compute): the four main strategies in full; the variants of the default
    at half the compute and half the repetitions, GP (its asks take seconds each from about 50 trials
    on, on this CPU) at an eighth of the compute and a tenth of the repetitions."""
    main = [Strategy(sampler="random", scheduler="none"), Strategy(sampler="random"), Strategy(scheduler="none"),
            Strategy()]  # the last: the sweep's defaults, TPE(10) + ASHA, first rung B/4, rf 2, snapshot
    if main_only:
        return [(s, reps, compute) for s in main]
    variants = [Strategy(startup_trials=5), Strategy(startup_trials=20), Strategy(grace_steps=15),
                Strategy(reduction_factor=3), Strategy(sampler="cmaes")]
    return ([(s, reps, compute) for s in main] + [(s, max(2, reps // 2), compute / 2) for s in variants]
            + [(Strategy(sampler="gp"), max(2, reps // 10), compute / 8)])


def _simulate(task) -> pd.DataFrame:
    bench_path, strategy, reps, compute = task
    return simulate(Surrogate(load_benchmark(bench_path)), [strategy], repetitions=reps, compute_trials=compute)


def anytime_table(sim: pd.DataFrame, points) -> pd.DataFrame:
    rows = []
    for strategy in dict.fromkeys(sim["strategy"]):
        row = {"strategy": strategy}
        for c in points:
            s = sim[(sim["strategy"] == strategy) & (sim["compute"] == c)]["regret"].to_numpy(float)
            if len(s):
                lo, hi = answers.mean_interval(s) if len(s) > 1 else (float("nan"), float("nan"))
                row[f"{c}"] = f"{s.mean():.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def figure(sim: pd.DataFrame, path: Path, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for strategy in dict.fromkeys(sim["strategy"]):
        g = sim[sim["strategy"] == strategy].groupby("compute")["regret"]
        mean, sem = g.mean(), g.sem()
        ax.plot(mean.index, mean, label=strategy)
        ax.fill_between(mean.index, mean - 1.96 * sem, mean + 1.96 * sem, alpha=0.15)
    ax.axhline(floor, color="grey", ls="--", lw=1, label="noise floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compute spent (trial budgets)")
    ax.set_ylabel("regret of the sweep's answer (BPB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", type=Path, default=ROOT / "bench/benchmarks/curriculum-demo")
    p.add_argument("--repetitions", type=int, default=40)
    p.add_argument("--compute", type=float, default=256)
    p.add_argument("--workers", type=int, default=2, help="processes, one strategy each at a time (2)")
    p.add_argument("--quick", action="store_true", help="the main strategies, 3 repetitions, 32 budgets")
    p.add_argument("--main", action="store_true", help="the four main strategies only (for a longer --compute)")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repetitions, args.compute = 3, 32
    t0, started = time.perf_counter(), datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load = os.getloadavg()
    bench = load_benchmark(args.benchmark)
    s = Surrogate(bench)
    floor, best = s.noise_floor(), s.best_true()
    print(f"{bench.describe()}\nbest recipe's mean score {best:.4f}, noise floor {floor:.4f}; {args.repetitions} "
          f"sweeps per strategy, up to {args.compute:g} trial budgets, 2 at once; load {load}\n", flush=True)
    strategies = plan(args.quick or args.main, args.repetitions, args.compute)
    tasks = [(args.benchmark, st, reps, c) for st, reps, c in strategies]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        frames = []
        for (_, st, reps, c), frame in zip(tasks, pool.map(_simulate, tasks), strict=True):
            print(f"{st.label()}: {reps} sweeps of {c:g} budgets ({time.perf_counter() - t0:.0f}s in all)", flush=True)
            frames.append(frame)
    sim = pd.concat(frames, ignore_index=True)
    points = [c for c in POINTS if c <= args.compute]
    print(f"\n{len(sim)} points simulated in {time.perf_counter() - t0:.0f}s")
    print("\nregret of the answer (mean [95% interval]) at each compute, in trial budgets:\n")
    print(markdown_table(anytime_table(sim, points)))
    table = pd.concat([answers.strategy_table(sim[sim["strategy"] == x], floor)
                       for x in dict.fromkeys(sim["strategy"])])
    print("\nat each strategy's largest compute; to_floor: median compute to come within the noise floor:\n")
    columns = ["strategy", "compute", "trials", "regret", "regret_finalists", "within_floor", "to_floor", "never"]
    print(markdown_table(table[columns]))
    out: dict = {"started": started, "load": load, "floor": floor, "best": best,
                 "strategies": table.to_dict(orient="records")}
    ref = table.set_index("strategy")["to_floor"]
    base = "random"
    if base in ref.index and ref.notna().all():
        print("\ncompute to the floor, as a share of random search's: "
              + ", ".join(f"{k} {v / ref[base]:.2f}" for k, v in ref.items() if k != base))
    curves = sim.groupby(["strategy", "compute"])["regret"].mean()
    target = curves.loc[base].iloc[-1]
    matched = {k: float(g.index.get_level_values("compute")[g.to_numpy() <= target].min())
               for k, g in curves.groupby(level="strategy") if (g.to_numpy() <= target).any()}
    print(f"\ncompute for the mean regret to reach random search's at {args.compute:g} budgets ({target:.3f}), as a "
          f"share of those {args.compute:g}: " + ", ".join(f"{k} {v / args.compute:.2f} ({v:g})"
                                                         for k, v in matched.items() if k != base))
    out["match_random"] = {"target": float(target), "compute": matched}
    if len(bench.transfer_scores()):
        subset, seeds = bench.fidelity_recipes()
        grace = default_grace(bench.budget)
        fid = []
        for fidelity in ("snapshot", "probe", "restart"):
            sub = Surrogate(bench, fidelity, recipes=subset, seeds=seeds)
            st = Strategy(fidelity=fidelity, grace_steps=grace)
            f = simulate(sub, [st], repetitions=args.repetitions, compute_trials=min(args.compute, 64))
            fid.append(answers.strategy_table(f, floor))
        print(f"\nfidelities on the {len(subset)} recipes with all three (seeds {seeds}), first rung "
              f"{grace}, rf 2, up to 64 budgets:\n")
        fid_table = pd.concat(fid)
        print(markdown_table(fid_table[["strategy", "trials", "regret", "within_floor", "to_floor", "never"]]))
        t = answers.rank_transfer(bench)
        print(f"\nrank transfer, {bench.info['settings']['transfer_factor']}x budget: Spearman {t['spearman']:.3f} "
              f"[{t['lo']:.3f}, {t['hi']:.3f}] over {t['recipes']} recipes; noise floor there "
              f"{bench.transfer_noise_floor():.4f}")
        for resample in (False, True):
            f = answers.finalists_needed(bench, resample=resample)
            k = f.loc[f["enough"], "k"]
            print(f"finalists for the true best at the longer budget to be among them with 90% probability"
                  f"{' (candidates resampled)' if resample else ''}: {int(k.iloc[0]) if len(k) else 'none'} of "
                  f"{len(f)}; P at k = {', '.join(map(str, KS))}: "
                  + ", ".join(f"{x:.2f}" for x in f.set_index("k")["prob"].reindex(KS))
                  + "; the best of the k behind the best there by " + ", ".join(
                      f"{x:.3f}" for x in f.set_index("k")["regret"].reindex(KS)))
            out[f"finalists{'_resampled' if resample else ''}"] = f.to_dict(orient="records")
        out.update(transfer=t, fidelities=fid_table.to_dict(orient="records"))
    if args.figure:
        figure(sim, args.figure, floor)
        print(f"\nfigure: {args.figure}")
    print(f"\n{time.perf_counter() - t0:.0f}s; load {os.getloadavg()} at the end")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
