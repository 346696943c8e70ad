"""cluster.yaml checked offline through Ray's own config code, with no AWS call.

`ray up` loads the file with yaml.safe_load and runs `prepare_config` (merge with the AWS
defaults, setup-command merge, Docker check, per-type worker bounds) then `validate_config`
(ray-schema.json plus head type and min/max checks) before it contacts AWS. These tests run
the same two functions. The AWS-side steps of `ray up` (resource autodetection and
`bootstrap_config`: IAM, key pairs, subnets, security groups) need credentials and are
blocked here.

What Ray 2.60 itself rejects (checked below): unknown keys at the top level, in a node type
and in `docker`; non-integer or negative `resources`; the removed keys (`head_node`,
`worker_nodes`, `initial_workers`, `target_utilization_fraction`) when non-empty; a
`head_node_type` that is not a node type; a node type without `resources`; a sum of
`min_workers` above the global `max_workers`. What it lets through, so these tests check it
themselves: whole-number floats such as `CPU: 4.0` (JSON Schema counts 4.0 as an integer),
a node type whose `min_workers` exceeds its own `max_workers`, and an empty `head_node: {}`
(dropped with a warning).
"""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
REMOVED_KEYS = ("head_node", "worker_nodes", "initial_workers", "target_utilization_fraction")
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.fixture
def offline(monkeypatch):
    """No AWS: boto3/botocore cannot be imported, Ray's AWS provider cannot be loaded, and
    no socket can connect, so a call that reaches AWS fails the test instead of hanging."""
    from ray.autoscaler._private import providers

    def no_aws(*args, **kwargs):
        raise AssertionError("the offline check reached Ray's AWS node provider")

    def no_network(self, address, *args, **kwargs):
        raise AssertionError(f"the offline check tried to connect to {address!r}")

    for module in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, module, None)  # `import boto3` now raises ImportError
    monkeypatch.setitem(providers._NODE_PROVIDERS, "aws", no_aws)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)


def load_raw() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)  # exactly how `ray up` reads it


def ray_check(raw: dict[str, Any]) -> dict[str, Any]:
    """The offline half of `ray up`: Ray's prepare_config, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def own_problems(raw: dict[str, Any]) -> list[str]:
    """What Ray's validator lets through but this project requires."""
    problems = []
    for key in REMOVED_KEYS:
        if key in raw:
            problems.append(f"removed key {key!r} present")
    for name, node_type in raw.get("available_node_types", {}).items():
        for res, value in node_type.get("resources", {}).items():
            if type(value) is not int:  # bool and 4.0 are not resource counts
                problems.append(f"{name}.resources.{res} = {value!r} is not an int")
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
    return problems


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"]["gpu_worker"]


# --- the shipped file -------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation(offline):
    prepared = ray_check(load_raw())
    # prepare_config really ran: it merged the shared setup commands into the head's and
    # the workers' lists, and filled the AWS defaults it was not given.
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert "cluster_synced_files" in prepared


def test_cluster_yaml_meets_project_rules():
    raw = load_raw()
    assert own_problems(raw) == []
    assert raw["cluster_name"] == "jepatune"
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    assert set(types) == {"head", "gpu_worker"}
    assert raw["head_node_type"] == "head"
    head, worker = types["head"], types["gpu_worker"]
    assert "GPU" not in head["resources"] and head["min_workers"] == head["max_workers"] == 0
    assert worker["resources"]["GPU"] >= 1
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= raw["max_workers"]
    for key in ("max_workers", "idle_timeout_minutes", "upscaling_speed"):
        assert key in raw


def test_no_removed_keys_anywhere():
    def keys(node: Any):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    assert set(keys(load_raw())).isdisjoint(REMOVED_KEYS)


