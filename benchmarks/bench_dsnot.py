"""DSnoT's mask refinement on one layer: seconds for LLM-sized weights (CPU, or CUDA when present).

For each shape and sparsity: a random weight, a Wanda mask from random activation statistics, then
``dsnot_refine`` with the default options and with ``threshold=0`` (no stop on a small error; rows
still stop when a swap would flip their error's sign); median of ``--repeats``.  Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import device_name, run_record, write_json  # noqa: E402
from sparse_kernels.pruning import dsnot_refine, parse_sparsity  # noqa: E402
from sparse_kernels.pruning.criteria import wanda_prune, wanda_scores  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--sparsities", default="0.5,2:4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/cpu/bench_dsnot.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows_out = []
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        W = torch.randn(rows, cols, generator=g).to(dev)
        mean, var = torch.randn(cols, generator=g).to(dev), torch.rand(cols, generator=g).to(dev) + 0.1
        norm_sq = (var + mean * mean) * 1000
        for sp in args.sparsities.split(","):
            spec = parse_sparsity(sp if ":" in sp else float(sp))
            _, mask = wanda_prune(W, norm_sq, spec)
            imp = wanda_scores(W, norm_sq)
            for label, thr in (("default", None), ("threshold 0", 0.0)):
                kw = {} if thr is None else {"threshold": thr}
                times = []
                for _ in range(args.repeats):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    new = dsnot_refine(W, mask, mean, var, imp, spec, **kw)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row = {"shape": shape, "sparsity": str(spec), "options": label,
                       "seconds_median": round(statistics.median(times), 3),
                       "swaps": int((new & ~mask).sum())}
                rows_out.append(row)
                print(row, flush=True)
    write_json(run_record(__doc__.split("\n")[0], "bench_dsnot.py", argv, rows_out, device=device_name(args.device),
                          threads=torch.get_num_threads(), repeats=args.repeats), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
