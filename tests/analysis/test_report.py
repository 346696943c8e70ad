"""Figures and report.md: each plot on small hand-built frames, then the report of a real sweep, of a
crashed one, of one that never started and of an ablation folder."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_sweep
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from jepatune.analysis import plots, schema
from jepatune.analysis.report import markdown_table, write_report
from jepatune.analysis.tables import write_parquet
from jepatune.cli import main
from jepatune.errors import JepatuneError
from jepatune.experiment.layout import FIGURES_DIR, REPORT_NAME

PNG = b"\x89PNG\r\n\x1a\n"
KNOBS = {"jepa_pure_frac": "float64", "sigreg_weight": "float64", "regularizer": "string", "swa_enabled": "boolean"}
LINK = re.compile(r"\]\(([^)]+)\)")


def table(columns: dict[str, str], rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def trials(rows: list[dict]) -> pd.DataFrame:
    """A trials table; unset fields: completed at 16 steps, not the reference."""
    defaults = {"status": "completed", "is_reference": False, "step": 16, "trial_steps": 16}
    return table({**schema.TRIALS, **KNOBS}, [{**defaults, "trial_id": f"t{i}", **r} for i, r in enumerate(rows)])


def png(fig: Figure) -> bytes:
    """The figure drawn as PNG (layout and text are resolved only when drawn)."""
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    assert data.startswith(PNG) and len(data) > 1024
    return data


def message(fig: Figure) -> str:
    png(fig)
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


# --- each figure on hand-built frames --------------------------------------------------------------

SEARCHED = [  # a categorical, a bool, a log-scale float and a float with one value
    {"jepa_pure_frac": 0.1, "sigreg_weight": 1e-3, "regularizer": "varcov", "swa_enabled": True, "last_val_bpb": 5.0,
     "is_reference": True},
    {"jepa_pure_frac": 0.1, "sigreg_weight": 1e-1, "regularizer": "lejepa", "swa_enabled": False, "last_val_bpb": 4.6},
    {"jepa_pure_frac": 0.1, "sigreg_weight": 1.0, "regularizer": "lejepa", "swa_enabled": True, "last_val_bpb": 4.8},
    {"jepa_pure_frac": 0.1, "sigreg_weight": 1e-2, "regularizer": "none", "swa_enabled": None, "last_val_bpb": 6.0,
     "status": "pruned", "step": 4},
    {"jepa_pure_frac": 0.1, "sigreg_weight": 0.5, "regularizer": "varcov", "swa_enabled": False, "last_val_bpb": 10.0,
     "status": "diverged", "step": 8},
]


def curves_of(rows: list[tuple[str, int, float]]) -> pd.DataFrame:
    return table(schema.CURVES, [{"trial_id": t, "step": s, "val_bpb": v} for t, s, v in rows])


CURVES = [("t0", 4, 6.0), ("t0", 16, 5.0), ("t1", 4, 5.5), ("t1", 16, 4.6), ("t2", 4, 5.8), ("t2", 16, 4.8),
          ("t3", 4, 6.0), ("t4", 4, 7.0), ("t4", 8, 10.0)]


def test_learning_curves_colour_each_trial_by_status_and_keep_the_penalty_off_the_scale():
    fig = plots.learning_curves(trials(SEARCHED), curves_of(CURVES), rungs=(4, 8))
    png(fig)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]  # not the dotted rungs
    colours = [to_rgba(ln.get_color()) for ln in lines]
    assert len(lines) == 5 and colours[0] == to_rgba("black")  # the reference first, in black
    assert colours[3] == to_rgba(plots.STATUS_COLORS["pruned"]) and colours[4] == to_rgba("tab:red")
    assert ax.get_ylim()[1] < 10.0  # the diverged trial's penalty value leaves the top
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"completed (3)", "pruned (1)", "diverged (1)", "reference recipe"} <= labels


def test_every_figure_says_so_when_it_has_nothing_to_draw():
    none = trials([])
    assert "no learning curves" in message(plots.learning_curves(none, curves_of([])))
    assert "no completed trial" in message(plots.bpb_by_param(trials([{**SEARCHED[3]}])))
    assert "no trial" in message(plots.parallel_coordinates(none))
    assert "no importance" in message(plots.importance_bars(pd.DataFrame(columns=["param", "importance"])))
    rungs = pd.DataFrame(columns=["rung", "n", "spearman", "cutoff", "best_stopped_here", "stopped"])
    assert "no ASHA rung" in message(plots.rung_scatter(trials(SEARCHED), curves_of(CURVES), rungs))
    assert "no finished retrain" in message(plots.final_comparison(table(schema.FINAL, [])))
    assert "no variant" in message(plots.ablation_deltas(ablation_rows()[:1]))


def test_bpb_by_param_draws_a_panel_per_knob_with_one_valued_and_categorical_knobs():
    fig = plots.bpb_by_param(trials(SEARCHED))
    png(fig)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in panels] == list(KNOBS)
    by_knob = dict(zip(KNOBS, panels, strict=True))
    assert by_knob["sigreg_weight"].get_xscale() == "log"  # 1e-3 .. 1
    assert [t.get_text() for t in by_knob["regularizer"].get_xticklabels()] == ["lejepa", "varcov"]  # completed
    one = by_knob["jepa_pure_frac"]  # every trial at 0.1: one group, drawn as a marker
    assert len(one.collections[0].get_offsets()) == 3 and one.get_xscale() == "linear"


def test_parallel_coordinates_scale_categorical_bool_and_log_knobs():
    fig = plots.parallel_coordinates(trials(SEARCHED))
    png(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*KNOBS, "final val BPB"]
    texts = {t.get_text() for t in ax.texts}
    assert {"lejepa", "none", "varcov", "True", "False", "0.001", "1", "0.1"} <= texts
    grey = [ln for ln in ax.get_lines() if to_rgba(ln.get_color()) == to_rgba("0.75")]
    coloured = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(KNOBS) + 1]
    assert len(grey) == 2 and len(coloured) == 3  # pruned and diverged: knobs only
    best = coloured[-1]  # drawn last, on top
    assert best.get_ydata()[-1] == 0.0 and best.get_linewidth() > coloured[0].get_linewidth()
    assert "grey" in ax.get_title()


def test_importance_bars_put_the_most_important_on_top():
    imp = pd.DataFrame({"param": ["a", "b", "c"], "importance": [0.6, 0.3, 0.1], "evaluator": "ped-anova"})
    fig = plots.importance_bars(imp)
    png(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["c", "b", "a"]
    assert "ped-anova" in fig.axes[0].get_title()


def test_rung_scatter_shows_each_rung_with_its_spearman_and_cutoff():
    from jepatune.analysis import explore

    t = trials([{"last_val_bpb": v} for v in (5.0, 4.6, 4.8, 4.7)])
    c = curves_of([(f"t{i}", 4, v) for i, v in enumerate((6.0, 5.5, 5.8, 5.6))]
                  + [("t0", 8, 5.4), ("t1", 8, 5.0)])
    decisions = table(schema.DECISIONS, [{"trial_id": "t1", "rung": 4, "step": 4, "value": 5.5, "cutoff": 5.9,
                                          "decision": "continue"},
                                         {"trial_id": "t0", "rung": 8, "step": 8, "value": 5.4, "cutoff": None,
                                          "decision": "continue"}])
    rungs = explore.rung_correlation(t, c, decisions)
    fig = plots.rung_scatter(t, c, rungs)
    png(fig)
    first, second = fig.axes[:2]
    assert first.get_title() == "step 4: Spearman 1.00, n=4" and second.get_title() == "step 8: Spearman n/a, n=2"
    assert [ln.get_xdata()[0] for ln in first.get_lines()] == [5.9]  # the cut-off line
    assert not second.get_lines()


def test_final_comparison_joins_seeds_and_gives_the_paired_delta():
    rows = [("reference", 0, 5.3), ("reference", 1, 5.4), ("best", 0, 5.0), ("best", 1, 5.2),
            ("best", 2, 99.0)]  # seed 2 diverged below
    final = table(schema.FINAL, [{"recipe": r, "seed": s, "val_bpb": v, "steps": 300,
                                  "status": "diverged" if v > 50 else "completed"} for r, s, v in rows])
    fig = plots.final_comparison(final)
    png(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["reference", "best"]
    assert "best − reference: -0.2500, paired 95% CI [" in ax.get_title()
    assert "300 steps each" in ax.get_ylabel()
    joined = [ln for ln in ax.get_lines() if to_rgba(ln.get_color()) == to_rgba("0.8")]
    assert len(joined) == 2  # seeds 0 and 1, each run by both recipes
    assert ax.get_ylim()[1] < 50  # the diverged run is not drawn


def ablation_rows() -> pd.DataFrame:
    rows = [("base", "", 3, 5.0, 0.1, math.nan, math.nan, math.nan, False),
            ("lejepa", "regularizer=lejepa", 3, 4.8, 0.1, -0.2, -0.3, -0.1, True),
            ("no_swa", "swa_enabled=False", 3, 5.3, 0.1, 0.3, 0.1, 0.5, True),
            ("long_jepa", "jepa_pure_frac=0.3 | a long change text that goes on and on", 3, 5.05, 0.2, 0.05, -0.2,
             0.3, False),
            ("one_seed", "seed=1", 1, 5.1, math.nan, 0.1, math.nan, math.nan, False)]
    return table(schema.ABLATION, [dict(zip(schema.ABLATION, (*r, ""), strict=True)) for r in rows])


def test_ablation_deltas_colour_by_significance():
    fig = plots.ablation_deltas(ablation_rows(), "quick")
    png(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:3] == ["lejepa: regularizer=lejepa", "no_swa: swa_enabled=False",
                          "long_jepa: jepa_pure_frac=0.3 | a long change t…"]  # in order, cut at 48
    heights = [t.get_position()[1] for t in ax.get_yticklabels()]
    assert heights == sorted(heights, reverse=True)  # the first variant on top
    colours = [to_rgba(c.lines[0].get_color()) for c in ax.containers]
    assert colours == [to_rgba("tab:green"), to_rgba("tab:red"), to_rgba("0.45")]  # one_seed: no interval
    assert "base 5.0000 BPB, n=3" in ax.get_title()


def test_ablation_deltas_of_a_table_built_from_runs():
    from jepatune.analysis.ablation import ablation_table

    bpb = {"base": (5.0, 5.1, 5.2), "lejepa": (4.7, 4.8, 4.9), "no_swa": (5.0, 5.3, 5.1)}
    runs = table(schema.ABLATION_RUNS, [{"variant": v, "change": "" if v == "base" else f"{v} on", "seed": s,
                                         "val_bpb": b, "steps": 8, "status": "completed"}
                                        for v, values in bpb.items() for s, b in enumerate(values)])
    fig = plots.ablation_deltas(ablation_table(runs), "runs")
    png(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lejepa: lejepa on", "no_swa: no_swa on"]
    (lejepa, no_swa) = ax.containers
    assert lejepa.lines[0].get_xdata()[0] == pytest.approx(-0.3)  # every seed 0.3 better: a zero-width CI
    assert to_rgba(lejepa.lines[0].get_color()) == to_rgba("tab:green")
    assert to_rgba(no_swa.lines[0].get_color()) == to_rgba("0.45")  # +0.0333 with a CI across 0


def test_markdown_table_escapes_pipes_and_blanks_missing_values():
    text = markdown_table(ablation_rows()[["variant", "change", "delta", "significant"]])
    lines = text.splitlines()
    assert lines[:2] == ["| variant | change | delta | significant |", "| --- | --- | --- | --- |"]
    assert lines[2] == "| base |  |  | False |"
    assert "jepa_pure_frac=0.3 \\| a long" in lines[5] and lines[3].endswith("| -0.2 | True |")


# --- the report of a real sweep ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory, finished_sweep_folder):
    """A copy of the session's finished sweep (8 trials, a 2-seed retrain), a hand-built ablation beside it."""
    settings = copy_sweep(finished_sweep_folder, tmp_path_factory.mktemp("report"))
    ablation_folder(settings.folder / "ablations" / "quick")
    return settings.folder