def test_image_setup_and_start_commands():
    raw = load_raw()
    assert raw["docker"]["image"] == IMAGE
    images = [v for k, v in raw["docker"].items() if k.endswith("image")]
    assert images and not any("ray-ml" in image for image in images)
    assert raw["file_mounts"] == {"~/jepatune": "."}
    setup = raw["setup_commands"]
    pin = next(i for i, c in enumerate(setup) if "ray[tune]==2.60.0" in c)
    install = next(i for i, c in enumerate(setup) if "pip install" in c and "-e" in c and "jepatune" in c)
    assert pin < install
    data = next(c for c in setup if "jepatune data fineweb" in c)
    assert "--train-shards 10 --variant sp1024 --out ~/data/fineweb_sp1024" in data
    assert data.startswith("test -d ~/data/fineweb_sp1024 ||") and data.endswith("|| true")
    head_start, worker_start = raw["head_start_ray_commands"], raw["worker_start_ray_commands"]
    assert head_start[0] == worker_start[0] == "ray stop"
    for flag in (
        "--head",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ):
        assert flag in head_start[-1]
    assert "--address=$RAY_HEAD_IP:6379" in worker_start[-1]


# --- broken copies: prove the validator really runs -----------------------------------------


def _set(path: str, value: Any):
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


RAY_REJECTS = {
    "unknown top-level key": _set("max_nodes", 8),
    "fractional GPU resource": _set("available_node_types.gpu_worker.resources.GPU", 0.5),
    "negative CPU resource": _set("available_node_types.gpu_worker.resources.CPU", -1),
    "resources as a string": _set("available_node_types.gpu_worker.resources.GPU", "1"),
    "removed head_node": _set("head_node", {"InstanceType": "m6i.2xlarge"}),
    "removed worker_nodes": _set("worker_nodes", {"InstanceType": "g6e.xlarge"}),
    "removed initial_workers": _set("initial_workers", 1),
    "removed target_utilization_fraction": _set("target_utilization_fraction", 0.8),
    "sum of min_workers above max_workers": _set("available_node_types.gpu_worker.min_workers", 9),
    "head_node_type not a node type": _set("head_node_type", "ray.head.default"),
    "unknown key in a node type": _set("available_node_types.gpu_worker.instance_type", "g6e.xlarge"),
    "unknown key in docker": _set("docker.gpus", "all"),
    "float max_workers": _set("max_workers", 8.5),
}


@pytest.mark.parametrize("mutate", RAY_REJECTS.values(), ids=RAY_REJECTS.keys())
def test_ray_rejects_broken_copy(offline, mutate):
    import jsonschema

    broken = load_raw()
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_check(broken)


def test_ray_rejects_node_type_without_resources(offline):
    import jsonschema

    broken = load_raw()
    del _worker(broken)["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        ray_check(broken)


RAY_ACCEPTS_WE_REJECT = {
    "whole-number float CPU": (_set("available_node_types.gpu_worker.resources.CPU", 4.0), "is not an int"),
    "min_workers above the type's max_workers": (
        lambda cfg: _worker(cfg).update(min_workers=3, max_workers=2),
        "min_workers 3 > max_workers 2",
    ),
    "empty removed head_node": (_set("head_node", {}), "removed key 'head_node'"),
}


@pytest.mark.parametrize("case", RAY_ACCEPTS_WE_REJECT.values(), ids=RAY_ACCEPTS_WE_REJECT.keys())
def test_own_checks_catch_what_ray_lets_through(offline, case):
    mutate, message = case
    broken = load_raw()
    mutate(broken)
    ray_check(broken)  # Ray 2.60 accepts it ...
    assert any(message in p for p in own_problems(broken))  # ... so this project checks it


def test_offline_guard_is_live(offline):
    """The guard above would fail a test whose path reached AWS (as `ray up`'s next step,
    `_bootstrap_config`, does), so the passing validation really stayed offline."""
    from ray.autoscaler._private.commands import _bootstrap_config

    with pytest.raises(ImportError):
        import boto3  # noqa: F401
    with pytest.raises(AssertionError, match="AWS node provider"):
        _bootstrap_config(load_raw(), no_config_cache=True)
