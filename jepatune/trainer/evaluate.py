"""Validation bits-per-byte: mean cross-entropy over non-overlapping windows / ln 2."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jepatune.trainer.losses import bits_per_byte


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
