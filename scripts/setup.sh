#!/usr/bin/env bash
# Set up a fresh machine: venv, torch pinned FIRST (a newer torch pulls GBs of CUDA wheels),
# the package with its dev and export extras (onnx, onnxruntime, onnxscript: pinned in constraints.txt,
# so the ONNX parity tests run in CI), and the Fashion-MNIST Debian package when we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-dev,export}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: $FMNIST missing and not root: run 'sudo apt-get install dataset-fashion-mnist'" \
         "or pass --data-root to a folder with the Fashion-MNIST IDX files" >&2
  fi
fi
touch "$VENV/.kdprune-installed"
