#!/usr/bin/env bash
# The README's main job: a short, real compression demo on Fashion-MNIST (~10 min on 2 CPU cores).
# Trains a ResNet-20 base for 2 epochs, prunes it to 50% of its FLOPs with PFEC L1 filter pruning
# plus a 1-epoch KD fine-tune from the dense model, then prints the before/after table and reloads
# the saved model (safetensors + structure.json, no pickle) to evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
KDP="${VENV:-.venv}/bin/kdprune"
OUT="${DEMO_OUT:-runs/demo}"
EPOCHS="${DEMO_EPOCHS:-2}"

echo "== 1/3 train a ResNet-20 base on Fashion-MNIST ($EPOCHS epochs) -> $OUT/base"
RESUME=""; [ -f "$OUT/base/checkpoint.pt" ] && RESUME="--resume"
"$KDP" train --model resnet20 --data fashion-mnist --epochs "$EPOCHS" --out "$OUT/base" $RESUME

echo "== 2/3 compress: KD fine-tuned L1 pruning to 50% of FLOPs -> $OUT/kd50"
RESUME=""; [ -d "$OUT/kd50" ] && RESUME="--resume"
"$KDP" compress --method kd --from "$OUT/base" --target-flops 0.5 --epochs 1 --out "$OUT/kd50" $RESUME

echo "== 3/3 reload the pruned model from disk (no pickle) and evaluate it"
"$KDP" eval "$OUT/kd50" --latency
"$KDP" info "$OUT/kd50"
