"""Hard failures with real processes: `jepatune search` runs as a subprocess with its own local Ray
(no ray.init here), and is SIGKILLed mid-sweep or mid-retrain, or has one trial's worker SIGKILLed
mid-trial."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
from processes import Search, cmdline, poll, session_pids, set_args

from jepatune.analysis import schema
from jepatune.analysis.tables import load_tables
from jepatune.experiment.layout import CACHE_DIR, read_jsonl
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import base_config, read_settings
from jepatune.search.searcher import RecordingASHA
from jepatune.spaces import get_space
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.loop import trainer_code_bytes

TRIAL_ID = re.compile(r"^run_trial_([0-9a-f]{8})_")


def _snapshot_states(folder: Path) -> dict[str, str]:
    """trial id -> Ray status in the newest experiment snapshot."""
    snap = sorted(folder.glob("experiment_state-*.json"))[-1]
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in json.loads(snap.read_text())["trial_data"]}


def _check_dtypes(folder: Path) -> dict[str, pd.DataFrame]:
    tables = load_tables(folder)
    for name, columns in schema.TABLES.items():
        pq.read_metadata(folder / "tables" / f"{name}.parquet")  # valid Parquet
        for column, dtype in columns.items():
            assert str(tables[name][column].dtype) == dtype, (name, column)
    return tables


def _raw_reports(folder: Path) -> dict[str, list[dict]]:
    """Ray's own record, trial folder by trial folder: every line of each result.json."""
    return {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
            for d in sorted(folder.glob("run_trial_*")) if (d / "result.json").exists()}


def _checkpointed_steps(folder: Path) -> dict[str, int]:
    """trial id -> the step of the newest checkpoint the newest experiment snapshot names for it: what
    a resumed sweep restarts that trial from."""
    import ray.cloudpickle

    snaps = sorted(folder.glob("experiment_state-*.json"))
    try:
        trial_data = json.loads(snaps[-1].read_text())["trial_data"] if snaps else []
    except ValueError:  # mid-copy
        return {}
    out = {}
    for trial_json, runtime_json in trial_data:
        trial, manager = json.loads(trial_json), json.loads(runtime_json)["checkpoint_manager"]
        results = ray.cloudpickle.loads(bytes.fromhex(manager["value"]))._checkpoint_results
        if trial["status"] == "RUNNING" and results:
            out[trial["trial_id"]] = int(results[-1].metrics["step"])
    return out


def _asha_cutoff(values: list[float], reduction_factor: int = 2) -> float | None:
    """Ray's ASHA cut-off of a rung holding `values` (val_bpb, minimised)."""
    import numpy as np

    return float(np.nanpercentile(values, 100 / reduction_factor)) if values else None


