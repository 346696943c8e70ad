"""A trial's own report log completes Ray's copy of its reports: the tables keep every curve point
when Ray's result.json on the storage predates the trial's last reports, and keep a trial whose
folder never reached the storage."""

from __future__ import annotations

import json

import pytest

from jepatune.analysis.tables import build_trials
from jepatune.experiment.ray_files import read_trials
from jepatune.experiment.report_log import ReportLog, read_report_logs

COPIED = "run_trial_0a1b2c3d_1_jepa_pure_frac=0.2_2026-12-02"  # in Ray's last snapshot
UNCOPIED = "run_trial_4e5f6a7b_2_jepa_pure_frac=0.4_2026-12-02"  # started and ended after it


def report(trial_id: str, step: int, bpb: float, **extra) -> dict:
    """As the trainable reports it (`params` is the model's size there, not the suggestion)."""
    return {"trial_id": trial_id, "step": step, "val_bpb": bpb, "tokens": step * 512, "params": 24868,
            "status": "running", **extra}


@pytest.mark.parametrize("form", ["folder", "uri"])  # a file per log, or an object per row (object stores)
def test_the_tables_take_the_reports_ray_had_not_copied_from_the_trials_log(tmp_path, form):
    root = tmp_path / "sweep"
    experiment = str(root) if form == "folder" else f"file://{root}"
    ray_folder = root / COPIED
    ray_folder.mkdir(parents=True)
    (ray_folder / "params.json").write_text(json.dumps({"jepa_pure_frac": 0.2}))
    # Ray's copy holds the first rung only, and a line cut by a crash.
    (ray_folder / "result.json").write_text(json.dumps({**report("0a1b2c3d", 25, 3.0), "training_iteration": 1,
                                                        "timestamp": 1796215000})
                                            + "\n{\"trial_id\": \"0a1b")
    first = ReportLog(experiment, COPIED, "0a1b2c3d")
    first.start({"jepa_pure_frac": 0.2})
    for step, bpb in [(25, 3.0), (50, 2.8)]:
        first.add(report("0a1b2c3d", step, bpb))
    first.start({"jepa_pure_frac": 0.2})  # restarted from its checkpoint at step 50, on another node
    first.add(report("0a1b2c3d", 100, 2.6, status="completed"))
    second = ReportLog(experiment, UNCOPIED, "4e5f6a7b")
    second.start({"jepa_pure_frac": 0.4})
    second.add(report("4e5f6a7b", 25, 3.1))
    second.add(report("4e5f6a7b", 100, 2.5, status="completed"))

    logs = read_report_logs(experiment)
    assert set(logs) == {COPIED, UNCOPIED} and logs[UNCOPIED]["params"] == {"jepa_pure_frac": 0.4}
    assert [r["step"] for r in logs[COPIED]["reports"]] == [25, 50, 100]
    trials = read_trials(experiment)
    assert [(t["trial_id"], t["index"]) for t in trials] == [("0a1b2c3d", 1), ("4e5f6a7b", 2)]
    # Ray's row for step 25 is kept (it has Ray's fields), the log fills steps 50 and 100.
    assert [(r["step"], r.get("training_iteration")) for r in trials[0]["reports"]] == [(25, 1), (50, None),
                                                                                        (100, None)]
    table, curves = build_trials(experiment, trial_steps=100, knobs=["jepa_pure_frac"])
    assert list(table["status"]) == ["completed", "completed"] and list(table["jepa_pure_frac"]) == [0.2, 0.4]
    assert list(table["last_val_bpb"]) == [2.6, 2.5] and list(table["is_reference"]) == [True, False]
    assert curves.groupby("trial_id")["step"].apply(list).to_dict() == {"0a1b2c3d": [25, 50, 100],
                                                                        "4e5f6a7b": [25, 100]}
    assert curves["time"].notna().all()
