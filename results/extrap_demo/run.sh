#!/usr/bin/env bash
# The demonstration behind results/extrap_demo (issue 12): four encodings built to extrapolate,
# 3 epochs each on CIFAR-10 at the default mixed resolution (sides 16..48 px, h and w
# independent), default precision (auto: bf16 on this CPU), seed 0, then the sweep to 96 px in
# both test-time position modes on the first 1,000 test images. A demonstration of the tool, not
# a ranking (3 epochs, one seed). Run from the repository root; re-running resumes what is
# unfinished. The run directories go to results/extrap_demo/runs/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=results/extrap_demo/runs
for pe in rope alibi_2d lookhere fire_2d; do
  .venv/bin/python train.py --pos-embed "$pe" --epochs 3 --seed 0 --out "$RUNS/$pe" --resume latest
done
.venv/bin/python eval_resolutions.py "$RUNS/rope" "$RUNS/alibi_2d" "$RUNS/lookhere" "$RUNS/fire_2d" \
  --pos-mode extrapolate,interpolate --res 8,16,32,48,64,80,96 --aspect 16x64,64x16 \
  --max-images 1000 --out results/extrap_demo --plots
