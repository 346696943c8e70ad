"""The ByteJEPA trainer: model, losses, Muon, curriculum, training loop, data, export.

It knows nothing of Ray, Optuna or pandas. A notebook user can write::

    from jepatune.trainer import TrainConfig, train
    summary = train(TrainConfig(data_path="data/demo", iterations=200), report=print)

Names are loaded on first use, so importing the package does not import torch.
"""

from __future__ import annotations

from jepatune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "TrainConfig": "jepatune.trainer.config",
    "load_config": "jepatune.trainer.config",
    "apply_overrides": "jepatune.trainer.config",
    "build_model": "jepatune.trainer.model",
    "GPT": "jepatune.trainer.model",
    "train": "jepatune.trainer.loop",
    "TrainResult": "jepatune.trainer.loop",
})
