"""A real sweep with a local Ray: ASHA, OptunaSearch, the tables, the retrain."""

import json
import math

import optuna
import pandas as pd
import pytest
from conftest import copy_sweep

from jepatune.analysis import compare_final, schema
from jepatune.analysis.finalists import conclusion
from jepatune.analysis.tables import load_tables, write_tables
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import swa_choices
from jepatune.trainer.config import TrainConfig, load_config


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, finished_sweep_folder, local_ray):
    """The session's finished sweep (8 trials of the tiny model, a 2-seed retrain at 16 steps), copied;
    Ray stays up for the retrain tests."""
    settings = copy_sweep(finished_sweep_folder, tmp_path_factory.mktemp("sweep"))
    tables = load_tables(settings.folder)
    return settings, tables, compare_final(tables["final"])


def test_reference_recipe_is_the_first_trial(sweep):
    _, tables, _ = sweep
    trials = tables["trials"]
    first = trials.iloc[0]
    assert first["is_reference"] and trials["is_reference"].sum() == 1
    ref = TrainConfig()
    assert first["jepa_pure_frac"] == pytest.approx(ref.jepa_pure_frac)
    assert first["ce_pure_frac"] == pytest.approx(ref.ce_pure_frac)
    assert first["sigreg_weight"] == pytest.approx(ref.sigreg_weight)


def test_asha_stops_trials_and_the_searcher_proposes_new_configs(sweep):
    settings, tables, _ = sweep
    trials, decisions = tables["trials"], tables["decisions"]
    assert len(trials) == settings.samples
    assert trials["config_key"].nunique() == len(trials)  # every trial a different recipe
    assert (trials["status"] == "pruned").sum() >= 2 and (trials["status"] == "completed").sum() >= 2
    pruned = trials[trials["status"] == "pruned"]
    assert (pruned["step"] < settings.trial_steps).all()
    # Every decision is ASHA's rule: stop exactly when the value is worse than the rung's cut-off.
    assert set(decisions["rung"]) <= set(settings.rungs)
    for row in decisions.itertuples():
        worse = not pd.isna(row.cutoff) and row.value > row.cutoff
        assert (row.decision in ("stop", "audit")) == worse, row  # an audit is a stop run on anyway
    assert set(decisions.loc[decisions["decision"] == "stop", "trial_id"]) == set(pruned["trial_id"])


def test_optuna_is_told_pruned_not_complete(sweep):
    settings, tables, _ = sweep
    trials = tables["trials"].set_index("trial_id")
    study = load_study(settings.folder)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == (trials["status"] == "pruned").sum()
    assert states.count(optuna.trial.TrialState.COMPLETE) == (trials["status"] == "completed").sum()
    completed = sorted(trials.loc[trials["status"] == "completed", "last_val_bpb"])
    assert sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE) == \
        pytest.approx(completed)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            # Optuna keeps the last rung value of a pruned trial, marked PRUNED: TPE ranks it below
            # every trial that finished, instead of mistaking it for a final value.
            last_step = max(t.intermediate_values)
            assert last_step < settings.trial_steps  # keyed by step, not by report count
            assert t.value == t.intermediate_values[last_step]


def test_tables_have_the_documented_dtypes_and_round_trip(sweep, tmp_path):
    settings, tables, _ = sweep
    for name, columns in schema.TABLES.items():
        frame = tables[name]
        for column, dtype in columns.items():
            assert str(frame[column].dtype) == dtype, (name, column)
    assert str(tables["trials"]["jepa_pure_frac"].dtype) == "float64"
    assert str(tables["trials"]["swa_enabled"].dtype) == "boolean"
    # rebuilt from the experiment folder alone, they are the same
    paths = write_tables(settings.folder)
    for name, path in paths.items():
        pd.testing.assert_frame_equal(pd.read_parquet(path), tables[name])
    curves = tables["curves"]
    assert set(curves["trial_id"]) == set(tables["trials"]["trial_id"])
    assert not curves["val_bpb"].isna().any()


