"""One optimiser step, in parts: the loss weights and LR multiplier of the current progress, the
micro-batches' gradients, the optimiser update and the weight average; and `StepState`, what
a step changes besides the weights, the optimiser state, the data position and the RNG.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jepatune.trainer import schedule
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.data import DistributedTokenLoader
from jepatune.trainer.losses import LOSS_ORDER, lejepa_directions, lejepa_rows
from jepatune.trainer.model import GPT
from jepatune.trainer.muon import Muon
from jepatune.trainer.runtime import Runtime, autocast
from jepatune.trainer.schedule import LossWeights
from jepatune.trainer.swa import WeightAverage


def loss_weights_at(c: TrainConfig, p: float) -> LossWeights:
    return schedule.curriculum_weights(p, c.jepa_pure_frac, c.ce_pure_frac, c.jepa_weight, c.sigreg_weight)


def lr_multiplier_at(c: TrainConfig, step: int, elapsed: float) -> float:
    return schedule.lr_multiplier(step, c.iterations, c.warmdown_iters, elapsed, c.max_wallclock_seconds,
                                  c.warmdown_frac)


@dataclass
class StepState:
    """The step count and the weight average, what the last step ran at (for reports), and the
    losses summed since the last evaluation."""

    weights: LossWeights
    loss_sums: Tensor  # (total, *LOSS_ORDER), each step adding the mean over its micro-batches
    nonfinite: Tensor  # a non-finite loss since the last evaluation: read by the host only now and then
    step: int = 0
    steps_since_eval: int = 0
    lr_mult: float = 1.0
    progress: float = 0.0
    swa: WeightAverage | None = None
    swa_choices: dict[float, WeightAverage] = dataclasses.field(default_factory=dict)  # by start, once started

    @classmethod
    def start(cls, c: TrainConfig, device: torch.device) -> StepState:
        return cls(loss_weights_at(c, 0.0), torch.zeros(1 + len(LOSS_ORDER), device=device),
                   torch.zeros((), dtype=torch.bool, device=device))

    def copy(self) -> StepState:
        """A copy to restore after a branch of steps. The averages are shared, not copied: no branch
        updates them (probes leave them alone, compile priming runs before they exist)."""
        return dataclasses.replace(self, loss_sums=self.loss_sums.clone(), nonfinite=self.nonfinite.clone())

    def reset_losses(self) -> None:
        self.loss_sums.zero_()
        self.nonfinite.zero_()
        self.steps_since_eval = 0

    def diverged(self) -> bool:
        return bool(self.nonfinite.item())  # a host sync


def accumulate_gradients(net: nn.Module, loader: DistributedTokenLoader, loss_weights: Tensor, state: StepState,
                         c: TrainConfig, rt: Runtime) -> None:
    """Forward and backward over this rank's next micro-batches at `state.weights`: the gradients
    are their mean (over every rank's under DDP), and their mean losses are added to `state`.
    `loss_weights` is the buffer the forward reads the weights from."""
    local_accum = c.grad_accum_steps // rt.world_size
    local_tokens = c.train_batch_tokens // (rt.world_size * local_accum)
    w = state.weights
    for i, value in enumerate(w):  # scalar fills: no host-to-device copy, no sync
        loss_weights[i].fill_(value)
    dirs = None
    if c.regularizer == "lejepa" and w.stage < 3:
        dirs = lejepa_directions(c.model_dim, c.lejepa_directions, state.step, c.seed, rt.device)
    for micro in range(local_accum):
        x, y = (torch.from_numpy(a).to(rt.device, non_blocking=True)
                for a in loader.next_batch(local_tokens, c.train_seq_len))
        rows = None
        if dirs is not None:
            # Seeded by the global micro-batch index: the same subset whatever the world size.
            micro_index = state.step * c.grad_accum_steps + rt.rank * local_accum + micro
            rows = lejepa_rows(x.numel(), c.lejepa_positions, micro_index, c.seed, rt.device)
        if rt.distributed:  # all-reduce gradients on the last micro-batch only
            net.require_backward_grad_sync = micro == local_accum - 1
        with autocast(rt.device, rt.bf16):
            total, parts = net(x, y, loss_weights, w.stage, dirs, rows)
        (total / local_accum).backward()
        state.loss_sums += torch.cat((total.detach().reshape(1), parts)) / local_accum
        state.nonfinite |= ~torch.isfinite(total.detach())


def apply_update(optimizers: list[torch.optim.Optimizer], muon: Muon, model: GPT, c: TrainConfig, step: int,
                 lr_mult: float) -> None:
    """Muon's momentum warm-up, every group's LR at `lr_mult` x its base, the optional clip, the step."""
    muon.param_groups[0]["momentum"] = schedule.muon_momentum(
        step, c.muon_momentum_warmup_start, c.muon_momentum, c.muon_momentum_warmup_steps)
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
    if c.grad_clip_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip_norm)
    for o in optimizers:
        o.step()


def update_average(swa: WeightAverage | None, model: GPT, c: TrainConfig, progress_after: float,
                   start: float) -> WeightAverage | None:
    """The weight average after a step that ended at `progress_after`: started by the first step
    that ends at or past `start` (the reference reads its clock after the step)."""
    if not c.swa_enabled or progress_after < start:
        return swa
    if swa is None:
        return WeightAverage(model, c.swa_decay, c.swa_fp32_shadow)
    swa.update(model)
    return swa


def update_averages(state: StepState, model: GPT, c: TrainConfig, progress_after: float) -> None:
    """The main average (from `c.swa_start`) and one for each of `c.swa_start_choices`."""
    state.swa = update_average(state.swa, model, c, progress_after, c.swa_start)
    for start in (f for f in c.swa_start_choices if f != c.swa_start):
        avg = update_average(state.swa_choices.get(start), model, c, progress_after, start)
        if avg is not None:
            state.swa_choices[start] = avg
