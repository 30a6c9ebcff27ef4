#!/usr/bin/env bash
# On the GPU machine: bash scripts/gpu_check.sh OUT_DIR — bench/gpu_check.py with what
# scripts/gpu_check_prepare.sh put in .gpucheck/, under a hard 8-minute stop (the check keeps
# itself to 450 s and rewrites OUT_DIR/gpu_check.json after every part).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [gpu_check.py options]}
shift
PYTHONUNBUFFERED=1 exec timeout -k 10 480 python3 bench/gpu_check.py "$out" --carry .gpucheck "$@"
