#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: Fashion-MNIST from Debian, .venv with cskd.
# CSKD_TORCH_INDEX=<pip index URL> installs PyTorch from that index instead (for example
# https://download.pytorch.org/whl/cpu: the CPU-only build, without the 3.2 GB of CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "cskd set-up: $*"; }
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  say "installing Fashion-MNIST (the Debian package dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import cskd, timm, pytest" >/dev/null 2>&1; then
  say "installing PyTorch 2.14.1 and torchvision into .venv (about 2 minutes, 5.7 GB with CUDA)"
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned to the build this machine keeps on disk; then the package and its tools.
  .venv/bin/pip install -q ${CSKD_TORCH_INDEX:+--index-url "$CSKD_TORCH_INDEX"} \
    "torch==2.14.1" "torchvision==0.29.1"
  say "installing cskd (editable) with timm, pytest and its other tools"
  .venv/bin/pip install -q -e ".[dev]"
fi
say "ready. For the README's cskd commands, activate the environment once per shell:" \
  "source .venv/bin/activate (or call .venv/bin/cskd)"
