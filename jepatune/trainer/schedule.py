"""The curriculum, LR warm-down and Muon momentum as pure functions of progress.

Progress `p` is the fraction of the budget spent before the current step: step /
iterations, or elapsed / max_wallclock_seconds under a wall clock (as the reference).
"""

from __future__ import annotations

from jepatune.trainer.losses import Losses


class LossWeights(Losses[float]):
    """The weights of the losses, in their order (jepa, reg, ce)."""

    __slots__ = ()

    @property
    def stage(self) -> int:
        """1 = pure JEPA, 2 = bridge, 3 = pure CE."""
        if self.ce == 0.0:
            return 1
        return 3 if self.jepa == 0.0 and self.reg == 0.0 else 2


CE_ONLY = LossWeights(jepa=0.0, reg=0.0, ce=1.0)  # stage 3, and the probe's cool-down


def curriculum_weights(p: float, jepa_pure_frac: float, ce_pure_frac: float,
                       jepa_weight: float, sigreg_weight: float) -> LossWeights:
    """The reference's three stages: pure JEPA, a linear bridge to CE, pure CE."""
    if p < jepa_pure_frac:
        return LossWeights(jepa=jepa_weight, reg=sigreg_weight, ce=0.0)
    if p < ce_pure_frac:
        b = (p - jepa_pure_frac) / (ce_pure_frac - jepa_pure_frac)
        return LossWeights(jepa=jepa_weight * (1.0 - b), reg=sigreg_weight * (1.0 - b), ce=b)
    return CE_ONLY


def lr_multiplier(step: int, iterations: int, warmdown_iters: int, elapsed_s: float = 0.0,
                  max_wallclock_s: float = 0.0, warmdown_frac: float = 0.0) -> float:
    """No warm-up; a linear warm-down to 0 at the end of the budget.

    By steps: over the last `warmdown_iters` steps. Under a wall clock, as the reference:
    over the last `warmdown_iters` average steps of time, remaining / (warmdown_iters *
    step_time). `warmdown_frac` > 0 replaces the count by that fraction of the budget,
    which short trials need: a fixed 2000-step warm-down would decay from step 0.
    """
    if max_wallclock_s <= 0:
        length = round(warmdown_frac * iterations) if warmdown_frac > 0 else warmdown_iters
        if length > 0 and max(iterations - length, 0) <= step < iterations:
            return max((iterations - step) / length, 0.0)
        return 1.0
    if warmdown_frac > 0:
        warmdown_s = warmdown_frac * max_wallclock_s
    elif warmdown_iters > 0:
        warmdown_s = warmdown_iters * elapsed_s / max(step, 1)
    else:
        return 1.0
    remaining_s = max(max_wallclock_s - elapsed_s, 0.0)
    return remaining_s / max(warmdown_s, 1e-9) if remaining_s <= warmdown_s else 1.0


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def progress(step: int, iterations: int, elapsed_s: float = 0.0, max_wallclock_s: float = 0.0) -> float:
    if max_wallclock_s > 0:
        return min(elapsed_s / max_wallclock_s, 1.0)
    return step / iterations
