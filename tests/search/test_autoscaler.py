"""A sweep on Ray's autoscaler with fake nodes: a head with no GPU, a GPU worker type (min 0, max 2).

Trials that ask for half a GPU make the autoscaler start workers, and they run there; a worker node
killed mid-sweep takes its trials with it, and Ray runs them again, on a node the autoscaler starts
for them, from their last checkpoints.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from clusters import AUTH_OFF, FakeAutoscalingCluster, kill_node
from processes import Search, poll, set_args

from jepatune.analysis.tables import load_tables
from jepatune.search.trainable import RUNG_RESULT


def reports(trial_dir: Path) -> list[dict]:
    rows = []
    for line in (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # being written
            continue
    return rows


@pytest.fixture
def autoscaling():
    import ray

    ray.shutdown()  # the tests here drive the cluster from subprocesses
    temp = tempfile.mkdtemp(prefix="jt-as-", dir="/tmp")  # short: Ray's socket paths
    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                   "max_workers": 2}})
    try:
        address = cluster.start(temp)
        yield address, node_ids(address)[0]  # the head: the only node before any trial asks for a GPU
    finally:
        cluster.shutdown()


def node_ids(address: str) -> list[str]:
    """The ids of every node the cluster has had (alive or dead). The fake provider's ids share their
    first digits, so the full ids are compared here, not the tables' short ones."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        return [n["NodeID"] for n in ray.nodes()]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_autoscaler_starts_gpu_workers_and_a_killed_one_loses_no_checkpoint(autoscaling, tmp_path, demo_data,
                                                                                sweep_knobs):
    out, samples, steps = tmp_path / "out", 6, 96
    folder = out / "s"
    args = ["--data", str(demo_data), "--out", str(out), "--name", "s", "--samples", str(samples), "--trial-steps",
            str(steps), "--grace-steps", "6", "--concurrency", "4", "--gpus-per-trial", "0.5", "--max-failures", "3",
            *set_args(sweep_knobs)]
    started = time.monotonic()
    address, head = autoscaling
    with Search(args, tmp_path / "sweep.log", ray_address=address, extra_env=AUTH_OFF) as search:
        def running_with_a_checkpoint() -> Path | None:
            """A trial that reported a checkpoint and has not ended (the driver prints a line for each
            that ends: `trial K/N ID: ...`)."""
            ended = search.log.read_text(errors="replace")
            for trial in folder.glob("run_trial_*"):
                saved = sorted(trial.glob(f"checkpoint_*/{RUNG_RESULT}"))
                if len(saved) == 2 and f" {trial.name.split('_')[2]}: " not in ended:  # at its second checkpoint
                    return trial
            return None

        poll("a trial with a checkpoint on a worker", lambda: running_with_a_checkpoint() is not None, search, 120)
        victim = running_with_a_checkpoint()
        # A trial restarts from the last checkpoint the driver registered, and the worker writes a
        # checkpoint before its report reaches the driver. A report returns once the driver has taken
        # it, so a second checkpoint on the node means the first one's report was taken.
        saved = json.loads(sorted(victim.glob(f"checkpoint_*/{RUNG_RESULT}"))[0].read_text())  # the first rung's
        node, checkpointed = saved["node_id"], saved["step"]
        assert kill_node(node), f"no raylet of node {node}"
        assert search.wait(300) == 0, search.tail()
    print(f"autoscaled sweep with a worker killed: {time.monotonic() - started:.0f}s")

    trials = load_tables(folder)["trials"]
    assert len(trials) == samples and set(trials["status"]) <= {"completed", "pruned"}, trials
    # The head has no GPU: every trial ran on a worker the autoscaler started, and it started another
    # after the kill (or had two up), since the killed trial finished elsewhere.
    ran_on = {r["node_id"] for trial in folder.glob("run_trial_*") for r in reports(trial) if "node_id" in r}
    nodes, workers = ran_on, set(node_ids(address)) - {head}
    assert head not in nodes and nodes <= workers and node in workers and len(workers) >= 2, (head, nodes, workers)
    # The killed trial went on from its checkpoint: its reports after the kill start past that step.
    again = reports(victim)
    redone = [r for r in again if r.get("node_id") != node]
    assert redone and min(r["step"] for r in redone) > checkpointed, (checkpointed, [(r.get("node_id"), r["step"])
                                                                                       for r in again])
    assert trials.set_index("trial_id").loc[victim.name.split("_")[2], "restarts"] >= 1
