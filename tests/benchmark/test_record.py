"""Recording a benchmark for real (a tiny model, a few recipes), resuming it, and simulating on it."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_sets

from jepatune.benchmark.settings import RecordSettings
from jepatune.benchmark.tables import RECORDS_NAME, load_benchmark, read_records
from jepatune.cli import main
from jepatune.errors import JepatuneError
from jepatune.trainer.runtime import cpu_kind

RECORD = ["--recipes", "3", "--seeds", "2", "--trial-steps", "8", "--transfer-recipes", "2", "--transfer-factor", "2",
          "--transfer-seeds", "1", "--probe-steps", "1", "--fidelity-seeds", "1", "--fidelity-rungs", "2,4",
          "--refine-recipes", "2", "--preset", "none"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("bench") / "b"
    assert main(["benchmark", "record", "--out", str(out), "--data", str(demo_data), *RECORD, "--workers", "2",
                 *tiny_sets()]) == 0
    return out


def test_the_tables_hold_every_run_and_rung(recorded):
    b = load_benchmark(recorded)
    assert b.recipes["origin"].tolist() == ["reference", "ce-from-0", "design", "refine", "refine"]
    ce0 = b.recipes.set_index("origin").loc["ce-from-0"]
    assert ce0["knob:jepa_pure_frac"] == 0 and ce0["knob:ce_pure_frac"] == 0
    kinds = b.runs["kind"].value_counts().to_dict()
    # rungs of B/8 = 1 and B/4 = 2 with factors 2 and 3 below 8: 1, 2, 3, 4, 6; restarts at 2, 4 (seed 0)
    assert b.rungs == (1, 2, 3, 4, 6) and b.fidelity_rungs == [2, 4]
    assert kinds == {"main": 10, "restart": 10, "transfer": 2}
    assert (b.runs.loc[b.runs["kind"] == "transfer", "iterations"] == 16).all()
    snap = b.rung_values("snapshot")
    assert snap.shape == (10, 5) and snap.notna().all().all()
    # every main run branched a probe off at every rung; restarts for every recipe
    assert b.rung_values("probe").shape == (10, 5) and b.rung_values("restart").shape == (5, 2)
    assert b.fidelity_recipes() == ([0, 1, 2, 3, 4], [0])
    # a main run's compute counts its branches: 8 steps + 5 probes of 1 step
    assert (b.runs.loc[b.runs["kind"] == "main", "compute_steps"] == 13).all()
    assert b.transfer_scores().shape == (2, 1) and b.main_scores().shape == (5, 2)
    info = json.loads((recorded / "benchmark.json").read_text())
    assert info["runs"] == 22 and info["settings"]["recipes"] == 3 and info["format"] == 2
    # every run says which kind of CPU its floats came from
    assert info["cpus"] == [{"cpu": cpu_kind(), "runs": 22}] and info["machine"]["cpu"] == cpu_kind()


def test_refined_recipes_lie_near_the_best_design_recipe(recorded):
    from jepatune.spaces import get_space

    b = load_benchmark(recorded)
    space = get_space("curriculum")
    design = b.main_scores().loc[[0, 1, 2]].mean(axis=1)
    recipes = b.recipes.set_index("recipe")
    unit = {i: [d.to_unit(recipes.loc[i, d.name]) for d in space.dims] for i in recipes.index}
    best = design.idxmin()
    for i in (3, 4):  # a quarter of 2 recipes: one centre, the best design recipe by mean score
        assert max(abs(a - c) for a, c in zip(unit[i], unit[best], strict=True)) <= 0.1 + 1e-9
        assert unit[i] != unit[best]
    lines = [r for r in read_records(recorded / RECORDS_NAME) if r.get("record") == "refine"]
    assert len(lines) == 1 and [r["recipe"] for r in lines[0]["recipes"]] == [3, 4]


def test_default_restarts_are_at_every_recorded_rung():
    s = RecordSettings(out="", data="", trial_steps=8)
    assert s.restart_rungs() == s.rungs() == (1, 2, 3, 4, 6)
    with pytest.raises(JepatuneError, match="restarts are recorded at rungs the main runs evaluate"):
        RecordSettings(out="", data="", trial_steps=8, fidelity_rungs=(5,)).check()
    with pytest.raises(JepatuneError, match="at most --seeds=1"):
        RecordSettings(out="", data="", seeds=1, fidelity_seeds=2).check()


def test_a_main_run_scores_as_a_sweep_trial_does(recorded, demo_data):
    from jepatune.experiment.trials import trial_config
    from jepatune.trainer.loop import train

    b = load_benchmark(recorded)
    base = dict(b.info["base"])
    knobs = read_records(recorded / RECORDS_NAME)[0]["recipes"][2]["knobs"]
    config = trial_config(base, knobs, 8, b.rungs).replace(seed=base["seed"] + 1)
    result = train(config, final_score=False)
    # The recorded run branched probes off at every rung; the trial has none: both are equal to the bit,
    # since a probe is undone entirely (weights, optimiser, data position).
    run = b.runs.query("kind == 'main' and recipe == 2 and seed == 1").iloc[0]
    assert run["score"] == result.summary["val_bpb"]
    curve = b.curves.query("kind == 'main' and recipe == 2 and seed == 1").set_index("step")["snapshot_bpb"]
    got = {h["step"]: h["val_bpb"] for h in result.history if not h.get("final")}
    assert curve.to_dict() == got


def test_resume_trains_only_what_is_missing(recorded, tmp_path, demo_data, capsys):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(recorded, copy)
    records = read_records(copy / RECORDS_NAME)
    other = {"vendor": "OtherVendor", "capability": "DEFAULT"}  # the first runs came from another kind of CPU
    lines = [json.dumps(r if r.get("record") != "run" else {**r, "cpu": other}) + "\n" for r in records]
    kept = "".join(lines[:-2]) + lines[-2][:20]  # two runs lost, the second cut mid-line by a crash
    (copy / RECORDS_NAME).write_text(kept)
    (copy / "benchmark.json").unlink()
    capsys.readouterr()
    assert main(["benchmark", "record", "--out", str(copy), "--data", str(demo_data), *RECORD, *tiny_sets()]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["benchmark", "record", "--out", str(copy), "--resume", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "20 runs already in" in out
    assert len([line for line in out.splitlines() if line.startswith("[")]) == 2  # the two lost runs, no more
    assert (copy / RECORDS_NAME).read_text().startswith("".join(lines[:-2]))
    assert len(read_records(copy / RECORDS_NAME)) == len(lines)  # whole lines again
    a, b = load_benchmark(recorded), load_benchmark(copy)
    key = ["kind", "recipe", "seed", "iterations"]
    a_runs, b_runs = (t.runs.sort_values(key)[[*key, "score"]].values.tolist() for t in (a, b))
    assert a_runs == b_runs  # the two runs trained again are the lost ones, to the bit
    # finishing on another kind of CPU is said, at the start and in benchmark.json
    assert "warning: runs of this recording ran on" in out and "warning: the runs ran on 2 kinds of CPU" in out
    assert b.info["cpus"] == [{"cpu": other, "runs": 20}, {"cpu": cpu_kind(), "runs": 2}]
    assert b.info["settings"]["out"] == str(copy) != a.info["settings"]["out"]  # where it was finished
    assert sum(r.get("record") == "refine" for r in read_records(copy / RECORDS_NAME)) == 1  # not drawn again


def test_resume_refuses_a_format_1_recording(recorded, tmp_path, capsys):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(recorded, copy)
    records = read_records(copy / RECORDS_NAME)
    old_meta = {k: v for k, v in records[0].items() if k != "format"}
    (copy / RECORDS_NAME).write_text("".join(json.dumps(r) + "\n" for r in [old_meta, *records[1:4]]))
    before = (copy / RECORDS_NAME).read_text()
    capsys.readouterr()
    assert main(["benchmark", "record", "--out", str(copy), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recorded in format 1" in err[0] and "record it anew" in err[0]
    assert (copy / RECORDS_NAME).read_text() == before


def test_a_recording_on_ray_is_the_process_pool_s(recorded, tmp_path, demo_data, local_ray):
    """The same recording with each run a Ray task: the same runs, to the bit (one torch thread each)."""
    out = tmp_path / "on-ray"
    assert main(["benchmark", "record", "--out", str(out), "--data", str(demo_data), *RECORD, "--ray",
                 "--cpus-per-run", "1", *tiny_sets()]) == 0
    a, b = load_benchmark(recorded), load_benchmark(out)
    key = ["kind", "recipe", "seed", "iterations"]
    for table in ("runs", "curves"):
        x, y = (getattr(t, table).sort_values(key + (["step"] if table == "curves" else [])).reset_index(drop=True)
                for t in (a, b))
        assert x.equals(y), table


def test_simulate_on_a_recorded_benchmark(recorded, capsys, tmp_path):
    out = tmp_path / "sim.parquet"
    assert main(["simulate", str(recorded), "--sampler", "random,tpe", "--startup-trials", "2", "--compute", "6",
                 "--repetitions", "2", "--fidelity", "snapshot", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random+asha" in text and "tpe(2)+asha" in text and "noise floor" in text
    import pandas as pd

    sim = pd.read_parquet(out)
    assert set(sim["strategy"]) == {"random+asha(gB/4,rf2,snapshot)", "tpe(2)+asha(gB/4,rf2,snapshot)"}
    assert sim.loc[sim["compute"] == 6, "true"].notna().all()
    # the probe fidelity simulated on the recipes that have probe values
    assert main(["simulate", str(recorded), "--fidelity", "probe", "--compute", "4", "--repetitions", "1"]) == 0


def test_simulate_refuses_what_is_no_benchmark(tmp_path, capsys):
    assert main(["simulate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds neither a benchmark.json nor a sweep" in err[0]
    assert not any(tmp_path.iterdir())


def test_simulate_on_a_sweeps_own_records(finished_sweep_folder, tmp_path, capsys):
    from conftest import copy_sweep

    from jepatune.analysis.tables import load
    from jepatune.benchmark.from_sweep import sweep_benchmark

    settings = copy_sweep(finished_sweep_folder, tmp_path)
    b = sweep_benchmark(settings.folder)
    trials = load(settings.folder).trials
    done = trials[trials["status"] == "completed"]
    assert len(b.recipes) == len(done) >= 2 and b.rungs == (2, 4, 8) and b.seeds == [0]
    assert sorted(b.main_scores()[0]) == sorted(done["last_val_bpb"])
    # the reference trial maps back to the space's reference point
    from jepatune.spaces import get_space

    ref = b.recipes[b.recipes["origin"] == "reference"].iloc[0]
    point = get_space("curriculum").reference_point()
    assert {k: ref[k] for k in point} == pytest.approx(point)
    capsys.readouterr()
    assert main(["simulate", str(settings.folder), "--sampler", "random", "--grace-steps", "2", "--compute", "8",
                 "--repetitions", "2"]) == 0
    out = capsys.readouterr().out
    assert "one seed" in out and "random+asha(g2,rf2,snapshot)" in out
