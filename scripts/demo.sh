#!/usr/bin/env bash
# Set up (if needed) and run the Fashion-MNIST demo on the CPU: teacher, CSKD student, plain student.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cskd demo "$@"
