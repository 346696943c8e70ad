"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

Background: https://kellerjordan.github.io/posts/muon/. Across ranks each matrix is
handled by one rank (round-robin) and the updates are summed with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c)


def zeropower_via_newtonschulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T of g = U S V^T, in bf16, on g scaled to unit Frobenius norm."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 orthogonalize=zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.orthogonalize = orthogonalize  # torch.compile'd by the trainer when compile=true

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            momentum = group["momentum"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(momentum).add_(p.grad)
                    g = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                    g = self.orthogonalize(g, steps=group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
        return None
