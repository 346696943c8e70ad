"""Trainer throughput: ms per optimiser step, tokens/s and peak memory of `Trainer.train_step`.

One row per (mode, curriculum stage): stage 1 = JEPA + regulariser (no CE), 2 = bridge,
3 = CE only. The stage is chosen by setting `trainer.step` (and the elapsed time, under a
wall clock) to a point of the budget inside that stage before every step. With
`--reference train_gpt.py` another script's GPT, Muon and training step are timed on the same
batches in the same process, and the ratio ours / reference is printed per stage: the ByteJEPA
reference (`../shared/reference/seed/train_gpt.py`: every stage, its loss weights set through its
`set_phase` and its weight average updated in stage 3, as its main loop does) or the Parameter
Golf baseline (CE only: stage 3).

    python bench/trainer_throughput.py            # tiny preset, eager + compiled, stages 1 and 3
    python bench/trainer_throughput.py --stages 1,2,3 --reference ../shared/reference/seed/train_gpt.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from jepatune.corpora import build_demo  # noqa: E402
from jepatune.trainer import schedule  # noqa: E402
from jepatune.trainer.config import PRESETS, TrainConfig, load_config, parse_set_args  # noqa: E402
from jepatune.trainer.data import DistributedTokenLoader, find_shards  # noqa: E402
from jepatune.trainer.loop import Trainer  # noqa: E402
from jepatune.trainer.model import build_model  # noqa: E402
from jepatune.trainer.runtime import autocast, setup_runtime  # noqa: E402

Row = dict[str, Any]
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")  # torch's own deprecations
COLUMNS = [("impl", 9), ("mode", 8), ("stage", 5), ("device", 6), ("tokens/step", 11), ("ms/step", 9),
           ("tokens/s", 10), ("peak_MiB", 9), ("params", 10), ("warmup_s", 8)]


# --- measuring --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process max RSS (KiB on Linux)


def measure(step_fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median ms per timed step, peak MiB during the timed steps, seconds of the `warmup` untimed steps)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step_fn()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), peak_mib(device), warmup_s


def make_row(impl: str, mode: str, stage: int, device: torch.device, c: TrainConfig, params: int,
             ms: float | None = None, mem: float | None = None, warmup_s: float | None = None,
             error: str | None = None) -> Row:
    return {"impl": impl, "mode": mode, "stage": stage, "device": device.type,
            "tokens_per_step": c.train_batch_tokens, "ms_per_step": None if ms is None else round(ms, 2),
            "tokens_per_s": None if ms is None else round(c.train_batch_tokens / (ms / 1000)),
            "peak_mem_mib": None if mem is None else round(mem, 1), "params": params,
            "warmup_s": None if warmup_s is None else round(warmup_s, 1), "error": error}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def print_line(cells: list[Any], note: str = "") -> None:
    """Text columns left-aligned, numbers right-aligned, widths from COLUMNS."""
    parts = [fmt(v).ljust(w) if i < 4 else fmt(v).rjust(w)
             for i, (v, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))]
    print(" ".join(parts) + note, flush=True)


def print_row(r: Row) -> None:
    note = f"  FAILED: {r['error']}" if r["error"] else ""
    print_line([r["impl"], r["mode"], str(r["stage"]), r["device"], r["tokens_per_step"], r["ms_per_step"],
                r["tokens_per_s"], r["peak_mem_mib"], r["params"], r["warmup_s"]], note)


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def free_memory() -> None:
    """Drop compiled graphs (they hold on to their model) and cached blocks, so the next row starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- our trainer --------------------------------------------------------------------------------

def stage_point(c: TrainConfig, stage: int) -> tuple[int, float]:
    """(step, elapsed seconds) whose progress, as `Trainer.train_step` computes it, is inside `stage`."""
    bounds = {1: (0.0, c.jepa_pure_frac), 2: (c.jepa_pure_frac, c.ce_pure_frac), 3: (c.ce_pure_frac, 1.0)}
    lo, hi = bounds[stage]
    for p in ((lo + hi) / 2, lo):
        step = min(math.ceil(p * c.iterations), c.iterations - 1)
        elapsed = p * c.max_wallclock_seconds
        prog = schedule.progress(step, c.iterations, elapsed, c.max_wallclock_seconds)
        if schedule.curriculum_weights(prog, c.jepa_pure_frac, c.ce_pure_frac, 1.0, 1.0).stage == stage:
            return step, elapsed
    raise ValueError(f"no stage {stage}: jepa_pure_frac={c.jepa_pure_frac}, ce_pure_frac={c.ce_pure_frac}")


def bench_ours(c: TrainConfig, mode: str, stages: list[int], args: argparse.Namespace) -> list[Row]:
    """One Trainer per mode, as in a run: the stages share its model, optimiser state and SWA copy."""
    rows = []
    trainer = Trainer(c, None, None, None, False)
    device, params = trainer.rt.device, trainer.n_params
    for stage in stages:
        try:
            step, elapsed = stage_point(c, stage)

            def one_step(t: Trainer = trainer, step: int = step, elapsed: float = elapsed) -> None:
                t.state.step = step  # train_step derives the progress, hence the stage, from it
                t.train_step(elapsed=elapsed)

            r = make_row("ours", mode, stage, device, c, params, *measure(one_step, device, args.warmup, args.steps))
        except Exception as e:  # e.g. torch.compile without a working C compiler
            r = make_row("ours", mode, stage, device, c, params, error=short_error(e))
        print_row(r)
        rows.append(r)
    return rows


