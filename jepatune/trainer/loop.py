"""The training loop: `train(config, report=...)`.

One run: build the model and optimisers (runtime.py), take optimiser steps at the curriculum
weights and LR schedule of the current progress (step.py), evaluate at fixed steps and call
`report(metrics)` there (evaluate.py), then score the final model before and after the
int8+zlib round trip (final.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jepatune.errors import ExportError
from jepatune.trainer import schedule
from jepatune.trainer.checkpoint import (
    CHECKPOINT_NAME,
    check_same_recipe,
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
from jepatune.trainer.evaluate import eval_metrics, evaluate_bpb, is_eval_step, probe_branch
from jepatune.trainer.final import (
    completed_summary,
    diverged_summary,
    score_final,
    shipped_bpb,
    trainer_code_bytes,
    write_model_files,
    write_summary,
)
from jepatune.trainer.losses import LOSS_ORDER
from jepatune.trainer.model import count_parameters
from jepatune.trainer.runtime import (
    build_optimizers,
    build_run_model,
    leave_group,
    max_over_ranks,
    peak_memory_mib,
    setup_runtime,
    step_network,
)
from jepatune.trainer.schedule import LossWeights
from jepatune.trainer.step import (
    StepState,
    accumulate_gradients,
    apply_update,
    loss_weights_at,
    lr_multiplier_at,
    update_averages,
)
from jepatune.trainer.swa import WeightAverage

__all__ = ["METRICS_NAME", "Report", "TrainResult", "Trainer", "setup_runtime", "train", "trainer_code_bytes"]

Report = Callable[[dict[str, Any]], None]
Branch = tuple[LossWeights, float]  # a probe step's loss weights and LR multiplier
METRICS_NAME = "metrics.jsonl"
NONFINITE_CHECK_EVERY = 25  # steps between host syncs that look for a non-finite loss


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged"
    step: int
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


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
        self.train_files = find_shards(c.data_path, "train")
        check_train_vocab(self.train_files, c.vocab_size)  # an id the embedding lacks would crash a step
        self.val_prefix = load_val_tokens(c.data_path, c.train_seq_len, c.val_tokens)
        check_vocab(self.val_prefix, c.vocab_size, f"{c.data_path} val split")

        self.model = build_run_model(c, self.rt)
        self.n_params = count_parameters(self.model)
        self.optimizers, self.muon = build_optimizers(self.model, c)
        self.net = step_network(self.model, c, self.rt)
        self.loader = self.open_loader()
        # The current step's weights in LOSS_ORDER, read by the forward; bf16 like the reference's buffers
        # after its cast.
        weights_dtype = torch.bfloat16 if self.rt.bf16 and c.bf16_loss_weights else torch.float32
        self.loss_weights = torch.zeros(len(LOSS_ORDER), device=self.rt.device, dtype=weights_dtype)
        self.state = StepState.start(c, self.rt.device)  # step count, weight average, losses since the last eval
        self.train_time = 0.0  # seconds of training (evaluation excluded), across resumes
        self.time_setup = self.time_eval = self.time_ckpt = 0.0  # this process's seconds per phase
        self.probe_steps_done = 0  # optimiser steps spent in probe branches (compute, not progress)
        self.restored_from: Path | None = None
        self.history: list[dict[str, Any]] = []

    def open_loader(self, position: dict[str, int] | None = None) -> DistributedTokenLoader:
        return DistributedTokenLoader(self.train_files, self.rt.rank, self.rt.world_size,
                                      StreamPosition(**position) if position else None)

    # --- bookkeeping ------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.verbose and self.rt.main:
            print(msg, file=sys.stderr, flush=True)

    def elapsed(self, t0: float) -> float:
        return self.train_time + time.perf_counter() - t0

    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase, carried by every report (train_time spans resumes)."""
        return {"time_setup_s": round(self.time_setup, 3), "time_train_s": round(self.train_time, 3),
                "time_eval_s": round(self.time_eval, 3), "time_ckpt_s": round(self.time_ckpt, 3)}

    def emit(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if self.rt.main and self.out_dir is not None:
            with open(self.out_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.report_fn is not None:
            self.report_fn(metrics)

    # --- checkpoints --------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "config": self.c.to_dict(), "step": s.step, "train_time": self.train_time,
            "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
            "swa": s.swa.state_dict() if s.swa else None,
            "swa_choices": {str(start): avg.state_dict() for start, avg in s.swa_choices.items()},
            "data_position": vars(self.loader.stream.position).copy(), "rng": rng_state(),
            "probe_steps_done": self.probe_steps_done,
        }

    def restore(self, path: Path) -> None:
        if self.restored_from == path:  # train() restores before it writes anything; run() then finds it done
            return
        saved = load_checkpoint(path)
        check_same_recipe(path, saved["config"], self.c.to_dict())
        self.model.load_state_dict(saved["model"])
        for opt, st in zip(self.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(st)
        self.state.step, self.state.swa = saved["step"], self.saved_average(saved["swa"])
        self.state.swa_choices = {float(start): self.saved_average(avg)
                                  for start, avg in saved.get("swa_choices", {}).items()}
        self.loader = self.open_loader(saved["data_position"])
        self.train_time = saved["train_time"]
        self.probe_steps_done = saved.get("probe_steps_done", 0)
        set_rng_state(saved["rng"])
        self.restored_from = path

    def saved_average(self, state: dict[str, Any] | None) -> WeightAverage | None:
        if state is None:
            return None
        swa = WeightAverage.from_state_dict(state)
        swa.avg = {k: v.to(self.rt.device) for k, v in swa.avg.items()}
        return swa

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        if self.checkpoint_dir is None:
            return
        if self.rt.main:
            path = save_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME, self.checkpoint_state())
            metrics["checkpoint"] = str(path)
        if self.rt.distributed:
            dist.barrier()

    # --- one optimiser step ----------------------------------------------------------------
    def train_step(self, elapsed: float, branch: Branch | None = None) -> None:
        """One optimiser step at the schedule's loss weights and LR for the current progress, or, in
        a probe branch, at the given ones and without touching the weight average."""
        c, s = self.c, self.state
        started = time.perf_counter()
        s.progress = schedule.progress(s.step, c.iterations, elapsed, c.max_wallclock_seconds)
        if branch is None:
            s.weights, s.lr_mult = loss_weights_at(c, s.progress), lr_multiplier_at(c, s.step, elapsed)
        else:
            s.weights, s.lr_mult = branch
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        accumulate_gradients(self.net, self.loader, self.loss_weights, s, c, self.rt)
        apply_update(self.optimizers, self.muon, self.model, c, s.step, s.lr_mult)
        s.step += 1
        s.steps_since_eval += 1
        if branch is None:
            after = schedule.progress(s.step, c.iterations, elapsed + time.perf_counter() - started,
                                      c.max_wallclock_seconds)
            update_averages(s, self.model, c, after)

    # --- evaluation points --------------------------------------------------------------
    def evaluate(self, tokens: np.ndarray) -> tuple[float, float]:
        """(mean CE, BPB) of the current weights on `tokens`, in forward passes of the reference's
        size: each rank takes val_batch_size / grad_accum_steps tokens at a time, as it does."""
        c = self.c
        return evaluate_bpb(self.net, tokens, c.train_seq_len, c.val_batch_size // self.local_accum,
                            self.rt.device, self.rt.bf16, self.rt.rank, self.rt.world_size)

    def evaluation_point(self, last: bool) -> bool:
        """Evaluate, probe, checkpoint and report; False when the run has diverged instead."""
        c = self.c
        if self.state.diverged():
            return False
        t_eval = time.perf_counter()
        metrics = eval_metrics(self.state, self.evaluate(self.val_prefix), self.train_time, c, self.n_params,
                               self.rt)
        if not math.isfinite(metrics["val_loss"]):
            return False
        if c.probe_steps > 0 and not last:
            metrics["probe_bpb"] = self.probe()
        metrics["compute_steps"] = self.state.step + self.probe_steps_done
        self.log(f"step:{self.state.step}/{c.iterations} val_bpb:{metrics['val_bpb']:.4f} "
                 + (f"probe_bpb:{metrics['probe_bpb']:.4f} " if "probe_bpb" in metrics else "")
                 + f"train_time:{self.train_time:.1f}s stage:{metrics['stage']}")
        self.time_eval += time.perf_counter() - t_eval
        t_ckpt = time.perf_counter()
        self.checkpoint(metrics)
        self.time_ckpt += time.perf_counter() - t_ckpt
        metrics.update(self.phase_times())
        self.emit(metrics)
        return True

    # --- the run ------------------------------------------------------------------------
    def run(self, resume_from: Path | None) -> TrainResult:
        # self.state is replaced when a branch is undone (compile priming, probes): read it afresh.
        c = self.c
        if resume_from is not None:
            self.restore(resume_from)
            self.log(f"resumed from {resume_from} at step {self.state.step}")
        elif c.compile and c.warmup_steps > 0:
            self.prime_compile()
        self.log(f"model_params:{self.n_params} device:{self.rt.device} world_size:{self.rt.world_size} "
                 f"accum:{self.local_accum} bf16:{self.rt.bf16}")
        resumed_at = self.state.step if resume_from is not None else -1
        stop_after: int | None = None
        t0 = time.perf_counter()
        self.time_setup = t0 - self.created
        while True:
            step = self.state.step
            last = step >= c.iterations or (stop_after is not None and step >= stop_after)
            if step != resumed_at and (last or is_eval_step(c, step)):
                self.train_time += time.perf_counter() - t0
                if not self.evaluation_point(last):
                    return self.finish_diverged()
                t0 = time.perf_counter()
            if last:
                break
            elapsed = self.elapsed(t0)
            if c.max_wallclock_seconds > 0:  # every rank must see the same progress
                elapsed = max_over_ranks(elapsed, self.rt)
            self.train_step(elapsed)
            if self.state.step % NONFINITE_CHECK_EVERY == 0 and self.state.diverged():
                self.train_time += time.perf_counter() - t0
                return self.finish_diverged()
            if c.train_log_every > 0 and self.state.step % c.train_log_every == 0:
                self.log_train_loss(t0)
            if c.max_wallclock_seconds > 0 and stop_after is None and self.elapsed(t0) >= c.max_wallclock_seconds:
                stop_after = self.state.step
        return self.finish()

    def log_train_loss(self, t0: float) -> None:
        s = self.state
        loss, ms = s.loss_sums[0].item() / max(s.steps_since_eval, 1), 1000 * self.elapsed(t0) / max(s.step, 1)
        self.log(f"step:{s.step}/{self.c.iterations} train_loss:{loss:.4f} stage:{s.weights.stage} step_avg:{ms:.1f}ms")

    # --- branches that are undone: compile priming and probes ----------------------------
    @contextlib.contextmanager
    def undone_afterwards(self) -> Iterator[None]:
        """Steps taken inside are undone when it exits: the weights, the optimiser state, the data
        position, the RNG and the step state come back exactly."""
        model = copy.deepcopy(self.model.state_dict())
        optimizers = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        position, rng, state = vars(self.loader.stream.position).copy(), rng_state(), self.state.copy()
        yield
        self.model.load_state_dict(model)
        for o, saved in zip(self.optimizers, optimizers, strict=True):
            o.load_state_dict(saved)
        self.loader = self.open_loader(position)
        set_rng_state(rng)
        self.state = state

    def prime_compile(self) -> None:
        """Run warm-up steps to compile every graph, then undo them (as the reference)."""
        c = self.c
        with self.undone_afterwards():
            for i in range(c.warmup_steps):
                # Spread the warm-up over the budget so every curriculum stage's graph compiles.
                self.state.step = i * c.iterations // c.warmup_steps
                self.train_step(elapsed=self.state.step / c.iterations * c.max_wallclock_seconds)

    def probe(self) -> float:
        """The `probe` fidelity: from the current state, `probe_steps` steps of pure cross-entropy with
        the LR multiplier decayed linearly from its current value to zero (a cool-down), then the BPB on
        the val prefix. Everything is undone afterwards: the main run goes on exactly as if no probe
        had run (the data it reads included); the cost is counted in `probe_steps_done`."""
        with self.undone_afterwards():
            for branch in probe_branch(lr_multiplier_at(self.c, self.state.step, self.train_time), self.c.probe_steps):
                self.train_step(self.train_time, branch)
            bpb = self.evaluate(self.val_prefix)[1]
        self.probe_steps_done += self.c.probe_steps
        return bpb

    # --- the end ---------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Score what would be shipped (final.py) on the full val split (a retrain), or with
        `final_score=False` on the val prefix every evaluation used (a search trial: its score is
        then comparable with its rungs, and cheap); write the artifact and the summary."""
        c, s = self.c, self.state
        start, swa, chosen_on = c.swa_start, s.swa, {}
        if c.swa_start_choices:
            start, swa, chosen_on = self.choose_average()
        tokens = load_val_tokens(c.data_path, c.train_seq_len) if self.final_score else self.val_prefix
        final = score_final(self.model, self.evaluate, swa, tokens, c.save_predictor)
        if not math.isfinite(final.val_bpb):  # weights blew up without a non-finite training loss
            return self.finish_diverged()
        run = {"step": s.step, "tokens": s.step * c.train_batch_tokens, "compute_steps": s.step + self.probe_steps_done,
               "elapsed_s": round(self.train_time, 3), "params": self.n_params}
        summary = completed_summary(run, final, "val" if self.final_score else "val_prefix",
                                    peak_memory_mib(self.rt.device))
        summary["swa_start_shipped"] = start if swa is not None else None
        if chosen_on:
            summary["swa_select_bpb"] = chosen_on
        if self.rt.main and self.out_dir is not None:
            write_model_files(self.out_dir, final.state, c.save_predictor)
        self.log(f"final val_bpb (int8+zlib round trip, {summary['scored_on']}): {final.val_bpb:.4f} pre-quant: "
                 f"{final.prequant_bpb:.4f} artifact: {final.artifact_bytes} bytes (+{summary['code_bytes']} code) "
                 f"fits_cap: {summary['fits_cap']}")
        return self.end(summary)

    def choose_average(self) -> tuple[float, WeightAverage | None, dict[str, float]]:
        """Under swa_start_choices: the start, and the average, whose weights score the lowest BPB after
        the int8+zlib round trip on the swa_select_tokens bytes of the train stream that follow the
        last step's (bytes no step read, the same on every rank, apart from the val split the run is
        scored on), with each start's BPB there. An average from 1.0 is the raw weights."""
        c, s = self.c, self.state
        averages = {start: avg for start, avg in {c.swa_start: s.swa, **s.swa_choices}.items() if avg is not None}
        if not averages:
            return c.swa_start, None, {}
        tokens = self.loader.stream.take(max(1, c.swa_select_tokens // c.train_seq_len) * c.train_seq_len + 1)
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        bpb = {start: shipped_bpb(self.model, self.evaluate, avg.averaged_state(self.model), tokens,
                                  c.save_predictor)[0]
               for start, avg in sorted(averages.items())}
        self.model.load_state_dict(raw)
        best = min(bpb, key=bpb.__getitem__)
        self.log("SWA start chosen on unread train bytes: " + " ".join(f"{f:g}:{b:.4f}" for f, b in bpb.items())
                 + f" -> {best:g}")
        return best, averages[best], {f"{f:g}": b for f, b in bpb.items()}

    def finish_diverged(self) -> TrainResult:
        s = self.state
        self.log(f"diverged: non-finite loss by step {s.step}")
        return self.end(diverged_summary(s.step, s.step * self.c.train_batch_tokens, self.train_time, self.n_params))

    def end(self, summary: dict[str, Any]) -> TrainResult:
        if self.rt.main and self.out_dir is not None:
            write_summary(self.out_dir, summary, self.c)
        self.emit({**summary, "final": True})
        return TrainResult(summary["status"], self.state.step, summary, self.history)


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
    finished = False
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
        result = run.run(resume)
        finished = True
        return result
    finally:
        leave_group(run.rt, finished)
