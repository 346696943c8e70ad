"""SWA as the reference does it: really an exponential moving average of the weights.

From its start, after every step: avg = decay * avg + (1 - decay) * current, over every
floating tensor of the state dict. The reference averages each tensor in its own dtype,
so the bf16 embedding table is averaged in bf16, where 0.005 x a value is often below
the resolution and the average barely moves. `fp32_shadow=True` keeps an fp32 copy of
every tensor instead (the fix), and casts back when the average is read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, fp32_shadow: bool = False):
        self.decay = decay
        self.fp32_shadow = fp32_shadow
        self.avg: dict[str, Tensor] = {
            k: (v.detach().float().clone() if fp32_shadow and v.is_floating_point() else v.detach().clone())
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, cur in model.state_dict().items():
            avg = self.avg[name]
            if avg.is_floating_point():
                avg.mul_(self.decay).add_(cur.detach().to(avg.dtype), alpha=1.0 - self.decay)

    def averaged_state(self, like: nn.Module) -> dict[str, Tensor]:
        """The averaged weights in the model's own dtypes, ready for load_state_dict."""
        return {k: self.avg[k].to(v.dtype) for k, v in like.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "fp32_shadow": self.fp32_shadow, "avg": self.avg}

    @classmethod
    def from_state_dict(cls, state: dict) -> WeightAverage:
        self = cls.__new__(cls)
        self.decay, self.fp32_shadow, self.avg = state["decay"], state["fp32_shadow"], state["avg"]
        return self
