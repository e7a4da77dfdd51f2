"""Throughput of the 2:4 format ops per backend, against the PyTorch reference.

Ops: ``compress`` (strict, on an already 2:4-sparse weight), ``compress_prune``
(``prune=True`` on a dense weight: mask + pack) and ``decompress``.  The peer for
``compress`` (float16/bfloat16) is PyTorch's own converter
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass`` (which
also reorders the metadata for CUTLASS), timed on the same matrices.  Throughput is GB/s of
bytes read + written:

* compress: reads ``rows*cols`` elements, writes ``rows*cols/2`` values + ``rows*cols/16`` int16;
* decompress: the reverse.

Every backend's output is checked bit-exact against the reference before it is timed.
CPU timing: ``torch.utils.benchmark.Timer.blocked_autorange`` (median, p20, p80 over blocks);
CUDA: ``triton.testing.do_bench`` (flushes L2 between runs).  Rows are written to
``OUT/bench_compress.json`` and ``.csv`` with device name, versions, thread count and date,
rewritten after every row so a run killed part-way keeps what it measured; a backend that
raises gets a row with ``error`` set and the run goes on.

    PYTHONPATH=$PWD python benchmarks/bench_compress.py --quick --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparse_kernels as sk  # noqa: E402
from sparse_kernels.ops import _registry as R  # noqa: E402
from sparse_kernels.reference import sparse24 as ref  # noqa: E402
from sparse_kernels.info import device_name  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 14336)]
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OPS = ("compress", "compress_prune", "decompress")


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def backends_for(device: str) -> list[str]:
    avail = R.available("compress_2to4", device)
    if device == "cpu":  # the Triton interpreter is a correctness tool, not a CPU backend
        avail = [b for b in avail if b != "triton"]
    return avail


def bitexact(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        ib = {2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(ib), b.view(ib)
    return a.shape == b.shape and bool(torch.equal(a, b))


def make_case(op: str, rows: int, cols: int, dtype: torch.dtype, device: str):
    """(callable(backend) -> outputs, expected outputs (the reference, on ``device``), bytes moved)."""
    g = torch.Generator().manual_seed(rows + cols)
    dense = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    es = dense.element_size()
    moved = rows * cols * es + rows * cols // 2 * es + rows * cols // 16 * 2
    if op == "compress_prune":
        return (lambda b: sk.compress_2to4(dense, prune=True, backend=b)), ref.compress_2to4(dense, True), moved
    sparse = torch.where(ref.mask_2to4(dense), dense, torch.zeros((), dtype=dtype, device=device))
    values, meta = ref.compress_2to4(sparse, False)
    if op == "compress":
        return (lambda b: sk.compress_2to4(sparse, backend=b)), (values, meta), moved
    return (lambda b: sk.decompress_2to4(values, meta, backend=b)), sparse, moved


def torch_cutlass_case(rows: int, cols: int, dtype: torch.dtype, device: str):
    """The peer: PyTorch's own dense -> CUTLASS 2:4 converter (values + reordered meta), fp16/bf16."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    g = torch.Generator().manual_seed(rows + cols)
    dense = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    dense = torch.where(dense == 0, torch.ones((), dtype=dtype, device=device), dense)  # exactly 2 per group
    sparse = torch.where(ref.mask_2to4(dense), dense, torch.zeros((), dtype=dtype, device=device))
    want = sk.to_torch_cutlass(*ref.compress_2to4(sparse, False))
    return (lambda: sparse_semi_structured_from_dense_cutlass(sparse)), want


def outputs_match(got, want) -> bool:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return all(bitexact(g, w) for g, w in zip(got, want))


