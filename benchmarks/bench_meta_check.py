"""Cost of the meta check in the CPU 2:4 kernels: ``sparse_linear``'s cpp op on x of 0 rows (the
argument checks and the pass over meta that refuses corrupt nibbles, no product) against the
same call on 1 row (the whole decode-step call), weights rotated as in ``bench_linear.py`` so
meta comes from memory.  Medians of ``torch.utils.benchmark`` runs, JSON to ``--out``.

    PYTHONPATH=$PWD python benchmarks/bench_meta_check.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import SHAPES, device_name, make_problem, run_record, time_cpu, weight_copies, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/cpu/bench_meta_check.json")
    args = ap.parse_args(argv)
    op = torch.ops.sparse_kernels.sparse_linear_cpp
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        for n, k in SHAPES:
            ws = make_problem(n, k, dtype, "cpu", weight_copies(n, k, dtype.itemsize, "cpu", False), seed=0)
            row = {"dtype": dname, "shape": f"{n}x{k}"}
            for m in (0, 1):
                x = torch.randn(m, k).to(dtype)
                counter = itertools.count()

                def call(x=x, counter=counter):
                    w = ws[next(counter) % len(ws)]
                    return op(x, w["values"], w["meta"], None, None)

                row[f"batch{m}_ms"] = round(time_cpu(call, args.min_run_time)[0], 4)
            row["check_share_of_batch1"] = round(row["batch0_ms"] / row["batch1_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(run_record("sparse_linear cpp: argument checks + meta check (batch 0) against the whole call at "
                          "batch 1", "bench_meta_check.py", argv, rows,
                          machine=f"{device_name('cpu')}, {os.cpu_count()} cores, torch threads "
                                  f"{torch.get_num_threads()}"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
