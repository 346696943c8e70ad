"""`write_report(folder)`: `report.md` and its PNG figures (in `report/`) for a sweep or an ablation folder.

A sweep's report holds the leaderboard, learning curves, BPB against each searched knob, parallel
coordinates, importance, rung fidelity, the final retrain and one section per ablation under
`ablations/*/`; an ablation folder's report holds its ablation only. It reads what the folder
holds now, so a running or crashed sweep gets a report too: a section without data says so in
one line. Every file is written atomically; figures no longer linked are removed.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from jepatune.analysis import ablation, explore, plots, schema
from jepatune.analysis.summary import storage_text, storage_use
from jepatune.analysis.tables import Tables, load
from jepatune.atomic import atomic_path, atomic_write_text, unwritable_ancestor
from jepatune.errors import JepatuneError
from jepatune.experiment.layout import (
    ABLATION_NAME,
    ABLATIONS_DIR,
    BEST_NAME,
    FIGURES_DIR,
    FINAL_DIR,
    REPORT_NAME,
    SETTINGS_NAME,
)
from jepatune.experiment.settings import read_metadata, read_settings

LEADERBOARD_ROWS = 10
PROGRESS_AFTER_S = 2.0  # a report slower than this (a big or busy sweep) logs each figure it saves


@dataclass
class _Report:
    """The Markdown lines of a report, the figures saved for it so far, and each section's table (or
    the line saying why it has none), by section title."""

    figures_dir: Path
    lines: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    log: Callable[[str], None] | None = None
    started: float = field(default_factory=time.perf_counter)
    contents: dict[str, pd.DataFrame | str] = field(default_factory=dict)
    current: str = ""

    def section(self, title: str, level: int = 2) -> None:
        heading = ["#" * level + " " + title, ""]
        self.lines += heading if self.lines[-1:] == [""] else ["", *heading]
        self.current = title

    def text(self, *lines: str) -> None:
        self.lines += list(lines)

    def missing(self, why: str) -> None:
        self.lines.append(f"_{why}_")
        self.contents.setdefault(self.current, why)

    def table(self, frame: pd.DataFrame) -> None:
        self.lines += [markdown_table(frame), ""]
        self.contents.setdefault(self.current, frame)

    def figure(self, name: str, fig: Any, alt: str) -> None:
        """Save `fig` as FIGURES_DIR/`name` (atomically) and link it."""
        with atomic_path(self.figures_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=plots.DPI)
        self.saved.append(name)
        self.lines += [f"![{alt}]({FIGURES_DIR}/{name})", ""]
        if self.log is not None and (elapsed := time.perf_counter() - self.started) > PROGRESS_AFTER_S:
            self.log(f"saved {FIGURES_DIR}/{name} ({elapsed:.0f}s into the report)")


def _cell(value: Any) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a GitHub Markdown table (floats to 5 significant digits, missing values blank)."""
    rows = [[_cell(v.item() if hasattr(v, "item") else v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(folder: str | os.PathLike, *, log: Callable[[str], None] | None = None,
                 contents: dict[str, pd.DataFrame | str] | None = None, storage: dict[str, Any] | None = None) -> Path:
    """Write `folder`/report.md and its figures in `folder`/report/; return the report's path.

    `folder`: a sweep (holds sweep.json) or an ablation (holds ablation.json). `log`, when given,
    gets a line per figure saved once the report has taken more than PROGRESS_AFTER_S. `contents`,
    when given, receives each section's first table, or the line saying why it has none, by section
    title (so `jepatune analyze` prints what the report computed instead of computing it again).
    `storage`: the sweep's `storage_use`, when the caller has listed it already."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise JepatuneError(f"{folder} does not exist; give a sweep folder or an ablation folder")
    if (probe := unwritable_ancestor(folder / FIGURES_DIR)) is not None:
        raise JepatuneError(f"cannot write the report of {folder}: {probe} is not writable")
    report = _Report(folder / FIGURES_DIR, log=log)
    if (folder / SETTINGS_NAME).is_file():
        _sweep_report(folder, report, storage or storage_use(folder))
    elif (folder / ABLATION_NAME).is_file():
        _ablation_report(folder, report)
    else:
        raise JepatuneError(f"{folder} holds neither {SETTINGS_NAME} nor {ABLATION_NAME}; give the folder that "
                            f"`jepatune search` or `jepatune ablate` made")
    if contents is not None:
        contents.update(report.contents)
    path = folder / REPORT_NAME
    atomic_write_text(path, "\n".join(report.lines).strip() + "\n")
    for stale in (folder / FIGURES_DIR).glob("*.png"):  # figures of an earlier report that this one lacks
        if stale.name not in report.saved:
            stale.unlink(missing_ok=True)
    return path


# --- a sweep -------------------------------------------------------------------------------------

def _sweep_report(folder: Path, r: _Report, use: dict[str, Any]) -> None:
    meta = read_metadata(folder)
    settings, rungs = meta.get("settings", {}), [int(x) for x in meta.get("rungs", [])]
    tables = load(folder)
    trials = tables.trials
    counts = trials["status"].value_counts().to_dict()
    r.text(f"# Sweep report: {folder.name}", "",
           f"{len(trials)} of {settings.get('samples', '?')} trials "
           f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items())) or 'none started'}) over the "
           f"`{meta.get('space', '?')}` space, {settings.get('trial_steps', '?')} steps each, ASHA rungs at "
           f"steps {', '.join(map(str, rungs))} (fidelity `{settings.get('fidelity', 'snapshot')}`). "
           f"Started {meta.get('started', '?')}; report written "
           f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}. BPB: bits per byte on the validation split (lower is "
           f"better); a trial's BPB is its last value, on the `val_tokens` prefix.")
    if counts.get("incomplete"):
        r.text("", f"{counts['incomplete']} trials had not finished when the tables were built: the sweep is "
                   f"running, or stopped (`jepatune search --resume` continues it).")
    replays = _replay_table(tables, folder)
    _conclusion(r, folder, tables, settings, replays, rungs)
    _leaderboard(r, trials)
    _curves(r, tables, rungs)
    _by_param(r, trials)
    _parallel(r, trials)
    _importance(r, trials)
    _rungs(r, tables)
    _audits(r, tables, settings)
    _replays(r, replays)
    _finalists(r, tables, folder)
    r.section("Storage")
    if use["trials"]:
        r.text(f"The sweep takes {storage_text(use)}.", "")
    else:
        r.missing("no trial has written to the sweep's storage yet")
    r.section("Ablations")
    found = sorted(p.parent for p in (folder / ABLATIONS_DIR).glob(f"*/{ABLATION_NAME}"))
    if not found:
        r.missing(f"no ablation under {ABLATIONS_DIR}/ yet (`jepatune ablate --sweep {folder}` adds one)")
    for sub in found:
        r.section(sub.name, level=3)
        _ablation(r, sub, f"ablation-{_slug(sub.name)}.png")


def _leaderboard(r: _Report, trials: pd.DataFrame) -> None:
    r.section("Leaderboard")
    board = explore.leaderboard(trials, k=LEADERBOARD_ROWS)
    if board.empty:
        r.missing("no trial has run its whole budget yet")
        return
    r.text(f"Trials that ran their whole budget, by final BPB: the best {LEADERBOARD_ROWS} at most, and the "
           f"reference recipe.", "")
    r.table(board)


def _curves(r: _Report, tables: Tables, rungs: list[int]) -> None:
    r.section("Learning curves")
    if tables.curves["val_bpb"].notna().sum() == 0:
        r.missing("no trial has reported yet")
        return
    r.figure("curves.png", plots.learning_curves(tables.trials, tables.curves, rungs), "learning curves")


def _by_param(r: _Report, trials: pd.DataFrame) -> None:
    r.section("BPB against each searched hyperparameter")
    knobs = explore.knob_columns(trials)
    if not knobs or explore.completed_trials(trials).empty:
        r.missing("no completed trial yet" if knobs else "no searched hyperparameter in the trials table")
        return
    r.figure("params.png", plots.bpb_by_param(trials), "BPB against each hyperparameter")
    r.text("Mean BPB per bin of each hyperparameter (quantile bins; by value when few):", "")
    r.table(pd.concat([explore.marginals(trials, k).drop(columns=["low", "high"]).assign(param=k)
                       for k in knobs])[["param", "bin", "count", "mean_bpb", "min_bpb", "std_bpb"]])


def _parallel(r: _Report, trials: pd.DataFrame) -> None:
    r.section("Parallel coordinates")
    if not explore.knob_columns(trials) or trials.empty:
        r.missing("no trial with searched hyperparameters yet")
        return
    r.figure("parallel.png", plots.parallel_coordinates(trials), "parallel coordinates")


def _importance(r: _Report, trials: pd.DataFrame) -> None:
    r.section("Hyperparameter importance")
    try:
        imp = explore.importance(trials, evaluator="ped-anova")
    except JepatuneError as e:
        r.missing(str(e))
        return
    n = len(explore.completed_trials(trials))
    r.text(f"Optuna's PED-ANOVA over the {n} completed trials: how much each knob separates the best trials "
           "from the rest." + (f" With {n} trials this is a hint at most: a knob's importance moves a lot with each "
                               "trial added until there are a few tens." if n < 20 else ""), "")
    r.table(imp)
    r.figure("importance.png", plots.importance_bars(imp), "importance")


def _rungs(r: _Report, tables: Tables) -> None:
    r.section("Rung correlation")
    rungs = explore.rung_correlation(tables.trials, tables.curves, tables.decisions)
    if rungs.empty or explore.completed_trials(tables.trials).empty:
        r.missing("no ASHA rung reached yet" if rungs.empty else "no completed trial to compare the rungs with yet")
        return
    few = int(rungs["n"].max()) if len(rungs) else 0
    r.text("How well each ASHA rung's ranking predicts the final one (Spearman over the `n` completed trials, "
           "with an approximate 95% interval), and whether the eventual best trial would have been stopped there. "
           "Read before trusting the pruning." + (f" With at most {few} trials per rung the intervals span most of "
                                                  "[-1, 1]: a correlation here is no evidence either way."
                                                  if few < 10 else ""), "")
    r.table(rungs)
    r.figure("rungs.png", plots.rung_scatter(tables.trials, tables.curves, rungs), "rung correlation")


def _audits(r: _Report, tables: Tables, settings: dict[str, Any]) -> None:
    r.section("False stops (audit trials)")
    audit = explore.false_stops(tables.trials)
    if not audit.loc[0, "audited"]:
        stops = tables.decisions["decision"].isin(("stop", "audit")).sum() if len(tables.decisions) else 0
        if not settings.get("audit_frac", 0) and settings.get("scheduler", "asha") == "asha":
            r.missing("audits are off (`--audit-frac 0`): no stop is run on, so this sweep cannot say how often its "
                      "pruning is wrong")
        elif not stops:
            r.missing("ASHA stopped no trial: there is nothing to audit")
        else:
            r.missing("the audited trial has not finished yet (the first stop is always audited, then each with "
                      f"probability {settings.get('audit_frac', 0):g})")
        return
    n = int(audit.loc[0, "audited"])
    r.text("Trials ASHA stopped but ran to the end anyway (the first stop, then a random share): a stop is false "
           "when the trial ended better than the median of the trials ASHA kept. The rate's interval is Wilson's "
           f"95%; from {n} audit{'s' if n != 1 else ''} it is {'wide' if n < 10 else 'indicative'}.", "")
    r.table(audit)


def _replay_table(tables: Tables, folder: Path) -> pd.DataFrame:
    from jepatune.analysis.replay import sweep_replays

    s = read_settings(folder)
    return sweep_replays(tables.curves, tables.trials, s.rungs, s.rung_fidelity, s.probe_length)


def _replays(r: _Report, replays: pd.DataFrame) -> None:
    r.section("Other pruning settings, replayed")
    if replays.empty:
        r.missing("nothing to replay yet: it needs completed trials and a rung below the budget")
        return
    r.text("ASHA replayed offline on the recorded rung values of every trial that reported one (pruned trials "
           "with the values they reached, their final unknown), over 100 random arrival orders: trials kept to the "
           "end, how many have a known final (`scored`), the share of orders that stopped the best scored trial, "
           "the compute (an upper bound: a trial promoted past its data counts as run to the end; `compute_low` "
           "the lower) against running all of them to the end. No new training; the full study of fidelities is "
           "`bench/fidelity_study.py`.", "")
    r.table(replays)


def _own_replay(replays: pd.DataFrame, rungs: list[int]) -> pd.Series | None:
    """The replay row of the sweep's own setting (its rungs, on the value ASHA judged)."""
    if replays.empty:
        return None
    own = replays[replays["milestones"].eq(",".join(map(str, rungs[:-1]))).fillna(False).astype(bool).to_numpy()
                  & replays["column"].eq("val_bpb").fillna(False).astype(bool).to_numpy()]
    return own.iloc[0] if len(own) else None


def _pruning_sentence(replays: pd.DataFrame, rungs: list[int]) -> str | None:
    own = _own_replay(replays, rungs)
    if own is None:
        return None
    scored = int(own["scored"])
    text = (f"Replayed over 100 arrival orders of its {int(own['trials'])} trials, this sweep's own ASHA setting "
            f"(rungs {own['milestones']}) stops the best of the {scored} trials with a known final in "
            f"{own['best_stopped']:.0%} of orders, for {own['compute_frac']:.0%} of the compute of running every "
            f"trial to the end")
    safe = replays[replays["best_stopped"].eq(0).to_numpy() & replays["column"].eq("val_bpb").to_numpy()]
    if own["best_stopped"] > 0 and len(safe):
        cheapest = safe.sort_values("compute_frac").iloc[0]
        text += (f"; the cheapest replayed setting that never stopped it is a first rung at step "
                 f"{int(cheapest['grace'])} with reduction factor {cheapest['reduction_factor']:g} "
                 f"({cheapest['compute_frac']:.0%} of the compute)")
    elif own["best_stopped"] > 0:
        text += "; every replayed setting stopped it in some orders: the rungs are too early for this sweep"
    if scored < 10:
        text += f" (from {scored} scored trials only: a hint, not a measurement)"
    return text + "."


def next_ablation(best: Path) -> str:
    """The built-in ablation worth running on the winner (its best.toml), with what it measures: its
    curriculum against CE from step 0 and against no bridge, unless the winner is CE from step 0
    already; then what its weight average is worth."""
    try:
        knobs = tomllib.loads(best.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        knobs = {}
    if knobs.get("jepa_pure_frac") == 0 and knobs.get("ce_pure_frac") == 0:
        return ("swa --seeds 5` measures what the winner's weight average is worth (it trains with cross-entropy "
                "from step 0, so it has no curriculum to ablate).")
    return "jepa-vs-ce --seeds 5` measures what the winner's curriculum is worth, one change at a time."


def _conclusion(r: _Report, folder: Path, tables: Tables, settings: dict[str, Any],
                replays: pd.DataFrame, rungs: list[int]) -> None:
    """The report's first statement: which recipe to use, by how much and how sure; then the next steps."""
    from jepatune.analysis.finalists import conclusion, trial_to_final_spearman

    r.section("Conclusion")
    table = tables.finalists
    if table.empty:
        r.missing("No retrain yet, so no answer: the best trial is one noisy draw at the trial budget, chosen in "
                  f"sample. `jepatune retrain {folder} --final-steps N` retrains the top "
                  f"{settings.get('finalists', 3)} recipes and the reference with seeds no trial used.")
        return
    r.text(conclusion(table), "")
    r.contents.setdefault("Conclusion", conclusion(table))
    rho, k = trial_to_final_spearman(table), int(table["trial_bpb"].notna().sum())
    curse = table.loc[table["finalist"].fillna(False).astype(bool) & ~table["recipe"].eq("reference"),
                      "excess_drift"].mean()
    bullets = [f"- Recipe: `{folder / BEST_NAME}` (`jepatune train --config {folder / BEST_NAME}` trains it "
               "again).",
               f"- Next: `jepatune ablate --sweep {folder} --variants {next_ablation(folder / BEST_NAME)}"]
    if pd.notna(curse):
        spread = table["std"].dropna()
        scale = f"; the seeds' own spread is {spread.min():.3f}-{spread.max():.3f} BPB" if len(spread) else ""
        bullets.append(f"- Winner's curse: the finalists' retrain means moved {curse:+.4f} BPB further from their "
                       f"trial scores than the reference's did (positive: their trial scores flattered them{scale}).")
    if pd.notna(rho):
        bullets.append(f"- Trial budget to final budget: Spearman {rho:+.2f} between trial scores and retrain "
                       f"means over {k} recipes" + (" (too few to say much)." if k < 6 else "."))
    r.text(*bullets)
    if (pruning := _pruning_sentence(replays, rungs)) is not None:
        r.text(f"- Pruning: {pruning}")


def _finalists(r: _Report, tables: Tables, folder: Path) -> None:
    from jepatune.analysis.finalists import trial_to_final_spearman

    r.section("Finalists, retrained out of sample")
    table = tables.finalists
    if table.empty:
        r.missing("no final retrain yet (`jepatune retrain DIR` runs it)")
        return
    steps = tables.final["steps"].dropna()
    r.text(f"The top recipes by trial score and the reference, retrained at {int(steps.iloc[-1])} steps with seeds "
           "no trial used, scored after the int8+zlib round trip on the full val split. The winner is the best "
           "retrain mean. Deltas are paired by seed with 95% t intervals; `drift` = retrain mean - trial score, "
           "`excess_drift` = drift beyond the reference's (the winner's curse).", "")
    r.table(table)
    rho = trial_to_final_spearman(table)
    if pd.notna(rho):
        r.text(f"Rank correlation between the trial scores and the retrain means: Spearman {rho:+.2f} over "
               f"{int(table['trial_bpb'].notna().sum())} recipes.", "")
    r.figure("winners-curse.png", plots.winners_curse(table), "trial score vs retrain")
    r.figure("final.png", plots.final_comparison(tables.final), "finalists vs reference")
    r.figure("retrain-curves.png", plots.retrain_curves(retrain_curves(folder, tables.final)), "retrain curves")


def retrain_curves(folder: Path, final: pd.DataFrame) -> pd.DataFrame:
    """(recipe, seed, step, val_bpb) of each run of the newest retrain, from its metrics.jsonl, read
    where the sweep lives."""
    rows, store = [], read_settings(folder).store
    for run in explore.newest_budget(final).drop_duplicates(["recipe", "seed"], keep="last").itertuples():
        for m in store.read_rows(f"{FINAL_DIR}/{run.recipe}-seed{run.seed}/metrics.jsonl"):
            if not m.get("final") and m.get("val_bpb") is not None:
                rows.append({"recipe": run.recipe, "seed": run.seed, "step": m["step"], "val_bpb": m["val_bpb"]})
    return pd.DataFrame(rows, columns=["recipe", "seed", "step", "val_bpb"])


# --- ablations -----------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "ablation"


def _ablation_report(folder: Path, r: _Report) -> None:
    r.text(f"# Ablation report: {folder.name}", "")
    try:
        meta = json.loads((folder / ABLATION_NAME).read_text())
    except ValueError:  # cut by a crash: the table below still tells the story
        meta = {}
    if isinstance(meta, dict):  # its scalar settings; nested ones (the base recipe) stay in the file
        r.text(*(f"- {k}: {v}" for k, v in meta.items() if isinstance(v, str | int | float | bool)))
    r.section("Deltas vs base")
    _ablation(r, folder, "ablation.png")


def _ablation(r: _Report, folder: Path, figure: str) -> None:
    """The table and the deltas figure of the ablation at `folder`, or one line on what is missing."""
    try:
        table, _ = ablation.load_ablation(folder)  # rebuilt first when its runs are newer
    except (JepatuneError, OSError, ValueError) as e:
        r.missing(f"no ablation table: {str(e).splitlines()[0]}")
        return
    if table.empty:
        r.missing("no finished run yet")
        return
    r.text("Each variant changes one thing from the base, run with the same seeds; delta = variant - base "
           "(negative = better) with the 95% CI of the per-seed differences.", "")
    r.table(table[list(schema.ABLATION)])
    if table["variant"].astype(str).eq(ablation.BASE).all():
        r.missing("no variant beside the base has finished yet")
        return
    r.figure(figure, plots.ablation_deltas(table, folder.name), f"ablation {folder.name}")
