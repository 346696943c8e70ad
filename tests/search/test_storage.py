"""A sweep and an ablation on S3-compatible storage (moto's server on localhost), on a two-node Ray
cluster whose head has no CPU, so that every trial runs on the worker node.

All nodes share this machine's disk, so each test proves what would hold on separate machines from
what lands where: every file a resume, a table or a report needs is an object in the bucket, the
driver's local folder holds only the record that points there, and a driver started in a fresh
folder, given only the storage URI, finishes the sweep and builds every table.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import TINY
from processes import Search, poll, set_args

from jepatune.analysis.ablation import load_ablation
from jepatune.analysis.tables import load_tables
from jepatune.experiment.layout import ABLATION_NAME, CACHE_DIR, DECISIONS_NAME, FINAL_RUNS, SETTINGS_NAME
from jepatune.experiment.ray_files import load_study
from jepatune.experiment.settings import read_settings
from jepatune.experiment.store import Store

BUCKET = "jepatune-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free local port with one bucket; pyarrow (the driver's, every Ray
    node's: they inherit this environment) reaches it through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    """A head with no CPU and one worker node with two: Ray schedules every trial on the worker."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a driver joins one cluster at a time; the tests here drive it from subprocesses
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker.node_id[:12]
    finally:
        cluster.shutdown()


def test_the_store_reads_back_what_it_wrote_on_s3_and_on_a_local_folder(s3, tmp_path):
    for store in (Store(f"{s3}/store-test"), Store(tmp_path / "local")):
        assert store.read_text("a/b.json") is None and store.read_rows("log.jsonl") == []
        store.write_text("a/b.json", '{"x": 1}')
        store.append_row("log.jsonl", {"i": 0})
        store.append_row("log.jsonl", {"i": 1})
        assert store.read_json("a/b.json") == {"x": 1} and store.names("a", ".json") == ["b.json"]
        assert [r["i"] for r in store.read_rows("log.jsonl")] == [0, 1]  # in the order written
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 4}\n')
        store.put_dir(run, "final/r-seed1")
        assert [m["step"] for m in store.read_rows("final/r-seed1/metrics.jsonl")] == [0, 4]
        assert store.total_bytes() == len('{"x": 1}') + (run / "metrics.jsonl").stat().st_size + sum(
            len(json.dumps({"i": i})) + (0 if store.remote else 1) for i in (0, 1))
    assert not (tmp_path / "store-test").exists()  # the S3 store wrote nothing locally


@pytest.mark.slow
def test_a_sweep_on_s3_resumes_on_another_machine_from_the_uri_alone(cluster, s3, tmp_path, demo_data, sweep_knobs):
    address, worker_node = cluster[0].address, cluster[1]
    storage, samples, steps = f"{s3}/sweeps", 6, 48
    store = Store(f"{storage}/s")
    first_out = tmp_path / "first-machine"
    first = ["--data", str(demo_data), "--out", str(first_out), "--name", "s", "--storage", storage,
             "--samples", str(samples), "--trial-steps", str(steps), "--grace-steps", "6", "--concurrency", "2",
             *set_args(sweep_knobs)]
    with Search(first, tmp_path / "first.log", ray_address=address) as search:
        # Trials write their finished/ entry on the worker node, to the bucket, before they report.
        poll("two finished trials in the bucket", lambda: len(store.names(CACHE_DIR, ".json")) >= 2, search, 90)
        search.kill()
    assert sorted(os.listdir(first_out / "s")) == [SETTINGS_NAME]  # the local folder: only the pointer
    cache = {f.path: (store.read_bytes(f"{CACHE_DIR}/{f.base_name}"), f.mtime_ns)
             for f in store.files(CACHE_DIR, ".json")}
    finished = {path.rsplit("/", 1)[1][:-5]: json.loads(text) for path, (text, _) in cache.items()}
    assert store.exists(SETTINGS_NAME) and store.read_rows(DECISIONS_NAME)
    shutil.rmtree(first_out)  # the first machine is gone

    second_out = tmp_path / "second-machine"
    with Search(["--resume", "--storage", storage, "--name", "s", "--out", str(second_out)], tmp_path / "resume.log",
                ray_address=address) as search:
        assert search.wait(180) == 0, search.tail()

    # Nothing finished before the kill trained again: a trial that trains writes its cache entry anew.
    assert {f.path: (store.read_bytes(f"{CACHE_DIR}/{f.base_name}"), f.mtime_ns)
            for f in store.files(CACHE_DIR, ".json") if f.path in cache} == cache
    assert sorted(os.listdir(second_out / "s")) == [SETTINGS_NAME]
    settings = read_settings(second_out / "s")
    assert settings.experiment_path == f"{storage}/s" and read_settings(f"{storage}/s").storage == storage
    tables = load_tables(second_out / "s")  # read from the bucket: nothing else holds them
    assert all(store.exists(f"tables/{name}.parquet") for name in tables)
    trials = tables["trials"]
    assert len(trials) == samples and set(trials["status"]) <= {"completed", "pruned"}, trials
    assert set(trials["node"]) == {worker_node}, trials["node"]  # the head has no CPU
    for key, result in finished.items():
        row = trials[trials["config_key"] == key]
        assert len(row) == 1 and row["status"].item() == "completed"
        assert row["last_val_bpb"].item() == result["val_bpb"]
    assert set(tables["curves"]["trial_id"]) == set(trials["trial_id"])
    assert len(tables["decisions"]) == len(store.read_rows(DECISIONS_NAME)) > 0
    assert len(load_study(f"{storage}/s").trials) == samples  # the searcher's state, from the bucket
    # A third machine reads the sweep by its URI: the tables from the bucket, the report into its --out.
    from jepatune.cli import main

    assert main(["analyze", f"{storage}/s", "--out", str(tmp_path / "third-machine")]) == 0
    assert (tmp_path / "third-machine" / "s" / "report.md").is_file()


@pytest.mark.slow
def test_an_ablation_on_s3_run_on_the_worker_node_has_every_row(cluster, s3, tmp_path, demo_data):
    address = cluster[0].address
    storage = f"{s3}/ablations"
    knobs = {k: v for k, v in TINY.items() if k not in ("iterations", "val_loss_every")}
    args = ["--base", "reference", "--data", str(demo_data), "--variants", "regularizer", "--seeds", "2",
            "--steps", "8", "--storage", storage, "--out", str(tmp_path / "out"), "--name", "reg",
            *set_args(knobs)]
    with Search(args, tmp_path / "ablate.log", command="ablate", ray_address=address) as search:
        assert search.wait(240) == 0, search.tail()
    store = Store(f"{storage}/reg")
    local = tmp_path / "out" / "reg"
    assert ABLATION_NAME in os.listdir(local) and not (local / CACHE_DIR).exists() and not (local / "tables").exists()
    plan = store.read_json(ABLATION_NAME)
    assert len(store.names(CACHE_DIR, ".json")) == len(plan["runs"]) == 3 * 2  # base + 2 regularizers, 2 seeds
    table, runs = load_ablation(local)
    assert len(runs) == len(plan["runs"]) and set(runs["status"]) == {"completed"}, runs
    assert list(table["n"]) == [2, 2, 2] and table["delta"].iloc[1:].notna().all(), table
    assert not store.exists(FINAL_RUNS)