def time_ms(fn, device: str, min_run_time: float, min_samples: int) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds; slow calls are repeated to get ``min_samples`` samples."""
    if device == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return med, p20, p80
    from torch.utils.benchmark import Timer

    fn()  # warm-up
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = [t * 1e3 for t in timer.blocked_autorange(min_run_time=min_run_time).times]
    while len(times) < min_samples:
        times.append(timer.timeit(1).median * 1e3)
    times.sort()
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def run(args) -> list[dict]:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    min_run_time, min_samples = (0.3, 3) if args.quick else (1.0, 5)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    common = {"date": date, "torch": torch.__version__, "triton": triton_version(),
              "threads": torch.get_num_threads(), "quick": bool(args.quick)}
    rows_out = []
    for device in devices:
        backends = backends_for(device)
        for rows, cols in shapes:
            for dtype in dtypes:
                for op in OPS:
                    fn, want, moved = make_case(op, rows, cols, dtype, device)
                    base_ms = None
                    for b in backends:
                        error = ""
                        try:
                            ok = outputs_match(fn(b), want)
                            med, p20, p80 = time_ms(lambda: fn(b), device, min_run_time, min_samples) if ok else (None,) * 3
                        except Exception as e:  # noqa: BLE001 -- one broken backend must not end the run
                            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                            ok, (med, p20, p80) = False, (None,) * 3
                        if b == "reference":
                            base_ms = med
                        row = dict(common, device=device, device_name=device_name(device), op=op, backend=b,
                                   dtype=str(dtype).replace("torch.", ""), rows=rows, cols=cols,
                                   bitexact=ok, median_ms=med, p20_ms=p20, p80_ms=p80,
                                   gbps=moved / (med * 1e-3) / 1e9 if med else None,
                                   speedup_vs_reference=(base_ms / med) if (base_ms and med) else None,
                                   error=error)
                        rows_out.append(row)
                        report(row)
                        args.write_rows(rows_out)
                    if op == "compress" and dtype != torch.float32 and rows % 32 == 0:
                        error = ""
                        try:
                            peer, want_peer = torch_cutlass_case(rows, cols, dtype, device)
                            ok = outputs_match(peer(), want_peer)
                            med, p20, p80 = time_ms(peer, device, min_run_time, min_samples) if ok else (None,) * 3
                        except Exception as e:  # noqa: BLE001
                            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                            ok, (med, p20, p80) = False, (None,) * 3
                        row = dict(row, backend="torch_cutlass_converter", bitexact=ok, median_ms=med, p20_ms=p20,
                                   p80_ms=p80, gbps=moved / (med * 1e-3) / 1e9 if med else None,
                                   speedup_vs_reference=(base_ms / med) if (base_ms and med) else None, error=error)
                        rows_out.append(row)
                        report(row)
                        args.write_rows(rows_out)
    return rows_out


def report(row: dict) -> None:
    if row.get("error"):
        print(f"ERROR {row['device']} {row['backend']} {row['op']} {row['rows']}x{row['cols']} {row['dtype']}: "
              f"{row['error']}", file=sys.stderr, flush=True)
        return
    if not row["bitexact"]:
        print(f"MISMATCH {row['device']} {row['backend']} {row['op']} {row['rows']}x{row['cols']} {row['dtype']}: "
              "not timed", file=sys.stderr, flush=True)
        return
    print(f"{row['device']:4s} {row['op']:15s} {row['rows']:6d}x{row['cols']:<6d} {row['dtype']:9s} "
          f"{row['backend']:24s} {row['median_ms']:10.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] "
          f"{row['gbps']:7.2f} GB/s  x{row['speedup_vs_reference']:.1f} vs reference", flush=True)


def write(rows: list[dict], out: str, quiet: bool = False) -> None:
    os.makedirs(out, exist_ok=True)
    for name in ("bench_compress.json", "bench_compress.csv"):  # write-then-rename
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", newline="") as f:
            if name.endswith(".json"):
                json.dump(rows, f, indent=1)
            else:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        os.replace(path + ".tmp", path)
    if not quiet:
        print(f"wrote {len(rows)} rows to {out}/bench_compress.{{json,csv}}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, shorter timing")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/local"), help="output folder")
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: leave torch's default)")
    p.add_argument("--shapes", default="", help="e.g. 4096x4096,11008x4096 (overrides --quick's shapes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.write_rows = lambda rows: write(rows, args.out, quiet=True)
    rows = run(args)
    if rows:
        write(rows, args.out)


if __name__ == "__main__":
    main()