def ablation_folder(folder: Path) -> Path:
    """An ablation folder as `jepatune ablate` leaves it: its plan, then its tables (newer than the plan)."""
    (folder / "tables").mkdir(parents=True)
    (folder / "ablation.json").write_text(json.dumps({"name": folder.name, "seeds": 3, "runs": []}))
    os.utime(folder / "ablation.json", ns=(1, 1))
    write_parquet(table(schema.ABLATION_RUNS, []), folder / "tables" / "ablation_runs.parquet")
    write_parquet(ablation_rows(), folder / "tables" / "ablation.parquet")
    return folder


def linked(folder: Path) -> list[Path]:
    """The files report.md links, after checking each is a relative path inside `folder`."""
    targets = LINK.findall((folder / REPORT_NAME).read_text())
    assert all(not Path(t).is_absolute() for t in targets), targets
    return [folder / t for t in targets]


def check_figures(folder: Path) -> set[str]:
    """Every linked file exists and is a valid PNG over 1 KB; every PNG in report/ is linked; no
    temporary file is left. Returns the linked figure names."""
    paths = linked(folder)
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 1024, path
    assert sorted(paths) == sorted((folder / FIGURES_DIR).glob("*")), "a figure not linked, or a stray file"
    assert not list(folder.glob(".tmp-*")) and not list((folder / FIGURES_DIR).glob(".tmp-*"))
    return {p.name for p in paths}


