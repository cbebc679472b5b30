#!/usr/bin/env bash
# The vocabulary-scale benchmark (benchmarks/vocab.py) once on a GPU: covrl fused against covrl
# unfused, float32 and bfloat16, at every size (B x T in {4k, 16k}, V in {32k, 128k}, D = 1024).
#
#   bash benchmarks/vocab_gpu.sh [OUT_DIR]     # writes OUT_DIR/vocab_results_gpu.json and
#                                              # OUT_DIR/vocab_plan_gpu.md
#
# Needs a Python with covrl's dependencies and a CUDA build of jaxlib (PYTHON, default python3).
# Memory is the device allocator's peak (peak_bytes_in_use) in each configuration's own process;
# preallocation is off so that the allocator holds only what the computation uses. The torch
# peers are not run here (this project installs CPU torch only).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks}"
py="${PYTHON:-python3}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$py" - <<'PY'
import jax
d = jax.devices("gpu")[0]
print(f"device: {d.device_kind} ({d}), jax {jax.__version__}", flush=True)
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m benchmarks.vocab --platform gpu --out "$out/vocab_results_gpu.json"
"$py" -m benchmarks.vocab_plan | tee "$out/vocab_plan_gpu.md"   # the compiler's buffer plan there
