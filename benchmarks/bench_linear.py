"""Benchmark: 2:4 ``sparse_linear`` (every backend) and ``masked_linear`` against dense ``F.linear``.

Shapes are LLM layers (out x in): 4096x4096, 14336x4096, 4096x14336, 11008x4096.

* GPU (default when CUDA is present): fp16/bf16, batch 1, 4, 16, 64, 256, 2048, 8192; timing with
  ``triton.testing.do_bench`` (it flushes L2 before every run); contenders: dense cuBLAS, every
  sparse_linear backend available (cuda mma.sp, triton, decompress + cuBLAS where the op has it;
  cusparselt with the compressed weight cached; auto), PyTorch's
  ``SparseSemiStructuredTensor`` (cuSPARSELt, or CUTLASS where that is what torch picks),
  ``masked_linear`` and masked dense (``F.linear(x, W * M)``).
* CPU: fp32/bf16, batch 1, 4, 16, 64 (under 5 minutes on 2 cores); ``torch.utils.benchmark``;
  contenders: dense (MKL/oneDNN), cpp, auto, ``masked_linear`` (cpp), masked dense.

Every contender's output is checked first (error vs an fp64 result within 2x of dense torch's
own error, the tests' rule); the row records ``ok``.  Inputs are rotated: several x and, on CPU,
several weight copies (>= 64 MiB per contender, twice the L3 of the dev box) so neither dense nor
sparse weights are served from cache.  Each row has median/p20/p80 (ms), the speedup over dense
(dense median / ours), device, versions and date; rows go to ``OUT/bench_linear_<device>.json``
and ``.csv``, rewritten after every (dtype, shape, batch) case so a run killed part-way keeps
what it measured.  A contender that raises gets a row with ``error`` set and no timing; after
a CUDA fault (the context is then unusable) the run stops with what it has.  Cases run dtype
by dtype (all fp16 first on GPU).  ``--resume JSON`` reuses an earlier run's rows for the cases
it holds and measures only the others.  ``--plot`` draws speedup over dense vs batch (PNG,
needs matplotlib).

CUDA also gets a kernel-level time (``--no-graph`` turns it off): at batch 1-16 the eager time is
mostly the 10-60 us of Python and dispatch around every call, dense included.  Up to 20 calls of
the contender (inputs and weights rotated as in the eager timing) are captured in one
``torch.cuda.CUDAGraph`` after a warm-up on a side stream; replays are timed with ``do_bench`` and
divided by the number of calls: ``graph_ms``/``graph_p20_ms``/``graph_p80_ms`` and
``graph_speedup_vs_dense`` per row, NaN with ``graph_error`` set when the contender cannot be
captured.  A replay has no L2 flush between its calls, so on CUDA the weights are rotated over
enough copies that one rotation of compressed weights is >= 2x the L2 cache (at most 8 copies):
every call reads its weight from HBM, as an eager call does after do_bench's flush.  The eager
numbers are measured exactly as before (do_bench flushes L2 before every call).

    PYTHONPATH=$PWD python benchmarks/bench_linear.py --device cpu --out benchmarks/results/cpu --plot
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_kernels as sk  # noqa: E402
from sparse_kernels.ops import _registry as R  # noqa: E402
from sparse_kernels.ops import linear as L  # noqa: E402
from sparse_kernels.info import device_name  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096)]
GPU_BATCHES = [1, 4, 16, 64, 256, 2048, 8192]
CPU_BATCHES = [1, 4, 16, 64]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ROTATE_BYTES = 64 << 20
# CUDA-graph timing: up to GRAPH_CALLS calls captured in one graph, fewer when one eager call is long
# so that a replay lasts about GRAPH_REPLAY_MS (at batch 8192 a single call is 0.4-3.7 ms on the H200,
# 2026-11-28 run: nothing left to amortise, only the capture and replay time to save).
GRAPH_CALLS = 20
GRAPH_REPLAY_MS = 5.0
GRAPH_WARMUP = 3  # calls on a side stream before capture (PyTorch's CUDA graph docs use 3), at most `calls`


def versions():
    v = {"torch": torch.__version__, "sparse_kernels": sk.__version__, "python": platform.python_version()}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    v["cuda"] = torch.version.cuda
    return v


# ---------------------------------------------------------------- timing
def time_cpu(fn, min_run_time):
    from torch.utils import benchmark

    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    t = torch.tensor(m.times) * 1e3
    return t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()


def time_gpu(fn):
    import triton

    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _replay_ms(replay):
    """(median, p20, p80) ms of one graph replay (do_bench flushes L2 before each replay; a replay
    is 0.2-5 ms, so 30 ms of repeats give 6-150 samples)."""
    import triton

    return triton.testing.do_bench(replay, warmup=5, rep=30, quantiles=[0.5, 0.2, 0.8])


def graph_calls(eager_ms):
    """How many calls one graph captures: GRAPH_CALLS, fewer when an eager call is long."""
    if not eager_ms > 0:  # NaN: the eager timing failed; capture the default number anyway
        return GRAPH_CALLS
    return max(1, min(GRAPH_CALLS, int(GRAPH_REPLAY_MS / eager_ms)))


def time_graph(fn, xs, ws, calls):
    """(median, p20, p80) ms per call of ``fn`` from replays of one CUDA graph holding ``calls`` calls.

    Inputs rotate as in the eager timing (call i uses ``xs[i % len(xs)]``, ``ws[i % len(ws)]``).
    The calls are warmed up on a side stream first (lazy init, cuSPARSELt plans, the Triton
    autotuner's first call), as torch.cuda.graph requires.  Raises what capture or replay raises;
    the current stream is restored and the graph and its memory pool are freed in every case.
    """
    prev = torch.cuda.current_stream()
    g = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(prev)
        with torch.cuda.stream(side):
            for i in range(min(GRAPH_WARMUP, calls)):  # fewer for long calls (cusparselt: 200 ms on the H200)
                fn(xs[i % len(xs)], ws[i % len(ws)])
        prev.wait_stream(side)
        _check_sync_free(fn, xs[0], ws[0])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(xs[i % len(xs)], ws[i % len(ws)])
        return tuple(t / calls for t in _replay_ms(g.replay))
    finally:
        torch.cuda.set_stream(prev)  # a failed capture_end leaves the capture stream current
        if g is not None:
            try:
                g.reset()
            except Exception:  # noqa: BLE001 -- a graph whose capture failed may refuse; freed below
                pass
            del g
        torch.cuda.empty_cache()


def _check_sync_free(fn, x, w):
    """Raise if one call of ``fn`` waits for the GPU (an ``.item()``, a copy to the host): such a
    call cannot be captured, and a failed capture leaves its memory pool and allocator hook behind
    for the rest of the process (slowing every later allocation), so it is never attempted."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x, w)
    except RuntimeError as e:
        raise RuntimeError(f"not captured: the call synchronises with the host ({str(e).splitlines()[0]})") from None
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _measure_graph(name, fn, xs, ws, eager_ms):
    """(median, p20, p80) ms per call from CUDA-graph replays and None, or NaNs and the error text."""
    try:
        with torch.no_grad():
            return time_graph(fn, xs, ws, graph_calls(eager_ms)), None
    except Exception as e:  # noqa: BLE001 -- an uncapturable contender gets NaN and the reason
        msg = _error_text(e)
        print(f"  {name}: no CUDA graph timing: {msg}", flush=True)
        return (float("nan"),) * 3, msg


def _error_text(e):
    """``Type: first line`` of an exception, at most 300 characters; when it was raised while
    handling another (capture_end failing after the contender raised inside the capture), that
    first one leads."""
    def line(x):
        return f"{type(x).__name__}: {str(x).splitlines()[0] if str(x) else ''}"

    ctx = None if e.__suppress_context__ else e.__context__
    text = line(e) if ctx is None else f"{line(ctx)}; then {line(e)}"
    return text[:300]


# ---------------------------------------------------------------- contenders
def weight_copies(n, k, esize, device, graph):
    """How many weight copies the timing rotates through.

    CPU: >= ROTATE_BYTES of compressed weights (2-4 copies).  CUDA: 1 when there is no graph
    timing (do_bench flushes L2 before every eager call); with it, enough that one rotation of
    compressed weights is >= 2x the L2 cache (at most 8), since a replay's calls are not flushed.
    """
    half = n * k * esize // 2
    if device != "cuda":
        return max(2, min(4, -(-ROTATE_BYTES // half)))
    if not graph:
        return 1
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    return max(1, min(8, -(-2 * l2 // half)))


def make_problem(n, k, dtype, device, copies, seed):
    """``copies`` independent 2:4 weights (values, meta, dense, mask, packed mask)."""
    out = []
    gen_dev = "cuda" if device == "cuda" else "cpu"  # many copies of big weights: draw them on the GPU
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    for _ in range(copies):
        w = (torch.randn(n, k, generator=g, device=gen_dev) * k ** -0.5).to(dtype).to(device)
        values, meta = sk.compress_2to4(w, prune=True, backend="reference")
        dense = sk.decompress_2to4(values, meta, backend="reference")
        mask = dense != 0
        out.append(dict(w=w, values=values, meta=meta, dense=dense, mask=mask, packed=sk.pack_mask(mask)))
    return out


def sparse_linear_backends():
    """sparse_linear's backends timed through ``sk.sparse_linear(..., backend=b)``: every one the op
    has (cpp, cuda, triton, decompress, ...) except the reference (decompresses all of W per call)
    and cusparselt (timed with its compressed weight cached, below)."""
    return [b for b in R.OPS["sparse_linear"].backends if b not in ("reference", "cusparselt")]


def contenders(device, ws, dtype):
    """name -> fn(x, weights) -> y (a peer whose setup fails is reported and left out)."""
    c = {"dense": lambda x, p: F.linear(x, p["dense"])}
    for b in sparse_linear_backends():
        why = R.why_unavailable("sparse_linear", b, device)
        if why is None and not (b == "cuda" and dtype == torch.float32):
            c[b] = lambda x, p, b=b: sk.sparse_linear(x, p["values"], p["meta"], backend=b, meta_dev=p.get("meta_dev"))
    c["auto"] = lambda x, p: sk.sparse_linear(x, p["values"], p["meta"], meta_dev=p.get("meta_dev"))
    if device == "cuda" and dtype != torch.float32:
        if R.why_unavailable("sparse_linear", "cusparselt", device) is None:
            try:
                for p in ws:
                    p["cslt"] = L.cslt_pack(p["values"], p["meta"], dtype)
                c["cusparselt(cached)"] = lambda x, p: L.cslt_matmul(x, p["cslt"], None, p["values"].shape[0])
            except Exception as e:  # noqa: BLE001 -- report why the peer is missing, keep going
                print(f"  torch._cslt_compress failed: {type(e).__name__}: {e}")
        try:
            from torch.sparse import to_sparse_semi_structured

            for p in ws:
                p["sst"] = to_sparse_semi_structured(p["dense"])
            c["torch_semi_structured"] = lambda x, p: F.linear(x, p["sst"])
        except Exception as e:  # noqa: BLE001 -- report why the peer is missing, keep going
            print(f"  torch SparseSemiStructuredTensor unavailable: {type(e).__name__}: {e}")
        fn = L.reorder_meta_mma_fn()
        if fn is not None and R.why_unavailable("sparse_linear", "cuda", device) is None:
            for p in ws:
                p["meta_dev"] = fn(p["meta"])
            # kernels backend="cuda" does not pick yet (csrc/cuda/linear.h): split-K mma.sp, wgmma.sp
            c["cuda:splitk"] = lambda x, p: L.sparse_linear_cuda_kernel(x, p["values"], p["meta"], kernel="splitk",
                                                                        meta_dev=p.get("meta_dev"))
            if torch.cuda.get_device_capability(device) == (9, 0):  # Hopper's wgmma.sp kernel
                c["cuda:wgmma"] = lambda x, p: L.sparse_linear_cuda_kernel(x, p["values"], p["meta"], kernel="wgmma",
                                                                           meta_dev=p.get("meta_dev"))
    c["masked_linear"] = lambda x, p: sk.masked_linear(x, p["w"], p["packed"])
    c["masked_dense"] = lambda x, p: F.linear(x, p["w"] * p["mask"])
    return c


def check(y, x, p):
    exact = x.double() @ p["dense"].double().T
    ours = (y.double() - exact).abs().max().item()
    base = (F.linear(x, p["dense"]).double() - exact).abs().max().item()
    return ours, ours <= 2 * base + 1e-6 * max(exact.abs().max().item(), 1.0)


def _cuda_broken(device):
    """True when the CUDA context is unusable (a kernel faulted): nothing later can run."""
    if device != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        return False
    except Exception:  # noqa: BLE001
        return True


def _measure(name, fn, xs, ws, device, min_run_time):
    """(median, p20, p80) ms, max error, ok, error text or None for one contender."""
    try:
        err, ok = check(fn(xs[0], ws[0]), xs[0], ws[0])
        counter = itertools.count()

        def call(fn=fn, counter=counter):
            i = next(counter)
            return fn(xs[i % len(xs)], ws[i % len(ws)])

        with torch.no_grad():
            t = time_gpu(call) if device == "cuda" else time_cpu(call, min_run_time)
        return t, err, ok, None
    except Exception as e:  # noqa: BLE001 -- one broken contender must not end the table
        msg = _error_text(e)
        print(f"  {name} raised {msg}", flush=True)
        return (float("nan"),) * 3, float("nan"), False, msg


def _graph_timings(cs, res, xs, ws):
    """name -> ((median, p20, p80) ms per call, error or None) from CUDA-graph replays, for every
    contender whose eager run worked; stops capturing once the CUDA context is unusable."""
    out = {}
    for name, fn in cs.items():
        (eager_ms, _, _), _, _, error = res[name]
        if error:
            out[name] = (float("nan"),) * 3, "not captured: the eager call raised"
        elif _cuda_broken("cuda"):
            out[name] = (float("nan"),) * 3, "not captured: the CUDA context is unusable"
        else:
            out[name] = _measure_graph(name, fn, xs, ws, eager_ms)
    return out


def _graph_note(g, dense_g):
    (med, _, _), error = g
    return f"/graph {med:.4f}ms({dense_g / med:.2f}x)" if error is None else "/graph -"


def _case_key(r):
    return (r["out_features"], r["in_features"], r["dtype"], r["batch"])


def run(args):
    device = args.device
    dtypes = [DTYPES[d] for d in args.dtypes]
    rows = list(args.resumed)
    done = {_case_key(r) for r in rows}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(device=device, device_name=device_name(device), threads=torch.get_num_threads(), date=stamp,
                **versions())
    for dtype, (n, k) in itertools.product(dtypes, args.shapes):
        dname = str(dtype).replace("torch.", "")
        todo = [m for m in args.batches if (n, k, dname, m) not in done]
        if not todo:
            continue
        esize = torch.finfo(dtype).bits // 8
        graph = device == "cuda" and args.graph
        ws = make_problem(n, k, dtype, device, weight_copies(n, k, esize, device, graph), seed=n + k)
        cs = contenders(device, ws, dtype)
        for m in todo:
            xs = [torch.randn(m, k, device=device).to(dtype) for _ in range(3)]
            res = {name: _measure(name, fn, xs, ws, device, args.min_run_time) for name, fn in cs.items()}
            gres = _graph_timings(cs, res, xs, ws) if graph else {}
            dense_ms = res["dense"][0][0]
            dense_g = gres["dense"][0][0] if gres else float("nan")
            chosen = R.select("sparse_linear", None, torch.device(device), m, dtype, n * k)
            for name, ((med, p20, p80), err, ok, error) in res.items():
                row = dict(meta, out_features=n, in_features=k, batch=m, dtype=dname,
                           contender=name, median_ms=round(med, 5), p20_ms=round(p20, 5), p80_ms=round(p80, 5),
                           speedup_vs_dense=round(dense_ms / med, 4), max_abs_err=err, ok=ok,
                           auto_choice=chosen if name == "auto" else "", error=error or "",
                           loadavg_1min=round(os.getloadavg()[0], 2))
                if graph:
                    (gmed, gp20, gp80), gerr = gres[name]
                    row.update(graph_ms=round(gmed, 5), graph_p20_ms=round(gp20, 5), graph_p80_ms=round(gp80, 5),
                               graph_speedup_vs_dense=round(dense_g / gmed, 4), graph_error=gerr or "")
                rows.append(row)
            line = "  ".join(f"{nm}={r[0][0]:.3f}ms({dense_ms / r[0][0]:.2f}x{'' if r[2] else ' WRONG'})"
                             + (_graph_note(gres[nm], dense_g) if graph else "")
                             for nm, r in res.items())
            print(f"{n}x{k} {dname:8s} M={m:5d}  {line}", flush=True)
            args.write_rows(rows)
            if _cuda_broken(device):
                print("CUDA context is unusable after a kernel fault; stopping with the rows so far", flush=True)
                return rows
    return rows


def write(rows, out, device, quiet=False):
    return write_table(rows, os.path.join(out, f"bench_linear_{device}"), quiet)


def smollm2_setup(eval_tokens):
    """What the SmolLM2 accuracy scripts start from: ``(model, src, calibration, eval tokens,
    snapshot of the dense weights, dense perplexity)`` with the CLI's defaults (32 x 512 kjv-ot
    calibration tokens, seed 0; ``eval_tokens`` of kjv-nt)."""
    from sparse_kernels.llm import data, evaluate, models

    model, tok, src = models.load_model(None)
    calib = data.calibration_samples(tok, 32, 512, seed=0)
    ev = data.eval_tokens(tok, eval_tokens)
    snap = models.snapshot(model)
    dense = evaluate.perplexity(model, ev).ppl
    print(f"dense perplexity {dense:.3f}", flush=True)
    return model, src, calib, ev, snap, dense


def run_record(what, script, argv, rows, **fields):
    """A benchmark script's JSON record: ``what``, the versions, the date, the command line that ran
    it (``python benchmarks/SCRIPT ARGS``), then ``fields`` (machine, options, ...) and the rows."""
    return {"what": what, **versions(), "date": datetime.date.today().isoformat(),
            "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            **fields, "rows": rows}


def smollm2_doc(what, script, argv, eval_tokens, dense_ppl, rows, **extra):
    """The record the SmolLM2 accuracy scripts (permutation_smollm2.py, dsnot_smollm2.py) write:
    :func:`run_record` with the machine, the CLI-default calibration and evaluation, the dense
    perplexity and ``extra``."""
    return run_record(what, script, argv, rows, machine=f"{device_name('cpu')}, {os.cpu_count()} cores",
                      calibration="32 windows x 512 tokens of kjv-ot, seed 0 (CLI defaults)",
                      eval=f"perplexity on {eval_tokens} tokens of kjv-nt, windows of 512 (CLI defaults)",
                      ppl_dense=round(dense_ppl, 3), **extra)


def write_json(doc, path):
    """``doc`` as indented JSON at ``path``, write-then-rename (a kill mid-write keeps the
    previous file); creates the directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def write_table(rows, base, quiet=False):
    """``base``.json and .csv from ``rows`` (dicts; the CSV's columns are every key seen)."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    fields = list(dict.fromkeys(f for r in rows for f in r))
    for ext in (".json", ".csv"):  # write-then-rename: a kill mid-write keeps the previous file
        with open(base + ext + ".tmp", "w", newline="") as f:
            if ext == ".json":
                json.dump(rows, f, indent=1)
            else:
                w = csv.DictWriter(f, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(rows)
        os.replace(base + ext + ".tmp", base + ext)
    if not quiet:
        print(f"wrote {base}.json and .csv ({len(rows)} rows)")
    return base


def plot(rows, base):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; skipping the PNG")
        return
    panels = sorted({(r["out_features"], r["in_features"], r["dtype"]) for r in rows})
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (n, k, dt) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["out_features"], r["in_features"], r["dtype"]) == (n, k, dt)]
        for name in dict.fromkeys(r["contender"] for r in sel):
            pts = sorted((r["batch"], r["speedup_vs_dense"]) for r in sel if r["contender"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n}x{k} {dt}")
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel("speedup over dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sparse_linear vs dense, {rows[0]['device_name']} ({rows[0]['threads']} threads)")
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    print(f"wrote {base}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one shape, two batch sizes")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    ap.add_argument("--shapes", nargs="*", help="OUTxIN, e.g. 4096x4096")
    ap.add_argument("--min-run-time", type=float, default=0.3, help="CPU: seconds per contender")
    ap.add_argument("--no-graph", dest="graph", action="store_false",
                    help="CUDA: eager timing only (no kernel-level timing from CUDA-graph replays)")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG from an earlier run's JSON")
    ap.add_argument("--resume", metavar="JSON", help="reuse this earlier run's rows (same device) for the cases "
                    "it has; measure only the rest (a missing file is ignored)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), os.path.splitext(args.replot)[0])
        return
    gpu = args.device == "cuda"
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    args.batches = args.batches or (GPU_BATCHES if gpu else CPU_BATCHES)
    args.dtypes = args.dtypes or (["fp16", "bf16"] if gpu else ["fp32", "bf16"])
    if args.quick:
        args.shapes, args.batches = args.shapes[:1], [1, 16]
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.device)
    args.resumed = []
    if args.resume and os.path.exists(args.resume):
        with open(args.resume) as f:
            args.resumed = [r for r in json.load(f) if r.get("device") == args.device]
        print(f"--resume: {len({_case_key(r) for r in args.resumed})} cases from {args.resume}")
    args.write_rows = lambda rows: write(rows, args.out, args.device, quiet=True)
    rows = run(args)
    if not rows:
        print("no rows measured")
        return
    base = write(rows, args.out, args.device)
    if args.plot:
        plot(rows, base)


if __name__ == "__main__":
    main()
