"""2:4 channel permutation on SmolLM2-135M-Instruct: perplexity with and without it, per method.

For each method (``--methods``, default wanda,sparsegpt,magnitude) the dense weights are
restored, the model is pruned 2:4 by :func:`sparse_kernels.prune` once without and once with
``permute=`` (``--rounds`` rounds of the search), and the New-Testament perplexity is measured.
Calibration and evaluation are the CLI's defaults (32 x 512 Old-Testament tokens, seed 0;
16,384 New-Testament tokens in 512-token windows, fp32), so the "without" rows reproduce
``sparse-kernels prune --method M --pattern 2:4 --eval-tokens 16384``.

Also recorded per run: the prune time, and for the permuted runs the mean/min/max relative
gain of kept importance (``LayerReport.permutation_gain``).  Perplexity does not depend on the
machine's load; the times do.  Writes JSON to ``--out``.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs without permutation")
    ap.add_argument("--out", default="benchmarks/results/cpu/permutation_smollm2.json")
    args = ap.parse_args(argv)

    model, src, calib, ev, snap, dense = smollm2_setup(args.eval_tokens)
    rows = []
    for method in args.methods.split(","):
        for permute in ((False,) if not args.no_baseline else ()) + ({"rounds": args.rounds},):
            models.restore(model, snap)
            t0 = time.perf_counter()
            rep = demo.prune_model(model, method, args.pattern, calib, progress=False, permute=permute)
            secs = time.perf_counter() - t0
            ppl = evaluate.perplexity(model, ev).ppl
            gains = [r.permutation_gain for r in rep.layers if r.permutation_gain is not None]
            row = {"method": method, "pattern": args.pattern, "permute": bool(permute),
                   "rounds": args.rounds if permute else None, "ppl": round(ppl, 3), "prune_s": round(secs, 1),
                   "overall_sparsity": round(rep.overall_sparsity, 4)}
            if gains:
                row["kept_importance_gain"] = {"mean": round(sum(gains) / len(gains), 5),
                                               "min": round(min(gains), 5), "max": round(max(gains), 5)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = smollm2_doc(f"{args.pattern} pruning of {src.name} with and without input-channel permutation "
                      f"(fp32, CPU), same calibration and evaluation", "permutation_smollm2.py", argv,
                      args.eval_tokens, dense, rows)
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