def test_finalists_are_retrained_with_unseen_seeds_and_the_best_retrain_wins(sweep):
    settings, tables, _ = sweep
    final, trials, table = tables["final"], tables["trials"], tables["finalists"]
    base = TrainConfig()
    assert settings.finalists == 3 and settings.final_seeds == 2
    # the top 3 distinct recipes by trial score, and the reference (a finalist only when it ranked there)
    done = trials.query("status == 'completed'").sort_values("last_val_bpb")
    top = list(done["trial_id"].head(3))
    assert sorted(final.loc[final["finalist"].astype(bool), "trial_id"].unique()) == sorted(top)
    assert "reference" in set(final["recipe"]) and final["trial_id"].nunique() == len(set(final["recipe"]))
    for row in final.itertuples():  # the trial score each finalist was picked on
        assert row.trial_bpb == pytest.approx(trials.set_index("trial_id").loc[row.trial_id, "last_val_bpb"])
    # seeds that no trial trained with (every trial used the base seed), the same for every recipe
    assert set(final["seed"]) == {base.seed + 1, base.seed + 2} and base.seed not in set(final["seed"])
    assert final.groupby("recipe")["seed"].apply(frozenset).nunique() == 1
    assert (final["steps"] == 16).all() and final["fits_cap"].all()
    assert all(math.isfinite(v) for v in final["val_bpb"])
    # the winner: the lowest retrain mean (the reference's too), not the best trial
    means = final.groupby("recipe")["val_bpb"].mean()
    winner = means.idxmin()
    assert table.loc[table["winner"], "recipe"].tolist() == [winner] and table.iloc[0]["recipe"] == winner
    assert table.set_index("recipe")["mean"].to_dict() == pytest.approx(means.to_dict())
    best = load_config(settings.folder / "best.toml")
    won = trials.set_index("trial_id").loc[table.iloc[0]["trial_id"]]
    assert best.jepa_pure_frac == pytest.approx(won["jepa_pure_frac"]) and best.seed == base.seed
    assert best.model_dim == 32  # the fixed knobs travel with the recipe
    # every retrain, the reference's too, ships the average it judged best on unread train bytes
    choices = swa_choices(settings.final_swa_choices)
    assert best.swa_start_choices == choices and len(choices) > 3
    shipped = final.set_index("recipe")["swa_start_shipped"]
    summaries = {r: json.loads((settings.folder / "final" / f"{r}-seed{s}" / "summary.json").read_text())
                 for r, s in zip(final["recipe"], final["seed"], strict=True)}
    starts = {r: TrainConfig.from_dict(v["config"]).swa_start for r, v in summaries.items()}
    assert all(len(v["swa_select_bpb"]) > 3 for v in summaries.values())
    assert all(v in choices or v == starts[r] for r, v in shipped.items()), shipped


def test_retrain_a_recipe_file_beside_its_reference(sweep, tmp_path):
    from jepatune.cli import main

    settings, _, _ = sweep
    out = tmp_path / "retrain"
    assert main(["retrain", str(settings.folder / "best.toml"), "--final-steps", "8", "--final-seeds", "1",
                 "--out", str(out)]) == 0
    final = pd.read_parquet(out / "tables" / "final.parquet")
    assert sorted(final["recipe"]) == ["recipe", "reference"] and (final["steps"] == 8).all()
    for column, dtype in schema.FINAL.items():
        assert str(final[column].dtype) == dtype
    import json

    seed = TrainConfig().seed + 1  # the first seed after the recipe's own
    recipe = json.loads((out / "final" / f"recipe-seed{seed}" / "summary.json").read_text())["config"]
    reference = json.loads((out / "final" / f"reference-seed{seed}" / "summary.json").read_text())["config"]
    best = load_config(settings.folder / "best.toml")
    assert recipe["jepa_pure_frac"] == best.jepa_pure_frac
    # the reference recipe at the same shape and budget
    assert reference["jepa_pure_frac"] == TrainConfig().jepa_pure_frac and reference["model_dim"] == 32


def test_checkpoint_every_second_rung_and_the_last(sweep):
    from jepatune.experiment.ray_files import read_trials

    settings, _, _ = sweep
    assert settings.rungs == (2, 4, 8, 16)
    seen = 0
    for trial in read_trials(settings.experiment_path):
        for r in trial["reports"]:
            if "step" in r and not r.get("cached"):
                seen += 1
                assert (r.get("checkpoint_dir_name") is not None) == (r["step"] in (4, 16)), r
    assert seen > settings.samples


def test_analyze_prints_the_leaderboard_and_the_evidence(sweep, capsys):
    from jepatune.cli import main

    settings, tables, _ = sweep
    assert main(["analyze", str(settings.folder)]) == 0
    out = capsys.readouterr().out
    best = tables["trials"].query("status == 'completed'").sort_values("last_val_bpb").iloc[0]
    assert best["trial_id"] in out and "finalists retrained" in out
    assert conclusion(tables["finalists"]) in out  # the sweep's answer, in words
    assert "BPB by jepa_pure_frac" in out and "knob importance" in out
    assert "ASHA rung predicts" in out and all(f"\n {r:>4} " in out or f"\n{r:>5} " in out for r in (2, 4, 8))


def test_analyze_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    from jepatune.cli import main

    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a jepatune sweep" in capsys.readouterr().err


def test_ended_trials_keep_their_results_and_no_training_state(sweep):
    """Retention: every trial of the finished sweep ended, so each keeps at most one checkpoint folder
    (none when it was stopped before its first checkpoint), with its result files and without the
    state a resume would load."""
    from jepatune.search.trainable import RESULT_NAME, RUNG_RESULT
    from jepatune.trainer.checkpoint import CHECKPOINT_NAME

    settings, tables, _ = sweep
    trial_dirs = sorted(settings.folder.glob("run_trial_*"))
    assert len(trial_dirs) == settings.samples
    for trial in trial_dirs:
        checkpoints = sorted(trial.glob("checkpoint_*"))
        assert len(checkpoints) <= 1, checkpoints
        for kept in ({p.name for p in c.iterdir()} for c in checkpoints):
            assert CHECKPOINT_NAME not in kept and kept & {RESULT_NAME, RUNG_RESULT}, (trial.name, kept)
    completed = set(tables["trials"].loc[tables["trials"]["status"] == "completed", "trial_id"])
    with_result = {t.name.split("_")[2] for t in trial_dirs if list(t.glob(f"checkpoint_*/{RESULT_NAME}"))}
    assert with_result == completed
    ckpt_bytes = sum(p.stat().st_size for t in trial_dirs for p in t.rglob("checkpoint_*/*"))
    assert ckpt_bytes < 4096 * settings.samples  # a few small JSON files per trial
