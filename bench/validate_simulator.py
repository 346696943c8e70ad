"""Validate the simulator: real sweeps beside the simulator's prediction of the very same sweeps.

Runs real sweeps (`jepatune.search.sweep.run_sweep`: Ray Tune, the Optuna sampler, ASHA, real
training) on the benchmark's proxy (its preset, its budget, the demo corpus as it was built for the
benchmark) for each strategy and sampler seed, then simulates each one with the same settings and
seed against the benchmark (training seed = the benchmark's first, the one a sweep trains with), and
over `--spread` other sampler seeds for the simulated spread. Per sweep: the best observed trial
score (the sweep's answer as it saw it) real and simulated, and the surrogate's true score of each
answer. For random search the real and simulated sweeps draw the same recipes in the same order,
so their trial scores compare one to one: how far the surrogate is from real training at points it
never recorded, against the seed-to-seed noise.

    python bench/validate_simulator.py                          # 2 strategies x 3 seeds, 16 trials each
    python bench/validate_simulator.py --seeds 0 --samples 8    # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
from jepatune.analysis.report import markdown_table  # noqa: E402
from jepatune.benchmark.from_sweep import sweep_benchmark  # noqa: E402
from jepatune.benchmark.record import job, process_pool  # noqa: E402
from jepatune.benchmark.simulate import simulate_sweep  # noqa: E402
from jepatune.benchmark.strategy import Strategy  # noqa: E402
from jepatune.benchmark.surrogate import Surrogate  # noqa: E402
from jepatune.benchmark.tables import load_benchmark  # noqa: E402
from jepatune.spaces import get_space  # noqa: E402
from jepatune.trainer.config import TrainConfig  # noqa: E402

STRATEGIES = {"random": Strategy(sampler="random", scheduler="none"), "tpe+asha": Strategy()}


def real_sweep(out: Path, data: Path, bench, name: str, strategy: Strategy, seed: int, samples: int) -> Path:
    from jepatune.experiment.settings import SweepSettings
    from jepatune.search.sweep import run_sweep

    settings = SweepSettings(name=name, data=str(data), out=str(out), samples=samples, trial_steps=bench.budget,
                             preset=bench.info["settings"]["preset"], concurrency=strategy.concurrency,
                             sampler=strategy.sampler, scheduler=strategy.scheduler, seed=seed,
                             startup_trials=strategy.startup_trials, audit_frac=strategy.audit_frac, final_steps=0)
    if not (settings.folder / "tables" / "trials.parquet").exists():
        run_sweep(settings)
    return settings.folder


def answer(trials: pd.DataFrame, surrogate: Surrogate) -> tuple[float, float]:
    """(best observed score, the surrogate's true score of that recipe)."""
    best = trials.loc[trials["score"].idxmin()]
    return float(best["score"]), surrogate.true_score(best[surrogate.params].to_dict())


def best_params(trials: pd.DataFrame, params: list[str]) -> dict:
    return trials.loc[trials["score"].idxmin(), params].to_dict()


def retrain_answers(answers: dict[str, dict], bench, data: Path, seeds: int, cache: Path) -> dict[str, list[float]]:
    """Each answer's recipe trained again at the trial budget with base seed + 1 .. + `seeds` (the sweep
    trained it with the base seed), scored as a trial; kept in `cache` and read again next time."""
    done = json.loads(cache.read_text()) if cache.exists() else {}
    base = TrainConfig.from_dict({**bench.info["base"], "data_path": str(data.resolve())})
    space = get_space(bench.info["settings"]["space"], base=base)
    jobs = [job(base, {"recipe": name, "knobs": space.overrides(params)}, "main", k, bench.budget)
            for name, params in answers.items() if name not in done for k in range(1, seeds + 1)]
    for rec in process_pool(2)(jobs):
        done.setdefault(rec["recipe"], []).append(rec["score"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(done))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", type=Path, default=ROOT / "bench/benchmarks/curriculum-demo")
    p.add_argument("--out", type=Path, default=Path("runs/validate"))
    p.add_argument("--seeds", default="0,1,2", help="sampler seeds of the real sweeps (0,1,2)")
    p.add_argument("--samples", type=int, default=16, help="trials per sweep (16)")
    p.add_argument("--spread", type=int, default=30, help="simulated sampler seeds for the spread (30)")
    p.add_argument("--answer-seeds", type=int, default=2, help="more seeds each real answer is trained with (2)")
    args = p.parse_args(argv)
    from jepatune.corpora import build_demo

    bench = load_benchmark(args.benchmark)
    surrogate = Surrogate(bench)
    data = Path(bench.info["base"]["data_path"])
    if not data.is_dir():  # the benchmark's corpus, built again (the demo's default sizes, as it was)
        data = args.out / "data"
        build_demo(data)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, pairs, answers = [], [], {}
    t0 = time.perf_counter()
    for label, strategy in STRATEGIES.items():
        spread = [answer(simulate_sweep(surrogate, strategy, seed=100 + k, seed_index=0, samples=args.samples).trials
                         .query("status == 'completed'"), surrogate) for k in range(args.spread)]
        for seed in seeds:
            folder = real_sweep(args.out, data, bench, f"{label}-s{seed}", strategy, seed, args.samples)
            real = sweep_benchmark(folder)
            real_trials = real.recipes.merge(real.runs[["recipe", "score"]], on="recipe")
            sim = simulate_sweep(surrogate, strategy, seed=seed, seed_index=0, samples=args.samples).trials
            sim_done = sim[sim["status"] == "completed"]
            r_obs, r_true = answer(real_trials, surrogate)
            answers[f"{label}-s{seed}"] = best_params(real_trials, surrogate.params)
            s_obs, s_true = answer(sim_done, surrogate)
            rows.append({"strategy": label, "seed": seed, "real_best": r_obs, "sim_best": s_obs,
                         "real_answer_true": r_true, "sim_answer_true": s_true, "real_completed": len(real_trials),
                         "sim_completed": len(sim_done), "sim_spread_mean": float(np.mean([a for a, _ in spread])),
                         "sim_spread_sd": float(np.std([a for a, _ in spread], ddof=1))})
            if strategy.sampler == "random":  # the same draws: trial scores one to one
                sim_sorted = sim_done.sort_values("number").reset_index(drop=True)
                for _, row in real_trials.reset_index(drop=True).iterrows():
                    params = row[surrogate.params].to_dict()
                    match = sim_sorted[np.isclose(sim_sorted[surrogate.params].to_numpy(float),
                                                  np.array(list(params.values()), float)).all(axis=1)]
                    if len(match):
                        pairs.append({"seed": seed, "real": float(row["score"]), "sim": float(match["score"].iloc[0]),
                                      "recorded": bool(np.isclose(surrogate.x, surrogate.unit(params)).all(axis=1)
                                                       .any())})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    if args.answer_seeds:
        again = retrain_answers(answers, bench, data, args.answer_seeds, args.out / "answers.json")
        table["real_answer_measured"] = [float(np.mean([r["real_best"], *again[f"{r['strategy']}-s{r['seed']}"]]))
                                         for r in rows]
    print(f"\n{len(rows)} real sweeps in {time.perf_counter() - t0:.0f}s; benchmark noise floor "
          f"{surrogate.noise_floor():.4f}\n")
    print(markdown_table(table))
    if pairs:
        pr = pd.DataFrame(pairs)
        unrec = pr[~pr["recorded"]]
        err = (unrec["sim"] - unrec["real"]).abs()
        corr = unrec[["real", "sim"]].corr(method="spearman").iloc[0, 1] if len(unrec) > 2 else float("nan")
        rec = pr[pr["recorded"]]
        print(f"\nrandom search, the same recipes real and simulated: {len(pr)} pairs, {len(unrec)} at unrecorded "
              f"points: mean |sim - real| {err.mean():.4f} (median {err.median():.4f}), Spearman {corr:.3f}; "
              f"recorded points: mean |sim - real| {(rec['sim'] - rec['real']).abs().mean():.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "validation.csv", index=False)
    if pairs:
        pd.DataFrame(pairs).to_csv(args.out / "pairs.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
