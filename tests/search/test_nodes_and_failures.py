"""Real Ray beyond the happy path: trials on two nodes (and a node removed mid-sweep), one run on two
Ray Train DDP workers, and sweeps whose trials diverge, raise, are infeasible or run out of memory
while the sweep goes on."""

import json
import math
import threading
import time

import optuna
import pytest

from jepatune.analysis.tables import load_tables
from jepatune.errors import ConfigError
from jepatune.experiment.ray_files import load_study, read_trials
from jepatune.experiment.report_log import read_report_logs
from jepatune.experiment.settings import SweepSettings
from jepatune.experiment.trials import PENALTY_BPB
from jepatune.search.retrain import retrain_ddp
from jepatune.search.sweep import run_sweep
from jepatune.search.trainable import out_of_memory
from jepatune.spaces import FAILURE_CONSTRAINT, violation_of
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


# swa_decay acts only once SWA starts (the CE stage, at 80% of the budget): both recipes report the
# same BPB at the rungs before it, so ASHA stops neither, and the trials differ in config_key (the
# finished-trial cache cannot answer the restarted one).
SWA_SPACE = """
[params.swa_decay]
low = 0.9
high = 0.999
"""


@pytest.mark.slow
def test_a_removed_node_s_trial_restarts_from_its_checkpoint_on_the_other_node(two_nodes, tmp_path, demo_data,
                                                                                sweep_knobs):
    worker = next(iter(two_nodes.worker_nodes))
    gone = worker.node_id[:12]
    space = tmp_path / "swa.toml"
    space.write_text(SWA_SPACE)
    steps = 200  # rungs 25, 50, 100, 200, each with a checkpoint
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path), space=str(space), samples=2, trial_steps=steps,
                             grace_steps=25, concurrency=2, cpus_per_trial=1, overrides=sweep_knobs, max_failures=2)
    removed: dict = {}

    def remove_the_worker_node() -> None:
        """Once the worker node's trial logged its second rung, mid-trial. A trial logs a report before it
        makes it, and a report returns once the driver has taken it, so the first rung's checkpoint is
        registered; the second rung's report may or may not have reached the driver."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not removed:
            for folder, log in read_report_logs(settings.experiment_path).items():
                last = log["reports"][-1] if log["reports"] else {}
                if last.get("node") == gone and 50 <= last.get("step", 0) < steps:
                    removed.update(folder=folder, step=last["step"])
                    two_nodes.remove_node(worker)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=remove_the_worker_node, daemon=True)
    thread.start()
    run_sweep(settings)  # the driver is on the head node, which stays; Ray's snapshots back off (10 s and more)
    thread.join(10)
    assert removed, "the worker node's trial finished before the node could be removed"

    tables = load_tables(settings.folder)
    trials = tables["trials"].set_index("trial_id")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials
    trial_id = next(t for t in trials.index if t in removed["folder"])
    moved = trials.loc[trial_id]
    assert moved["restarts"] >= 1 and moved["step"] == steps and moved["node"] != gone, moved
    # Every rung in the curve, those reported on the lost node included (Ray's copy of its result.json
    # may predate them: the tables take them from the trial's own report log).
    assert list(tables["curves"].query("trial_id == @trial_id")["step"]) == [25, 50, 100, 200]
    reports = next(t["reports"] for t in read_trials(settings.experiment_path) if t["trial_id"] == trial_id)
    before = [r["step"] for r in reports if r["node"] == gone]
    after = [r["step"] for r in reports if r["node"] != gone]
    assert before and before[0] == 25 and after and after[-1] == steps, (before, after)
    # Restarted from a checkpoint (the first rung's, or the second's if its report had reached the
    # driver), not from step 0: the first rung is never reported again.
    assert min(after) > 25 and [r["step"] for r in reports].count(25) == 1, (before, after)
    print(f"node removed after step {removed['step']}; the trial went on from step {min(after)} on the head node")


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


# scalar_lr=1e36 diverges within a step; vocab_size=64 is a valid config, but the trainer refuses the
# demo corpus's bytes (token ids up to 255) with a DataError on any machine; jepa_pure_frac above the
# fixed ce_pure_frac is infeasible.
FAILING_SPACE = """
[params.scalar_lr]
choices = [0.04, 1e36]
[params.vocab_size]
choices = [256, 64]
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
    # Seed 5 draws (reference, vocab_size=64, diverging, infeasible, infeasible, fine) in the random startup;
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
            assert row.step == 8 and row.last_val_bpb < 8.0 and row.vocab_size == 256
            assert told.state == optuna.trial.TrialState.COMPLETE and told.value == pytest.approx(row.last_val_bpb)
        elif row.status == "diverged":
            assert row.scalar_lr == 1e36 and row.last_val_bpb == PENALTY_BPB
            assert told.state == optuna.trial.TrialState.COMPLETE and told.value == PENALTY_BPB
            assert told.constraints[FAILURE_CONSTRAINT] == 1.0  # kept out of TPE's good group
        elif row.status == "errored":
            assert row.vocab_size == 64 and "vocab_size 64" in row.error and row.restarts == settings.max_failures
            assert told.state == optuna.trial.TrialState.FAIL
        else:  # infeasible: reported at step 0 with the reason, never trained
            assert row.step == 0 and row.jepa_pure_frac > 0.5 and "ce_pure_frac" in row.error
            assert violation_of(told) > 0 and told.value == PENALTY_BPB
            assert told.constraints[FAILURE_CONSTRAINT] == 1.0
        assert (violation_of(told) > 0) == (row.status == "infeasible")


def test_out_of_memory_is_told_apart_from_other_errors():
    import torch

    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**45, 32)  # 4 PiB
    assert out_of_memory(refused.value).startswith("out of memory: ")
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == (
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
