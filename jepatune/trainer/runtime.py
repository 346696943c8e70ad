"""Where a run executes and what it builds there: the device and process group, the seeded model,
the optimisers, and the network a step calls (compiled, wrapped in DDP).

Runs on CPU or CUDA, in one process or under `torchrun`-style DDP (RANK / WORLD_SIZE /
LOCAL_RANK in the environment).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jepatune.errors import ConfigError
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.model import GPT, apply_reference_bf16_cast, build_model, is_control
from jepatune.trainer.muon import Muon, zeropower_via_newtonschulz5


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    bf16: bool = False
    owns_group: bool = False  # this run joined the process group (torchrun), so it leaves it too

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(c: TrainConfig) -> Runtime:
    """Pick the device and join the process group when launched with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use --set device=cpu")
    cuda = c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    owns_group = world_size > 1 and not dist.is_initialized()  # not under Ray Train, which owns its group
    if owns_group:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if c.grad_accum_steps % world_size:
        raise ConfigError(f"grad_accum_steps={c.grad_accum_steps} must be divisible by the world size {world_size}")
    bf16 = c.precision == "bf16" or (c.precision == "auto" and cuda)
    return Runtime(device, rank, world_size, bf16, owns_group)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def leave_group(rt: Runtime, finished: bool) -> None:
    """Leave the group this run joined. Left to interpreter exit, gloo's threads can outlive the group
    and abort the process ("terminate called without an active exception") after a run that
    succeeded; so can a rank that tears down while its peer still talks to it, so a finished run
    first waits for every rank (a failed one does not: its peers may be gone)."""
    if rt.owns_group:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def build_run_model(c: TrainConfig, rt: Runtime) -> GPT:
    """The model initialised from `c.seed`, cast as the reference's bf16 run casts it, on the device."""
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    model = build_model(c)
    if rt.bf16:
        apply_reference_bf16_cast(model, c)
    return model.to(rt.device)


def build_optimizers(model: GPT, c: TrainConfig) -> tuple[list[torch.optim.Optimizer], Muon]:
    """The reference's split: Muon for block and predictor matrices, Adam for the rest."""
    block_params = list(model.blocks.named_parameters())
    matrices = [p for n, p in block_params if p.ndim == 2 and not is_control(n)]
    matrices += [p for p in model.predictor.parameters() if p.ndim == 2]
    scalars = [p for n, p in block_params if p.ndim < 2 or is_control(n)] + [model.skip_weights]
    fused = {"fused": True}  # as the reference (CPU has a fused Adam too)

    def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}], betas=(c.beta1, c.beta2),
                                eps=c.adam_eps, **fused)

    token_lr = c.tied_embed_lr if c.tie_embeddings else c.embed_lr
    ns = torch.compile(zeropower_via_newtonschulz5) if c.compile else zeropower_via_newtonschulz5
    muon = Muon(matrices, lr=c.matrix_lr, momentum=c.muon_momentum, backend_steps=c.muon_backend_steps,
                orthogonalize=ns)
    muon.param_groups[0]["base_lr"] = c.matrix_lr
    optimizers: list[torch.optim.Optimizer] = [adam([model.tok_emb.weight], token_lr), muon,
                                               adam(scalars, c.scalar_lr)]
    if model.lm_head is not None:
        optimizers.insert(1, adam([model.lm_head.weight], c.head_lr))
    return optimizers, muon


def step_network(model: GPT, c: TrainConfig, rt: Runtime) -> nn.Module:
    """What a step calls: the model, compiled when `c.compile`, in DDP across ranks."""
    net: nn.Module = torch.compile(model, dynamic=False) if c.compile else model
    # The predictor gets no gradient in stage 3 and the untied head none in stage 1.
    return DDP(net, find_unused_parameters=True) if rt.distributed else net


def max_over_ranks(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    t = torch.tensor(value, device=rt.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# The instruction sets whose presence changes which float kernels run (vector widths, FMA, bf16 units).
KERNEL_FLAGS = ("fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_kind() -> dict[str, str]:
    """The kind of CPU a run's floats come from: its vendor and model, the vector instructions
    PyTorch's kernels dispatch to and those of KERNEL_FLAGS it has. The same run on two kinds can
    differ in the last bits of a sum (other vector widths, other matmul kernels), and a few hundred
    optimiser steps grow that into a different curve, so a result that must be reproduced to the bit
    says which kind made it."""
    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id", platform.machine()), "model": info.get("model name", platform.processor()),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": " ".join(f for f in KERNEL_FLAGS if f in flags)}


def same_cpu_kind(recorded: dict[str, str], here: dict[str, str]) -> bool:
    """Whether floats recorded on the CPU kind `recorded` should come out to the bit here: every field
    it holds but the model name (which VMs often blur) is equal; a field it lacks was not recorded."""
    return all(here.get(k) == v for k, v in recorded.items() if k != "model")
