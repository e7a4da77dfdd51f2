"""How long the 2:4 channel-permutation search takes on LLM-sized layers, and what it gains.

For each shape (out x in) a Wanda-style score ``|W| * ||X_j||`` is drawn (Gaussian weights,
log-normal column norms, so a few input channels dominate as in LLM activations), and
:func:`sparse_kernels.pruning.find_permutation` runs with ``--rounds`` (default 100, the
``prune(permute=True)`` default).  Recorded: wall time (median of ``--repeats``), rounds run,
and the relative gain of 2:4-kept importance over the identity order.  On a GPU the search runs
on the device (the reference ``nm_split_scores``), on CPU the C++ kernel.
Writes JSON rows (device, versions, date) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import device_name, run_record, write_json  # noqa: E402
from sparse_kernels.pruning.permutation import find_permutation, nm_kept_score  # noqa: E402

SHAPES = ("4096x4096", "11008x4096", "4096x11008")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/cpu/bench_permutation_search.json")
    args = ap.parse_args(argv)
    dev = args.device
    rows = []
    for sh in args.shapes.split(","):
        n, k = map(int, sh.split("x"))
        g = torch.Generator().manual_seed(n * 7 + k)
        score = torch.randn(n, k, generator=g).abs() * torch.exp(torch.randn(k, generator=g))
        score = score.to(dev)
        times = []
        for _ in range(args.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            perm = find_permutation(score, 2, 4, rounds=args.rounds)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        base = nm_kept_score(score)
        row = {"shape": sh, "rounds": args.rounds, "seconds": round(statistics.median(times), 3),
               "kept_importance_gain": round(nm_kept_score(score, perm=perm) / base - 1, 5)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = run_record("2:4 channel-permutation search time and kept-importance gain on synthetic Wanda-style scores",
                     "bench_permutation_search.py", argv, rows, device=device_name(dev), cores=os.cpu_count())
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
