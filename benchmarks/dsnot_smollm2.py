"""DSnoT mask refinement on SmolLM2-135M-Instruct: perplexity without and with it, per criterion.

Each ``--configs`` entry ``METHOD:SPARSITY:VARIANT`` restores the dense weights, prunes with
:func:`sparse_kernels.prune` (``dsnot=`` per VARIANT: ``none``; ``all``, every layer refined with
the paper's defaults; ``attn``, the MLP layers left as the criterion chose them, the paper's
default ``skip_layer=mlp``; ``t0.1``, every layer with ``threshold=0.1`` in our units, 2048 times
stricter than the paper's) and measures the New-Testament perplexity.  Calibration and
evaluation are the CLI's defaults (32 x 512 Old-Testament tokens, seed 0; 16,384 New-Testament
tokens in 512-token windows, fp32), so ``none`` rows reproduce ``sparse-kernels prune --method M
--sparsity S --eval-tokens 16384``.  Also recorded: prune time and the number of swaps.  Writes
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import smollm2_doc, smollm2_setup, write_json  # noqa: E402
from sparse_kernels.llm import demo, evaluate, models  # noqa: E402

VARIANTS = {"none": False, "all": True, "attn": {"skip": r"(^|\.)mlp\."}, "t0.1": {"threshold": 0.1}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="wanda:0.5:none,wanda:0.5:all,wanda:0.5:attn,wanda:0.7:none,wanda:0.7:all,"
                                         "wanda:0.7:attn,wanda:2:4:none,wanda:2:4:all,wanda:2:4:attn")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/cpu/dsnot_smollm2.json")
    args = ap.parse_args(argv)
    configs = []
    for c in args.configs.split(","):
        method, rest = c.split(":", 1)
        sparsity, variant = rest.rsplit(":", 1)
        if variant not in VARIANTS:
            raise SystemExit(f"--configs: variant {variant!r} is not one of {', '.join(VARIANTS)}")
        configs.append((method, sparsity, variant))

    model, src, calib, ev, snap, dense = smollm2_setup(args.eval_tokens)
    rows = []
    for method, sparsity, variant in configs:
        models.restore(model, snap)
        pattern = sparsity if ":" in sparsity else f"{float(sparsity) * 100:g}%"
        t0 = time.perf_counter()
        rep = demo.prune_model(model, method, pattern, calib, progress=False, dsnot=VARIANTS[variant])
        secs = time.perf_counter() - t0
        ppl = evaluate.perplexity(model, ev).ppl
        swaps = [r.dsnot_swaps for r in rep.layers if r.dsnot_swaps is not None]
        row = {"method": method, "sparsity": sparsity, "dsnot": variant, "ppl": round(ppl, 3),
               "prune_s": round(secs, 1), "overall_sparsity": round(rep.overall_sparsity, 4),
               "layers_refined": len(swaps), "swaps": sum(swaps)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = smollm2_doc(f"DSnoT mask refinement on {src.name} (fp32, CPU): perplexity without and with it",
                      "dsnot_smollm2.py", argv, args.eval_tokens, dense, rows,
                      dsnot_options="all: max_cycles=50, threshold=0.1/2048, var_power=1 (the paper's defaults, "
                                    "threshold in our units); attn: also skip=(^|\\.)mlp\\.; t0.1: threshold=0.1")
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
