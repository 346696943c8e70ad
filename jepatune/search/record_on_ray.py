"""A benchmark recording's runs as Ray tasks (`jepatune benchmark record --ray`).

`jepatune.benchmark.record` plans the runs and keeps their records; this runner trains them on the
cluster RAY_ADDRESS names (a `ray up` cluster: `ray exec` / `ray job submit`), or on a local Ray,
each run a task with its own CPUs and GPUs, so that a benchmark at a real model's shape is recorded
on the machines its sweeps will use. The records come back to the driver, which appends each to
records.jsonl as it lands: a worker lost with its node costs only its run, which Ray retries
elsewhere; a lost driver costs the runs in flight (`--resume` trains them again). The data folder
must hold the same shards at the same path on every node, as for a sweep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jepatune.benchmark.record import Runner, run_job

Record = dict[str, Any]


def _run_on_node(job: Record, threads: int) -> Record:
    import torch

    torch.set_num_threads(threads)  # as many torch threads as CPUs the task holds
    return run_job(job)


def ray_runner(cpus: float = 1.0, gpus: float = 0.0) -> Runner:
    """Each job a Ray task holding `cpus` CPUs and `gpus` GPUs; records in the order runs finish."""
    def run(jobs: list[Record]) -> Iterator[Record]:
        import ray

        from jepatune.search.sweep import ensure_ray

        ensure_ray()
        task = ray.remote(_run_on_node).options(num_cpus=cpus, num_gpus=gpus)
        pending = [task.remote(job, max(1, int(cpus))) for job in jobs]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])
        finally:  # a driver stopped early (an error, ^C) leaves no run training for nobody
            for ref in pending:
                ray.cancel(ref, force=True)
    return run
