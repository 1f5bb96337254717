#!/usr/bin/env bash
# The runs behind results/cifar10_5ep: four encodings, 5 epochs each on CIFAR-10 at the default
# mixed resolution (sides 16..48 px, h and w independent), bf16 autocast, seed 0, then the sweep.
# Machine: 2-core AVX-512 CPU, torch 2.13 CPU build, no GPU. Run from the repository root.
set -euo pipefail
for pe in learned_1d sincos rope rope_mixed; do
  .venv/bin/accelerate launch train.py --pos-embed "$pe" --epochs 5 --mixed-precision bf16 --seed 0 \
    --out "runs/c10_${pe}_5ep"
done
.venv/bin/python eval_resolutions.py runs/c10_learned_1d_5ep runs/c10_sincos_5ep runs/c10_rope_5ep \
  runs/c10_rope_mixed_5ep --out results/cifar10_5ep --plots \
  --res 8,12,16,24,32,40,48,56,64 --aspect 16x32,32x16,32x64,64x32  # the sweep's defaults at the time
