"""One figure per view of a sweep or an ablation: DataFrames in (the tables of
`jepatune.analysis.schema`), a matplotlib Figure out.

Nothing here reads or writes files, and pyplot is never used: each Figure owns an Agg canvas,
so drawing needs no display and keeps no global state. A frame with nothing to draw gives a
figure that says so, never an error. `jepatune.analysis.report` saves them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from jepatune.analysis import explore
from jepatune.experiment.trials import PENALIZED

DPI = 100
RECIPE_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink"]  # orange: the reference
STATUS_COLORS = {"completed": "tab:blue", "pruned": "0.6", "diverged": "tab:red", "infeasible": "tab:purple",
                 "oom": "tab:brown", "errored": "tab:orange", "incomplete": "tab:green"}
REFERENCE_STYLE = dict(marker="*", s=140, color="black", zorder=5, label="reference recipe")
BPB = "val BPB"


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig
    return fig


def _message(text: str, title: str) -> Figure:
    """A small figure that says why there is nothing to draw."""
    fig = _figure(6.0, 1.6)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_title(title)
    ax.set_axis_off()
    return fig


def _flags(column: pd.Series) -> np.ndarray:
    """A nullable boolean column as a numpy mask (NA: False)."""
    return column.fillna(False).astype(bool).to_numpy()


def _statuses(trials: pd.DataFrame) -> pd.Series:
    """trial_id -> status ("incomplete" when unknown)."""
    return trials.drop_duplicates("trial_id").set_index("trial_id")["status"].astype(object).fillna("incomplete")


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# --- learning curves ----------------------------------------------------------------------------

def learning_curves(trials: pd.DataFrame, curves: pd.DataFrame, rungs: Sequence[int] = ()) -> Figure:
    """val_bpb against step for every trial, coloured by status; the reference recipe in black,
    the ASHA rungs as dotted lines. The y axis leaves out the penalty values of diverged,
    infeasible and out-of-memory trials (their lines leave the top of the plot)."""
    title = "Learning curves (val BPB on the val_tokens prefix, at each evaluation)"
    points = curves.dropna(subset=["step", "val_bpb"])
    if points.empty:
        return _message("no learning curves yet: no trial has reported", title)
    status = _statuses(trials)
    reference = set(trials.loc[_flags(trials["is_reference"]), "trial_id"])
    fig = _figure()
    ax = fig.add_subplot()
    counts: dict[str, int] = {}
    sane = []
    for trial_id, curve in points.groupby("trial_id", sort=False):
        s = str(status.get(trial_id, "incomplete"))
        counts[s] = counts.get(s, 0) + 1
        curve = curve.sort_values("step")
        is_ref = trial_id in reference
        ax.plot(curve["step"].astype(float), curve["val_bpb"].astype(float), marker="o", ms=2.5,
                color="black" if is_ref else STATUS_COLORS.get(s, "black"), lw=2.2 if is_ref else 1.1,
                alpha=1.0 if is_ref or s == "completed" else 0.7, zorder=4 if is_ref else 3 if s == "completed" else 2)
        if s not in PENALIZED:
            sane.append(curve["val_bpb"].astype(float))
    for rung in rungs:
        ax.axvline(rung, color="0.8", lw=0.8, ls=":", zorder=0)
    if sane:
        values = pd.concat(sane)
        pad = 0.03 * max(values.max() - values.min(), 0.1)
        ax.set_ylim(values.min() - pad, values.max() + pad)
    handles = [Line2D([], [], color=STATUS_COLORS.get(s, "black"), label=f"{s} ({n})") for s, n in counts.items()]
    if reference & set(points["trial_id"]):
        handles.append(Line2D([], [], color="black", lw=2.2, label="reference recipe"))
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="optimiser step", ylabel=BPB, title=title)
    ax.grid(alpha=0.3)
    return fig


# --- BPB against each hyperparameter ------------------------------------------------------------

def bpb_by_param(trials: pd.DataFrame, bins: int = 5) -> Figure:
    """One panel per searched hyperparameter: the final BPB of each completed trial against its
    value, with the mean BPB per bin of `explore.marginals` (orange) and the reference (star)."""
    title = ("Final val BPB against each searched hyperparameter "
             "(completed trials; orange: mean per bin; star: reference)")
    knobs = explore.knob_columns(trials)
    done = explore.completed_trials(trials)
    if not knobs or done.empty:
        return _message("no completed trial yet" if knobs else "no searched hyperparameter in the trials table",
                        title)
    ncols = min(3, len(knobs))
    nrows = math.ceil(len(knobs) / ncols)
    fig = _figure(3.6 * ncols, 2.9 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for i, (ax, knob) in enumerate(zip(axes.flat, knobs, strict=False)):
        _param_panel(ax, done, knob, explore.marginals(trials, knob, bins=bins))
        if i % ncols == 0:
            ax.set_ylabel(BPB)
    for ax in axes.flat[len(knobs):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def _param_panel(ax: Axes, done: pd.DataFrame, knob: str, marginals: pd.DataFrame) -> None:
    rows = done[done[knob].notna().to_numpy()]
    y = rows["last_val_bpb"].astype(float)
    if explore.is_numeric(rows[knob]):
        x = rows[knob].astype(float)
        if explore.is_log(x):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range collide
        for m in marginals.itertuples():
            if m.low < m.high:
                ax.hlines(m.mean_bpb, m.low, m.high, color="tab:orange", lw=2.5, zorder=2)
            else:
                ax.plot([m.low], [m.mean_bpb], marker="_", ms=18, mew=2.5, color="tab:orange", zorder=2)
    else:
        categories = sorted({str(v) for v in rows[knob]})
        x = rows[knob].map(lambda v: categories.index(str(v))).astype(float)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        means = marginals.set_index(marginals["bin"].astype(str))["mean_bpb"]
        ax.plot(range(len(categories)), [means.get(c, math.nan) for c in categories], ls="none", marker="_",
                ms=24, mew=2.5, color="tab:orange", zorder=2)
    ax.scatter(x, y, s=18, color="tab:blue", alpha=0.8, zorder=3)
    ref = _flags(rows["is_reference"])
    if ref.any():
        ax.scatter(x[ref], y[ref], **REFERENCE_STYLE)
    ax.set_xlabel(knob)
    ax.grid(alpha=0.3)


# --- parallel coordinates ------------------------------------------------------------------------

def _unit_scale(values: pd.Series) -> tuple[pd.Series, list[tuple[float, str]]]:
    """Values mapped to [0, 1] (log10 first for a log-scale knob; categories evenly spaced) and the
    axis labels to draw: (position, text)."""
    present = values.dropna()
    if explore.is_numeric(values):
        v = values.astype(float)
        log = explore.is_log(present.astype(float))
        scaled = np.log10(v) if log else v
        lo, hi = (scaled.min(), scaled.max()) if len(present) else (0.0, 0.0)
        if not hi > lo:
            return v.where(v.isna(), 0.5), ([(0.5, _fmt(present.iloc[0]))] if len(present) else [])
        return (scaled - lo) / (hi - lo), [(0.0, _fmt(present.astype(float).min())),
                                           (1.0, _fmt(present.astype(float).max()))]
    categories = sorted({str(v) for v in present})
    spots = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
    return values.map(lambda v: math.nan if pd.isna(v) else spots[str(v)]).astype(float), \
        [(p, c) for c, p in spots.items()]


def parallel_coordinates(trials: pd.DataFrame) -> Figure:
    """Each trial a line across the searched hyperparameters (scaled to each axis's range; log
    axes for log-scale knobs), then its final BPB: completed trials coloured by BPB (dark: best),
    the others in grey over the hyperparameters only."""
    title = "Parallel coordinates: searched hyperparameters and final val BPB"
    knobs = explore.knob_columns(trials)
    if not knobs or trials.empty:
        return _message("no trial with searched hyperparameters yet", title)
    done = _flags(trials["status"].eq("completed") & trials["last_val_bpb"].notna())
    scaled = pd.DataFrame({k: _unit_scale(trials[k])[0] for k in knobs}, index=trials.index)
    ticks = {i: _unit_scale(trials[k])[1] for i, k in enumerate(knobs)}
    names = list(knobs)
    fig = _figure(max(6.0, 1.5 * (len(knobs) + 1) + 1.5), 4.5)
    ax = fig.add_subplot()
    for _, row in scaled[~done].iterrows():
        ax.plot(range(len(knobs)), row.to_numpy(float), color="0.75", lw=0.9, zorder=1)
    if done.any():
        bpb, bpb_ticks = _unit_scale(trials.loc[done, "last_val_bpb"].astype(float))
        ticks[len(knobs)] = bpb_ticks
        names.append("final " + BPB)
        values = trials.loc[done, "last_val_bpb"].astype(float)
        norm = Normalize(values.min(), values.max() if values.max() > values.min() else values.min() + 1e-9)
        cmap = matplotlib.colormaps["viridis"]
        for index in values.sort_values(ascending=False).index:  # the best drawn last, on top
            ax.plot(range(len(names)), [*scaled.loc[index].to_numpy(float), bpb[index]],
                    color=cmap(norm(values[index])), lw=2.0 if values[index] == values.min() else 1.3, zorder=2)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="final " + BPB, pad=0.01)
    for i in range(len(names)):
        ax.axvline(i, color="0.3", lw=0.8, zorder=0)
        for pos, text in ticks.get(i, []):
            ax.text(i + 0.03, pos, text, fontsize=7, va="center", ha="left", zorder=6,
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7))
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) - 0.6)
    ax.set_ylim(-0.06, 1.06)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title + ("" if done.all() else " (grey: stopped early or unfinished)"))
    return fig


# --- importance, rung fidelity --------------------------------------------------------------------

def importance_bars(importance: pd.DataFrame) -> Figure:
    """Horizontal bars of `explore.importance`, most important on top."""
    title = "Hyperparameter importance"
    if importance.empty:
        return _message("no importance to show", title)
    imp = importance.sort_values("importance", kind="stable")
    fig = _figure(7.0, 1.2 + 0.45 * len(imp))
    ax = fig.add_subplot()
    ax.barh(imp["param"].astype(str), imp["importance"].astype(float), color="tab:blue")
    for y, v in enumerate(imp["importance"].astype(float)):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(float(imp["importance"].max()), 1e-9) * 1.15)
    ax.set(xlabel="importance (sums to 1)", title=f"{title} ({imp['evaluator'].iloc[0]}, completed trials)")
    return fig


def rung_scatter(trials: pd.DataFrame, curves: pd.DataFrame, rungs: pd.DataFrame) -> Figure:
    """One panel per ASHA rung (`rungs`: `explore.rung_correlation`): each completed trial's val_bpb
    at the rung against its final val_bpb, the largest cut-off ASHA applied there (dashed), the
    best trial as a star, and the rung's Spearman correlation in the title."""
    title = "Does an early rung predict the final BPB? (completed trials)"
    done = explore.completed_trials(trials)
    if rungs.empty or done.empty:
        return _message("no completed trial yet" if not rungs.empty else "no ASHA rung below the budget", title)
    final = done.drop_duplicates("trial_id").set_index("trial_id")["last_val_bpb"].astype(float)
    best = final.idxmin()
    ncols = min(4, len(rungs))
    nrows = math.ceil(len(rungs) / ncols)
    fig = _figure(3.3 * ncols + 0.5, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for i, (ax, row) in enumerate(zip(axes.flat, rungs.itertuples(), strict=False)):
        at = curves[_flags(curves["step"].eq(row.rung))].drop_duplicates("trial_id", keep="last")
        both = pd.concat([at.set_index("trial_id")["val_bpb"].astype(float), final], axis=1, join="inner",
                         keys=["rung", "final"]).dropna()
        ax.scatter(both["rung"], both["final"], s=18, color="tab:blue", zorder=3)
        if best in both.index:
            ax.scatter([both.loc[best, "rung"]], [both.loc[best, "final"]], marker="*", s=140, color="tab:green",
                       zorder=4, label="best trial")
        if pd.notna(row.cutoff):
            ax.axvline(row.cutoff, color="tab:red", ls="--", lw=1, label="largest ASHA cut-off")
        rho = "n/a" if pd.isna(row.spearman) else f"{row.spearman:.2f}"
        ax.set_title(f"step {row.rung}: Spearman {rho}, n={row.n}", fontsize=9)
        ax.set_xlabel(f"{BPB} at step {row.rung}")
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("final " + BPB)
    for ax in axes.flat[len(rungs):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


# --- deltas with intervals: ablations and the final retrain ----------------------------------------

def ablation_deltas(ablation: pd.DataFrame, name: str = "ablation") -> Figure:
    """Each variant's delta vs the base (negative = better) with its 95% interval: green when
    significantly better, red when significantly worse, grey otherwise. `ablation`: one row a
    variant, base first (columns: `jepatune.analysis.schema.ABLATION`)."""
    title = f"Ablation {name}: val BPB change vs base"
    base = ablation[ablation["variant"].astype(str).eq("base").to_numpy()]
    variants = ablation[~ablation["variant"].astype(str).eq("base").to_numpy()]
    if variants.empty:
        return _message("no variant beside the base yet", title)
    fig = _figure(8.0, 1.4 + 0.5 * len(variants))
    ax = fig.add_subplot()
    ys = np.arange(len(variants))[::-1]  # the first variant on top
    for y, row in zip(ys, variants.itertuples(), strict=True):
        significant = bool(row.significant) if pd.notna(row.significant) else False
        color = ("tab:green" if row.delta < 0 else "tab:red") if significant else "0.45"
        if pd.notna(row.ci_low) and pd.notna(row.ci_high):
            # clipped at 0: a zero-width interval (identical differences) can round to -1e-16 either side
            arms = [[max(0.0, row.delta - row.ci_low)], [max(0.0, row.ci_high - row.delta)]]
            ax.errorbar([row.delta], [y], xerr=arms, fmt="o", color=color, capsize=4, lw=1.6)
        else:
            ax.plot([row.delta], [y], "o", color=color)
    labels = [f"{v}: {c}" if pd.notna(c) and str(c) and str(c) != str(v) else str(v)
              for v, c in zip(variants["variant"], variants["change"], strict=True)]
    ax.set_yticks(ys, [t if len(t) <= 48 else t[:47] + "…" for t in labels], fontsize=8)
    ax.axvline(0, color="0.2", lw=1)
    if len(base) and pd.notna(base["mean_bpb"].iloc[0]):
        b = base.iloc[0]
        title += f" (base {b['mean_bpb']:.4f} BPB, n={b['n']})"
    handles = [Line2D([], [], color=c, marker="o", ls="-", label=t) for c, t in
               (("tab:green", "significantly better"), ("tab:red", "significantly worse"), ("0.45", "not significant"))]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set(xlabel="Δ val BPB vs base, mean with 95% CI (negative = better)", title=title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _recipe_order(recipes: Sequence[str]) -> list[str]:
    """The reference first, then the rest by name."""
    return sorted(recipes, key=lambda r: (r != "reference", r))


def final_comparison(final: pd.DataFrame) -> Figure:
    """The final retrain at equal budget: each seed's post-quant val_bpb per recipe (the same seed
    joined across recipes), the mean with its 95% t interval, and the paired delta in the title."""
    title = "Retrained recipes at equal budget\n(val BPB after the int8+zlib round trip, full val split)"
    ok = final[_flags(final["status"].isna() | final["status"].eq("completed")) & final["val_bpb"].notna().to_numpy()]
    if ok.empty:
        return _message("no finished retrain run yet", title)
    recipes = _recipe_order(list(ok["recipe"].astype(str).unique()))
    at = {r: i for i, r in enumerate(recipes)}
    fig = _figure(max(7.0, 2.2 * len(recipes) + 2), 4.5)
    ax = fig.add_subplot()
    for _, runs in ok.groupby("seed"):  # paired seeds
        if runs["recipe"].nunique() > 1:
            runs = runs.assign(x=runs["recipe"].astype(str).map(at)).sort_values("x")
            ax.plot(runs["x"] - 0.08, runs["val_bpb"].astype(float), color="0.8", lw=0.8, zorder=1)
    for recipe, runs in ok.groupby(ok["recipe"].astype(str)):
        x, v = at[recipe], runs["val_bpb"].astype(float)
        ax.scatter(np.full(len(v), x - 0.08), v, s=28, color="tab:orange" if recipe == "reference" else "tab:blue",
                   zorder=3, label="per seed" if x == 0 else None)
        half = explore.t_quantile_975(len(v) - 1) * v.std() / math.sqrt(len(v)) if len(v) > 1 else 0.0
        ax.errorbar([x + 0.1], [v.mean()], yerr=[[half], [half]], fmt="s", color="black", capsize=5, zorder=4,
                    label="mean, 95% CI" if x == 0 else None)
        ax.annotate(f"{v.mean():.4f}\n(n={len(v)})", (x + 0.16, v.mean()), fontsize=8, va="center")
    deltas = explore.compare_final(ok).dropna(subset=["delta"])
    notes = [f"{r.recipe} − reference: {r.delta:+.4f}" + (f", paired 95% CI [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
                                                          if r.paired else ", no paired CI")
             for r in deltas.itertuples()]
    steps = ok["steps"].dropna().unique()
    budget = f"{int(steps[0])} steps each" if len(steps) == 1 else "budgets differ"
    ax.set_xticks(range(len(recipes)), recipes)
    ax.set_xlim(-0.6, len(recipes) - 0.3)
    ax.set(ylabel=f"{BPB} ({budget})", title=title if not notes else title + "\n" + "; ".join(notes))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def winners_curse(finalists: pd.DataFrame) -> Figure:
    """Each retrained recipe's trial score (x) against its retrain mean with a 95% t interval (y). The
    dashed line is the reference's own drift from trial to retrain: a finalist above it lost more
    than the reference did, what its selection on one noisy trial had flattered (the winner's curse)."""
    title = "Trial score vs retrain (the winner's curse)"
    rows = finalists.dropna(subset=["trial_bpb", "mean"])
    if rows.empty:
        return _message("no retrained recipe with a trial score yet", title)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for row in rows.itertuples():
        n = int(row.n)
        half = explore.t_quantile_975(n - 1) * row.std / math.sqrt(n) if n > 1 and pd.notna(row.std) else 0.0
        color = "tab:orange" if row.recipe == "reference" else "tab:green" if row.winner else "tab:blue"
        ax.errorbar([row.trial_bpb], [row.mean], yerr=[[half], [half]], fmt="o", color=color, capsize=4, zorder=3)
        ax.annotate(f"{row.recipe}" + (" (winner)" if row.winner else ""), (row.trial_bpb, row.mean), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")
    lo, hi = float(rows["trial_bpb"].min()), float(rows["trial_bpb"].max())
    pad = max(hi - lo, 0.01) * 0.2
    xs = np.array([lo - pad, hi + pad])
    ref = rows[rows["recipe"].eq("reference")]
    if len(ref):
        drift = float(ref["drift"].iloc[0])
        ax.plot(xs, xs + drift, "--", color="tab:orange", lw=1, label=f"reference's drift ({drift:+.3f})")
        ax.legend(fontsize=8)
    ax.set(xlabel=f"trial score ({BPB}, trial budget, val prefix)", ylabel=f"retrain mean ({BPB}, full val)",
           title=title)
    ax.grid(alpha=0.3)
    return fig


def retrain_curves(curves: pd.DataFrame) -> Figure:
    """Val BPB against step of every retrain run (columns recipe, seed, step, val_bpb; the val prefix
    its evaluations use), one colour per recipe: a curve still falling at the end wants a longer
    budget, one that turns up before it a stream or schedule that pulls the model away."""
    title = "Retrain runs: val BPB during training (val prefix)"
    if curves.empty:
        return _message("no retrain run has reported yet", title)
    fig = _figure()
    ax = fig.add_subplot()
    recipes = _recipe_order(list(curves["recipe"].astype(str).unique()))
    others = iter(RECIPE_COLORS * len(recipes))
    colors = {r: ("tab:orange" if r == "reference" else next(others)) for r in recipes}
    for (recipe, _), run in curves.groupby(["recipe", "seed"], sort=False):
        run = run.sort_values("step")
        ax.plot(run["step"], run["val_bpb"], color=colors[str(recipe)], lw=1, alpha=0.8)
    ax.legend(handles=[Line2D([], [], color=colors[r], label=r) for r in recipes], fontsize=8)
    # A pure-JEPA start leaves the CE head untrained (BPB far above 8): show the part that decides.
    late = curves.loc[curves["step"] >= 0.2 * curves["step"].max(), "val_bpb"].astype(float)
    if len(late):
        span = max(late.max() - late.min(), 0.05)
        ax.set_ylim(late.min() - 0.1 * span, late.max() + 0.5 * span)
    ax.set(xlabel="step", ylabel=BPB, title=title)
    ax.grid(alpha=0.3)
    return fig
