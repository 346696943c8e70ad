"""`ray job submit` of `jepatune search` to a cluster started with `ray start --head`, as
docs/cluster.md tells a user to submit it (`--working-dir`, `bash -c "jepatune search ..."`).

The session's local Ray already holds the default agent ports on this machine; the started head gets
free ones, as docs/cluster.md says to do beside a second Ray, or its job agent never serves."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from processes import free_port, kill_processes_mentioning, set_args

from jepatune.analysis.tables import load_tables

REPO = Path(__file__).resolve().parents[2]
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "ray-client-server-port")


@pytest.mark.slow
def test_a_sweep_submitted_as_a_ray_job_runs_on_the_started_cluster(tmp_path, demo_data, sweep_knobs):
    temp = tempfile.mkdtemp(prefix="jt-job-", dir="/tmp")  # the cluster's own: short, for Ray's socket paths
    dashboard = free_port()
    # Token authentication is off, as for a 2.60 cluster reached through `ray dashboard`'s SSH tunnel.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(["ray", "start", "--head", f"--port={free_port()}", f"--temp-dir={temp}", "--num-cpus=2",
                    "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                    *(f"--{name}={free_port()}" for name in AGENT_PORTS)],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        out = tmp_path / "sweep"
        command = shlex.join(["jepatune", "search", "--data", str(demo_data), "--out", str(out), "--name", "job",
                              "--samples", "3", "--trial-steps", "8", "--grace-steps", "4", "--concurrency", "2",
                              *set_args(sweep_knobs)])
        submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                  "--", "bash", "-c", command]
        deadline = time.monotonic() + 120
        while True:  # the head's job agent comes up a few seconds after `ray start` returns
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if "No available agent to submit job" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        log = job.stdout[-4000:] + job.stderr[-2000:]
        assert job.returncode == 0 and "succeeded" in job.stdout, log
        assert "sweep finished" in job.stdout and "top trials" in job.stdout, log  # the job's own output
        trials = load_tables(out / "job")["trials"]
        assert len(trials) == 3 and set(trials["status"]) <= {"completed", "pruned"}, trials
        assert trials["is_reference"].sum() == 1
    finally:
        kill_processes_mentioning(temp)
        subprocess.run(["rm", "-rf", temp], check=False)
