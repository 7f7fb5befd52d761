#!/usr/bin/env bash
# The GPU speed path, side by side on one GPU: DeiT-Ti and DeiT-S with RegNetY-16GF at 224 px
# (random weights: speed does not depend on them), the CSKD release's way of running a step
# (fp16 autocast, a gradient scaler, no compile, channels-first) against ours (bf16 student,
# fp16 teacher, train.compile for both, the teacher channels-last) and ours with the teacher's
# targets from a cache; then the time and size of building a cache with RegNetY-16GF. Synthetic
# batches: nothing to fetch, nothing installed (the GPU machine needs python3 with torch,
# torchvision, timm, safetensors, pyyaml and tqdm; cskd runs from src/ via PYTHONPATH).
#
#   bash benchmarks/gpu_speed_path.sh [RESULTS_DIR]       # docs/results/speed_path.md's GPU block
#
# QUICK=1 runs the CPU smoke mode instead (what the test suite does). Target: ours at least 1.5x
# the release's way online. Not yet run on a GPU (none was drawn for the task that wrote it).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-docs/results}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${QUICK:-0}" = 1 ]; then
  exec "$PYTHON" benchmarks/speed_path.py --quick --threads 1 --ways online cached release \
    --results-dir "$RESULTS_DIR" --name speed_path_quick
fi
exec "$PYTHON" benchmarks/speed_path.py --device cuda --pairs deit_ti_regnety_160 deit_s_regnety_160 \
  --ways release ours ours+cache --batch-size 256 --repeats 7 --steps 5 --warmup 3 \
  --cache-images 1024 --results-dir "$RESULTS_DIR" --name gpu_speed_path
