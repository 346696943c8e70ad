"""Evaluation: validation bits-per-byte (mean cross-entropy over non-overlapping windows / ln 2),
the metrics reported at an evaluation point, and the probe fidelity's branch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jepatune.trainer.config import TrainConfig
from jepatune.trainer.losses import LOSS_ORDER, bits_per_byte
from jepatune.trainer.runtime import Runtime, autocast
from jepatune.trainer.schedule import CE_ONLY, LossWeights
from jepatune.trainer.step import StepState


@torch.no_grad()
def evaluate_bpb(model: nn.Module, val_tokens: np.ndarray, seq_len: int, batch_tokens: int,
                 device: torch.device, bf16: bool, rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """(mean CE in nats, BPB) of `model` on `val_tokens` (length a multiple of seq_len, + 1).

    Sequences are split evenly over ranks and the sums all-reduced, so every rank returns the
    same numbers. `batch_tokens` is what all ranks take in one forward pass together.
    """
    total_seqs = (len(val_tokens) - 1) // seq_len
    first, last = total_seqs * rank // world_size, total_seqs * (rank + 1) // world_size
    batch_seqs = max(1, batch_tokens // (seq_len * world_size))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for start in range(first, last, batch_seqs):
        end = min(start + batch_seqs, last)
        chunk = torch.from_numpy(val_tokens[start * seq_len : end * seq_len + 1].astype(np.int64)).to(device)
        x, y = chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)
        with autocast(device, bf16):
            loss = model(x, y)
        loss_sum += loss.double() * y.numel()
        count += y.numel()
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    mean = (loss_sum / count).item()
    return mean, bits_per_byte(mean)


def is_eval_step(c: TrainConfig, step: int) -> bool:
    return step in c.eval_steps or (c.val_loss_every > 0 and step % c.val_loss_every == 0)


def train_losses(state: StepState, rt: Runtime) -> dict[str, float | None]:
    """The mean train loss and its parts since the last evaluation, over every rank's micro-batches
    (None before the first step)."""
    if rt.distributed:
        dist.all_reduce(state.loss_sums)
        state.loss_sums /= rt.world_size
    names = ("train_loss", *(f"loss_{k}" for k in LOSS_ORDER))
    if not state.steps_since_eval:
        return dict.fromkeys(names)
    return dict(zip(names, (state.loss_sums / state.steps_since_eval).tolist(), strict=True))


def eval_metrics(state: StepState, val: tuple[float, float], train_time: float, c: TrainConfig,
                 params: int, rt: Runtime) -> dict[str, Any]:
    """The report of an evaluation point, given the val prefix's (mean CE, BPB); starts the next
    span of train losses."""
    w = state.weights  # the last step's
    metrics = {"step": state.step, "tokens": state.step * c.train_batch_tokens, "elapsed_s": round(train_time, 3),
               "val_loss": val[0], "val_bpb": val[1], **train_losses(state, rt),
               **{f"w_{k}": v for k, v in w._asdict().items()}, "stage": w.stage, "lr_mult": state.lr_mult,
               "progress": state.progress, "swa_active": state.swa is not None, "params": params}
    state.reset_losses()
    return metrics


def probe_branch(lr_mult: float, steps: int) -> list[tuple[LossWeights, float]]:
    """The probe fidelity's (loss weights, LR multiplier) per step: pure cross-entropy with the LR
    multiplier decayed linearly from its current value to zero (a cool-down)."""
    return [(CE_ONLY, lr_mult * (steps - i) / steps) for i in range(steps)]
