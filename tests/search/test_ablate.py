"""`jepatune ablate`: variant planning, a real Ray grid with its tables and cache, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

from jepatune.analysis import load_ablation, schema
from jepatune.cli import main
from jepatune.experiment.settings import AblationSettings
from jepatune.search.ablate import plan_variants, seeded
from jepatune.trainer.config import TrainConfig


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, demo_data) -> Path:
    """The tiny model as a TOML recipe: jepa_pure_frac 0.25, ce_pure_frac 0.5, SWA with the CE stage."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TrainConfig(data_path=str(demo_data), **TINY).to_toml())
    return path


@pytest.fixture
def fake_sweep(tmp_path, demo_data, recipe) -> Path:
    """A sweep folder as `search` leaves it, reduced to what an ablation reads: sweep.json and best.toml."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"settings": {"data": str(demo_data)}}))
    (folder / "best.toml").write_text(recipe.read_text() + "swa_start_frac = 0.9\n")
    return folder


def run_main(argv: list[str]) -> tuple[int, str]:
    """`jepatune ARGV` in process: exit status and stdout (stderr, Ray's progress, is dropped)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return code, out.getvalue()


def assert_one_error_line(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("jepatune: error:"), err
    assert all(f in err[0] for f in fragments), err[0]


# --- planning: no Ray --------------------------------------------------------------------------

def plan(**settings) -> tuple[list[tuple[str, str]], list[str]]:
    notes: list[str] = []
    variants = plan_variants(AblationSettings(**settings), log=notes.append)
    return [(v.name, v.change) for v in variants], notes


def test_presets_hold_the_swa_start_and_drop_what_equals_the_base(recipe):
    variants, notes = plan(base=str(recipe), variant_sets=("jepa-vs-ce", "regularizer", "swa"))
    # ce_pure_frac moves the CE stage; the SWA start, unset, would move with it: it is held at 0.5.
    assert variants == [("base", ""), ("ce-only", "jepa_pure_frac=0, ce_pure_frac=0, swa_start_frac=0.5"),
                        ("no-bridge", "ce_pure_frac=0.25, swa_start_frac=0.5"),
                        ("regularizer=lejepa", "regularizer=lejepa"), ("regularizer=none", "regularizer=none"),
                        ("no-swa", "swa_enabled=false")]
    assert any("regularizer=varcov" in n and "equals the base" in n for n in notes)
    assert any("swa-reference" in n and "equals the base" in n for n in notes)
    assert any("swa-searched skipped" in n for n in notes)


def test_factors_give_one_variant_per_value_and_skip_duplicates(recipe):
    variants, notes = plan(base=str(recipe), variant_sets=("swa",),
                           factors=("swa_enabled=false", "jepa_pure_frac=0.1,0.25"))
    assert variants == [("base", ""), ("no-swa", "swa_enabled=false"), ("jepa_pure_frac=0.1", "jepa_pure_frac=0.1")]
    assert any("swa_enabled=false" in n and "trains the same as no-swa" in n for n in notes)
    assert any("jepa_pure_frac=0.25" in n and "equals the base" in n for n in notes)


def test_base_best_is_the_sweeps_recipe_and_its_searched_swa_start(fake_sweep):
    settings = AblationSettings(sweep=str(fake_sweep), variant_sets=("swa",), steps=24)
    assert settings.base_kind == "best" and settings.folder == fake_sweep / "ablations" / "swa"
    variants = plan_variants(settings, log=(notes := []).append)
    assert variants[0].config.swa_start_frac == 0.9 and variants[0].config.iterations == 24
    assert [(v.name, v.change) for v in variants[1:]] == [("no-swa", "swa_enabled=false"),
                                                        ("swa-reference", "swa_enabled=true, swa_start_frac=unset")]
    assert any("swa-searched" in n and "equals the base" in n for n in notes)
    reference = plan_variants(AblationSettings(base="reference", sweep=str(fake_sweep), variant_sets=("regularizer",)),
                              log=lambda _: None)
    assert reference[0].config.swa_start_frac is None and reference[0].config.jepa_pure_frac == 0.1  # the reference
    assert reference[0].config.model_dim == TINY["model_dim"]  # at the sweep's shape


# --- a real ablation: 2 variants x 2 seeds ---------------------------------------------------------

@pytest.fixture(scope="module")
def ablation(tmp_path_factory, recipe, local_ray):
    out = tmp_path_factory.mktemp("ablations")
    argv = ["ablate", "--base", str(recipe), "--factor", "regularizer=lejepa,varcov", "--seeds", "2",
            "--steps", "12", "--out", str(out), "--name", "reg"]
    code, stdout = run_main(argv)
    assert code == 0, stdout
    return argv, out / "reg", stdout


def finished_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "finished").glob("*.json")}


