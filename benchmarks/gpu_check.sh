#!/usr/bin/env bash
# GPU checks to run once on a CUDA machine (the dev box has none).  Each family adds its lines.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (from the repository root, after building _C)
set -euo pipefail
OUT=${1:-benchmarks/results/gpu}
export PYTHONPATH=${PYTHONPATH:-$PWD}

# --- sparse matmuls (issue 3): tests on CUDA, then the benchmark (about 5 minutes on an H200)
python -m pytest -q tests/test_linear.py tests/test_nn.py tests/test_linear_triton.py
python benchmarks/bench_linear.py --device cuda --out "$OUT" --plot
