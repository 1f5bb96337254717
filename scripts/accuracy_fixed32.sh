#!/usr/bin/env bash
# Issue 11's accuracy check: learned_1d at fixed 32x32 with the reference recipe (no RandAugment,
# 1 warm-up epoch, 128 images a step, --max-seq-len 260), fp32 against the default precision
# (auto = bf16 on CPUs with native bf16). Two queues run side by side, one thread each; every run
# resumes where it stopped (--resume latest), and its metrics are copied to results/ when it ends.
#   bash scripts/accuracy_fixed32.sh            # all runs; then python scripts/accuracy_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=results/accuracy_fixed32
RECIPE=(--pos-embed learned_1d --train-res 32 --randaug-ops 0 --warmup-epochs 1 --batch-images 128
        --max-seq-len 260 --log-every 50)
mkdir -p "$OUT"

one() {  # name epochs precision seed
  local name=$1 epochs=$2 prec=$3 seed=$4 run=runs/accuracy_fixed32/$1
  if [ -f "$OUT/$name/results.json" ]; then echo "$name: recorded"; return; fi
  mkdir -p "$run"
  [ -f "$run/commit" ] || git rev-parse HEAD > "$run/commit"  # the code the run started with
  OMP_NUM_THREADS=1 "$PY" train.py "${RECIPE[@]}" --epochs "$epochs" --mixed-precision "$prec" --seed "$seed" \
    --out "$run" --resume latest >> "$run.log" 2>&1
  mkdir -p "$OUT/$name"
  cp "$run/results.json" "$run/metrics.jsonl" "$run/train_config.json" "$OUT/$name/"
  cp "$run/commit" "$OUT/$name/commit"
  echo "$name: $(python3 -c "import json; print(json.load(open('$OUT/$name/results.json'))['test_acc'])")"
}

mkdir -p runs/accuracy_fixed32
( one fp32_6ep_s0 6 no 0; one fp32_6ep_s1 6 no 1 ) &
( one auto_6ep_s0 6 auto 0; one auto_6ep_s1 6 auto 1; one auto_10ep_s0 10 auto 0 ) &
wait
