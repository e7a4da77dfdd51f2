#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU (CI and the lead call this).
#  * every csrc/cuda/*.cu with plain nvcc for sm_80 and sm_90a (ptxas validates mma.sp);
#  * every csrc/cuda/*_ops.cpp (ATen wrappers) with g++ -fsyntax-only against torch's headers.
# Warnings are errors.  Exits non-zero on the first failure; prints what it checked.
# Env: NVCC (default $CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc), PYTHON (default: python3
# on PATH; must import torch), CXX (default g++).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CSRC="$(dirname "$HERE")"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

TORCH_INC="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

# A CPU-only torch wheel ships c10/cuda headers but not the CMake-generated one they include;
# a stub with the shared-library define (what a CUDA build generates) stands in for it.
STUB="$TMP/stub"
if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$STUB/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
fi

fail=0
shopt -s nullglob
for cu in "$HERE"/*.cu; do
  for arch in "-arch=sm_80" "-gencode arch=compute_90a,code=sm_90a"; do
    echo "nvcc $arch $(basename "$cu")"
    # shellcheck disable=SC2086
    if ! "$NVCC" -std=c++17 -O3 $arch -Werror all-warnings -I "$CSRC" -c "$cu" -o "$TMP/out.o"; then
      echo "FAILED: nvcc $arch $cu" >&2
      fail=1
    fi
  done
done
for cpp in "$HERE"/*_ops.cpp; do
  echo "g++ -fsyntax-only $(basename "$cpp")"
  if ! "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Wno-unused-parameter \
      -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$PY_INC" -isystem "$STUB" \
      -isystem "$CUDA_HOME/include" -I "$CSRC" -DSK_WITH_CUDA=1 "$cpp"; then
    echo "FAILED: g++ $cpp" >&2
    fail=1
  fi
done
if [ "$fail" -ne 0 ]; then
  echo "csrc/cuda/check.sh: FAILED" >&2
  exit 1
fi
echo "csrc/cuda/check.sh: all CUDA sources compile (sm_80, sm_90a) and all wrappers pass the syntax check"
