"""Shared fixtures: one demo corpus and tiny configs, built once per test session."""

from __future__ import annotations

import pytest

from jepatune.trainer.config import TrainConfig

# A model small enough that a step takes milliseconds on one CPU core.
TINY = dict(
    num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=32, train_batch_tokens=512,
    grad_accum_steps=2, val_batch_size=1024, val_tokens=2048, iterations=12, val_loss_every=4,
    train_log_every=0, muon_momentum_warmup_steps=4, warmdown_frac=0.25, lejepa_directions=16,
    lejepa_positions=64, jepa_pure_frac=0.25, ce_pure_frac=0.5,
)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from jepatune.trainer.corpora import build_demo

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


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the search tests: started once; a test that needs a cluster shuts it
    down, and the next test that needs the local one starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)
    return ray


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
