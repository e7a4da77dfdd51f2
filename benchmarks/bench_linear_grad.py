"""Benchmark (CPU): the backward ops of masked_linear and sparse_linear, cpp against the reference.

One LLM layer (4096x4096 by default), batch M = 16 and 256, fp32 and bf16, packed mask (what
SparseLinear stores; 50% random keep) and a 2:4 weight.  Ops and contenders:

* ``masked_linear_grad_x`` (grad_y @ (W*M)) and ``sparse_linear_grad_x`` (grad_y @ W_2:4):
  reference, cpp (its own path choice), cpp forced to its direct kernel and to its blocked-GEMM path
  (``SPARSE_KERNELS_CPU_GEMM_MIN_M``; these two pick the threshold), and ``dense``: ``grad_y @ W``
  with a stored dense weight (what a dense layer's backward costs).
* ``masked_linear_grad_w`` ((grad_y^T x) * M) and ``sparse_linear_grad_values`` (grad_y^T x at the
  kept positions): reference, cpp, cpp_direct, cpp_gemm, and ``dense``: ``grad_y^T @ x``.

Each output is checked against an fp64 result first (error within 2x of the reference's own error,
the tests' rule).  Two weight copies are rotated (>= 32 MiB each).  torch.utils.benchmark, median
and p20/p80 in ms; the 1-minute load average is recorded at the start and on every row (the dev
box is shared).  Rows go to ``OUT/bench_linear_grad_cpu.json`` and ``.csv``.

    PYTHONPATH=$PWD python benchmarks/bench_linear_grad.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_kernels as sk  # noqa: E402
from sparse_kernels.info import device_name  # noqa: E402
from sparse_kernels.reference import linear as ref  # noqa: E402

OPS = torch.ops.sparse_kernels
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATH_ENV = "SPARSE_KERNELS_CPU_GEMM_MIN_M"


def time_cpu(fn, min_run_time):
    from torch.utils import benchmark

    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    t = torch.tensor(m.times) * 1e3
    return t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()


def with_path(fn, path):
    """Run ``fn`` with the cpp ops forced to one path (None: their own choice)."""
    def call(*a):
        old = os.environ.get(PATH_ENV)
        if path is not None:
            os.environ[PATH_ENV] = {"direct": str(1 << 40), "gemm": "1"}[path]
        try:
            return fn(*a)
        finally:
            if old is None:
                os.environ.pop(PATH_ENV, None)
            else:
                os.environ[PATH_ENV] = old
    return call


def weights(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = torch.rand(n, k, generator=g) < 0.5
    values, meta = sk.compress_2to4(w, prune=True)
    return dict(w=w, wm=torch.where(keep, w, torch.zeros((), dtype=dtype)), mask=sk.pack_mask(keep), keep=keep,
                values=values, meta=meta, w24=sk.decompress_2to4(values, meta))


def cases():
    """op -> (exact fp64 fn, {contender: fn(gy, x, p)})."""
    cpp = lambda name: (lambda *a: getattr(OPS, name + "_cpp")(*a))  # noqa: E731
    mlx, mlw = "masked_linear_grad_x", "masked_linear_grad_w"
    slx, slv = "sparse_linear_grad_x", "sparse_linear_grad_values"
    c = {
        mlx: (lambda gy, x, p: gy.double() @ p["wm"].double(),
              dict(reference=lambda gy, x, p: OPS.masked_linear_grad_x(gy, p["w"], p["mask"]),
                   cpp=lambda gy, x, p: cpp(mlx)(gy, p["w"], p["mask"]),
                   dense=lambda gy, x, p: gy @ p["w"])),
        mlw: (lambda gy, x, p: (gy.double().T @ x.double()) * p["keep"],
              dict(reference=lambda gy, x, p: OPS.masked_linear_grad_w(gy, x, p["w"], p["mask"]),
                   cpp=lambda gy, x, p: cpp(mlw)(gy, x, p["w"], p["mask"]),
                   dense=lambda gy, x, p: gy.T @ x)),
        slx: (lambda gy, x, p: gy.double() @ p["w24"].double(),
              dict(reference=lambda gy, x, p: OPS.sparse_linear_grad_x(gy, p["values"], p["meta"]),
                   cpp=lambda gy, x, p: cpp(slx)(gy, p["values"], p["meta"]),
                   dense=lambda gy, x, p: gy @ p["w"])),
        slv: (lambda gy, x, p: (gy.double().T @ x.double()).gather(1, ref.kept_columns(p["meta"])),
              dict(reference=lambda gy, x, p: OPS.sparse_linear_grad_values(gy, x, p["meta"]),
                   cpp=lambda gy, x, p: cpp(slv)(gy, x, p["meta"]),
                   dense=lambda gy, x, p: gy.T @ x)),
    }
    for _, fns in c.values():
        fns["cpp_direct"] = with_path(fns["cpp"], "direct")
        fns["cpp_gemm"] = with_path(fns["cpp"], "gemm")
    return c


def run(args):
    load0 = os.getloadavg()[0]
    print(f"load average at start: {load0:.2f}" + ("  (above 1.5: numbers taken under load)" if load0 > 1.5 else ""))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = dict(device="cpu", device_name=device_name("cpu"), threads=torch.get_num_threads(), date=stamp,
                torch=torch.__version__, sparse_kernels=sk.__version__, python=platform.python_version(),
                loadavg_1min_start=round(load0, 2))
    rows = []
    n, k = args.shape
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        ps = [weights(n, k, dtype, seed=s) for s in range(2)]
        for m, (op, (exact_fn, fns)) in itertools.product(args.batches, cases().items()):
            g = torch.Generator().manual_seed(m)
            gys = [torch.randn(m, n, generator=g).to(dtype) for _ in range(2)]
            xs = [torch.randn(m, k, generator=g).to(dtype) for _ in range(2)]
            exact = exact_fn(gys[0], xs[0], ps[0])
            base = (fns["reference"](gys[0], xs[0], ps[0]).double() - exact).abs().max().item()
            res = {}
            for name, fn in fns.items():
                if name == "dense":
                    err, ok = float("nan"), True  # a different function (no mask): timing baseline only
                else:
                    err = (fn(gys[0], xs[0], ps[0]).double() - exact).abs().max().item()
                    ok = err <= 2 * base + 1e-6 * max(exact.abs().max().item(), 1.0)
                counter = itertools.count()

                def call(fn=fn, counter=counter):
                    i = next(counter)
                    return fn(gys[i % 2], xs[i % 2], ps[i % 2])

                res[name] = (time_cpu(call, args.min_run_time), err, ok)
            ref_ms = res["reference"][0][0]
            for name, ((med, p20, p80), err, ok) in res.items():
                rows.append(dict(info, op=op, out_features=n, in_features=k, batch=m, dtype=dname, contender=name,
                                 median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                 speedup_vs_reference=round(ref_ms / med, 3), max_abs_err=err, ok=ok,
                                 loadavg_1min=round(os.getloadavg()[0], 2)))
            line = "  ".join(f"{nm}={r[0][0]:.2f}ms[{r[0][1]:.2f},{r[0][2]:.2f}]{'' if r[2] else ' WRONG'}"
                             for nm, r in res.items())
            print(f"{op:26s} {dname} M={m:4d}  {line}", flush=True)
    return rows


def write(rows, out):
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "bench_linear_grad_cpu")
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {base}.json and .csv ({len(rows)} rows)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"))
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    args = ap.parse_args(argv)
    write(run(args), args.out)


if __name__ == "__main__":
    main()
