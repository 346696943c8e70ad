"""Why a sweep's ranking carries over to a longer budget, or does not: the transfer subset studied.

A recorded benchmark holds its transfer subset at the trial budget and at `transfer_factor` times it.
This study says which of the space's parameters order the good recipes at each budget (Spearman of
each parameter with the mean score, over the subset's recipes that score within 0.5 BPB of its best
at the longer budget), then trains the subset again at the trial budget under each `--variant` (a
trainer knob changed for the trial only) and asks of each what a sweep needs: the rank correlation
of its trial scores with the recorded longer-budget scores, and how far the best of its top k is
from the best recipe there (`jepatune.benchmark.answers.finalists_needed_from`). The variants tried
by default: the weight average's EMA decay scaled so that its horizon is the same share of the trial
as it is of the longer run (decay ** factor), and no weight average in the trial at all. With
`--longer KEY=VALUE` the subset is trained again at the longer budget with that knob too (a change
to what the retrain ships, such as the SWA start chosen by each run), and every set of trial scores
is judged against both sets of longer runs.

    python bench/transfer_study.py                           # the committed benchmark, the two variants
    python bench/transfer_study.py --variant swa_start_frac=0.9 --variant warmup_steps=5
    python bench/transfer_study.py --variant none            # the parameter table only
    python bench/transfer_study.py --longer 'swa_start_choices=[0.7,0.9,1]' --variant 'swa_start_choices=[0.7,0.9,1]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
from jepatune.analysis.explore import spearman  # noqa: E402
from jepatune.analysis.report import markdown_table  # noqa: E402
from jepatune.benchmark.answers import finalists_needed_from  # noqa: E402
from jepatune.benchmark.record import all_recipes, job, process_pool  # noqa: E402
from jepatune.benchmark.tables import RECORDS_NAME, load_benchmark, read_records  # noqa: E402
from jepatune.corpora import build_demo  # noqa: E402
from jepatune.trainer.config import TrainConfig  # noqa: E402

KS = (1, 3, 5, 8, 12, 16)


def parameter_table(bench, long: pd.Series, short: pd.Series) -> pd.DataFrame:
    good = long.index[long <= long.min() + 0.5]
    recipes = bench.recipes.set_index("recipe")
    every = bench.main_scores().mean(axis=1).loc[recipes.index]
    longer = bench.budget * bench.info["settings"]["transfer_factor"]
    return pd.DataFrame([{"parameter": p,
                          f"with the score at {bench.budget}": spearman(recipes.loc[good, p], short[good]),
                          f"at {longer}": spearman(recipes.loc[good, p], long[good]),
                          f"at {bench.budget}, all {len(recipes)} recipes": spearman(recipes[p], every)}
                         for p in bench.params]).round(2)


def variant_jobs(records, base: TrainConfig, subset: list[int], seeds: int, steps: int, knob: dict) -> list[dict]:
    recipes = {r["recipe"]: r for r in all_recipes(records)}
    return [job(base, {**recipes[i], "knobs": {**recipes[i]["knobs"], **knob}}, "main", k, steps)
            for i in subset for k in range(seeds)]


def train_variant(records, base: TrainConfig, subset: list[int], seeds: int, steps: int, knob: dict,
                  workers: int) -> pd.DataFrame:
    """The subset trained again with `knob`: scores by recipe (rows) and seed (columns)."""
    runs = list(process_pool(workers)(variant_jobs(records, base, subset, seeds, steps, knob)))
    return pd.DataFrame(runs).pivot_table(index="recipe", columns="seed", values="score").loc[subset]


def verdict(name: str, seen: pd.DataFrame, long: pd.Series, best: float, longer_name: str = "as recorded") -> dict:
    """How a sweep that sees `seen` fares against `long`; regrets are measured from `best`, the best
    score at the longer budget in any of the sets compared, so rows judged on other sets compare."""
    f = finalists_needed_from(seen.to_numpy(), long.loc[seen.index].to_numpy()).set_index("k")
    offset = float(long.min()) - best
    return {"trial scores": name, "longer budget": longer_name,
            "Spearman with the longer budget": round(spearman(seen.mean(axis=1), long), 3),
            **{f"regret, top {k}": round(float(f.loc[k, "regret"]) + offset, 3) for k in KS if k <= len(f)},
            "P(best in top 12)": round(float(f.loc[min(12, len(f)), "prob"]), 2)}


def parse_variant(text: str, decay: float, factor: int) -> tuple[str, dict]:
    if text == "scaled-ema":
        return f"swa_decay={decay ** factor:.5f} (horizon scaled)", {"swa_decay": decay ** factor}
    key, sep, value = text.partition("=")
    if not sep or key not in TrainConfig.__dataclass_fields__:
        raise ValueError(f"--variant {text!r}: give KEY=VALUE with a trainer knob, or 'scaled-ema'")
    try:
        parsed = json.loads(value.lower() if value.lower() in ("true", "false") else value)
    except json.JSONDecodeError:
        parsed = value  # a word: a knob that takes a name
    return text, {key: parsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", type=Path, default=ROOT / "bench/benchmarks/curriculum-demo")
    p.add_argument("--variant", action="append", default=None,
                   help="KEY=VALUE for the trial runs, or scaled-ema (default: scaled-ema and swa_enabled=false); "
                        "none: the parameter table only")
    p.add_argument("--longer", default=None,
                   help="KEY=VALUE: train the subset again at the longer budget with this knob too, and judge every "
                        "set of trial scores against those runs as well (a change to what the retrain ships)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bench = load_benchmark(args.benchmark)
    s = bench.info["settings"]
    base = TrainConfig.from_dict(bench.info["base"])
    texts = [] if args.variant == ["none"] else (args.variant or ["scaled-ema", "swa_enabled=false"])
    try:
        variants = [parse_variant(t, base.swa_decay, int(s["transfer_factor"])) for t in texts]
        longer = parse_variant(args.longer, base.swa_decay, int(s["transfer_factor"])) if args.longer else None
    except ValueError as e:
        p.error(str(e))  # one line, exit status 2, before anything is trained
    long = bench.transfer_scores().mean(axis=1)
    short = bench.main_scores().loc[long.index]
    print(f"{bench.describe()}\n\nSpearman of each parameter with the mean score, over the "
          f"{int((long <= long.min() + 0.5).sum())} transfer recipes within 0.5 BPB of the best at the longer "
          f"budget:\n")
    params = parameter_table(bench, long, short.mean(axis=1))
    print(markdown_table(params))
    records = read_records(args.benchmark / RECORDS_NAME)
    data = Path(base.data_path)
    if (variants or longer) and not data.is_dir():  # the benchmark's corpus, built again as the recording built it
        build_demo(data)
    subset, seeds, t0 = list(long.index), int(s["transfer_seeds"]), time.perf_counter()
    longs = {"as recorded": long}
    if longer:
        longs[longer[0]] = train_variant(records, base, subset, seeds, bench.budget * int(s["transfer_factor"]),
                                         longer[1], args.workers).mean(axis=1)
        gain = longs[longer[0]] - long
        print(f"longer budget with {longer[0]}: {len(subset) * seeds} runs ({time.perf_counter() - t0:.0f}s); "
              f"mean score {gain.mean():+.4f} against the recorded runs, better for {int((gain < 0).sum())} of "
              f"{len(gain)} recipes; best {longs[longer[0]].min():.4f} (recorded {long.min():.4f})", flush=True)
    trials = {f"as recorded (swa_decay {base.swa_decay})": short}
    for name, knob in variants:
        trials[name] = train_variant(records, base, subset, seeds, bench.budget, knob, args.workers)
        print(f"{name}: {len(subset) * seeds} runs ({time.perf_counter() - t0:.0f}s in all)", flush=True)
    best = min(float(v.min()) for v in longs.values())
    rows = [verdict(name, seen, lg, best, longer_name)
            for name, seen in trials.items() for longer_name, lg in longs.items()]
    print(f"\nthe transfer subset's {len(long)} recipes: trial scores (one seed as a sweep sees them) against the mean "
          f"score at {bench.budget * int(s['transfer_factor'])} steps (noise floor there "
          f"{bench.transfer_noise_floor():.4f}); regret: the best of the top k behind the best "
          f"there ({best:.4f}):\n")
    table = pd.DataFrame(rows)
    print(markdown_table(table))
    if args.json:
        args.json.write_text(json.dumps({"parameters": params.to_dict(orient="records"),
                                         "variants": table.to_dict(orient="records")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
