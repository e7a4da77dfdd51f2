"""2:4 int4 matmul (``sparse_linear_int4``) against 16-bit 2:4 (``sparse_linear``) and dense ``F.linear``.

    PYTHONPATH=. python benchmarks/bench_int4.py [--quick] [--device cpu|cuda] [--out DIR]

For each shape, activation dtype and batch: dense ``F.linear`` on the dense 2:4-pruned weight (the
CPU BLAS / oneDNN, or cuBLAS), ``sparse_linear`` on the 2:4 weight in the activation dtype (auto
backend) and ``sparse_linear_int4`` on the same weight rounded to int4 in groups of ``--group``
columns with bfloat16 scales (cpp on CPU, Triton on CUDA).  Each contender is checked against
float64 first (its own weight: the int4 one is the rounded weight).  Times are medians (p20/p80);
on CPU each contender rotates through enough weight copies that one rotation is >= 64 MiB (twice
this machine's 32 MiB L3), so the weight comes from memory as in decoding; on CUDA do_bench flushes
L2.  Rows go to DIR/bench_int4_{device}.{json,csv} with the machine, versions and date, the bytes of
each weight format too.
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
from bench_linear import device_name, time_cpu, time_gpu, versions, write_table  # noqa: E402

ROTATE = 64 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _copies(nbytes, device):
    return 1 if device == "cuda" else max(2, min(16, -(-ROTATE // nbytes)))


def run(args):
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dev = args.device
    meta = dict(device=dev, device_name=device_name(dev), threads=torch.get_num_threads(), date=stamp, **versions())
    g = torch.Generator().manual_seed(0)
    int4_backend = "cpp" if dev == "cpu" else "triton"
    for (n, k), dt in [(s, d) for s in args.shapes for d in args.dtypes]:
        dtype = DTYPES[dt]
        base_w = [(torch.randn(n, k, generator=g) * k ** -0.5) for _ in range(2)]
        q = [sk.compress_2to4_int4(w.to(torch.bfloat16), args.group, prune=True) for w in base_w]
        s24 = [sk.compress_2to4(w.to(dtype), prune=True) for w in base_w]
        dense = [sk.decompress_2to4(*p).to(dev) for p in s24]
        sizes = {"dense_bytes": _nbytes(dense[0]), "sparse24_bytes": _nbytes(*s24[0]), "int4_bytes": _nbytes(*q[0])}
        reps = {"dense": _copies(sizes["dense_bytes"], dev), "sparse24": _copies(sizes["sparse24_bytes"], dev),
                "int4": _copies(sizes["int4_bytes"], dev)}
        # more copies by reusing the two drawn weights: copies are separate tensors, so separate memory
        dws = [dense[i % 2].clone() for i in range(reps["dense"])]
        sws = [tuple(t.clone().to(dev) for t in s24[i % 2]) for i in range(reps["sparse24"])]
        qws = [tuple(t.clone().to(dev) for t in q[i % 2]) for i in range(reps["int4"])]
        cs = {
            "dense": (dws, lambda x, p: F.linear(x, p), lambda p: p),
            "sparse24": (sws, lambda x, p: sk.sparse_linear(x, *p), lambda p: sk.decompress_2to4(*p)),
            f"int4_{int4_backend}": (qws, lambda x, p: sk.sparse_linear_int4(x, *p, backend=int4_backend),
                                     lambda p: sk.decompress_2to4_int4(*p)),
        }
        for m in args.batches:
            xs = [torch.randn(m, k, generator=g).to(dtype).to(dev) for _ in range(3)]
            res = {}
            for name, (ws, fn, weight) in cs.items():
                wd = weight(ws[0]).double()
                exact = xs[0].double() @ wd.T
                base = (F.linear(xs[0], wd.to(dtype)).double() - exact).abs().max().item()
                err = (fn(xs[0], ws[0]).double() - exact).abs().max().item()
                it = iter(range(1 << 62))
                call = lambda fn=fn, ws=ws, it=it: fn(xs[next(it) % 3], ws[next(it) % len(ws)])  # noqa: E731
                t = time_cpu(call, args.min_run_time) if dev == "cpu" else time_gpu(call)
                res[name] = (t, err, err <= 2 * base + 1e-6 * max(exact.abs().max().item(), 1.0), len(ws))
            dense_ms = res["dense"][0][0]
            for name, ((med, p20, p80), err, ok, copies) in res.items():
                rows.append(dict(meta, out_features=n, in_features=k, group_size=args.group, dtype=dt, batch=m,
                                 contender=name, median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                 speedup_vs_dense=round(dense_ms / med, 3), max_abs_err=err, ok=ok,
                                 weight_copies=copies, **sizes, loadavg_1min=round(os.getloadavg()[0], 2)))
            line = "  ".join(f"{nm}={r[0][0]:.3f}ms({dense_ms / r[0][0]:.2f}x{'' if r[2] else ' WRONG'})"
                             for nm, r in res.items())
            print(f"{n}x{k} {dt} M={m:3d}  {line}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, two batches")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="default: benchmarks/results/<device>")
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.batches = ["1024x1024"], [1, 16]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.device)
    write_table(run(args), os.path.join(out, f"bench_int4_{args.device}"))


if __name__ == "__main__":
    main()
