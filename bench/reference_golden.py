"""Golden curves from the ByteJEPA reference itself, for tests/trainer/test_golden.py.

Runs the seed's own `main()` (`../shared/reference/seed/train_gpt.py`, imported, never copied) on
CPU at a tiny shape, in fp32 and in bf16 autocast, and writes what it computed to
`tests/data/reference_golden.json`: every step's train loss (the mean over its 8 micro-batches,
recorded from its forward), the final val_bpb after its int8+zlib round trip, and the sha256 of its
artifact. What lets a CUDA-only script run here, and nothing else changes in it:

- `torch` as the script sees it is the real module with the CUDA entry points it calls made CPU
  ones: `torch.device("cuda", i)` is the CPU, `torch.cuda.*` set-up and timing calls are no-ops,
  `torch.autocast(device_type="cuda")` is CPU autocast (off in the fp32 run), `torch.compile` is
  the identity (no compiler needed; compile does not change the maths);
- its wall clock is fixed: `time.perf_counter` returns the number of optimiser steps taken times
  one second, so with MAX_WALLCLOCK_SECONDS = ITERATIONS its time-based curriculum, warm-down, SWA
  start and stop are exactly the step-based ones of jepatune with `iterations` = ITERATIONS.

    python bench/reference_golden.py                     # adds this CPU's runs to tests/data/reference_golden.json

The floats are those of the machine's kind of CPU (`jepatune.trainer.runtime.cpu_kind`): the same
run on an AMD EPYC and on an Intel Xeon with AVX-512 and AMX differs from the first step that sums
CE gradients (fp32) or from step 1 (bf16). The file keeps one entry per kind; running the script
on a new kind adds its entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "reference" / "seed" / "train_gpt.py"
OUT = ROOT / "tests" / "data" / "reference_golden.json"
sys.path.insert(0, str(ROOT))

# The tiny shape: the reference's 8 micro-batches a step (grad_accum_steps = 8 on one process).
SHAPE = {"NUM_LAYERS": 2, "MODEL_DIM": 32, "NUM_HEADS": 2, "NUM_KV_HEADS": 1, "TRAIN_SEQ_LEN": 64,
         "TRAIN_BATCH_TOKENS": 1024, "VAL_BATCH_SIZE": 1024, "ITERATIONS": 30, "MAX_WALLCLOCK_SECONDS": 30,
         "WARMDOWN_ITERS": 10, "WARMUP_STEPS": 0, "MUON_MOMENTUM_WARMUP_STEPS": 10, "JEPA_PURE_FRAC": 0.2,
         "CE_PURE_FRAC": 0.6, "VAL_LOSS_EVERY": 0, "TRAIN_LOG_EVERY": 0, "SEED": 1337}
# The same run as jepatune knobs (tests/trainer/test_golden.py builds its TrainConfig from these).
KNOBS = {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "train_seq_len": 64,
         "train_batch_tokens": 1024, "val_batch_size": 1024, "iterations": 30, "warmdown_iters": 10,
         "warmup_steps": 0, "muon_momentum_warmup_steps": 10, "jepa_pure_frac": 0.2, "ce_pure_frac": 0.6,
         "val_loss_every": 0, "train_log_every": 0, "seed": 1337, "grad_accum_steps": 8, "val_tokens": 0}
CORPUS = {"train_mb": 0.1, "val_mb": 0.01}


def cpu_torch(bf16: bool, clock: list[int]) -> types.ModuleType:
    """The real torch, seen through a module whose CUDA entry points are CPU ones (see above)."""
    real = torch
    shim = types.ModuleType("torch")
    shim.__dict__.update({k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    shim.__version__ = real.__version__
    cuda = types.SimpleNamespace(**{k: getattr(real.cuda, k) for k in dir(real.cuda) if not k.startswith("__")})
    cuda.is_available = lambda: True
    cuda.set_device = cuda.synchronize = lambda *a, **k: None
    cuda.max_memory_allocated = cuda.max_memory_reserved = lambda *a, **k: 0
    shim.cuda = cuda
    shim.device = lambda *a, **k: real.device("cpu")
    shim.compile = lambda fn=None, **k: fn if fn is not None else (lambda f: f)
    shim.autocast = lambda device_type, dtype=None, enabled=True: (
        real.autocast("cpu", dtype=real.bfloat16, enabled=enabled) if bf16 else contextlib.nullcontext())
    return shim


def run_reference(data: Path, bf16: bool) -> dict:
    clock = [0]  # optimiser steps taken: the fixed clock
    env = {k: str(v) for k, v in SHAPE.items()}
    env.update(DATA_PATH=str(data), RUN_ID="golden")
    os.environ.update(env)
    spec = importlib.util.spec_from_file_location("bytejepa_reference", SEED)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ref.torch = cpu_torch(bf16, clock)
    ref.time = types.SimpleNamespace(perf_counter=lambda: float(clock[0]), time=lambda: 0.0)
    ref.subprocess = types.SimpleNamespace(run=lambda *a, **k: types.SimpleNamespace(stdout=""),
                                           PIPE=None)  # no nvidia-smi here
    muon_step = ref.Muon.step

    def counted_step(self, closure=None):  # Muon steps once per optimiser step: it drives the clock
        out = muon_step(self, closure)
        clock[0] += 1
        return out

    ref.Muon.step = counted_step
    losses: list[float] = []
    forward = ref.GPT.forward

    def recorded(self, input_ids, target_ids):
        loss = forward(self, input_ids, target_ids)
        if self.training:
            losses.append(float(loss.detach().float()))
        return loss

    ref.GPT.forward = recorded
    if not bf16:  # the reference's maths in fp32: no bf16 cast of the model either (it casts unconditionally)
        ref.GPT.bfloat16 = lambda self: self
    printed: list[str] = []
    ref.print = lambda *a, **k: printed.append(" ".join(map(str, a)))
    with tempfile.TemporaryDirectory() as cwd:
        here = os.getcwd()
        os.chdir(cwd)
        try:
            ref.main()
            artifact = Path("final_model.int8.ptz").read_bytes()
        finally:
            os.chdir(here)
    final = next(line for line in printed if line.startswith("final_int8_zlib_roundtrip_exact"))
    steps = [sum(losses[i:i + 8]) / 8 for i in range(0, len(losses), 8)]
    return {"train_loss": steps, "val_bpb": float(final.split("val_bpb:")[1]),
            "artifact_sha256": hashlib.sha256(artifact).hexdigest(),
            "swa_started": next((line for line in printed if line.startswith("swa_started")), None)}


def main() -> int:
    from jepatune.corpora import build_demo
    from jepatune.trainer.runtime import cpu_kind, same_cpu_kind

    if not SEED.is_file():
        raise SystemExit(f"{SEED}: the reference script is not there")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_demo(data, **CORPUS)
        runs = {"fp32": run_reference(data, bf16=False), "bf16": run_reference(data, bf16=True)}
    here = cpu_kind()
    # One entry per kind of CPU: the floats are this machine's, other kinds' entries are kept.
    kept = json.loads(OUT.read_text()).get("cpus", []) if OUT.is_file() else []
    kept = [e for e in kept if not same_cpu_kind(e["cpu"], here)]
    golden = {"how": "python bench/reference_golden.py: the ByteJEPA reference's main() on CPU at this shape, "
                     "with its clock fixed to one second per optimiser step (see the script), once on each "
                     "kind of CPU listed",
              "torch": torch.__version__, "reference_env": SHAPE, "jepatune_knobs": KNOBS, "corpus": CORPUS,
              "cpus": [*kept, {"cpu": here, "runs": runs}]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"on {here['model']} ({here['capability']}; {here['flags']}), beside {len(kept)} other kinds of CPU:")
    for name, r in runs.items():
        print(f"{name}: {len(r['train_loss'])} steps, loss {r['train_loss'][0]:.6f} -> {r['train_loss'][-1]:.6f}, "
              f"val_bpb {r['val_bpb']:.8f}, artifact {r['artifact_sha256'][:16]}, {r['swa_started']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
