"""The three fidelities and the audit trials, each in a tiny real sweep."""

import os
from pathlib import Path

import pandas as pd
import pytest

from jepatune.analysis import false_stops, rung_correlation
from jepatune.analysis.tables import load_tables
from jepatune.experiment.fidelity import get_fidelity
from jepatune.experiment.settings import SweepSettings
from jepatune.search.sweep import run_sweep
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.loop import train

STEPS, GRACE = 16, 4  # rungs at steps 4, 8, 16


def sweep(tmp_path, data, knobs, **settings):
    s = SweepSettings(data=str(data), out=str(tmp_path), samples=6, trial_steps=STEPS, grace_steps=GRACE,
                      concurrency=2, overrides=knobs, startup_trials=6, **settings)
    run_sweep(s)
    return s, load_tables(s.folder)


def test_restart_milestones_count_every_step_spent():
    for name, clock in (("restart", ("compute_steps", (4, 12, 28))), ("snapshot", ("step", (4, 8, 16))),
                        ("probe", ("step", (4, 8, 16)))):
        fidelity = get_fidelity(name)
        assert (fidelity.time_attr, fidelity.milestones((4, 8, 16))) == clock


def test_restart_retrains_each_rung_at_its_budget(tmp_path, demo_data, sweep_knobs, local_ray):
    settings, tables = sweep(tmp_path, demo_data, sweep_knobs, fidelity="restart", audit_frac=0.0)
    curves, trials, decisions = tables["curves"], tables["trials"], tables["decisions"]
    assert set(curves["step"]) <= {4, 8, 16}
    # The clock ASHA judges on counts the earlier rungs' runs: 4, then 4 + 8, then 4 + 8 + 16.
    spent = {4: 4, 8: 12, 16: 28}
    assert all(row.compute_steps == spent[row.step] for row in curves.itertuples())
    assert set(decisions["rung"]) <= {4, 12} and set(decisions["step"]) <= {4, 8}
    for row in decisions.itertuples():
        assert (row.decision == "stop") == (not pd.isna(row.cutoff) and row.value > row.cutoff)
    assert (trials["status"] == "pruned").any() and (trials["status"] == "completed").any()
    assert (trials.loc[trials["status"] == "completed", "compute_steps"] == 28).all()
    # A promoted trial really trained a fresh run of 8 steps: its rung value is that run's BPB.
    promoted = curves[curves["step"] == 8].iloc[0]
    knobs = trials.set_index("trial_id").loc[promoted["trial_id"], ["jepa_pure_frac", "ce_pure_frac"]].to_dict()
    base = TrainConfig(data_path=str(demo_data), **sweep_knobs)
    alone = train(base.replace(**knobs, iterations=8, val_loss_every=0), final_score=False)
    assert promoted["val_bpb"] == pytest.approx(alone.summary["val_bpb"], rel=1e-4)
    assert rung_correlation(trials, curves, decisions)["rung"].tolist() == sorted(set(decisions["step"]))


def test_probe_rungs_report_the_cool_down_and_count_it(tmp_path, demo_data, sweep_knobs, local_ray):
    settings, tables = sweep(tmp_path, demo_data, sweep_knobs, fidelity="probe", probe_steps=2, audit_frac=0.0)
    curves = tables["curves"]
    rungs = curves[curves["step"] < STEPS]
    assert len(rungs) and rungs["probe_bpb"].notna().all()
    assert (rungs["val_bpb"] == rungs["probe_bpb"]).all()  # what ASHA and Optuna judged
    assert (rungs["snapshot_bpb"] != rungs["probe_bpb"]).all()
    # two probe steps at each rung passed: 4 -> 6, 8 -> 12, the end (no probe) 16 -> 20
    assert all(row.compute_steps == row.step + 2 * (1 + (row.step > 4)) for row in rungs.itertuples())
    ends = curves[curves["step"] == STEPS]
    assert (ends["compute_steps"] == STEPS + 4).all() and ends["probe_bpb"].isna().all()


def test_audits_run_stopped_trials_to_the_end(tmp_path, demo_data, sweep_knobs, local_ray):
    settings, tables = sweep(tmp_path, demo_data, sweep_knobs, audit_frac=1.0)
    trials, decisions = tables["trials"], tables["decisions"]
    audits = decisions[decisions["decision"] == "audit"]
    assert len(audits) and not (decisions["decision"] == "stop").any()  # every stop became an audit
    for row in audits.itertuples():  # an audit is a stop by ASHA's rule
        assert row.value > row.cutoff
    audited = trials[trials["audited"]]
    assert set(audited["trial_id"]) == set(audits["trial_id"])
    assert (audited["status"] == "completed").all() and (audited["step"] == STEPS).all()
    assert (trials["status"] == "completed").all()
    est = false_stops(trials).iloc[0]
    assert est["audited"] == len(audited) and est["kept"] == len(trials) - len(audited)
    assert 0 <= est["ci_low"] <= est["rate"] <= est["ci_high"] <= 1


def test_scratch_folders_of_dead_workers_are_cleared(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from jepatune.search import trainable

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{trainable.WORK_PREFIX}{int(dead.stdout)}-abc"
    (orphan / "ckpt").mkdir(parents=True)
    live = tmp_path / f"{trainable.WORK_PREFIX}{os.getppid()}-def"  # a running process's folder stays
    live.mkdir()
    with trainable.work_dir() as work:
        assert Path(work).name.startswith(f"{trainable.WORK_PREFIX}{os.getpid()}-")
        assert not orphan.exists() and live.exists()
    assert not Path(work).exists()
