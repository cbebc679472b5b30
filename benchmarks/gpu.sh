#!/usr/bin/env bash
# The accelerator run (benchmarks/gpu.py): in the runtime's own Python and JAX, nothing installed.
#
#   bash benchmarks/gpu.sh [OUT_DIR]     # default: $OUT if set (the device tool's folder), else reports/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-reports/gpu}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -m benchmarks.gpu --out "$out" "${@:2}"
