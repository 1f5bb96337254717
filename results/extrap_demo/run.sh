#!/usr/bin/env bash
# The demonstration behind results/extrap_demo (issue 12): four encodings built to extrapolate,
# 3 epochs each on CIFAR-10 at the default mixed resolution (sides 16..48 px, h and w
# independent), bf16 autocast, seed 0, then the sweep to 96 px in both test-time position modes.
# A demonstration of the tool, not a ranking (3 epochs, one seed). Run from the repository root;
# the run directories go to results/extrap_demo/runs/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=results/extrap_demo/runs
for pe in rope alibi_2d lookhere fire_2d; do
  .venv/bin/accelerate launch train.py --pos-embed "$pe" --epochs 3 --mixed-precision bf16 --seed 0 \
    --out "$RUNS/$pe"
done
.venv/bin/python eval_resolutions.py "$RUNS/rope" "$RUNS/alibi_2d" "$RUNS/lookhere" "$RUNS/fire_2d" \
  --pos-mode extrapolate,interpolate --res 8,16,24,32,40,48,56,64,72,80,88,96 \
  --aspect 16x32,32x16,16x64,64x16,32x64,64x32 --out results/extrap_demo --plots