SECTIONS = ["Conclusion", "Leaderboard", "Learning curves", "BPB against each searched hyperparameter",
            "Parallel coordinates", "Hyperparameter importance", "Rung correlation", "False stops (audit trials)",
            "Other pruning settings, replayed", "Finalists, retrained out of sample", "Storage", "Ablations"]
FINALISTS = "Finalists, retrained out of sample"


def one_line(body: str) -> bool:
    """A section that says in one italic line why it has nothing to show."""
    return "\n" not in body and body.startswith("_") and body.endswith("_")


def sections(text: str) -> dict[str, str]:
    """## heading -> its body."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts), 2)}


def test_analyze_writes_a_report_whose_links_are_all_valid_figures(sweep, capsys, monkeypatch):
    from jepatune.analysis import report, summary

    listings = []  # on an object store each listing is requests: analyze lists the sweep's storage once

    def counted(folder, real=summary.storage_use):
        listings.append(folder)
        return real(folder)

    monkeypatch.setattr(summary, "storage_use", counted)
    monkeypatch.setattr(report, "storage_use", counted)
    assert main(["analyze", str(sweep)]) == 0
    assert len(listings) == 1
    out = capsys.readouterr().out
    assert f"report: {sweep / REPORT_NAME}" in out and "top trials" in out  # the leaderboard as before
    names = check_figures(sweep)
    assert {"curves.png", "params.png", "parallel.png", "rungs.png", "final.png", "winners-curse.png",
            "retrain-curves.png", "ablation-quick.png"} <= names
    text = (sweep / REPORT_NAME).read_text()
    body = sections(text)
    assert list(body) == SECTIONS
    for title in ("Leaderboard", "Rung correlation", "Other pruning settings, replayed", FINALISTS):
        assert "\n| --- |" in body[title], title  # a Markdown table
    assert "other ASHA settings replayed" in out
    assert re.match(r"The sweep takes [\d.]+ [kMG]?B at .+, [\d.]+ [kMG]?B per trial over \d+ trials", body["Storage"])
    assert "storage: " in out  # analyze prints it too
    assert "| finalist-1 |" in body[FINALISTS] and "| reference |" in body[FINALISTS]
    # The report opens with its answer: which recipe, by how much, how sure; then what to run next.
    from jepatune.analysis.finalists import conclusion
    from jepatune.analysis.tables import load_tables

    answer = conclusion(load_tables(sweep)["finalists"])
    assert body["Conclusion"].startswith(answer) and "best.toml" in body["Conclusion"]
    assert "jepatune ablate --sweep" in body["Conclusion"] and "- Pruning: Replayed over 100" in body["Conclusion"]
    assert text.index(answer) < text.index("## Leaderboard")
    # importance needs 2 completed trials with different BPB: a figure, or one line saying why not
    assert "importance.png" in names or one_line(body["Hyperparameter importance"])
    assert "### quick" in body["Ablations"] and "| lejepa | regularizer=lejepa |" in body["Ablations"]


def test_a_new_report_replaces_the_figures_of_the_old_one(sweep):
    write_report(sweep)
    stale = sweep / FIGURES_DIR / "param-removed.png"
    stale.write_bytes(PNG)
    before = (sweep / FIGURES_DIR / "curves.png").stat().st_mtime_ns
    os.utime(sweep / FIGURES_DIR / "curves.png", ns=(before - 10**9, before - 10**9))
    assert write_report(sweep) == sweep / REPORT_NAME
    assert not stale.exists() and (sweep / FIGURES_DIR / "curves.png").stat().st_mtime_ns > before - 10**9
    check_figures(sweep)


def test_an_ablation_folder_gets_its_own_report(sweep, capsys):
    folder = sweep / "ablations" / "quick"
    assert main(["analyze", str(folder)]) == 0
    assert f"report: {folder / REPORT_NAME}" in capsys.readouterr().out
    assert check_figures(folder) == {"ablation.png"}
    text = (folder / REPORT_NAME).read_text()
    assert text.startswith("# Ablation report: quick") and "- seeds: 3" in text
    assert list(sections(text)) == ["Deltas vs base"] and "| no_swa | swa_enabled=False | 3 |" in text


def crash(sweep: Path, folder: Path) -> Path:
    """A copy of `sweep` as a SIGKILLed driver leaves it early on: no snapshot, no tables, no
    decisions, no retrain, each trial's result.json cut after its first report, mid-line."""
    shutil.copytree(sweep, folder, ignore=shutil.ignore_patterns("checkpoint_*", "report*", "ablations"))
    for gone in ("tables", "final"):
        shutil.rmtree(folder / gone)
    for gone in [*folder.glob("experiment_state-*.json"), folder / "decisions.jsonl", folder / "best.toml"]:
        gone.unlink()
    for result in folder.glob("*/result.json"):
        first = result.read_text().splitlines()[0]
        result.write_text(first + "\n" + first[: len(first) // 2])
    return folder


def test_a_crashed_sweep_still_gets_a_report_that_says_what_is_missing(sweep, tmp_path, capsys):
    folder = crash(sweep, tmp_path / "crashed")
    assert main(["analyze", str(folder)]) == 0
    assert f"report: {folder / REPORT_NAME}" in capsys.readouterr().out
    assert check_figures(folder) == {"curves.png", "parallel.png"}  # first reports and knobs: all there is
    text = (folder / REPORT_NAME).read_text()
    assert "8 trials had not finished" in text
    body = sections(text)
    assert list(body) == SECTIONS
    for title in SECTIONS[:1] + SECTIONS[3:4] + SECTIONS[5:]:  # no completed trial, retrain or ablation
        if title != "Storage":  # known however far the sweep got
            assert one_line(body[title]), (title, body[title])
    assert body["Storage"].startswith("The sweep takes ") and "over 8 trials" in body["Storage"]
    assert body["Leaderboard"] == "_no trial has run its whole budget yet_"
    assert "no final retrain yet" in body[FINALISTS] and "No retrain yet" in body["Conclusion"]


def test_a_sweep_killed_before_its_first_trial_gets_a_report(sweep, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(sweep / "sweep.json", folder)
    write_report(folder)
    assert check_figures(folder) == set()
    body = sections((folder / REPORT_NAME).read_text())
    assert list(body) == SECTIONS and all(one_line(b) for b in body.values()), body
    assert "0 of 8 trials (none started)" in (folder / REPORT_NAME).read_text()


def test_a_folder_that_is_neither_a_sweep_nor_an_ablation_is_refused(tmp_path, capsys):
    with pytest.raises(JepatuneError, match="holds neither sweep.json nor ablation.json"):
        write_report(tmp_path)
    with pytest.raises(JepatuneError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a jepatune sweep" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_next_ablation_suits_the_winner(tmp_path):
    from jepatune.analysis.report import next_ablation
    from jepatune.trainer.config import TrainConfig

    best = tmp_path / "best.toml"
    best.write_text(TrainConfig().to_toml())  # the reference's curriculum: ablate it
    assert next_ablation(best).startswith("jepa-vs-ce ")
    best.write_text(TrainConfig(jepa_pure_frac=0.0, ce_pure_frac=0.0).to_toml())  # CE from 0: nothing to ablate there
    assert next_ablation(best).startswith("swa ") and "no curriculum" in next_ablation(best)
    assert next_ablation(tmp_path / "missing.toml").startswith("jepa-vs-ce ")
