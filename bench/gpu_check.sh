#!/usr/bin/env bash
# GPU check of the trainer, from the repository root:  bash bench/gpu_check.sh
#
# 1. builds the demo byte corpus in a temp folder;
# 2. times Trainer.train_step at the reference shape (9x512, seq 4096, 524,288 tokens a step in
#    8 micro-batches), eager and compiled, curriculum stages 1 (JEPA + varcov), 2 (bridge) and 3
#    (CE + SWA), beside the ByteJEPA reference script's own step at the same shape;
# 3. trains 200 steps at the reference shape with `jepatune train` and prints val_bpb.
# An estimated 5-8 minutes on one H100 (not yet run on one).
# Needs python3 with torch and numpy only (no pip install).
#
# Environment:
#   GPU_CHECK_DRY=1     the same steps on CPU with the tiny preset: a check of this script
#   REFERENCE=PATH      the reference train_gpt.py timed beside ours (default: the ByteJEPA seed at
#                       ../shared/reference/seed/train_gpt.py when it is there; the Parameter Golf
#                       baseline works too, stage 3 only); REFERENCE=none skips it
#   GPU_CHECK_MODES     throughput modes (default eager,compiled; eager when dry)
#   GPU_CHECK_ITERS     steps of the training run (default 200; 20 when dry)
#   GPU_CHECK_KEEP=1    keep the work folder (corpus, throughput JSON, training outputs)
#   PYTHON              the interpreter (default python3)
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jepatune-gpu-check.XXXXXX")
if [[ ${GPU_CHECK_KEEP:-0} == 1 ]]; then
  trap 'echo "work folder kept: $WORK"' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi

if [[ $DRY == 1 ]]; then
  PRESET=tiny
  SHAPE=(--set device=cpu)
  MODES=${GPU_CHECK_MODES:-eager}
  ITERS=${GPU_CHECK_ITERS:-20}
  EVERY=10
  VAL_TOKENS=65536
  BENCH_STEPS=(--warmup 1 --steps 3)
  DEMO=(--train-mb 1 --val-mb 0.1)  # a small val split: the final scoring reads all of it four times
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # small CPU boxes run the tiny model faster on one thread
else
  PRESET=reference
  # The reference's own values, spelled out: the shape under test.
  SHAPE=(--set train_seq_len=4096 --set train_batch_tokens=524288 --set grad_accum_steps=8)
  MODES=${GPU_CHECK_MODES:-eager,compiled}
  ITERS=${GPU_CHECK_ITERS:-200}
  EVERY=100
  VAL_TOKENS=1048576
  BENCH_STEPS=(--warmup 3 --steps 8)
  DEMO=()
fi

section() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

section "machine"
if [[ $DRY == 1 ]]; then
  echo "dry run: CPU, preset $PRESET"
elif command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv
else
  echo "nvidia-smi: not found"
fi
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| available", torch.cuda.is_available())'
if [[ $DRY != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA device visible to torch; run with GPU_CHECK_DRY=1 for the CPU dry run" >&2
  exit 1
fi

section "demo corpus"
"$PY" -m jepatune data demo --out "$WORK/data" ${DEMO[@]+"${DEMO[@]}"}

section "throughput: preset $PRESET, modes $MODES, stages 1, 2 and 3"
REF=()
REFERENCE=${REFERENCE:-${PG_REFERENCE:-../shared/reference/seed/train_gpt.py}}
if [[ $REFERENCE != none && -f $REFERENCE ]]; then
  REF=(--reference "$REFERENCE")
  echo "reference: $REFERENCE"
fi
# A failure here is reported and the training check still runs.
T0=$SECONDS
"$PY" bench/trainer_throughput.py --preset "$PRESET" "${SHAPE[@]}" --set val_tokens="$VAL_TOKENS" \
  --data "$WORK/data" --modes "$MODES" --stages 1,2,3 "${BENCH_STEPS[@]}" ${REF[@]+"${REF[@]}"} \
  --json "$WORK/throughput.json" || echo "throughput: exit status $? (see the rows above)"
echo "throughput took $((SECONDS - T0)) s"
if [[ -f $WORK/throughput.json ]]; then
  "$PY" - "$WORK/throughput.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    what = f"{r['impl']:<9} {r['mode']:<8} stage {r['stage']}"
    if r["error"]:
        print(f"{what}: FAILED {r['error']}")
    else:
        print(f"{what}: {r['tokens_per_s']:>10,} tokens/s  {r['ms_per_step']:>9,.1f} ms/step  "
              f"peak {r['peak_mem_mib']:>9,.1f} MiB")
for r in d["ratios"]:
    print(f"ours/reference ms per step, stage {r['stage']} {r['mode']}: {r['ratio']:.3f} "
          f"(ours at {1 / r['ratio']:.2f}x the reference's tokens/s)")
EOF
fi

section "training: $ITERS steps, preset $PRESET"
T0=$SECONDS
"$PY" -m jepatune train --preset "$PRESET" --data "$WORK/data" "${SHAPE[@]}" \
  --set iterations="$ITERS" --set max_wallclock_seconds=0 --set val_loss_every="$EVERY" --set warmdown_frac=0.3 \
  --set val_tokens="$VAL_TOKENS" --set train_log_every=50 --out "$WORK/train"
echo "training took $((SECONDS - T0)) s (wall, including evaluation and export)"
"$PY" - "$WORK/train" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for line in (out / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if not m.get("final"):
        loss = "-" if m["train_loss"] is None else f"{m['train_loss']:.4f}"
        print(f"step {m['step']:>5}  val_bpb {m['val_bpb']:.4f}  train_loss {loss}  stage {m['stage']}  "
              f"elapsed {m['elapsed_s']:.1f}s")
s = json.loads((out / "summary.json").read_text())
print(f"final after {s['step']} steps ({s['status']}): val_bpb {s['val_bpb']:.4f} (int8+zlib) "
      f"prequant {s.get('prequant_bpb', float('nan')):.4f} raw {s.get('raw_bpb', float('nan')):.4f} "
      f"train_time {s['elapsed_s']:.1f}s = {1000 * s['elapsed_s'] / max(s['step'], 1):.0f} ms/step "
      f"peak {s.get('peak_mem_mib', 0):,.0f} MiB params {s['params']:,}")
EOF
section "done"
