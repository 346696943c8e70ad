"""The training loop: `train(config, report=...)`.

One run: build the model and optimisers, stream byte batches, apply the curriculum
weights and LR schedule of the current progress, keep the SWA average, evaluate at
fixed steps and call `report(metrics)` there, then score the final model before and
after the int8+zlib round trip. Runs on CPU or CUDA, in one process or under
`torchrun`-style DDP (RANK / WORLD_SIZE / LOCAL_RANK in the environment).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jepatune.atomic import atomic_path, atomic_write_text
from jepatune.errors import ConfigError, ExportError
from jepatune.trainer import export, schedule
from jepatune.trainer.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.data import (
    DistributedTokenLoader,
    StreamPosition,
    check_train_vocab,
    check_vocab,
    find_shards,
    load_val_tokens,
)
from jepatune.trainer.evaluate import autocast, evaluate_bpb
from jepatune.trainer.losses import lejepa_directions, lejepa_rows
from jepatune.trainer.model import GPT, apply_reference_bf16_cast, build_model, count_parameters, is_control
from jepatune.trainer.muon import Muon, zeropower_via_newtonschulz5
from jepatune.trainer.swa import WeightAverage

Report = Callable[[dict[str, Any]], None]
METRICS_NAME, SUMMARY_NAME, MODEL_NAME = "metrics.jsonl", "summary.json", "final_model.pt"
# Knobs that may differ between a checkpoint and the run resuming from it.
RESUME_FREE_KNOBS = {"data_path", "device", "compile", "train_log_every", "val_batch_size"}
NONFINITE_CHECK_EVERY = 25  # steps between host syncs that look for a non-finite loss


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged"
    step: int
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


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


# The modules a training run imports (a test checks the list against a fresh interpreter's import
# of this one): the code a submission ships beside its artifact. Data building (corpora) is not.
RUN_MODULES = ("jepatune", "jepatune.atomic", "jepatune.errors", "jepatune.trainer", "jepatune.trainer.checkpoint",
               "jepatune.trainer.config", "jepatune.trainer.data", "jepatune.trainer.evaluate",
               "jepatune.trainer.export", "jepatune.trainer.loop", "jepatune.trainer.losses", "jepatune.trainer.model",
               "jepatune.trainer.muon", "jepatune.trainer.schedule", "jepatune.trainer.swa")


def trainer_code_bytes() -> int:
    """Bytes of the source a training run needs (RUN_MODULES), counted against the size cap beside
    the artifact, as the reference counts its train_gpt.py."""
    return sum(Path(importlib.util.find_spec(m).origin).stat().st_size for m in RUN_MODULES)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """The state of one training run. `train()` below is the usual entry point; the
    benchmarks drive `train_step` directly."""

    def __init__(self, c: TrainConfig, report: Report | None = None, out_dir: Path | None = None,
                 checkpoint_dir: Path | None = None, verbose: bool = False, final_score: bool = True):
        self.created = time.perf_counter()  # start-up (data, model, compile) is timed from here to the first step
        self.c, self.report_fn, self.verbose, self.final_score = c, report, verbose, final_score
        self.out_dir, self.checkpoint_dir = out_dir, checkpoint_dir
        self.rt = setup_runtime(c)
        self.local_accum = c.grad_accum_steps // self.rt.world_size
        self.local_tokens = c.train_batch_tokens // (self.rt.world_size * self.local_accum)
        self.train_files = find_shards(c.data_path, "train")
        check_train_vocab(self.train_files, c.vocab_size)  # an id the embedding lacks would crash a step
        self.val_prefix = load_val_tokens(c.data_path, c.train_seq_len, c.val_tokens)
        check_vocab(self.val_prefix, c.vocab_size, f"{c.data_path} val split")

        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        self.model = build_model(c)
        if self.rt.bf16:
            apply_reference_bf16_cast(self.model, c)
        self.model.to(self.rt.device)
        self.n_params = count_parameters(self.model)
        self.optimizers, self.muon = build_optimizers(self.model, c)
        net: nn.Module = torch.compile(self.model, dynamic=False) if c.compile else self.model
        # The predictor gets no gradient in stage 3 and the untied head none in stage 1.
        self.net = DDP(net, find_unused_parameters=True) if self.rt.distributed else net
        self.loader = DistributedTokenLoader(self.train_files, self.rt.rank, self.rt.world_size)
        self.swa: WeightAverage | None = None
        # (w_jepa, w_ce, w_reg) of the current step; bf16 like the reference's buffers after its cast
        weights_dtype = torch.bfloat16 if self.rt.bf16 and c.bf16_loss_weights else torch.float32
        self.weights = torch.zeros(3, device=self.rt.device, dtype=weights_dtype)
        self.step, self.train_time = 0, 0.0
        self.restored_from: Path | None = None
        self.time_setup = self.time_eval = self.time_ckpt = 0.0  # this process's seconds per phase
        self.probe_steps_done = 0  # optimiser steps spent in probe branches (compute, not progress)
        self.history: list[dict[str, Any]] = []
        self._reset_sums()

    # --- bookkeeping ------------------------------------------------------------------
    def _reset_sums(self) -> None:
        self.loss_sum = torch.zeros(4, device=self.rt.device)  # total, ce, jepa, reg
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        self.steps_since_eval = 0

    def log(self, msg: str) -> None:
        if self.verbose and self.rt.main:
            print(msg, file=sys.stderr, flush=True)

    def elapsed(self, t0: float) -> float:
        return self.train_time + time.perf_counter() - t0

    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase, carried by every report (train_time spans resumes)."""
        return {"time_setup_s": round(self.time_setup, 3), "time_train_s": round(self.train_time, 3),
                "time_eval_s": round(self.time_eval, 3), "time_ckpt_s": round(self.time_ckpt, 3)}

    def state(self) -> dict[str, Any]:
        return {
            "config": self.c.to_dict(), "step": self.step, "train_time": self.train_time,
            "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
            "swa": self.swa.state_dict() if self.swa else None,
            "data_position": vars(self.loader.stream.position).copy(), "rng": rng_state(),
            "probe_steps_done": self.probe_steps_done,
        }

    def restore(self, path: Path) -> None:
        if self.restored_from == path:  # train() restores before it writes anything; run() then finds it done
            return
        s = load_checkpoint(path)
        theirs, ours = s["config"], self.c.to_dict()
        differ = sorted(k for k in ours if k not in RESUME_FREE_KNOBS and _norm(theirs.get(k)) != _norm(ours[k]))
        if differ:
            k = differ[0]
            raise ConfigError(f"cannot resume from {path}: {k}={theirs.get(k)!r} there but {ours[k]!r} here; "
                              f"resume with the config it was trained with, or start a fresh run")
        self.model.load_state_dict(s["model"])
        for opt, st in zip(self.optimizers, s["optimizers"], strict=True):
            opt.load_state_dict(st)
        self.swa = WeightAverage.from_state_dict(s["swa"]) if s["swa"] else None
        if self.swa:
            self.swa.avg = {k: v.to(self.rt.device) for k, v in self.swa.avg.items()}
        self.loader = DistributedTokenLoader(self.train_files, self.rt.rank, self.rt.world_size,
                                             StreamPosition(**s["data_position"]))
        self.step, self.train_time = s["step"], s["train_time"]
        self.probe_steps_done = s.get("probe_steps_done", 0)
        set_rng_state(s["rng"])
        self.restored_from = path

    def emit(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if self.rt.main and self.out_dir is not None:
            with open(self.out_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.report_fn is not None:
            self.report_fn(metrics)

    # --- one optimiser step ----------------------------------------------------------------
    def train_step(self, elapsed: float, branch: tuple[schedule.LossWeights, float] | None = None) -> None:
        """One optimiser step at the schedule's loss weights and LR for the current progress, or, in
        a probe branch, at the given (weights, LR multiplier) and without touching the weight average."""
        c, rt = self.c, self.rt
        started = time.perf_counter()
        p = schedule.progress(self.step, c.iterations, elapsed, c.max_wallclock_seconds)
        w = schedule.curriculum_weights(p, c.jepa_pure_frac, c.ce_pure_frac, c.jepa_weight, c.sigreg_weight)
        if branch is not None:
            w = branch[0]
        for i, value in enumerate(w):  # scalar fills: no host-to-device copy, no sync
            self.weights[i].fill_(value)
        dirs = None
        if c.regularizer == "lejepa" and w.stage < 3:
            dirs = lejepa_directions(c.model_dim, c.lejepa_directions, self.step, c.seed, rt.device)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        for micro in range(self.local_accum):
            x, y = (torch.from_numpy(a).to(rt.device, non_blocking=True)
                    for a in self.loader.next_batch(self.local_tokens, c.train_seq_len))
            rows = None
            if dirs is not None:
                # Seeded by the global micro-batch index: the same subset whatever the world size.
                micro_index = self.step * c.grad_accum_steps + rt.rank * self.local_accum + micro
                rows = lejepa_rows(x.numel(), c.lejepa_positions, micro_index, c.seed, rt.device)
            if rt.distributed:  # all-reduce gradients on the last micro-batch only
                self.net.require_backward_grad_sync = micro == self.local_accum - 1
            with autocast(rt.device, rt.bf16):
                total, parts = self.net(x, y, self.weights, w.stage, dirs, rows)
            (total / self.local_accum).backward()
            self.loss_sum += torch.cat((total.detach().reshape(1), parts)) / self.local_accum
            self.nonfinite |= ~torch.isfinite(total.detach())
        self.muon.param_groups[0]["momentum"] = schedule.muon_momentum(
            self.step, c.muon_momentum_warmup_start, c.muon_momentum, c.muon_momentum_warmup_steps)
        lr = self.lr_at(elapsed) if branch is None else branch[1]
        for o in self.optimizers:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * lr
        if c.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip_norm)
        for o in self.optimizers:
            o.step()
        self.step += 1
        self.steps_since_eval += 1
        # The reference reads its clock after the step: the average starts with the first step that
        # ends at or past the SWA start (by steps: step s + 1 >= swa_start * iterations).
        after = schedule.progress(self.step, c.iterations, elapsed + time.perf_counter() - started,
                                  c.max_wallclock_seconds)
        if branch is None and c.swa_enabled and after >= c.swa_start:
            if self.swa is None:
                self.swa = WeightAverage(self.model, c.swa_decay, c.swa_fp32_shadow)
            else:
                self.swa.update(self.model)
        self.last_weights, self.last_lr, self.last_progress = w, lr, p

    def lr_at(self, elapsed: float) -> float:
        c = self.c
        return schedule.lr_multiplier(self.step, c.iterations, c.warmdown_iters, elapsed, c.max_wallclock_seconds,
                                      c.warmdown_frac)

    def diverged(self) -> bool:
        return bool(self.nonfinite.item())

    # --- evaluation points --------------------------------------------------------------
    def is_eval_step(self, step: int) -> bool:
        c = self.c
        return step in c.eval_steps or (c.val_loss_every > 0 and step % c.val_loss_every == 0)

    def evaluate(self, tokens: np.ndarray) -> tuple[float, float]:
        """(mean CE, BPB) of the current weights on `tokens`, in forward passes of the reference's
        size: each rank takes val_batch_size / grad_accum_steps tokens at a time, as it does."""
        c = self.c
        return evaluate_bpb(self.net, tokens, c.train_seq_len, c.val_batch_size // self.local_accum,
                            self.rt.device, self.rt.bf16, self.rt.rank, self.rt.world_size)

    def eval_metrics(self) -> dict[str, Any]:
        c = self.c
        val_loss, val_bpb = self.evaluate(self.val_prefix)
        n = max(self.steps_since_eval, 1)
        if self.rt.distributed:  # the mean over every rank's micro-batches
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= self.rt.world_size
        sums = (self.loss_sum / n).tolist()
        w = getattr(self, "last_weights", schedule.curriculum_weights(
            0.0, c.jepa_pure_frac, c.ce_pure_frac, c.jepa_weight, c.sigreg_weight))
        metrics = {
            "step": self.step, "tokens": self.step * c.train_batch_tokens, "elapsed_s": round(self.train_time, 3),
            "val_loss": val_loss, "val_bpb": val_bpb,
            "train_loss": sums[0] if self.steps_since_eval else None,
            "loss_ce": sums[1] if self.steps_since_eval else None,
            "loss_jepa": sums[2] if self.steps_since_eval else None,
            "loss_reg": sums[3] if self.steps_since_eval else None,
            "w_jepa": w.jepa, "w_ce": w.ce, "w_reg": w.reg, "stage": w.stage,
            "lr_mult": getattr(self, "last_lr", 1.0), "progress": getattr(self, "last_progress", 0.0),
            "swa_active": self.swa is not None, "params": self.n_params,
        }
        self._reset_sums()
        return metrics

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        if self.checkpoint_dir is None:
            return
        if self.rt.main:
            metrics["checkpoint"] = str(save_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME, self.state()))
        if self.rt.distributed:
            dist.barrier()

    # --- the run ------------------------------------------------------------------------
    def run(self, resume_from: Path | None) -> TrainResult:
        c, rt = self.c, self.rt
        if resume_from is not None:
            self.restore(resume_from)
            self.log(f"resumed from {resume_from} at step {self.step}")
        elif c.compile and c.warmup_steps > 0:
            self.prime_compile()
        self.log(f"model_params:{self.n_params} device:{rt.device} world_size:{rt.world_size} "
                 f"accum:{self.local_accum} bf16:{rt.bf16}")
        resumed_at = self.step if resume_from is not None else -1
        stop_after: int | None = None
        t0 = time.perf_counter()
        self.time_setup = t0 - self.created
        while True:
            last = self.step >= c.iterations or (stop_after is not None and self.step >= stop_after)
            if self.step != resumed_at and (last or self.is_eval_step(self.step)):
                self.train_time += time.perf_counter() - t0
                if self.diverged():
                    return self.finish_diverged()
                t_eval = time.perf_counter()
                metrics = self.eval_metrics()
                if not math.isfinite(metrics["val_loss"]):
                    return self.finish_diverged()
                if c.probe_steps > 0 and not last:
                    metrics["probe_bpb"] = self.probe()
                metrics["compute_steps"] = self.step + self.probe_steps_done
                self.log(f"step:{self.step}/{c.iterations} val_bpb:{metrics['val_bpb']:.4f} "
                         + (f"probe_bpb:{metrics['probe_bpb']:.4f} " if "probe_bpb" in metrics else "")
                         + f"train_time:{self.train_time:.1f}s stage:{metrics['stage']}")
                self.time_eval += time.perf_counter() - t_eval
                t_ckpt = time.perf_counter()
                self.checkpoint(metrics)
                self.time_ckpt += time.perf_counter() - t_ckpt
                metrics.update(self.phase_times())
                self.emit(metrics)
                t0 = time.perf_counter()
            if last:
                break
            elapsed = self.elapsed(t0)
            if rt.distributed and c.max_wallclock_seconds > 0:  # every rank must see the same progress
                e = torch.tensor(elapsed, device=rt.device, dtype=torch.float64)
                dist.all_reduce(e, op=dist.ReduceOp.MAX)
                elapsed = e.item()
            self.train_step(elapsed)
            if self.step % NONFINITE_CHECK_EVERY == 0 and self.diverged():
                self.train_time += time.perf_counter() - t0
                return self.finish_diverged()
            if c.train_log_every > 0 and self.step % c.train_log_every == 0:
                n = max(self.steps_since_eval, 1)
                ms = 1000 * self.elapsed(t0) / max(self.step, 1)
                self.log(f"step:{self.step}/{c.iterations} train_loss:{self.loss_sum[0].item() / n:.4f} "
                         f"stage:{self.last_weights.stage} step_avg:{ms:.1f}ms")
            if c.max_wallclock_seconds > 0 and stop_after is None and self.elapsed(t0) >= c.max_wallclock_seconds:
                stop_after = self.step
        return self.finish()

    # --- branches that are undone: compile priming and probes ----------------------------
    _STEP_ATTRS = ("step", "swa", "steps_since_eval", "last_weights", "last_lr", "last_progress")

    def snapshot(self) -> dict[str, Any]:
        """Everything a training step changes, so that a branch of steps can be undone exactly."""
        return {"model": copy.deepcopy(self.model.state_dict()),
                "optimizers": [copy.deepcopy(o.state_dict()) for o in self.optimizers],
                "position": vars(self.loader.stream.position).copy(), "rng": rng_state(),
                "sums": (self.loss_sum.clone(), self.nonfinite.clone()),
                "attrs": {a: self.__dict__[a] for a in self._STEP_ATTRS if a in self.__dict__}}

    def rollback(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        for o, s in zip(self.optimizers, saved["optimizers"], strict=True):
            o.load_state_dict(s)
        self.loader = DistributedTokenLoader(self.train_files, self.rt.rank, self.rt.world_size,
                                             StreamPosition(**saved["position"]))
        set_rng_state(saved["rng"])
        self.loss_sum, self.nonfinite = saved["sums"]
        for attr in self._STEP_ATTRS:
            self.__dict__.pop(attr, None)
        self.__dict__.update(saved["attrs"])

    def prime_compile(self) -> None:
        """Run warm-up steps to compile every graph, then undo them (as the reference)."""
        c = self.c
        saved = self.snapshot()
        for i in range(c.warmup_steps):
            # Spread the warm-up over the budget so every curriculum stage's graph compiles.
            self.step = i * c.iterations // c.warmup_steps
            self.train_step(elapsed=self.step / c.iterations * c.max_wallclock_seconds)
        self.rollback(saved)

    def probe(self) -> float:
        """The `probe` fidelity: from the current state, `probe_steps` steps of pure cross-entropy with
        the LR multiplier decayed linearly from its current value to zero (a cool-down), then the BPB on
        the val prefix. Everything is rolled back afterwards: the main run goes on exactly as if no
        probe had run (the data it reads included); the cost is counted in `probe_steps_done`."""
        k = self.c.probe_steps
        saved = self.snapshot()
        lr0 = self.lr_at(self.train_time)
        ce_only = schedule.LossWeights(0.0, 1.0, 0.0)
        for i in range(k):
            self.train_step(self.train_time, branch=(ce_only, lr0 * (k - i) / k))
        bpb = self.evaluate(self.val_prefix)[1]
        self.rollback(saved)
        self.probe_steps_done += k
        return bpb

    def finish_diverged(self) -> TrainResult:
        summary = {"status": "diverged", "step": self.step, "tokens": self.step * self.c.train_batch_tokens,
                   "elapsed_s": round(self.train_time, 3), "val_bpb": math.inf, "params": self.n_params}
        self.log(f"diverged: non-finite loss by step {self.step}")
        self.write_summary(summary)
        self.emit({**summary, "final": True})
        return TrainResult("diverged", self.step, summary, self.history)

    def score(self, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> tuple[float, float, int]:
        """(pre-quant BPB, post-quant BPB, artifact bytes) of `state` on `tokens`."""
        c = self.c
        self.model.load_state_dict(state)
        pre = self.evaluate(tokens)[1]
        shipped = state if c.save_predictor else export.drop_predictor(state)
        blob, _ = export.artifact_bytes(shipped)
        self.model.load_state_dict({**state, **export.decode_artifact(blob)})
        return pre, self.evaluate(tokens)[1], len(blob)

    def finish(self) -> TrainResult:
        """Score what would be shipped: the average when SWA ran (else the raw weights), after the
        int8+zlib round trip; raw and averaged weights are each scored before and after it too. On
        the full val split (a retrain), or with `final_score=False` on the val prefix every
        evaluation used (a search trial: its score is then comparable with its rungs, and cheap)."""
        c = self.c
        tokens = load_val_tokens(c.data_path, c.train_seq_len) if self.final_score else self.val_prefix
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        raw_pre, raw_post, raw_bytes = self.score(raw, tokens)
        summary: dict[str, Any] = {"status": "completed", "step": self.step, "tokens": self.step * c.train_batch_tokens,
                                   "compute_steps": self.step + self.probe_steps_done,
                                   "elapsed_s": round(self.train_time, 3), "params": self.n_params,
                                   "scored_on": "val" if self.final_score else "val_prefix",
                                   "raw_bpb": raw_pre, "raw_q_bpb": raw_post, "avg_bpb": None, "avg_q_bpb": None}
        final_state, pre, post, nbytes = raw, raw_pre, raw_post, raw_bytes
        if self.swa is not None:
            final_state = self.swa.averaged_state(self.model)
            pre, post, nbytes = self.score(final_state, tokens)
            summary.update(avg_bpb=pre, avg_q_bpb=post)
        self.model.load_state_dict(final_state)
        if not math.isfinite(post):  # weights blew up without a non-finite training loss
            return self.finish_diverged()
        code = trainer_code_bytes()
        summary.update(val_bpb=post, prequant_bpb=pre, artifact_bytes=nbytes, code_bytes=code,
                       total_bytes=nbytes + code, fits_cap=export.fits_cap(nbytes, code),
                       peak_mem_mib=round(peak_memory_mib(self.rt.device), 1))
        if self.rt.main and self.out_dir is not None:
            shipped = final_state if c.save_predictor else export.drop_predictor(final_state)
            export.write_artifact(shipped, self.out_dir / export.ARTIFACT_NAME)
            _save_torch(self.out_dir / MODEL_NAME, {k: v.cpu() for k, v in final_state.items()})
        self.log(f"final val_bpb (int8+zlib round trip, {summary['scored_on']}): {post:.4f} pre-quant: {pre:.4f} "
                 f"artifact: {nbytes} bytes (+{code} code) fits_cap: {summary['fits_cap']}")
        self.write_summary(summary)
        self.emit({**summary, "final": True})
        return TrainResult("completed", self.step, summary, self.history)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.rt.main and self.out_dir is not None:
            atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(
                {**summary, "config": self.c.to_dict()}, indent=2, default=str) + "\n")


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train(config: TrainConfig, report: Report | None = None, *, out_dir: str | os.PathLike | None = None,
          checkpoint_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
          verbose: bool = False, final_score: bool = True, on_start: Callable[[], None] | None = None) -> TrainResult:
    """Train one ByteJEPA model.

    report: called with a metrics dict at every evaluation point (step, tokens,
        elapsed_s, val_bpb on the val prefix, train loss and its parts, curriculum
        weights, ...) and once at the end with the final summary (`final: True`).
    out_dir: where metrics.jsonl, final_model.pt, final_model.int8.ptz and
        summary.json go (nothing is written when None).
    checkpoint_dir: when set, a resumable checkpoint is written there at every
        evaluation point, before `report` is called (its path is in metrics["checkpoint"]).
    resume_from: a checkpoint file or folder to continue from; one that is no checkpoint, or holds
        another recipe, is refused before anything is written.
    final_score: score the final weights (raw and averaged, before and after the int8+zlib
        round trip) on the full val split. Search trials turn it off: they score the same
        weights the same way on the val prefix their evaluations use.
    on_start: called once the data and config are checked and the output folder exists.
    """
    out = Path(out_dir).resolve() if out_dir is not None else None
    ckpt = Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None
    run = Trainer(config, report, out, ckpt, verbose, final_score)  # checks data and config before writing
    try:
        resume = Path(resume_from) if resume_from is not None else None
        if resume is not None:
            run.restore(resume)  # a checkpoint it refuses (another recipe, not a checkpoint) leaves no file behind
        for folder in (out, ckpt):
            if folder is not None:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ExportError(f"cannot create the output folder {folder} ({e.strerror or e}); "
                                      f"choose another folder") from None
        if on_start is not None:
            on_start()
        return run.run(resume)
    finally:
        if run.rt.owns_group:
            # Left to interpreter exit, gloo's threads can outlive the group and abort the process
            # ("terminate called without an active exception") after a run that succeeded.
            dist.destroy_process_group()
