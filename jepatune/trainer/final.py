"""The end of a run: the score of what would be shipped, the summary, and the files written.

What ships is the weight average when SWA ran (else the raw weights), after the int8+zlib
round trip; raw and averaged weights are each scored before and after it too. The code
counted against the size cap beside the artifact is `RUN_MODULES`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jepatune.atomic import atomic_path, atomic_write_text
from jepatune.trainer import export
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.model import GPT
from jepatune.trainer.swa import WeightAverage

SUMMARY_NAME, MODEL_NAME = "summary.json", "final_model.pt"

# The modules a training run imports (a test checks the list against a fresh interpreter's import
# of jepatune.trainer.loop): the code a submission ships beside its artifact. Data building
# (jepatune.corpora) is not among them.
RUN_MODULES = ("jepatune", "jepatune.atomic", "jepatune.errors", "jepatune.lazy", "jepatune.trainer",
               "jepatune.trainer.checkpoint", "jepatune.trainer.config", "jepatune.trainer.data",
               "jepatune.trainer.evaluate", "jepatune.trainer.export", "jepatune.trainer.final",
               "jepatune.trainer.loop", "jepatune.trainer.losses", "jepatune.trainer.model", "jepatune.trainer.muon",
               "jepatune.trainer.runtime", "jepatune.trainer.schedule", "jepatune.trainer.step",
               "jepatune.trainer.swa")


def trainer_code_bytes() -> int:
    """Bytes of the source of RUN_MODULES, counted against the size cap beside the artifact, as the
    reference counts its train_gpt.py."""
    return sum(Path(importlib.util.find_spec(m).origin).stat().st_size for m in RUN_MODULES)


Evaluate = Callable[[np.ndarray], tuple[float, float]]  # val tokens -> (mean CE, BPB) of the model's weights


def shipped(state: dict[str, Tensor], save_predictor: bool) -> dict[str, Tensor]:
    return state if save_predictor else export.drop_predictor(state)


def score(model: GPT, evaluate: Evaluate, state: dict[str, Tensor], tokens: np.ndarray,
          save_predictor: bool) -> tuple[float, float, int]:
    """(pre-quant BPB, post-quant BPB, artifact bytes) of `state` on `tokens`; `model` is left holding
    the round-tripped weights."""
    model.load_state_dict(state)
    pre = evaluate(tokens)[1]
    post, nbytes = shipped_bpb(model, evaluate, state, tokens, save_predictor)
    return pre, post, nbytes


def shipped_bpb(model: GPT, evaluate: Evaluate, state: dict[str, Tensor], tokens: np.ndarray,
                save_predictor: bool) -> tuple[float, int]:
    """(BPB, artifact bytes) of `state` after the int8+zlib round trip; `model` is left holding it."""
    blob, _ = export.artifact_bytes(shipped(state, save_predictor))
    model.load_state_dict({**state, **export.decode_artifact(blob)})
    return evaluate(tokens)[1], len(blob)


@dataclass
class FinalScore:
    state: dict[str, Tensor]  # the weights that ship, before quantisation
    prequant_bpb: float
    val_bpb: float  # after the int8+zlib round trip
    artifact_bytes: int
    scores: dict[str, float | None]  # raw_bpb, raw_q_bpb, avg_bpb, avg_q_bpb


def score_final(model: GPT, evaluate: Evaluate, swa: WeightAverage | None, tokens: np.ndarray,
                save_predictor: bool) -> FinalScore:
    """Score the raw weights and, when SWA ran, the average; `model` is left holding what ships."""
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre, post, nbytes = score(model, evaluate, raw, tokens, save_predictor)
    final = FinalScore(raw, pre, post, nbytes, {"raw_bpb": pre, "raw_q_bpb": post, "avg_bpb": None, "avg_q_bpb": None})
    if swa is not None:
        avg = swa.averaged_state(model)
        pre, post, nbytes = score(model, evaluate, avg, tokens, save_predictor)
        final = FinalScore(avg, pre, post, nbytes, {**final.scores, "avg_bpb": pre, "avg_q_bpb": post})
    model.load_state_dict(final.state)
    return final


def completed_summary(run: dict[str, Any], final: FinalScore, scored_on: str, peak_mem_mib: float) -> dict[str, Any]:
    """`run` (step, tokens, ...) with the final scores, the artifact's size and whether it fits the cap."""
    code = trainer_code_bytes()
    return {"status": "completed", **run, "scored_on": scored_on, **final.scores, "val_bpb": final.val_bpb,
            "prequant_bpb": final.prequant_bpb, "artifact_bytes": final.artifact_bytes, "code_bytes": code,
            "total_bytes": final.artifact_bytes + code, "fits_cap": export.fits_cap(final.artifact_bytes, code),
            "peak_mem_mib": round(peak_mem_mib, 1)}


def diverged_summary(step: int, tokens: int, elapsed_s: float, params: int) -> dict[str, Any]:
    return {"status": "diverged", "step": step, "tokens": tokens, "elapsed_s": round(elapsed_s, 3),
            "val_bpb": math.inf, "params": params}


def write_summary(out_dir: Path, summary: dict[str, Any], c: TrainConfig) -> None:
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps({**summary, "config": c.to_dict()}, indent=2,
                                                         default=str) + "\n")


def write_model_files(out_dir: Path, state: dict[str, Tensor], save_predictor: bool) -> None:
    """The int8+zlib artifact, and the float weights beside it."""
    export.write_artifact(shipped(state, save_predictor), out_dir / export.ARTIFACT_NAME)
    with atomic_path(out_dir / MODEL_NAME) as tmp:
        torch.save({k: v.cpu() for k, v in state.items()}, tmp)
