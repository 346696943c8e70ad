"""Recording a benchmark for real (a tiny model, a few recipes), resuming it, and simulating on it."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_sets

from jepatune.benchmark.tables import RECORDS_NAME, load_benchmark, read_records
from jepatune.cli import main

RECORD = ["--recipes", "3", "--seeds", "2", "--trial-steps", "8", "--transfer-recipes", "2", "--transfer-factor", "2",
          "--transfer-seeds", "1", "--probe-steps", "1", "--workers", "2", "--preset", "none"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("bench") / "b"
    assert main(["benchmark", "record", "--out", str(out), "--data", str(demo_data), *RECORD, *tiny_sets()]) == 0
    return out


def test_the_tables_hold_every_run_and_rung(recorded):
    b = load_benchmark(recorded)
    assert b.recipes["origin"].tolist() == ["reference", "ce-from-0", "design"]
    ce0 = b.recipes.set_index("origin").loc["ce-from-0"]
    assert ce0["knob:jepa_pure_frac"] == 0 and ce0["knob:ce_pure_frac"] == 0
    kinds = b.runs["kind"].value_counts().to_dict()
    # rungs of B/8 = 1 and B/4 = 2 with factors 2 and 3 below 8: 1, 2, 3, 4, 6; probes and restarts at 2, 4
    assert b.rungs == (1, 2, 3, 4, 6) and b.fidelity_rungs == [2, 4]
    assert kinds == {"main": 6, "transfer": 2, "probe": 2, "restart": 4}
    assert (b.runs.loc[b.runs["kind"] == "transfer", "iterations"] == 16).all()
    snap = b.rung_values("snapshot")
    assert snap.shape == (6, 5) and snap.notna().all().all()
    assert b.rung_values("probe").shape == (2, 2) and b.rung_values("restart").shape == (2, 2)
    # a probe run's compute counts its branches: 8 steps + 2 probes of 1 step
    assert (b.runs.loc[b.runs["kind"] == "probe", "compute_steps"] == 10).all()
    assert b.transfer_scores().shape == (2, 1) and b.main_scores().shape == (3, 2)
    info = json.loads((recorded / "benchmark.json").read_text())
    assert info["runs"] == 14 and info["settings"]["recipes"] == 3 and "machine" in info


def test_a_main_run_scores_as_a_sweep_trial_does(recorded, demo_data):
    from jepatune.experiment.trials import trial_config
    from jepatune.trainer.loop import train

    b = load_benchmark(recorded)
    base = dict(b.info["base"])
    knobs = read_records(recorded / RECORDS_NAME)[0]["recipes"][2]["knobs"]
    config = trial_config(base, knobs, 8, b.rungs).replace(seed=base["seed"] + 1)
    result = train(config, final_score=False)
    run = b.runs.query("kind == 'main' and recipe == 2 and seed == 1").iloc[0]
    assert run["score"] == pytest.approx(result.summary["val_bpb"], rel=1e-6)
    curve = b.curves.query("kind == 'main' and recipe == 2 and seed == 1").set_index("step")["snapshot_bpb"]
    got = {h["step"]: h["val_bpb"] for h in result.history if not h.get("final")}
    assert curve.to_dict() == pytest.approx(got, rel=1e-6)


def test_resume_trains_only_what_is_missing(recorded, tmp_path, demo_data, capsys):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(recorded, copy)
    lines = (copy / RECORDS_NAME).read_text().splitlines(keepends=True)
    kept = "".join(lines[:-2]) + lines[-2][:20]  # two runs lost, the second cut mid-line by a crash
    (copy / RECORDS_NAME).write_text(kept)
    (copy / "benchmark.json").unlink()
    capsys.readouterr()
    assert main(["benchmark", "record", "--out", str(copy), "--data", str(demo_data), *RECORD, *tiny_sets()]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["benchmark", "record", "--out", str(copy), "--resume", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 runs already in" in out
    assert len([line for line in out.splitlines() if line.startswith("[")]) == 2  # the two lost runs, no more
    assert (copy / RECORDS_NAME).read_text().startswith("".join(lines[:-2]))
    assert len(read_records(copy / RECORDS_NAME)) == len(lines)  # whole lines again
    a, b = load_benchmark(recorded), load_benchmark(copy)
    key = ["kind", "recipe", "seed", "iterations"]
    assert a.runs.sort_values(key)[key].values.tolist() == b.runs.sort_values(key)[key].values.tolist()


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