@pytest.mark.slow
def test_a_sweep_killed_mid_way_resumes_without_losing_or_repeating_trials(tmp_path, demo_data, sweep_knobs):
    samples, steps, out = 8, 48, tmp_path / "out"
    folder = out / "s"
    started = time.monotonic()
    # samples <= the sampler's 10 random startup trials: the restored, seeded sampler then replays
    # exactly the suggestions lost with the last snapshot, so each recipe comes back once. Rungs
    # 6, 12, 24, 48: enough trials complete early for the kill to land mid-sweep, while a trial that
    # the last snapshot knows as running has a checkpoint to continue from.
    first = ["--data", str(demo_data), "--out", str(out), "--name", "s", "--samples", str(samples),
             "--trial-steps", str(steps), "--grace-steps", "6", "--concurrency", "2", *set_args(sweep_knobs)]
    # A snapshot at every step of Ray's loop (the default is every 2 s), so that the kill surely
    # lands while the last snapshot names a running trial's checkpoint: what the resume is checked against.
    with Search(first, tmp_path / "first.log", extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "0"}) as search:
        # The trainable writes finished/<config_key>.json when a trial completes, before it reports.
        poll("two finished trials and a running one with a checkpoint in the snapshot",
              lambda: len(list((folder / CACHE_DIR).glob("*.json"))) >= 2 and bool(_checkpointed_steps(folder)),
              search, 60)
        search.kill()
    cache = {f.stem: (f.read_bytes(), f.stat().st_mtime_ns) for f in (folder / CACHE_DIR).glob("*.json")}
    finished = {key: json.loads(text) for key, (text, _) in cache.items()}
    states = _snapshot_states(folder)
    assert sum(s == "TERMINATED" for s in states.values()) < samples, "the kill came after the sweep's end"
    told_before = len(load_study(folder).trials)
    decided_before = read_jsonl(folder / "decisions.jsonl")
    lines_before = {name: len(reports) for name, reports in _raw_reports(folder).items()}
    resumes_from = _checkpointed_steps(folder)

    with Search(["--resume", "--out", str(out), "--name", "s"], tmp_path / "resume.log") as search:
        assert search.wait(90) == 0, search.tail()
    print(f"kill and resume: {time.monotonic() - started:.0f}s, {len(finished)} finished and "
          f"{len(states)} trials in the snapshot at the kill, {len(resumes_from)} running with a checkpoint")

    # From Ray's raw trial folders and the cache files, not the (folded) tables:
    raw = _raw_reports(folder)
    after = {name: reports[lines_before.get(name, 0):] for name, reports in raw.items()}
    trained = [r for reports in raw.values() for r in reports if not r.get("cached")]
    for key in finished:
        # A recipe finished before the kill was trained to its end once (its final report may not have
        # reached Ray before the kill: then only the cache holds it), and not at all after the resume,
        # where it is answered from the cache.
        assert sum(r.get("config_key") == key and r["step"] == steps for r in trained) <= 1, key
        assert any(r.get("config_key") == key and r["step"] == steps for reports in raw.values() for r in reports)
        assert not any(r.get("config_key") == key and not r.get("cached") for new in after.values() for r in new), key
        assert cache[key] == ((folder / CACHE_DIR / f"{key}.json").read_bytes(),
                              (folder / CACHE_DIR / f"{key}.json").stat().st_mtime_ns), key  # not rewritten
    for name, new in after.items():  # a trial running at the kill continued from its checkpoint
        trial_id = TRIAL_ID.match(name).group(1)
        if trial_id in resumes_from and (trained_again := [r for r in new if not r.get("cached")]):
            assert trained_again[0]["step"] > resumes_from[trial_id], (name, resumes_from[trial_id], trained_again)

    # ASHA's books across the kill: the resumed scheduler held every value decided before it, so each
    # decision's cut-off, before the kill and after it, is Ray's rule over all earlier values at its rung.
    decided = read_jsonl(folder / "decisions.jsonl")
    assert decided[:len(decided_before)] == decided_before
    # A resumed driver's scheduler holds exactly the recorded values in its rungs (the resume may
    # need no new decision when the kill came late, so this holds whether or not it made any).
    rebuilt = RecordingASHA(time_attr="step", metric="val_bpb", mode="min", max_t=steps, grace_period=6,
                            reduction_factor=2, milestones=(6, 12, 24, steps),
                            decisions_path=str(folder / "decisions.jsonl"))
    rebuilt.on_trial_add(None, SimpleNamespace(trial_id="new"))
    held = {int(m): {t: -v for t, v in recorded.items()} for m, recorded in rebuilt._brackets[0]._rungs}
    assert held == {rung: {d["trial_id"]: d["value"] for d in decided if d["rung"] == rung} for rung in held}
    for i, row in enumerate(decided):
        earlier = [d["value"] for d in decided[:i] if d["rung"] == row["rung"] and d["trial_id"] != row["trial_id"]]
        assert row["cutoff"] == pytest.approx(_asha_cutoff(earlier)), (i, row, earlier)
        assert (row["decision"] != "continue") == (row["cutoff"] is not None and row["value"] > row["cutoff"])

    tables = _check_dtypes(folder)
    trials = tables["trials"]
    assert trials["config_key"].notna().all() and trials["config_key"].is_unique, trials
    assert len(trials) == samples, trials  # orphaned folders folded into the re-run of their recipe
    assert set(trials["status"]) <= {"completed", "pruned"}, trials
    for key, result in finished.items():  # finished before the kill: kept, once, with that result
        row = trials[trials["config_key"] == key]
        assert len(row) == 1 and row["status"].item() == "completed"
        assert row["last_val_bpb"].item() == pytest.approx(result["val_bpb"], rel=0, abs=0)
    curves = tables["curves"]
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    assert not curves.duplicated(["trial_id", "step"]).any()

    # The searcher went on from its snapshot rather than starting again.
    study = load_study(folder)
    assert told_before <= len(study.trials) == samples
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    settings = read_settings(folder)
    reference = get_space(settings.space, base=base_config(settings), code_bytes=trainer_code_bytes()).reference_point()
    assert sum(t.params == reference for t in study.trials) == 1
    assert trials["is_reference"].sum() == 1