# --- the reference script (ByteJEPA's, or the Parameter Golf baseline) ----------------------------

def load_reference(path: Path) -> ModuleType:
    """Import a reference train_gpt.py as a module (afresh each time: compiled mode patches a global)."""
    spec = importlib.util.spec_from_file_location("reference_train_gpt", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_jepa(ref: ModuleType) -> bool:
    """The ByteJEPA script (a predictor, loss weights set per step); the baseline is CE only."""
    return hasattr(ref.GPT, "set_phase")


def reference_step(ref: ModuleType, c: TrainConfig, compiled: bool,
                   stage: int = 3) -> tuple[Callable[[], None], torch.nn.Module]:
    """The script's training step in `stage` at our config's shape, precision, optimiser split and
    micro-batching: its loss weights for a point inside the stage, its average updated in stage 3."""
    rt = setup_runtime(c)  # our device and precision rules
    device, bf16 = rt.device, rt.bf16
    torch.manual_seed(c.seed)
    model = ref.GPT(vocab_size=c.vocab_size, num_layers=c.num_layers, model_dim=c.model_dim,
                    num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, mlp_mult=c.mlp_mult,
                    tie_embeddings=c.tie_embeddings, tied_embed_init_std=c.tied_embed_init_std,
                    logit_softcap=c.logit_softcap, rope_base=c.rope_base, qk_gain_init=c.qk_gain_init)
    model = model.to(device)
    if bf16:  # as its main(): a bf16 model, then linear weights and low-dim/control tensors back to fp32
        model = model.bfloat16()
        for m in model.modules():
            if isinstance(m, ref.CastedLinear):
                m.float()
        ref.restore_low_dim_params_to_fp32(model)
    jepa = is_jepa(ref)
    if jepa:
        step, elapsed = stage_point(c, stage)
        w = schedule.curriculum_weights(schedule.progress(step, c.iterations, elapsed, c.max_wallclock_seconds),
                                        c.jepa_pure_frac, c.ce_pure_frac, c.jepa_weight, c.sigreg_weight)
        model.set_phase(w.jepa > 0, w.jepa, w.ce, w.reg)
    elif stage != 3:
        raise ValueError(f"stage {stage}: this reference is CE only (stage 3)")
    net = model
    if compiled:  # as its main(); the ByteJEPA forward reads a flag on the host, so not one full graph
        ref.zeropower_via_newtonschulz5 = torch.compile(ref.zeropower_via_newtonschulz5)
        net = torch.compile(model, dynamic=False, fullgraph=not jepa)

    named = list(model.blocks.named_parameters())
    control = ref.CONTROL_TENSOR_NAME_PATTERNS
    matrices = [p for n, p in named if p.ndim == 2 and not any(k in n for k in control)]
    if jepa:
        matrices += [p for p in model.predictor.parameters() if p.ndim == 2]
    scalars = [p for n, p in named if p.ndim < 2 or any(k in n for k in control)] + [model.skip_weights]
    fused = {"fused": True}  # as the reference and our build_optimizers

    def adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}], betas=(c.beta1, c.beta2),
                                eps=c.adam_eps, **fused)

    muon = ref.Muon(matrices, lr=c.matrix_lr, momentum=c.muon_momentum, backend_steps=c.muon_backend_steps)
    muon.param_groups[0]["base_lr"] = c.matrix_lr
    optimizers = [adam([model.tok_emb.weight], c.tied_embed_lr if c.tie_embeddings else c.embed_lr), muon,
                  adam(scalars, c.scalar_lr)]
    if model.lm_head is not None:
        optimizers.insert(1, adam([model.lm_head.weight], c.head_lr))

    accum = c.grad_accum_steps  # one process: every micro-batch is local, as in our trainer
    local_tokens = c.train_batch_tokens // accum
    loader = DistributedTokenLoader(find_shards(c.data_path, "train"))  # the same byte stream as ours
    average = copy.deepcopy(model.state_dict()) if jepa and stage == 3 and c.swa_enabled else None

    def one_step() -> None:  # its training loop body, less logging
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        for _ in range(accum):
            x, y = (torch.from_numpy(a).to(device, non_blocking=True)
                    for a in loader.next_batch(local_tokens, c.train_seq_len))
            with autocast(device, bf16):
                loss = net(x, y)
            (loss * (1.0 / accum)).backward()
        muon.param_groups[0]["momentum"] = c.muon_momentum
        for o in optimizers:
            for g in o.param_groups:
                g["lr"] = g["base_lr"]
        for o in optimizers:
            o.step()
        if average is not None:  # its main loop's EMA, over the whole state dict
            current = model.state_dict()
            for k, v in average.items():
                if v.is_floating_point():
                    v.mul_(c.swa_decay).add_(current[k], alpha=1.0 - c.swa_decay)

    return one_step, model


