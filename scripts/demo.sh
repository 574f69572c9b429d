#!/usr/bin/env bash
# The README's main job: a short, real compression demo on Fashion-MNIST (~4-6 min on 2 CPU cores).
# Starts from the shipped ResNet-20 base (kp.pretrained("resnet20-fmnist"), 93.78% top-1, sha256
# checked), prunes it to 50% of its FLOPs with PFEC L1 filter pruning plus a 1-epoch KD fine-tune on 30k images
# from the dense model, with the dense + same-epochs control (the base fine-tuned 1 epoch too), prints
# the before/control/after table, then reloads the saved model (safetensors + structure.json, no
# pickle) to evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
KDP="${VENV:-.venv}/bin/kdprune"
OUT="${DEMO_OUT:-runs/demo}"

echo "== 1/2 compress the shipped ResNet-20 base: L1 pruning to 50% of FLOPs + 1 epoch of KD, and the dense control -> $OUT/kd50"
RESUME=""; [ -d "$OUT/kd50" ] && RESUME="--resume"
"$KDP" compress --method kd --from pretrained:resnet20-fmnist --target-flops 0.5 --epochs 1 --control 1 --train-subset 30000 \
  --out "$OUT/kd50" $RESUME

echo "== 2/2 reload the pruned model from disk (no pickle) and evaluate it"
"$KDP" eval "$OUT/kd50" --latency
"$KDP" info "$OUT/kd50"
