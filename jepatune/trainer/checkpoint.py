"""Training checkpoints: everything needed for a resumed run to continue exactly.

A checkpoint holds the model, every optimiser's state, the SWA average, the data
position, the RNG states, the step and the training time. It is written atomically and
read with `torch.load(weights_only=True)`, so a file from elsewhere cannot run code. A run
resumes only from a checkpoint of its own recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from jepatune.atomic import atomic_path
from jepatune.errors import ConfigError, ExportError

CHECKPOINT_FORMAT = "jepatune-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"
# Knobs that may differ between a checkpoint and the run resuming from it.
RESUME_FREE_KNOBS = {"data_path", "device", "compile", "train_log_every", "val_batch_size"}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"checkpoint {path} does not exist; check the path") from None
    except OSError as e:
        raise ExportError(f"cannot read checkpoint {path} ({e.strerror}); check the file and its permissions") from None
    except Exception as e:  # a file that is no checkpoint can fail anywhere in the unpickler (IndexError, ...)
        detail = _reason(e)
        if detail.startswith("Unsupported global"):  # a real pickle, of classes that could run code
            raise ExportError(f"checkpoint {path} holds objects that safe loading refuses ({detail}); "
                              f"load only files jepatune wrote") from None
        raise ExportError(f"checkpoint {path} is not a readable torch file ({detail}); it is truncated or no "
                          f"checkpoint: give a {CHECKPOINT_NAME} that jepatune wrote") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{path} is not a jepatune checkpoint (format {CHECKPOINT_FORMAT} expected); "
                          f"give a {CHECKPOINT_NAME} that jepatune wrote")
    return state


def _reason(error: BaseException) -> str:
    """The gist of a failed torch.load in one line: torch's weights-only refusals wrap the unpickler's
    reason ("Unsupported global: ...", or an unknown opcode for a file that is no pickle) in paragraphs
    of advice."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".")[:300] if lines else type(error).__name__


def check_same_recipe(path: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume from `path`, whose run had the config `saved`, a run of `config` that differs
    in a knob outside RESUME_FREE_KNOBS."""
    differ = sorted(k for k in config if k not in RESUME_FREE_KNOBS and _norm(saved.get(k)) != _norm(config[k]))
    if differ:
        k = differ[0]
        raise ConfigError(f"cannot resume from {path}: {k}={saved.get(k)!r} there but {config[k]!r} here; "
                          f"resume with the config it was trained with, or start a fresh run")


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
