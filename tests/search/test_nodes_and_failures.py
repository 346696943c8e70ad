"""Real Ray beyond the happy path: trials on two nodes, one run on two Ray Train DDP workers, and
a sweep whose trials diverge, raise or are infeasible while the sweep goes on."""

import json
import math

import optuna
import pytest

from jepatune.analysis.tables import load_tables
from jepatune.errors import ConfigError
from jepatune.search.retrain import retrain_ddp
from jepatune.search.sweep import SweepSettings, load_study, run_sweep
from jepatune.search.trainable import PENALTY_BPB
from jepatune.spaces import violation_of
from jepatune.trainer.loop import train


@pytest.fixture
def two_nodes():
    """Two one-CPU Ray nodes on this machine. They share its disk, so a local experiment folder
    works; the nodes of a real cluster do not, and need --storage (s3://... or NFS)."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()  # the local Ray of earlier tests: a driver joins one cluster at a time
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:  # as conftest's `local_ray` left it, for the tests after this one
            ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)


@pytest.mark.slow
def test_trials_spread_over_two_nodes(two_nodes, tmp_path, demo_data, sweep_knobs):
    import ray

    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), samples=4, trial_steps=8, concurrency=2,
                             cpus_per_trial=1, overrides=sweep_knobs)
    run_sweep(settings)
    trials = load_tables(settings.folder)["trials"]
    assert len(trials) == 4 and trials["node"].notna().all()
    # Two one-CPU trials at once cannot share a one-CPU node.
    assert trials["node"].nunique() == 2
    assert set(trials["node"]) == {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]}


@pytest.mark.slow
def test_ray_train_ddp_on_two_workers_matches_one_process(tiny, local_ray, tmp_path):
    config = tiny.replace(iterations=6, val_loss_every=3, grad_accum_steps=2)
    out = tmp_path / "run"
    metrics = retrain_ddp(config, out, num_workers=2, use_gpu=False)
    assert metrics["status"] == "completed" and math.isfinite(metrics["val_bpb"])
    # Ray Train set RANK/WORLD_SIZE and joined the gloo group: the trainer ran DDP, one micro-batch a rank.
    assert (metrics["rank"], metrics["world_size"]) == (0, 2)
    assert (out / "final_model.int8.ptz").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_bpb"] == metrics["val_bpb"] and summary["config"]["grad_accum_steps"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 3, 6, 6]  # rank 0's record alone: evals, final
    # Gradient accumulation 2 in one process == 2 workers x 1 micro-batch.
    assert metrics["val_bpb"] == pytest.approx(train(config).summary["val_bpb"], rel=1e-4)


def test_ray_train_ddp_refuses_what_the_workers_would_fail_on(tiny, tmp_path):
    with pytest.raises(ConfigError, match="divisible by num_workers=2"):
        retrain_ddp(tiny.replace(grad_accum_steps=1), tmp_path, num_workers=2)
    with pytest.raises(ConfigError, match="use_gpu=False"):
        retrain_ddp(tiny.replace(device="cuda"), tmp_path, num_workers=2)


# scalar_lr=1e36 diverges within a step; device="cuda" raises ConfigError in the trial on this
# CPU-only machine; jepa_pure_frac above the fixed ce_pure_frac is infeasible.
FAILING_SPACE = """
[params.scalar_lr]
choices = [0.04, 1e36]
[params.device]
choices = ["cpu", "cuda"]
[params.jepa_pure_frac]
low = 0.0
high = 1.0
[fixed]
ce_pure_frac = 0.5
"""


def test_diverged_errored_and_infeasible_trials_are_recorded_and_the_sweep_goes_on(tmp_path, demo_data,
                                                                                   sweep_knobs, local_ray):
    space = tmp_path / "failing.toml"
    space.write_text(FAILING_SPACE)
    # Seed 5 draws (reference, cuda, diverging, infeasible, infeasible, fine) in the random startup;
    # one rung at the full budget, so ASHA prunes nothing.
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), space=str(space), samples=6, trial_steps=8,
                             grace_steps=8, concurrency=2, overrides=sweep_knobs, seed=5, max_failures=1)
    grid = run_sweep(settings)
    trials = load_tables(settings.folder)["trials"]
    assert len(grid) == len(trials) == 6 and grid.num_errors == (trials["status"] == "errored").sum()
    assert set(trials["status"]) == {"completed", "diverged", "errored", "infeasible"}, trials
    study = {round(t.params["jepa_pure_frac"], 12): t for t in load_study(settings.folder).trials}
    for row in trials.itertuples():
        told = study[round(row.jepa_pure_frac, 12)]
        if row.status == "completed":
            assert row.step == 8 and row.last_val_bpb < 8.0 and row.device == "cpu"
            assert told.state == optuna.trial.TrialState.COMPLETE and told.value == pytest.approx(row.last_val_bpb)
        elif row.status == "diverged":
            assert row.scalar_lr == 1e36 and row.last_val_bpb == PENALTY_BPB
            assert told.state == optuna.trial.TrialState.COMPLETE and told.value == PENALTY_BPB
        elif row.status == "errored":
            assert row.device == "cuda" and "cuda" in row.error and row.restarts == settings.max_failures
            assert told.state == optuna.trial.TrialState.FAIL
        else:  # infeasible: reported at step 0 with the reason, never trained
            assert row.step == 0 and row.jepa_pure_frac > 0.5 and "ce_pure_frac" in row.error
            assert violation_of(told) > 0 and told.value == PENALTY_BPB
        assert (violation_of(told) > 0) == (row.status == "infeasible")