@torch.no_grad()
def loss_gap(ref_model: torch.nn.Module, c: TrainConfig) -> float:
    """|our CE - the baseline's CE| with the baseline's (trained) weights loaded into our GPT, on one batch."""
    rt = setup_runtime(c)
    ours = build_model(c)
    if rt.bf16:
        ours.tok_emb.to(torch.bfloat16)
    ours.to(rt.device).load_state_dict(ref_model.state_dict(), strict=False)  # ours adds only the predictor
    x, y = (torch.from_numpy(a).to(rt.device) for a in DistributedTokenLoader(find_shards(c.data_path, "train"))
            .next_batch(c.train_batch_tokens // c.grad_accum_steps, c.train_seq_len))
    with autocast(rt.device, rt.bf16):
        return abs(ours(x, y).item() - ref_model(x, y).item())


def bench_reference(path: Path, c: TrainConfig, mode: str, stage: int, args: argparse.Namespace) -> Row:
    device, params = setup_runtime(c).device, 0
    try:
        ref = load_reference(path)
        step_fn, model = reference_step(ref, c, mode == "compiled", stage)
        params = sum(p.numel() for p in model.parameters())
        r = make_row("reference", mode, stage, device, c, params, *measure(step_fn, device, args.warmup, args.steps))
        if mode == "eager" and stage == 3:  # the same loss, or the timing compares different work
            if is_jepa(ref):
                model.set_phase(False, 0.0, 1.0, 0.0)  # its evaluation path: plain CE
            r["loss_gap"] = loss_gap(model, c)
    except Exception as e:
        r = make_row("reference", mode, stage, device, c, params, error=short_error(e))
    print_row(r)
    if "loss_gap" in r:
        print(f"check: |CE ours - CE reference| with the reference's weights = {r['loss_gap']:.2e}", flush=True)
    return r


# --- driver -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting config (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig knob (repeatable)")
    p.add_argument("--data", type=Path, help="byte-shard folder (default: build the demo corpus)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row before timing (default 3)")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--stages", default="1,3", help="comma list of curriculum stages 1, 2, 3")
    p.add_argument("--reference", type=Path, help="a reference train_gpt.py to compare with (ByteJEPA's: every "
                   "stage; the Parameter Golf baseline: stage 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="write the rows and ratios here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"eager", "compiled"}:
        p.error(f"--modes: expected a comma list of eager, compiled; got {','.join(args.modes)!r}")
    try:
        args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        p.error(f"--stages: expected a comma list of 1, 2, 3; got {args.stages!r}")
    if not args.stages or set(args.stages) - {1, 2, 3}:
        p.error(f"--stages: expected a comma list of 1, 2, 3; got {args.stages}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--steps must be >= 1, --warmup and --threads >= 0")
    if args.reference is not None and not args.reference.is_file():
        p.error(f"--reference {args.reference}: no such file")
    return args


def run(args: argparse.Namespace, data: Path) -> tuple[list[Row], list[dict[str, Any]]]:
    sets = parse_set_args(args.overrides)
    config = load_config(None, {**PRESETS[args.preset], "data_path": str(data.resolve()), **sets})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, preset {args.preset}, "
          f"overrides {sets or '{}'}, data {data}, warmup {args.warmup}, timed {args.steps} (median)",
          flush=True)
    print_line([name for name, _ in COLUMNS])
    rows, ratios = [], []
    for mode in args.modes:
        c = config.replace(compile=mode == "compiled")
        ours = bench_ours(c, mode, args.stages, args)
        free_memory()
        rows += ours
        if args.reference is None:
            continue
        stages = args.stages if is_jepa(load_reference(args.reference)) else [3]
        for stage in stages:
            ref = bench_reference(args.reference, c, mode, stage, args)
            free_memory()
            rows.append(ref)
            mine = next((r for r in ours if r["stage"] == stage and r["ms_per_step"]), None)
            if mine and ref["ms_per_step"]:
                ratios.append({"mode": mode, "stage": stage, "ours_ms": mine["ms_per_step"],
                               "reference_ms": ref["ms_per_step"],
                               "ratio": round(mine["ms_per_step"] / ref["ms_per_step"], 3)})
    for r in ratios:
        print(f"ratio ours/reference ms per step, stage {r['stage']}, {r['mode']}: {r['ratio']:.3f} "
              f"({r['ours_ms']:,.1f} vs {r['reference_ms']:,.1f} ms: ours at {r['reference_ms'] / r['ours_ms']:.2f}x "
              f"the reference's tokens/s)")
    if args.reference is not None and not ratios:
        print("no ratio: it needs a stage both can run in --stages, and both rows to succeed")
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="jepatune-bench-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "demo"
            build_demo(data)
        rows, ratios = run(args, data)
    if args.json is not None:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.preset,
                "overrides": parse_set_args(args.overrides), "warmup": args.warmup, "steps": args.steps,
                "argv": sys.argv[1:] if argv is None else argv}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