@pytest.mark.slow
def test_a_killed_trial_restarts_from_its_last_checkpoint(tmp_path, demo_data, sweep_knobs):
    out, steps = tmp_path / "out", 96  # rungs 12, 24, 48, 96
    folder = out / "s"
    args = ["--data", str(demo_data), "--out", str(out), "--name", "s", "--samples", "2", "--trial-steps", str(steps),
            "--grace-steps", "12", "--concurrency", "1", "--max-failures", "2", *set_args(sweep_knobs)]

    def second_rung() -> Path | None:
        """The first trial's folder once its second checkpoint is stored. The worker stores it after
        the driver took the report of the first (a report blocks until the driver has taken it), so
        Ray knows a checkpoint to restart from."""
        return next((c.parent for c in folder.glob("run_trial_*/checkpoint_000001")), None)

    started = time.monotonic()
    with Search(args, tmp_path / "sweep.log") as search:
        poll("a second checkpoint", lambda: second_rung() is not None, search, 60)
        trial_dir = second_rung()
        workers = [p for p in session_pids(search.proc.pid) if "ray::ImplicitFunc" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in session_pids(search.proc.pid)]
        assert not list(trial_dir.glob("checkpoint_*/trial_result.json")), "the trial finished before the kill"
        os.kill(workers[0], signal.SIGKILL)
        assert search.wait(90) == 0, search.tail()
    print(f"worker kill: {time.monotonic() - started:.0f}s")

    trial_id = TRIAL_ID.match(trial_dir.name).group(1)
    tables = _check_dtypes(folder)
    row = tables["trials"].set_index("trial_id").loc[trial_id]
    assert row["restarts"] >= 1 and row["status"] == "completed" and row["step"] == steps, row
    # Resumed from a checkpoint, not from scratch: the first rung is reported once. Ray logs a report
    # before it registers the report's checkpoint, so a kill in between redoes that rung from the
    # checkpoint before: the same step again, with the same iteration and value.
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    reported = [r["step"] for r in reports]
    assert reported.count(12) == 1 and reported == sorted(reported) and reported[-1] == steps, reported
    for step in set(reported):
        again = [(r["training_iteration"], r["val_bpb"]) for r in reports if r["step"] == step]
        assert all(a == pytest.approx(again[0], rel=1e-6) for a in again), (step, again)
    curve = tables["curves"].query("trial_id == @trial_id")
    assert list(curve["step"]) == [12, 24, 48, 96] and list(curve["training_iteration"]) == [1, 2, 3, 4]
    assert len(list(trial_dir.glob("checkpoint_*"))) == 1  # the older ones pruned once the sweep ended


def _cut_run(scratch: Path) -> bool:
    """A retrain run is training: it has evaluated (metrics.jsonl) in its scratch folder, not finished."""
    return any(not (m.parent / "summary.json").exists() for m in scratch.glob("jepatune-trial-*/metrics.jsonl"))


def _changed(path: Path, before: int, search: Search, timeout: float) -> None:
    """Poll fast until `path` is replaced (its mtime moves), the moment a table rebuild is under way."""
    deadline = time.monotonic() + timeout
    while (path.stat().st_mtime_ns if path.exists() else before) == before:
        if not search.alive() or time.monotonic() > deadline:
            pytest.fail(f"{path.name} was not rewritten:\n{search.tail()}")
        time.sleep(0.001)