def test_the_folder_and_both_tables_with_their_dtypes(ablation):
    _, folder, stdout = ablation
    assert "regularizer=varcov (regularizer=varcov) equals the base; skipped" in stdout
    assert (folder / "ablation.json").is_file() and len(finished_files(folder)) == 4
    for name, columns in schema.ABLATION_TABLES.items():
        frame = pd.read_parquet(folder / "tables" / f"{name}.parquet")
        assert {c: str(t) for c, t in frame.dtypes.items()} == columns, name
    table, runs = load_ablation(folder)
    assert sorted(zip(runs["variant"], runs["seed"], strict=True)) == [
        ("base", 0), ("base", 1), ("regularizer=lejepa", 0), ("regularizer=lejepa", 1)]
    assert set(runs["change"]) == {"", "regularizer=lejepa"} and set(runs["status"]) == {"completed"}
    assert (runs["steps"] == 12).all() and runs["trial_id"].nunique() == 4
    assert runs["val_bpb"].between(0, 9).all() and runs["prequant_bpb"].notna().all()
    assert list(table["variant"]) == ["base", "regularizer=lejepa"] and list(table["n"]) == [2, 2]
    # the ablation ends with its report: the table and the deltas figure
    assert f"report: {folder / 'report.md'}" in stdout
    report = (folder / "report.md").read_text()
    assert "| regularizer=lejepa |" in report and any((folder / "report").glob("ablation*.png"))


def test_runs_pair_by_seed(ablation, recipe):
    _, folder, stdout = ablation
    table, runs = load_ablation(folder)
    by = runs.set_index(["variant", "seed"])["val_bpb"]
    d = [by["regularizer=lejepa", k] - by["base", k] for k in (0, 1)]
    assert table["delta"].iloc[1] == pytest.approx(sum(d) / 2)
    assert by["base", 0] != by["base", 1]  # seeds differ between runs of one variant...
    # ...and run k of every variant uses the base recipe's seed + k: retraining base seed 1 here
    # gives the score the grid recorded.
    from jepatune.trainer.loop import train

    config = TrainConfig.from_dict(json.loads((folder / "ablation.json").read_text())["base"])
    assert train(seeded(config, 1)).summary["val_bpb"] == pytest.approx(by["base", 1], rel=1e-6)
    assert "ablation (val_bpb after the int8+zlib round trip" in stdout


def test_a_rerun_trains_nothing_and_resume_trains_only_what_is_missing(ablation):
    argv, folder, _ = ablation
    before = finished_files(folder)
    _, runs_before = load_ablation(folder)
    code, stdout = run_main(argv)
    assert code == 0 and "4 finished before" in stdout
    assert finished_files(folder) == before  # no run trained again
    assert load_ablation(folder)[1].equals(runs_before)
    # As if killed while one run trained: its result is missing. --resume trains that one only.
    lost = sorted(before)[0]
    (folder / "finished" / lost).unlink()
    code, stdout = run_main(["ablate", "--resume", "--out", str(folder.parent), "--name", folder.name])
    assert code == 0 and "3 finished before" in stdout
    after = finished_files(folder)
    assert set(after) == set(before) and after[lost] > before[lost]
    assert {k: v for k, v in after.items() if k != lost} == {k: v for k, v in before.items() if k != lost}
    runs_after = load_ablation(folder)[1]
    assert (runs_after["trial_id"] != runs_before["trial_id"]).sum() == 1


def test_another_plan_in_the_same_folder_is_refused(ablation, capsys):
    argv, folder, _ = ablation
    stored = (folder / "ablation.json").read_text()
    code = main([*argv[:5], "--seeds", "3", *argv[7:]])
    assert_one_error_line(capsys, code, "holds another ablation")
    assert (folder / "ablation.json").read_text() == stored


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------

@pytest.mark.parametrize("name", ["unknown-key", "out-of-range", "best-without-sweep", "not-a-sweep",
                                  "unknown-preset", "nothing-to-ablate", "resume-nothing"])
def test_bad_input_is_one_line_and_writes_nothing(name, recipe, tmp_path, capsys):
    out, not_sweep = tmp_path / "out", tmp_path / "empty"
    not_sweep.mkdir()
    base = ["ablate", "--base", str(recipe), "--out", str(out)]
    argv, fragments = {
        "unknown-key": (base + ["--factor", "regularizr=none"], ["--factor", "did you mean regularizer?"]),
        "out-of-range": (base + ["--factor", "jepa_pure_frac=0.1,1.5"], ["jepa_pure_frac=1.5", "[0, 1]"]),
        "best-without-sweep": (["ablate", "--base", "best", "--variants", "swa", "--out", str(out)], ["--sweep"]),
        "not-a-sweep": (["ablate", "--sweep", str(not_sweep), "--variants", "swa"], ["not a jepatune sweep"]),
        "unknown-preset": (base + ["--variants", "regulariser"], ["regulariser", "jepa-vs-ce"]),
        "nothing-to-ablate": (base + ["--factor", "regularizer=varcov"], ["nothing to ablate"]),
        "resume-nothing": (["ablate", "--resume", "--out", str(out)], ["not a jepatune ablation"]),
    }[name]
    code = main(argv)
    assert_one_error_line(capsys, code, *fragments)
    assert not out.exists() and not any(not_sweep.iterdir())

