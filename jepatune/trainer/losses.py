"""The losses of a step in their one order (`Losses`: jepa, reg, ce), and JEPA latent prediction
and the two anti-collapse regularisers, as pure functions.

All losses are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")


class Losses(NamedTuple, Generic[T]):
    """The three losses of a step (or their weights), in the one order used everywhere: the
    reference sums them jepa + reg + ce, and a float sum's order decides its last bits."""

    jepa: T
    reg: T
    ce: T


LOSS_ORDER = Losses._fields


def weighted_sum(weights: Tensor, losses: Losses[Tensor]) -> Tensor:
    """weights . losses, summed left to right in LOSS_ORDER as the reference sums them."""
    return weights[0] * losses.jepa + weights[1] * losses.reg + weights[2] * losses.ce


def jepa_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MSE between predicted and actual next hidden states; the target gets no gradient."""
    return F.mse_loss(pred.float(), target.detach().float())


def _centred_rows(h: Tensor) -> Tensor:
    z = h.reshape(-1, h.size(-1)).float()  # (N, D)
    return z - z.mean(dim=0, keepdim=True)


def varcov(h: Tensor, cov_weight: float = 0.04) -> Tensor:
    """The reference's regulariser (it calls it SIGReg; it is VICReg-style).

    var = mean(relu(1 - std_d)) with the unbiased per-dimension std, covpen = sum of
    squared off-diagonal covariances / D, reg = var + cov_weight * covpen.
    """
    z = _centred_rows(h)
    n, d = z.shape
    std = z.std(dim=0, unbiased=True)
    var = F.relu(1.0 - std).mean()
    cov = (z.T @ z) / max(n - 1, 1)  # (D, D)
    off_diag = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return var + cov_weight * off_diag / d


def lejepa_directions(dim: int, num: int, step: int, seed: int, device: torch.device | str) -> Tensor:
    """(D, M) unit-norm Gaussian directions, the same on every rank: the generator is seeded by the step."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    a = torch.randn(dim, num, generator=g, device=device)  # drawn where it is used: no copy, no sync
    return a / a.norm(dim=0, keepdim=True)


def lejepa_rows(n: int, k: int, step: int, seed: int, device: torch.device | str) -> Tensor | None:
    """A random subset of k of the n positions (None = all), seeded by the step."""
    if k <= 0 or k >= n:
        return None
    g = torch.Generator(device=device).manual_seed(seed * 1_000_033 + step)
    return torch.randperm(n, generator=g, device=device)[:k]


def epps_pulley_weights(points: int, t_max: float = 3.0) -> tuple[Tensor, Tensor]:
    """Integration points t on [0, t_max] and weights: trapezoid dt at both ends and 2 dt
    inside (the 2 folds in the negative half by symmetry), times phi(t) = exp(-t^2 / 2)."""
    t = torch.linspace(0.0, t_max, points)
    dt = t_max / (points - 1)
    w = torch.full((points,), 2 * dt)
    w[0] = w[-1] = dt
    return t, w * torch.exp(-t.square() / 2)


def lejepa_sigreg(h: Tensor, directions: Tensor, rows: Tensor | None = None, points: int = 17) -> Tensor:
    """SIGReg of LeJEPA (Balestriero & LeCun, 2025): mean over random 1-D projections of
    the Epps-Pulley statistic against a standard normal,
    N * sum_t w_t ((mean cos(t x) - phi(t))^2 + (mean sin(t x))^2)."""
    z = _centred_rows(h)
    if rows is not None:
        z = z[rows]
    x = z @ directions.float()  # (N, M)
    t, w = epps_pulley_weights(points)
    stat = x.new_zeros(x.size(1))  # (M,)
    # One integration point at a time keeps memory at (N, M) instead of (N, M, P).
    for t_k, w_k in zip(t.tolist(), w.tolist(), strict=True):
        phi = math.exp(-t_k * t_k / 2)
        tx = t_k * x
        stat = stat + w_k * ((torch.cos(tx).mean(0) - phi).square() + torch.sin(tx).mean(0).square())
    return (z.size(0) * stat).mean()


def bits_per_byte(mean_ce_nats: float) -> float:
    """One token is one byte, so BPB is the mean cross-entropy in bits."""
    return mean_ce_nats / math.log(2.0)