@pytest.mark.slow
def test_a_driver_killed_in_the_retrain_and_its_tables_keeps_every_finished_run_once(tmp_path, demo_data,
                                                                                      sweep_knobs):
    out = tmp_path / "out"
    folder = out / "s"
    final, tables = folder / "final", folder / "tables"
    runs = final / "runs.jsonl"
    started = time.monotonic()
    first = ["--data", str(demo_data), "--out", str(out), "--name", "s", "--samples", "2", "--trial-steps", "16",
             "--grace-steps", "16", "--concurrency", "2", "--final-steps", "40", "--final-seeds", "2",
             *set_args(sweep_knobs)]
    scratch = tmp_path / "scratch"  # the nodes' temp folder, where a run trains before its files are kept
    scratch.mkdir()
    tmp_env = {"TMPDIR": str(scratch)}
    with Search(first, tmp_path / "first.log", extra_env=tmp_env) as search:
        # 4 retrain runs (a finalist and the reference, 2 seeds), 2 at a time: kill with one finished and one cut.
        poll("a finished and a cut retrain run", lambda: bool(read_jsonl(runs)) and _cut_run(scratch), search, 120)
        search.kill()
    kept = runs.read_text().splitlines()
    assert 1 <= len(kept) < 4
    # A run's folder appears whole once the run has finished: a cut one leaves nothing in final/.
    assert all((p / "summary.json").is_file() for p in final.iterdir() if p.is_dir())

    # `jepatune retrain DIR` rebuilds the tables first: killed once trials.parquet is replaced.
    trials_mtime = (tables / "trials.parquet").stat().st_mtime_ns
    with Search([str(folder)], tmp_path / "retrain-killed.log", command="retrain", extra_env=tmp_env) as again:
        _changed(tables / "trials.parquet", trials_mtime, again, 60)
        again.kill()
    mid_tables = (tables / "final.parquet").stat().st_mtime_ns < (tables / "trials.parquet").stat().st_mtime_ns

    with Search(["--resume", "--out", str(out), "--name", "s"], tmp_path / "resume.log", extra_env=tmp_env) as again:
        assert again.wait(120) == 0, again.tail()  # the sweep had ended: straight on to the retrain
    assert not list(scratch.glob("jepatune-trial-*")), "a killed run's scratch folder was left behind"
    print(f"kill in the retrain, kill {'in' if mid_tables else 'after'} the tables, resume: "
          f"{time.monotonic() - started:.0f}s; {len(kept)} of 4 runs finished at the first kill")

    lines = runs.read_text().splitlines()
    assert lines[:len(kept)] == kept  # finished before the kill: kept as they were, not trained again
    rows = read_jsonl(runs)
    assert len(rows) == len(lines) == 4
    labels, seeds = sorted({r["recipe"] for r in rows}), [TrainConfig().seed + 1, TrainConfig().seed + 2]
    assert len(labels) == 2 and "reference" in labels  # both trials are finalists, one of them the reference's
    assert sorted((r["recipe"], r["seed"]) for r in rows) == [(label, s) for label in labels for s in seeds]
    for row in rows:  # each folder holds one run: the cut one trained again from the start
        run = final / f"{row['recipe']}-seed{row['seed']}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if not m.get("final")] == list(range(0, 41, 4)), run
        assert [m.get("final") for m in metrics].count(True) == 1
        assert json.loads((run / "summary.json").read_text())["val_bpb"] == row["val_bpb"]
    checked = _check_dtypes(folder)
    assert sorted(p.name for p in tables.iterdir() if not p.name.startswith(".")) == [
        f"{name}.parquet" for name in sorted(schema.TABLES)]  # a cut write leaves only a hidden temp file
    assert len(checked["final"]) == 4 and not checked["final"].duplicated(["recipe", "seed"]).any()
    trials = checked["trials"]
    assert len(trials) == 2 and trials["config_key"].is_unique and set(trials["status"]) == {"completed"}


def test_asha_resumes_with_the_decisions_taken_before_a_crash(tmp_path):
    """Ray snapshots no scheduler: a resumed sweep's ASHA refills its rungs from decisions.jsonl."""
    path = tmp_path / "decisions.jsonl"
    rows = [{"trial_id": "a", "rung": 3, "step": 3, "value": 5.0, "cutoff": None, "decision": "continue"},
            {"trial_id": "b", "rung": 3, "step": 3, "value": 7.0, "cutoff": 5.0, "decision": "stop"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    asha = RecordingASHA(time_attr="step", metric="val_bpb", mode="min", max_t=24, grace_period=3,
                         reduction_factor=2, decisions_path=str(path))
    for trial_id in ("b", "c"):
        asha.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
    # b was stopped before the crash but resumed as running: stopped again at once
    assert asha.on_trial_result(None, SimpleNamespace(trial_id="b"), {"step": 6, "val_bpb": 4.0}) == "STOP"
    # c is judged against the rung as it was (a: 5.0, b: 7.0), not as the first trial to reach it
    assert asha.on_trial_result(None, SimpleNamespace(trial_id="c"), {"step": 3, "val_bpb": 6.5}) == "STOP"
    assert [r["trial_id"] for r in map(json.loads, path.read_text().splitlines())] == ["a", "b", "c"]
