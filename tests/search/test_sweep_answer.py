"""What a sweep optimises is what would be shipped, and what its searcher and scheduler are told is
the truth: a trial's value is its exported weights' BPB, failures stay out of TPE's good group and
out of ASHA's cut-offs, and ASHA's books are complete in decisions.jsonl."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest
from optuna.samplers._tpe.sampler import _split_trials

from jepatune.analysis.tables import load_tables
from jepatune.experiment.layout import read_jsonl
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import SweepSettings, base_config
from jepatune.experiment.trials import PENALTY_BPB, trial_config
from jepatune.search.searcher import RecordingASHA, RungAwareOptunaSearch
from jepatune.search.sweep import run_sweep
from jepatune.search.trainable import INJECT_OOM_ENV
from jepatune.spaces import FAILURE_CONSTRAINT
from jepatune.trainer.loop import train

State = optuna.trial.TrialState
SPLIT_SEED = 0  # draws completed, pruned and diverged trials from DIVERGING_SPACE (one at a time: always)
SWA_SPACE = """
[params.swa_start_frac]
choices = [0.3, 0.7]
[fixed]
swa_enabled = true
"""


def test_trials_differing_only_in_the_swa_start_report_what_they_would_ship(tmp_path, demo_data, sweep_knobs,
                                                                           local_ray):
    space = tmp_path / "swa.toml"
    space.write_text(SWA_SPACE)
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), space=str(space), samples=3, trial_steps=12,
                             grace_steps=12, concurrency=2, overrides=sweep_knobs, sampler="random", seed=1,
                             scheduler="none")
    run_sweep(settings)
    tables = load_tables(settings.folder)
    trials = tables["trials"].query("status == 'completed'")
    assert set(trials["swa_start_frac"]) == {0.3, 0.7}, trials  # both starts were tried
    meta = json.loads((settings.folder / "sweep.json").read_text())
    by_start = {}
    for row in trials.itertuples():
        # an independent run of the trial's own config, scored as a trial scores it
        config = trial_config(meta["base"], {"swa_start_frac": row.swa_start_frac, "swa_enabled": True},
                              settings.trial_steps, settings.rungs)
        alone = train(config, final_score=False).summary
        assert row.last_val_bpb == pytest.approx(alone["val_bpb"], abs=1e-9)  # the shipped weights' score
        assert alone["val_bpb"] == alone["avg_q_bpb"] != alone["avg_bpb"]  # averaged, then round-tripped
        by_start[row.swa_start_frac] = row
    early, late = by_start[0.3], by_start[0.7]
    # The SWA start does not change training, only what is shipped: equal live weights, other scores.
    assert early.live_bpb == pytest.approx(late.live_bpb, abs=1e-12)
    assert early.last_val_bpb != late.last_val_bpb
    ends = tables["curves"].query(f"step == {settings.trial_steps}").set_index("trial_id")
    for row in (early, late):
        end = ends.loc[row.trial_id]
        assert end["val_bpb"] == end["shipped_bpb"] == row.last_val_bpb and end["live_bpb"] == row.live_bpb
        assert end["avg_bpb"] == row.avg_bpb and end["avg_q_bpb"] == end["shipped_bpb"]


def _searcher(n_startup: int = 100) -> RungAwareOptunaSearch:
    return RungAwareOptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="val_bpb",
                                 mode="min", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=n_startup),
                                 trial_steps=16)


def test_tpe_keeps_a_diverged_trial_out_of_its_good_group():
    searcher = _searcher()
    for i in range(6):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"val_bpb": 3.0, "step": 16, "status": "completed"})
    searcher.on_trial_complete("t1", {"val_bpb": 3.5, "step": 16, "status": "completed"})
    for i in (2, 3):  # stopped by ASHA at step 4
        searcher.on_trial_result(f"t{i}", {"val_bpb": 4.0 + i / 10, "step": 4})
        searcher.on_trial_complete(f"t{i}", {"val_bpb": 4.0 + i / 10, "step": 4, "status": "running"})
    searcher.on_trial_complete("t4", {"val_bpb": PENALTY_BPB, "step": 3, "status": "diverged"})
    searcher.on_trial_complete("t5", {"val_bpb": PENALTY_BPB, "step": 0, "status": "infeasible"})
    study = searcher.study
    by_number = {t.number: t for t in study.trials}
    for n in (4, 5):
        assert by_number[n].state == optuna.trial.TrialState.COMPLETE and by_number[n].value == PENALTY_BPB
        assert by_number[n].constraints[FAILURE_CONSTRAINT] == 1.0
    # What TPE's split sees: with room for 3 in the good group, the two completed trials and the
    # better pruned one; the failures rank after every pruned trial. Told as a plain COMPLETE (Ray's
    # stock adapter, and this one before), the diverged trial would take the third place.
    below, above = _split_trials(study, study.get_trials(deepcopy=False), n_below=3)
    assert [t.number for t in below] == [0, 1, 2] and {4, 5} <= {t.number for t in above}
    below, _ = _split_trials(study, study.get_trials(deepcopy=False), n_below=4)
    assert [t.number for t in below] == [0, 1, 2, 3]


def test_a_resumed_errored_trial_is_told_once():
    searcher = _searcher()
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)
    # resume_errored: the same Ray trial runs again, reports its rungs and finishes
    searcher.on_trial_result("t0", {"val_bpb": 4.2, "step": 4})
    searcher.on_trial_complete("t0", {"val_bpb": 3.7, "step": 16, "status": "completed"})
    searcher.on_trial_complete("t0", {"val_bpb": 3.7, "step": 16, "status": "completed"})  # a second word
    trials = searcher.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    rerun = trials[1]
    assert rerun.params == trials[0].params and rerun.value == 3.7 and rerun.intermediate_values == {4: 4.2}
    assert rerun.user_attrs["jepatune:rerun_of"] == 0


def _asha(tmp_path, **kw) -> RecordingASHA:
    asha = RecordingASHA(time_attr="step", metric="val_bpb", mode="min", max_t=16, grace_period=2,
                         reduction_factor=2, decisions_path=str(tmp_path / "decisions.jsonl"), **kw)
    return asha


def _trial(name: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=name)


def _rungs(asha: RecordingASHA) -> dict[int, dict[str, float]]:
    return {int(m): dict(recorded) for m, recorded in asha._brackets[0]._rungs}


def test_asha_books_hold_only_judged_values_and_rebuild_exactly(tmp_path):
    asha = _asha(tmp_path, audit_frac=0.01)
    trials = {n: _trial(n) for n in ("a", "b", "c", "d")}
    for t in trials.values():
        asha.on_trial_add(None, t)
    report = lambda t, step, v, status="running": asha.on_trial_result(  # noqa: E731
        None, trials[t], {"step": step, "val_bpb": v, "status": status})
    assert report("a", 2, 5.0) == "CONTINUE"  # the first at a rung is never stopped
    assert report("b", 2, 6.0) == "CONTINUE"  # worse: stopped, but the first stop is always audited
    assert [r["decision"] for r in read_jsonl(tmp_path / "decisions.jsonl")] == ["continue", "audit"]
    for step in (4, 8):  # an audited trial runs on, judged no more
        assert report("b", step, 4.0) == "CONTINUE"
    assert report("b", 16, 3.9) == "STOP"
    asha.on_trial_complete(None, trials["b"], {"step": 16, "val_bpb": 3.9})  # Ray's ASHA would book 3.9 at 8
    assert report("c", 2, 7.0) == "STOP"  # a later stop, not audited at this share
    assert report("d", 2, PENALTY_BPB, "diverged") == "STOP"  # a penalty: no rung, no decision
    asha.on_trial_complete(None, trials["d"], {"step": 2, "val_bpb": PENALTY_BPB})
    rungs = _rungs(asha)
    assert rungs[2] == {"a": -5.0, "b": -6.0, "c": -7.0} and rungs[4] == rungs[8] == {}
    rows = read_jsonl(tmp_path / "decisions.jsonl")
    assert [(r["trial_id"], r["decision"]) for r in rows] == [("a", "continue"), ("b", "audit"), ("c", "stop")]
    # A resumed driver rebuilds the very same cut-offs from the decisions file alone.
    resumed = _asha(tmp_path, audit_frac=0.01)
    resumed.on_trial_add(None, _trial("e"))
    assert _rungs(resumed) == rungs


def test_a_shape_too_big_for_the_device_is_refused_before_training(tmp_path, demo_data, sweep_knobs, local_ray):
    space = tmp_path / "huge.toml"
    space.write_text("[params.mlp_mult]\nchoices = [2, 1099511627776]\n")  # 2**40 * model_dim floats
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), space=str(space), samples=3, trial_steps=8,
                             grace_steps=8, concurrency=1, overrides=sweep_knobs, seed=0)
    grid = run_sweep(settings)
    trials = load_tables(settings.folder)["trials"]
    assert grid.num_errors == 0 and set(trials["status"]) == {"completed", "infeasible"}, trials
    huge = trials[trials["mlp_mult"] == 2**40].iloc[0]
    assert huge["status"] == "infeasible" and huge["step"] == 0 and "GiB" in huge["error"], huge["error"]
    assert base_config(settings).mlp_mult == 2  # the others trained as usual
    assert (trials.loc[trials["status"] == "completed", "step"] == 8).all()


@pytest.fixture
def ray_with_injected_oom(tmp_path):
    """A local Ray whose workers fail the first training they start with an allocation error (as a
    machine out of memory would) until the marker file exists; the shared local Ray comes back after."""
    import ray

    marker = tmp_path / "oom-marker"
    ray.shutdown()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False,
             runtime_env={"env_vars": {INJECT_OOM_ENV: str(marker)}})
    yield marker
    ray.shutdown()


def test_a_machine_out_of_memory_is_retried_and_a_resumed_errored_trial_is_told(tmp_path, demo_data, sweep_knobs,
                                                                               ray_with_injected_oom):
    marker = ray_with_injected_oom
    kw = dict(data=str(demo_data), samples=2, trial_steps=8, grace_steps=8, concurrency=1, overrides=sweep_knobs)
    retried = SweepSettings(out=str(tmp_path / "retried"), max_failures=1, **kw)
    run_sweep(retried)
    assert marker.exists()  # the first trial did fail on memory
    trials = load_tables(retried.folder)["trials"]
    assert list(trials["status"]) == ["completed", "completed"] and list(trials["restarts"]) == [1, 0], trials
    assert [t.state for t in load_study(retried.folder).trials] == [State.COMPLETE] * 2  # no penalty, no FAIL

    marker.unlink()  # again, with no retry: the trial ends in an error...
    errored = SweepSettings(out=str(tmp_path / "errored"), max_failures=0, **kw)
    run_sweep(errored)
    trials = load_tables(errored.folder)["trials"]
    assert list(trials["status"]) == ["oom", "completed"], trials
    assert "out of memory" in trials.iloc[0]["error"]
    assert [t.state for t in load_study(errored.folder).trials] == [State.FAIL, State.COMPLETE]
    run_sweep(errored, resume=True)  # ...and a resumed sweep runs it again (resume_errored)
    trials = load_tables(errored.folder)["trials"]
    assert list(trials["status"]) == ["completed", "completed"], trials
    study = load_study(errored.folder).trials
    assert [t.state for t in study] == [State.FAIL, State.COMPLETE, State.COMPLETE]  # told once, as a new trial
    assert study[2].params == study[0].params and study[2].user_attrs["jepatune:rerun_of"] == 0
    assert study[2].value == pytest.approx(trials.iloc[0]["last_val_bpb"])


DIVERGING_SPACE = """
[params.scalar_lr]
choices = [0.04, 1e36]
[params.jepa_pure_frac]
low = 0.0
high = 0.5
"""


def test_after_a_real_sweep_tpe_sees_diverged_trials_below_every_pruned_one(tmp_path, demo_data, sweep_knobs,
                                                                            local_ray):
    space = tmp_path / "diverging.toml"
    space.write_text(DIVERGING_SPACE)
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), space=str(space), samples=8, trial_steps=16,
                             grace_steps=4, concurrency=1, overrides=sweep_knobs, seed=SPLIT_SEED, audit_frac=0.0)
    run_sweep(settings)
    trials = load_tables(settings.folder)["trials"]
    assert {"completed", "pruned", "diverged"} <= set(trials["status"]), trials
    study = load_study(settings.folder)
    frozen = study.get_trials(deepcopy=False)
    diverged = {t.number for t in frozen if t.constraints.get(FAILURE_CONSTRAINT, 0) > 0}
    pruned = [t for t in frozen if t.state == State.PRUNED]
    completed = [t for t in frozen if t.state == State.COMPLETE and t.number not in diverged]
    assert len(diverged) == (trials["status"] == "diverged").sum()
    # room in the good group for every completed trial and one more: a pruned one takes it, not a penalty
    below, above = _split_trials(study, frozen, n_below=len(completed) + 1)
    below = {t.number for t in below}
    assert {t.number for t in completed} < below and diverged <= {t.number for t in above}
    assert len(below & {t.number for t in pruned}) == 1
