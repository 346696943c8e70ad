"""export_study / import_study: a sweep as an Optuna journal study and back (a real sweep, hand-built tables)."""

import json

import optuna
import pandas as pd
import pytest
from conftest import copy_sweep

from jepatune.analysis import optuna_io, schema
from jepatune.analysis.tables import write_parquet
from jepatune.errors import JepatuneError
from jepatune.spaces import get_space

State = optuna.trial.TrialState


def open_journal(path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


# --- a real sweep --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory, finished_sweep_folder):
    """The session's finished sweep (8 trials of the tiny model over the curriculum space), copied."""
    return copy_sweep(finished_sweep_folder, tmp_path_factory.mktemp("optuna_io"))


@pytest.fixture(scope="module")
def exported(sweep):
    return optuna_io.export_study(sweep.folder)


def test_export_copies_the_sweeps_study(sweep, exported):
    from jepatune.experiment.ray_files import load_study

    assert exported == sweep.folder / "optuna.journal"
    assert not [p.name for p in sweep.folder.iterdir() if p.name.startswith(".tmp-") or p.suffix == ".lock"]
    loaded = open_journal(exported, sweep.name)
    assert loaded.direction == optuna.study.StudyDirection.MINIMIZE
    assert loaded.user_attrs["jepatune_source"] == "searcher"
    source = [t for t in load_study(sweep.folder).trials if t.state.is_finished()]
    assert len(loaded.trials) == len(source) == sweep.samples
    for a, b in zip(loaded.trials, source, strict=True):
        assert (a.state, a.value, a.params, a.distributions) == (b.state, b.value, b.params, b.distributions)
        assert (a.intermediate_values, a.user_attrs, a.constraints) == (b.intermediate_values, b.user_attrs,
                                                                        b.constraints)
    assert set(loaded.trials[0].params) == set(get_space("curriculum").params)  # bridge_share, not ce_pure_frac
    pruned = [t for t in loaded.trials if t.state == State.PRUNED]
    assert pruned, "ASHA stopped none of the 6 trials"
    for t in pruned:  # the value at the rung where ASHA stopped it, as Optuna records it
        assert t.intermediate_values and max(t.intermediate_values) < sweep.trial_steps
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
    scores = optuna.importance.get_param_importances(loaded, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    assert set(scores) <= set(get_space("curriculum").params)


def test_export_refuses_to_overwrite(sweep, exported, tmp_path):
    before = exported.stat().st_mtime_ns
    with pytest.raises(JepatuneError, match="optuna.journal exists; pass overwrite=True"):
        optuna_io.export_study(sweep.folder)
    assert exported.stat().st_mtime_ns == before
    assert optuna_io.export_study(sweep.folder, overwrite=True) == exported
    assert len(open_journal(exported, sweep.name).trials) == sweep.samples
    other = optuna_io.export_study(sweep.folder, tmp_path / "sub" / "x.journal")
    assert len(open_journal(other, sweep.name).trials) == sweep.samples


def test_import_round_trip(sweep, exported, tmp_path):
    space = get_space("curriculum")
    points = optuna_io.import_study(exported, sweep.name, "curriculum")
    loaded = open_journal(exported, sweep.name)
    finished = [t for t in loaded.trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert [p["state"] for p in points] == [t.state.name for t in finished]
    assert [p["value"] for p in points] == [t.value for t in finished]
    dims = {d.name: d for d in space.dims}
    for p in points:
        assert list(p["params"]) == list(space.params)
        assert all(dims[k].contains(v) for k, v in p["params"].items())
        space.overrides(p["params"])  # a point the space maps to TrainConfig overrides
    assert any(p["state"] == "COMPLETE" for p in points)
    url = f"sqlite:///{tmp_path / 'copy.db'}"  # any storage URL
    optuna.copy_study(from_study_name=sweep.name, from_storage=optuna_io.journal_storage(exported), to_storage=url)
    assert optuna_io.import_study(url, sweep.name, space) == points


# --- import checks on hand-built studies ---------------------------------------------------------

def journal_with(tmp_path, *trials: dict, name: str = "s") -> str:
    """A journal study whose trials have `params` (wide float distributions, so any value is storable)."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "j.journal"
    study = optuna.create_study(study_name=name, storage=optuna_io.journal_storage(path))
    for i, params in enumerate(trials):
        dists = {k: optuna.distributions.FloatDistribution(-10.0, 10.0) for k in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=5.0 + i))
    return str(path)


def test_import_names_the_first_mismatch(tmp_path):
    ref = get_space("curriculum").reference_point()
    assert optuna_io.import_study(journal_with(tmp_path, ref), "s", "curriculum") == [
        {"params": ref, "value": 5.0, "state": "COMPLETE"}]
    with pytest.raises(JepatuneError, match=r"trial 1: param 'lr' is not in space 'curriculum' \(its params: jepa"):
        optuna_io.import_study(journal_with(tmp_path / "a", ref, {**ref, "lr": 0.1}), "s", "curriculum")
    with pytest.raises(JepatuneError, match=r"trial 0: param 'jepa_pure_frac' = 0.9 is outside .*range \[0.0, 0.6\]"):
        optuna_io.import_study(journal_with(tmp_path / "b", {**ref, "jepa_pure_frac": 0.9}), "s", "curriculum")
    partial = {k: v for k, v in ref.items() if k != "swa_start"}
    with pytest.raises(JepatuneError, match="trial 1: param 'swa_start' of space 'curriculum' is missing"):
        optuna_io.import_study(journal_with(tmp_path / "c", ref, partial), "s", "curriculum")
    with pytest.raises(JepatuneError, match="no study named 'other'; its studies: s"):
        optuna_io.import_study(journal_with(tmp_path / "d", ref), "other", "curriculum")
    with pytest.raises(JepatuneError, match="no such journal file"):
        optuna_io.import_study(tmp_path / "missing.journal", "s", "curriculum")
    assert not (tmp_path / "missing.journal").exists()


# --- the table fallback --------------------------------------------------------------------------

KNOBS = {"jepa_pure_frac": "float64", "swa_enabled": "boolean", "num_layers": "Int64"}


def table(columns: dict[str, str], rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def test_export_falls_back_to_the_tables(tmp_path):
    folder = tmp_path / "handmade"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"settings": {"data": "unused"}}))  # no searcher state
    rows = [("completed", 5.0, 0.1, True, 2), ("pruned", 6.5, 0.5, False, 4), ("diverged", 99.0, 0.3, None, 8),
            ("infeasible", 99.0, 0.2, True, 2), ("errored", None, 0.4, False, 2), ("incomplete", 7.0, 0.0, True, 2)]
    trials = table({**schema.TRIALS, **KNOBS}, [
        {"trial_id": f"t{i}", "status": s, "last_val_bpb": v, "jepa_pure_frac": a, "swa_enabled": b,
         "num_layers": n, "is_reference": i == 0, "trial_steps": 16} for i, (s, v, a, b, n) in enumerate(rows)])
    curves = table(schema.CURVES, [{"trial_id": t, "step": s, "val_bpb": v}
                                   for t, s, v in (("t0", 4, 6.0), ("t0", 16, 5.0), ("t1", 2, 7.0), ("t1", 4, 6.5))])
    for name, frame in (("trials", trials), ("curves", curves), ("decisions", table(schema.DECISIONS, [])),
                        ("final", table(schema.FINAL, [])), ("finalists", table(schema.FINALISTS, []))):
        write_parquet(frame, folder / "tables" / f"{name}.parquet")

    loaded = open_journal(optuna_io.export_study(folder), "handmade")
    assert loaded.user_attrs["jepatune_source"] == "tables"
    t = loaded.trials
    assert [x.user_attrs["trial_id"] for x in t] == ["t0", "t1", "t2", "t3", "t4"]  # incomplete: left out
    assert [x.state for x in t] == [State.COMPLETE, State.PRUNED, State.COMPLETE, State.COMPLETE, State.FAIL]
    assert [x.value for x in t] == [5.0, 6.5, 99.0, 99.0, None]
    assert t[0].intermediate_values == {4: 6.0, 16: 5.0} and t[1].intermediate_values == {2: 7.0, 4: 6.5}
    assert t[0].user_attrs["is_reference"] and not t[1].user_attrs["is_reference"]
    assert [x.constraints["space"] for x in t] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert t[0].params == {"jepa_pure_frac": 0.1, "swa_enabled": True, "num_layers": 2}
    assert "swa_enabled" not in t[2].params  # null in the table
    assert t[0].distributions == {"jepa_pure_frac": optuna.distributions.FloatDistribution(0.1, 0.5),
                                  "swa_enabled": optuna.distributions.CategoricalDistribution([False, True]),
                                  "num_layers": optuna.distributions.IntDistribution(2, 8)}
