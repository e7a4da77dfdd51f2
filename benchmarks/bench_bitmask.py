"""Unstructured sparse matmul on CPU: ``bitmask_linear`` (values + bitmask) against dense ``F.linear``.

    PYTHONPATH=. python benchmarks/bench_bitmask.py [--quick] [--out DIR]

For each shape, sparsity (random unstructured, the pattern unstructured pruning leaves), dtype and
batch: dense ``F.linear`` on the dense weight (the CPU BLAS / oneDNN), ``bitmask_linear`` with the
cpp kernel and with the reference (decompress, then the BLAS), ``masked_linear`` (dense weight +
bit-packed mask, what SparseLinear(pattern=None) runs) and ``auto``.  Each result is checked against
float64 first; times are medians (p20/p80) of torch.utils.benchmark over rotated inputs.  Rows go to
DIR/bench_bitmask_cpu.{json,csv} with the machine, versions and date.  The weight bytes of each format
are reported too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_kernels as sk  # noqa: E402
from bench_linear import device_name, time_cpu, versions, write_table  # noqa: E402


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def run(args):
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(device="cpu", device_name=device_name("cpu"), threads=torch.get_num_threads(), date=stamp, **versions())
    g = torch.Generator().manual_seed(0)
    for (n, k), sparsity, dt in [(s, p, d) for s in args.shapes for p in args.sparsities for d in args.dtypes]:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        w = torch.randn(n, k, generator=g)
        w = torch.where(torch.rand(n, k, generator=g) < sparsity, torch.zeros(()), w).to(dtype)
        v, bm, rp = sk.compress_bitmask(w)
        mask = sk.pack_mask(w != 0)
        sizes = {"dense_bytes": _nbytes(w), "bitmask_bytes": _nbytes(v, bm, rp), "masked_bytes": _nbytes(w, mask)}
        cs = {
            "dense": lambda x: F.linear(x, w),
            "bitmask_cpp": lambda x: sk.bitmask_linear(x, v, bm, rp, backend="cpp"),
            "bitmask_reference": lambda x: sk.bitmask_linear(x, v, bm, rp, backend="reference"),
            "bitmask_auto": lambda x: sk.bitmask_linear(x, v, bm, rp),
            "masked_linear": lambda x: sk.masked_linear(x, w, mask),
        }
        for m in args.batches:
            xs = [torch.randn(m, k, generator=g).to(dtype) for _ in range(3)]
            exact = xs[0].double() @ w.double().T
            base = (F.linear(xs[0], w).double() - exact).abs().max().item()
            res = {}
            for name, fn in cs.items():
                err = (fn(xs[0]).double() - exact).abs().max().item()
                it = iter(range(1 << 62))
                t = time_cpu(lambda fn=fn, it=it: fn(xs[next(it) % 3]), args.min_run_time)
                res[name] = (t, err, err <= 2 * base + 1e-6 * max(exact.abs().max().item(), 1.0))
            dense_ms = res["dense"][0][0]
            for name, ((med, p20, p80), err, ok) in res.items():
                rows.append(dict(meta, out_features=n, in_features=k, sparsity=sparsity, dtype=dt, batch=m,
                                 contender=name, median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                 speedup_vs_dense=round(dense_ms / med, 3), max_abs_err=err, ok=ok, **sizes,
                                 loadavg_1min=round(os.getloadavg()[0], 2)))
            line = "  ".join(f"{nm}={r[0][0]:.3f}ms({dense_ms / r[0][0]:.2f}x{'' if r[2] else ' WRONG'})"
                             for nm, r in res.items())
            print(f"{n}x{k} s={sparsity:.2f} {dt} M={m:3d} bytes {sizes['bitmask_bytes'] / sizes['dense_bytes']:.3f}x  "
                  f"{line}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, one dtype, two batches")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096"])
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.7, 0.9])
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 32, 64])
    ap.add_argument("--min-run-time", type=float, default=0.3)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.batches, args.sparsities = ["1024x1024"], ["fp32"], [1, 16], [0.5]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    write_table(run(args), os.path.join(args.out, "bench_bitmask_cpu"))


if __name__ == "__main__":
    main()
