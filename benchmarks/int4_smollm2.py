"""2:4 int4 on SmolLM2-135M-Instruct: round-to-nearest after SparseGPT against SparseGPT with joint
int4 quantization (``prune(int4=G)``), by perplexity.

For each group size G (``--groups``): restore the dense weights, SparseGPT 2:4 with ``convert=True``
then :func:`sparse_kernels.quantize_int4` (round to nearest, scale = max|v|/7 per row and group);
and SparseGPT 2:4 with ``int4=G`` (each kept weight rounded inside the column loop, the OBS
updates compensating it; ``convert=True`` gives SparseLinearInt4 with those codes).  Also the
16-bit 2:4 model.  Calibration and evaluation are the CLI's defaults (32 x 512 Old-Testament
tokens, seed 0; 16,384 New-Testament tokens in 512-token windows), the model in ``--dtype``.
Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import smollm2_doc, smollm2_setup, write_json  # noqa: E402
import sparse_kernels as sk  # noqa: E402
from sparse_kernels.llm import bench, demo, evaluate, models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, nargs="*", default=[64, 32])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/cpu/int4_joint_smollm2.json")
    args = ap.parse_args(argv)
    model, src, calib, ev, snap, dense = smollm2_setup(args.eval_tokens)
    rows = []

    def run(label, group, int4_joint):
        fresh = models.load_model(None)[0]  # convert=True replaces modules: start from a fresh copy
        t0 = time.perf_counter()
        demo.prune_model(fresh, "sparsegpt", "2:4", calib, progress=False, convert=True,
                         **({"int4": group} if int4_joint else {}))
        if group is not None and not int4_joint:
            sk.quantize_int4(fresh, group_size=group)
        secs = time.perf_counter() - t0
        n4 = sum(isinstance(m, sk.SparseLinearInt4) for m in fresh.modules())
        row = {"variant": label, "group_size": group, "ppl": round(evaluate.perplexity(fresh, ev).ppl, 3),
               "prune_s": round(secs, 1), "int4_layers": n4, "weight_bytes": bench.tensor_bytes(fresh)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    del model, snap
    run("sparsegpt 2:4, 16-bit", None, False)
    for g in args.groups:
        run("sparsegpt 2:4, then round-to-nearest int4", g, False)
        run("sparsegpt 2:4 with joint int4", g, True)
    out = smollm2_doc(f"2:4 int4 on {src.name} (fp32, CPU): round-to-nearest after SparseGPT vs joint quantization",
                      "int4_smollm2.py", argv, args.eval_tokens, dense, rows)
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
