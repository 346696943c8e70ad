"""Ray's autoscaler with fake nodes, started and stopped by a test without touching any other Ray.

`ray.cluster_utils.AutoscalingCluster` runs the real autoscaler (Ray's monitor process with its
`fake_multinode` node provider, which starts worker nodes as local processes when tasks wait for
resources). As the 2.60 wheel ships it, it cannot run here: it reads a `fake_multi_node/example.yaml`
the wheel lacks, its start and shutdown run `ray stop --force` (every Ray of the machine, other
tests' included), and its fake workers join a GCS on port 6379. `FakeAutoscalingCluster` writes the
same cluster config itself, starts the head with its own temp folder and port, and stops exactly the
processes of that folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import ray
import ray._private.services
from processes import cmdline, free_port, kill_processes_mentioning
from ray.cluster_utils import AutoscalingCluster

# The fake provider's cluster config, as its example.yaml in Ray's repository gives it; the node
# types are the test's. An idle worker is removed after 0.1 minutes.
FAKE_CLUSTER = {
    "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}
# ray start turns token authentication on when ~/.ray/auth_token exists; the drivers here connect without.
AUTH_OFF = {"RAY_AUTH_MODE": "disabled"}


class FakeAutoscalingCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = json.loads(json.dumps(FAKE_CLUSTER))
        config["available_node_types"] = {**worker_node_types, "ray.head.default": {
            "resources": head_resources, "node_config": {}, "max_workers": 0}}
        return {**config, **config_kwargs}

    def start(self, temp_dir: str) -> str:
        """Start the head (its monitor runs the autoscaler); return the cluster's address."""
        self.temp_dir = temp_dir
        self.address = f"{ray._private.services.get_node_ip_address()}:{free_port()}"
        self._config["provider"]["gcs_address"] = self.address  # where the fake workers join
        config = Path(temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        command = ["ray", "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
                   f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats",
                   f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}"]
        env = {**os.environ, **AUTH_OFF, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        ray._private.services.find_gcs_addresses.cache_clear()
        return self.address

    def shutdown(self) -> None:
        kill_processes_mentioning(self.temp_dir)
        ray._private.services.find_gcs_addresses.cache_clear()


def kill_node(node_id: str) -> list[int]:
    """SIGKILL a node's raylet and the processes it started (its workers, the trials on it): the node
    is lost as a preempted machine is. Returns the pids killed."""
    import signal

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return -1

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    raylets = [p for p in pids if "raylet" in cmdline(p) and f"--node_id={node_id} " in cmdline(p) + " "]
    doomed = raylets + [p for p in pids if parent(p) in raylets]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return doomed
