#!/usr/bin/env bash
# One-shot GPU check for the lent GPU machine (no network; torch, triton, nvcc preinstalled).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT, else ./gpu_check_out)
#
# 1. builds sparse_kernels._C with the CUDA kernels (sm_80 + sm_90a) in place,
# 2. runs the test suite on the GPU (CUDA and Triton backends against the reference),
# 3. runs every benchmark briefly,
# and writes logs + results into OUTDIR as ONE archive gpu_check.tgz plus summary.txt
# (the device tool returns at most 8 files).  Budget: under 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-./gpu_check_out}}
WORK=$(mktemp -d)
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPARSE_KERNELS_QUIET=1
export MAX_JOBS=${MAX_JOBS:-16}
summary="$WORK/summary.txt"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$summary"; }

run_step() {  # name timeout_s command...
    local name=$1 limit=$2; shift 2
    log "start $name"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    log "end   $name rc=$rc"
    tail -n 15 "$WORK/$name.log" | sed "s/^/    [$name] /" | tee -a "$summary"
    return 0
}

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    nvcc --version 2>&1 | tail -n 1
} | tee -a "$summary"

run_step build 300 env SPARSE_KERNELS_STRICT_BUILD=1 "$PY" setup.py build_ext --inplace
run_step info 60 "$PY" -m sparse_kernels.info
TIMEOUT_FLAG=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG="--timeout=120"
run_step tests 240 "$PY" -m pytest -q -p no:cacheprovider $TIMEOUT_FLAG tests --junitxml="$WORK/pytest.xml"
# The sparse-matmul table is the one the README's GPU goals are read from: run it whole.
run_step bench_linear 300 "$PY" benchmarks/bench_linear.py --device cuda --plot --out "$WORK/bench_linear"
run_step bench_compress 90 "$PY" benchmarks/bench_compress.py --quick --device cuda --out "$WORK/bench_compress"
run_step bench_sparsegpt 120 "$PY" benchmarks/bench_sparsegpt.py --quick --out "$WORK/bench_sparsegpt"

log "total"
cp "$summary" "$OUTDIR/summary.txt"
tar czf "$OUTDIR/gpu_check.tgz" -C "$WORK" .
echo "results: $OUTDIR/gpu_check.tgz ($(du -h "$OUTDIR/gpu_check.tgz" | cut -f1)), summary: $OUTDIR/summary.txt"
