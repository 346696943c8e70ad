"""What a sweep puts on storage, per trial, at a given model shape (default: the reference's).

A rung checkpoint is measured for real: one optimiser step of the shape (on a batch of one
sequence: the checkpoint's size does not depend on the batch), evaluated, checkpointed as a trial
does (weights, Muon and Adam state, the SWA copy, RNG states). What an ended trial keeps (its
results, Ray's own files) does not depend on the shape; with `--sweep DIR` it is measured on
that sweep's folder.

    python bench/storage_size.py                          # the reference shape
    python bench/storage_size.py --sweep runs/demo/sweep  # and an ended trial's files, from a sweep
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jepatune.analysis.summary import human_bytes, storage_use  # noqa: E402
from jepatune.corpora import build_demo  # noqa: E402
from jepatune.experiment.settings import read_settings  # noqa: E402
from jepatune.trainer.checkpoint import CHECKPOINT_NAME  # noqa: E402
from jepatune.trainer.config import PRESETS, load_config  # noqa: E402
from jepatune.trainer.loop import train  # noqa: E402


def checkpoint_bytes(preset: str, data: Path) -> tuple[int, int]:
    """(bytes of one rung checkpoint, parameters) at `preset`'s shape."""
    base = load_config(None, {**PRESETS.get(preset, {}), "data_path": str(data)})
    config = base.replace(iterations=2, eval_steps=(1,), val_loss_every=0, max_wallclock_seconds=0.0, compile=False,
                          device="cpu", grad_accum_steps=1, train_batch_tokens=base.train_seq_len,
                          val_tokens=base.train_seq_len * 2, val_batch_size=base.train_seq_len * 2)
    with tempfile.TemporaryDirectory() as folder:
        reports = []
        result = train(config, report=reports.append, checkpoint_dir=folder, final_score=False)
        return (Path(folder) / CHECKPOINT_NAME).stat().st_size, int(result.summary["params"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="reference", help="model shape (default: the reference's)")
    p.add_argument("--data", type=Path, help="byte shards (default: a demo corpus built here)")
    p.add_argument("--sweep", help="a sweep folder or storage URI: measure what its ended trials keep")
    p.add_argument("--rungs", type=int, default=3, help="checkpointed rungs a running trial holds (default 3)")
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if args.data is None:
            build_demo(data, train_mb=0.6, val_mb=0.1)
        ckpt, params = checkpoint_bytes(args.preset, data)
    print(f"{args.preset} shape: {params:,} parameters; one rung checkpoint {human_bytes(ckpt)} ({ckpt / params:.1f} "
          f"bytes a parameter); a running trial holds up to {args.rungs} of them: {human_bytes(args.rungs * ckpt)} "
          f"({time.perf_counter() - t0:.0f}s)")
    print(f"without retention (a checkpoint per trial kept): {human_bytes(1000 * ckpt)} per 1,000 trials")
    if args.sweep:
        use = storage_use(args.sweep)
        print(f"an ended trial of {read_settings(args.sweep).experiment_path} keeps "
              f"{human_bytes(use['bytes_per_trial'])} ({use['trials']} trials, "
              f"{human_bytes(use['checkpoint_bytes'])} in checkpoints); with retention, 1,000 ended trials take "
              f"{human_bytes(1000 * use['bytes_per_trial'])} plus the running trials' checkpoints")


if __name__ == "__main__":
    main()
