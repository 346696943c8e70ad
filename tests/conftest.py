"""Shared fixtures: one demo corpus and tiny configs, built once per test session."""

from __future__ import annotations

import pytest

from jepatune.trainer.config import TrainConfig

# A model small enough that a step takes milliseconds on one CPU core.
TINY = dict(
    num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=32, train_batch_tokens=512,
    grad_accum_steps=2, val_batch_size=1024, val_tokens=2048, iterations=12, val_loss_every=4,
    train_log_every=0, muon_momentum_warmup_steps=4, warmdown_frac=0.25, lejepa_directions=16,
    lejepa_positions=64, jepa_pure_frac=0.25, ce_pure_frac=0.5, swa_select_tokens=2048,
)


def keep_checkpoint_at(step: int, saved):
    """A trainer `report` callback that copies the checkpoint written at `step` to `saved`."""
    import shutil

    def keep(metrics: dict) -> None:
        if metrics.get("step") == step and not metrics.get("final"):
            shutil.copy(metrics["checkpoint"], saved)

    return keep


def tiny_sets(**extra) -> list[str]:
    """`--set key=value` for every TINY knob (and `extra`), as a user types them on the command line."""
    def text(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)

    return [a for k, v in {**TINY, **extra}.items() for a in ("--set", f"{k}={text(v)}")]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from jepatune.corpora import build_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo(out, train_mb=0.6, val_mb=0.1)
    return out


@pytest.fixture
def tiny(demo_data) -> TrainConfig:
    return TrainConfig(data_path=str(demo_data), **TINY)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than on two: syncing costs more than the math."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sweep_knobs() -> dict:
    """Trainer knobs every test sweep fixes: the tiny model, minus what the spaces search."""
    searched = ("iterations", "val_loss_every", "jepa_pure_frac", "ce_pure_frac")
    return {k: v for k, v in TINY.items() if k not in searched}


def _local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)
    return ray


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the search tests: started once; a test that needs a cluster shuts it
    down, and the next test that needs the local one starts it again."""
    return _local_ray()


@pytest.fixture(scope="session")
def finished_sweep_folder(tmp_path_factory, demo_data, sweep_knobs):
    """One finished sweep, built once per test session: 8 trials of the tiny model over the curriculum
    space (16 steps, rungs 2, 4, 8, 16, a checkpoint every second rung), then a 2-seed retrain at 16 steps. Tests read a
    copy of it (`copy_sweep`), so that none sees another's changes."""
    from jepatune.experiment.settings import SweepSettings
    from jepatune.search.sweep import finalize, run_sweep

    _local_ray()
    settings = SweepSettings(data=str(demo_data), out=str(tmp_path_factory.mktemp("finished")), samples=8,
                             trial_steps=16, grace_steps=2, concurrency=2, overrides=sweep_knobs,
                             startup_trials=4, final_steps=16, final_seeds=2, finalists=3, checkpoint_every=2)
    run_sweep(settings)
    finalize(settings.folder, log=lambda _: None)
    return settings.folder


def copy_sweep(source, into):
    """A copy of the sweep folder `source` under `into`; returns its SweepSettings."""
    import shutil

    from jepatune.experiment.settings import read_settings

    shutil.copytree(source, into / source.name, symlinks=True)
    return read_settings(into / source.name)


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
