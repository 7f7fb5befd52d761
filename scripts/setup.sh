#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: Fashion-MNIST from Debian, .venv with cskd.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import cskd, timm, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned to the build this machine keeps on disk; then the package and its tools.
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[dev]"
fi
