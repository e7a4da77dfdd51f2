"""What the input permutation of a permuted 2:4 layer costs at run time.

A permuted 2:4 ``SparseLinear`` (``in_perm``, from ``prune(permute=True, convert=True)`` or
``sparsify(permute=True)``) gathers ``x[..., in_perm]`` before the sparse kernel.  This times,
side by side in one run, the same 2:4 weight as a plain and as a permuted SparseLinear (and
dense ``nn.Linear`` as the baseline), eval mode, ``torch.no_grad``, the default backend.

Correctness first: each layer's output is compared with ``F.linear(x, layer.dense_weight())``
(the original-order weight).  Timing: ``torch.utils.benchmark`` (CPU) / ``triton.testing.do_bench``
(CUDA), median with p20/p80; two weight copies are alternated on CPU so the cache holds neither.
Writes JSON rows (device, versions, date) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import device_name, run_record, time_cpu, time_gpu, write_json  # noqa: E402
from sparse_kernels.nn import SparseLinear  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="out x in, comma list")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/cpu/bench_permuted_linear.json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, k in (tuple(map(int, sh.split("x"))) for sh in args.shapes.split(",")):
        copies = []
        for _ in range(2):
            lin = torch.nn.Linear(k, n, bias=False).to(dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
            perm = torch.randperm(k, generator=g)
            plain = SparseLinear.from_dense(lin, pattern="2:4").to(dev).eval()
            permuted = SparseLinear.from_dense(lin, pattern="2:4", in_perm=perm).to(dev).eval()
            copies.append({"dense": lin.to(dev).eval(), "2:4": plain, "2:4 permuted": permuted})
        for b in map(int, args.batches.split(",")):
            xs = [torch.randn(b, k, generator=g).to(dtype).to(dev) for _ in copies]
            with torch.no_grad():
                for name in copies[0]:
                    for c, x in zip(copies, xs):
                        mod = c[name]
                        w = mod.weight if name == "dense" else mod.dense_weight()
                        want = F.linear(x.double(), w.double())
                        err = float((mod(x).double() - want).abs().max())
                        assert err <= 1e-2 * float(want.abs().max()) + 1e-6, (name, n, k, b, err)
                    state = {"i": 0}

                    def fn(name=name, state=state):
                        i = state["i"] = state["i"] ^ 1
                        return copies[i][name](xs[i])

                    med, p20, p80 = time_gpu(fn) if dev == "cuda" else time_cpu(fn, args.min_run_time)
                    rows.append({"shape": f"{n}x{k}", "batch": b, "layer": name, "median_ms": round(med, 4),
                                 "p20_ms": round(p20, 4), "p80_ms": round(p80, 4)})
                    print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next(q for q in rows if q["shape"] == r["shape"] and q["batch"] == r["batch"] and q["layer"] == "dense")
        plain = next(q for q in rows if q["shape"] == r["shape"] and q["batch"] == r["batch"] and q["layer"] == "2:4")
        r["speedup_vs_dense"] = round(base["median_ms"] / r["median_ms"], 3)
        r["time_vs_plain_2to4"] = round(r["median_ms"] / plain["median_ms"], 3)
    out = run_record("run-time cost of a permuted 2:4 SparseLinear (x gathered by in_perm) vs the plain 2:4 layer "
                     "and dense nn.Linear", "bench_permuted_linear.py", argv, rows, device=device_name(dev),
                     cores=os.cpu_count(), dtype=args.dtype)
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
