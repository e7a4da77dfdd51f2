"""The GPU check's own machinery, and GPU-only details of the launchers that CPU tests can reach.

* benchmarks/gpu_check.sh parses (``bash -n``); its pytest plugin records every outcome as it
  happens and stops a process whose CUDA context faulted;
* bench_linear ``--resume`` measures only the cases an earlier run lacks, and writes as it goes;
  its CUDA-graph timing (with a fake torch.cuda) captures rotated calls, frees the graph, and
  turns a failed capture into NaN plus the reason; its contenders follow sparse_linear's backends;
* the dry run of gpu_check.sh runs the error probe and only the steps GPU_CHECK_STEPS names;
* the Triton large-M autotune configs are pruned by batch bucket;
* Triton launches run on the tensors' device (``on_device``); the CUDA GEMM accepts a
  ``meta_dev`` whose data pointer is not 16-byte aligned (GPU only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparse_kernels as sk
from conftest import assert_matmul_close, load_benchmark, requires_cuda, skip_unless_backend
from sparse_kernels.ops.mma_layout import reorder_meta_mma
from sparse_kernels.reference import sparse24 as s24

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


def test_plugin_records_outcomes_and_stops_after_a_cuda_fault(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent("""
        import torch

        def test_ok():
            pass

        def test_fault():
            def boom():
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            torch.cuda.is_initialized = lambda: True
            torch.cuda.synchronize = boom
            assert False, "wrong result"

        def test_never_runs():
            pass
    """))
    results = tmp_path / "results.txt"
    env = dict(os.environ, GPU_CHECK_RESULTS=str(results), PYTHONPATH=os.path.join(ROOT, "benchmarks"))
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_plugin",
                           "test_fake.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    text = results.read_text()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "PASSED" in text and "test_fake.py::test_ok" in text
    assert "FAILED" in text and "wrong result" in text
    assert "CUDAERR" in text and "illegal memory access" in text
    assert "test_never_runs" not in text
    assert "# collected 3" in text  # the summary's "not run" count comes from this line


def test_bench_linear_resume_and_incremental_rows(tmp_path):
    bench = os.path.join(ROOT, "benchmarks", "bench_linear.py")
    common = [sys.executable, bench, "--device", "cpu", "--dtypes", "fp32", "--shapes", "32x32",
              "--min-run-time", "0.01"]
    env = dict(os.environ, PYTHONPATH=ROOT, SPARSE_KERNELS_QUIET="1")
    subprocess.run(common + ["--batches", "1", "--out", str(tmp_path / "a")], check=True, env=env,
                   capture_output=True, timeout=300)
    first = tmp_path / "a" / "bench_linear_cpu.json"
    out = subprocess.run(common + ["--batches", "1", "2", "--resume", str(first), "--out", str(tmp_path / "b")],
                         check=True, env=env, capture_output=True, text=True, timeout=300).stdout
    assert "M=    1" not in out and "M=    2" in out  # batch 1 came from the earlier run
    rows = json.loads((tmp_path / "b" / "bench_linear_cpu.json").read_text())
    assert sorted({r["batch"] for r in rows}) == [1, 2]
    assert all(r["ok"] and not r["error"] for r in rows if r["batch"] == 2)
    assert (tmp_path / "b" / "bench_linear_cpu.csv").read_text().count("\n") == len(rows) + 1


def test_triton_large_m_configs_pruned_by_batch_bucket():
    t = pytest.importorskip("sparse_kernels.triton.linear")
    cfgs = [t._cfg(bm, 64, 64, 4, 3) for bm in (64, 128)]
    assert [c.kwargs["BLOCK_M"] for c in t._prune_by_m(cfgs, {"M_BUCKET": 32})] == [64]
    assert [c.kwargs["BLOCK_M"] for c in t._prune_by_m(cfgs, {"M_BUCKET": 256})] == [64]
    assert [c.kwargs["BLOCK_M"] for c in t._prune_by_m(cfgs, {"M_BUCKET": 512})] == [128]
    only64 = cfgs[:1]
    assert t._prune_by_m(only64, {"M_BUCKET": 8192}) == only64  # never prunes to nothing
    assert t._prune_by_m(cfgs, {}) == cfgs


def test_on_device_is_a_no_op_on_cpu():
    from sparse_kernels.triton import on_device

    with on_device(torch.zeros(1)):
        pass


def _linear_problem(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w = torch.where(s24.mask_2to4(w), w, torch.zeros(())).half()
    x = torch.randn(m, k, generator=gen).half()
    values, meta = s24.compress_2to4(w, False)
    return x, w, values, meta


@requires_cuda
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sparse_linear_on_second_gpu(backend):
    skip_unless_backend("sparse_linear", backend, "cuda")
    x, w, values, meta = _linear_problem(33, 48, 64)
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        y = sk.sparse_linear(x.to(dev), values.to(dev), meta.to(dev), backend=backend)
    assert y.device == dev
    assert_matmul_close(y, x.double() @ w.double().T, torch.nn.functional.linear(x.to(dev), w.to(dev)))


@requires_cuda
@pytest.mark.parametrize("m", [5, 300])  # decode kernel, GEMM kernel (cp.async of meta_dev)
def test_sparse_linear_cuda_misaligned_meta_dev(m):
    skip_unless_backend("sparse_linear", "cuda", "cuda")
    skip_unless_backend("reorder_meta_mma", "cuda", "cuda")
    x, w, values, meta = _linear_problem(m, 200, 208, seed=m)
    md = reorder_meta_mma(meta.cuda())
    storage = torch.empty(md.numel() + 1, dtype=torch.int32, device="cuda")
    shifted = storage[1:].view(md.shape)  # data pointer 4 bytes past a 16-byte boundary
    shifted.copy_(md)
    assert shifted.data_ptr() % 16 != 0
    y = sk.sparse_linear(x.cuda(), values.cuda(), meta.cuda(), backend="cuda", meta_dev=shifted)
    assert_matmul_close(y, x.double() @ w.double().T, torch.nn.functional.linear(x.cuda(), w.cuda()))


# ---------------------------------------------------------------- bench_linear: graph timing, contenders
def _bench_linear():
    return load_benchmark("bench_linear")


class _FakeCuda:
    """Just enough of torch.cuda for bench_linear.time_graph: records what happens, captures by
    remembering the calls made inside ``graph(g)``, and can fail inside or at the end of capture."""

    def __init__(self, fail_in_capture=False, fail_at_end=False):
        self.log, self.capturing = [], False
        self.fail_in_capture, self.fail_at_end = fail_in_capture, fail_at_end
        self.prev = self._stream("default")
        self.sync_mode = 0

    def get_sync_debug_mode(self):
        return self.sync_mode

    def set_sync_debug_mode(self, mode):
        self.log.append(("sync_mode", mode))
        self.sync_mode = mode

    def _stream(self, name):
        fake = self

        class S:
            def __repr__(self):
                return name

            def wait_stream(self, other):
                fake.log.append(("wait", name, repr(other)))

        return S()

    def current_stream(self):
        return self.prev

    def Stream(self):  # noqa: N802 -- torch.cuda's name
        return self._stream("side")

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.log.append(("stream", repr(s)))
            yield

        return ctx()

    def set_stream(self, s):
        self.log.append(("set_stream", repr(s)))

    def empty_cache(self):
        self.log.append(("empty_cache",))

    def CUDAGraph(self):  # noqa: N802
        fake = self

        class G:
            def replay(self):
                fake.log.append(("replay",))

            def reset(self):
                fake.log.append(("reset",))

        return G()

    def graph(self, g):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.capturing = True
            self.log.append(("capture_begin",))
            try:
                yield
            finally:
                self.capturing = False
                if self.fail_at_end:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            self.log.append(("capture_end",))

        return ctx()


def _patch_cuda(monkeypatch, bench, fake):
    for name in ("current_stream", "Stream", "stream", "set_stream", "empty_cache", "CUDAGraph", "graph",
                 "get_sync_debug_mode", "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(bench, "_replay_ms", lambda replay: (replay(), (2.0, 1.0, 3.0))[1])


@pytest.mark.parametrize("eager_ms, calls, warmup", [(0.01, 20, 3), (2.5, 2, 2)])
def test_graph_timing_captures_rotated_calls_and_frees_the_graph(monkeypatch, eager_ms, calls, warmup):
    bench = _bench_linear()
    fake = _FakeCuda()
    _patch_cuda(monkeypatch, bench, fake)
    seen = []

    def fn(x, w):
        seen.append((fake.capturing, x, w))

    (med, p20, p80), err = bench._measure_graph("c", fn, ["x0", "x1", "x2"], ["w0", "w1"], eager_ms=eager_ms)
    assert err is None
    assert (med, p20, p80) == (2.0 / calls, 1.0 / calls, 3.0 / calls)  # replay time / the calls captured
    warm = [s for s in seen if not s[0]]
    captured = [s[1:] for s in seen if s[0]]
    assert len(warm) == warmup + 1  # + the call checked for host syncs
    assert captured == [(f"x{i % 3}", f"w{i % 2}") for i in range(calls)]
    names = [e[0] for e in fake.log]
    assert names.index("capture_end") < names.index("replay") < names.index("reset") < names.index("empty_cache")
    assert ("set_stream", "default") in fake.log


@pytest.mark.parametrize("where", ["inside", "at_end"])
def test_graph_timing_failure_gives_nan_and_the_reason(monkeypatch, where):
    bench = _bench_linear()
    fake = _FakeCuda(fail_at_end=True)
    _patch_cuda(monkeypatch, bench, fake)

    def fn(x, w):
        if fake.capturing and where == "inside":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    (med, p20, p80), err = bench._measure_graph("c", fn, [0], [0], eager_ms=float("nan"))
    assert all(t != t for t in (med, p20, p80))  # NaN
    assert "previous error during capture" in err
    if where == "inside":  # the contender's own error leads, capture_end's follows
        assert err.index("not permitted when stream is capturing") < err.index("previous error during capture")
    assert ("replay",) not in fake.log
    assert fake.log[-3:] == [("set_stream", "default"), ("reset",), ("empty_cache",)]


def test_graph_timing_never_captures_a_call_that_syncs(monkeypatch):
    """A contender that waits for the GPU (e.g. reads an error flag back) is refused before any
    capture: a failed capture would leave its memory pool behind for the rest of the run."""
    bench = _bench_linear()
    fake = _FakeCuda()
    _patch_cuda(monkeypatch, bench, fake)

    def fn(x, w):
        if fake.sync_mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    (med, _, _), err = bench._measure_graph("c", fn, [0], [0], eager_ms=0.5)
    assert med != med and "synchronises with the host" in err
    assert ("capture_begin",) not in fake.log
    assert fake.sync_mode == 0  # restored


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="CPU-only fallback")
def test_graph_timing_without_cuda_is_an_error_row_not_an_exception():
    bench = _bench_linear()
    (med, _, _), err = bench._measure_graph("dense", lambda x, w: x, [torch.zeros(1)], [None], eager_ms=0.1)
    assert med != med and err


def test_graph_calls_shrink_for_long_calls():
    bench = _bench_linear()
    assert bench.graph_calls(0.012) == bench.GRAPH_CALLS
    assert bench.graph_calls(float("nan")) == bench.GRAPH_CALLS
    assert bench.graph_calls(1.4) == int(bench.GRAPH_REPLAY_MS / 1.4)
    assert bench.graph_calls(200.0) == 1


def test_contenders_include_every_available_sparse_linear_backend(monkeypatch):
    import dataclasses

    bench = _bench_linear()
    R = bench.R
    spec = R.OPS["sparse_linear"]
    extra = tuple(b for b in ("decompress", "not_here") if b not in spec.backends)
    monkeypatch.setitem(R.OPS, "sparse_linear", dataclasses.replace(spec, backends=spec.backends + extra))
    real = R.why_unavailable

    def why(name, backend, device):
        if name == "sparse_linear" and backend == "decompress":
            return None
        if name == "sparse_linear" and backend == "not_here":
            return "not built"
        return real(name, backend, device)

    monkeypatch.setattr(R, "why_unavailable", why)
    calls = []
    monkeypatch.setattr(bench.sk, "sparse_linear", lambda x, v, m, backend=None, meta_dev=None: calls.append(backend))
    ws = bench.make_problem(16, 32, torch.float32, "cpu", copies=1, seed=0)
    cs = bench.contenders("cpu", ws, torch.float32)
    assert "decompress" in cs and "not_here" not in cs
    assert "reference" not in cs and "cusparselt" not in cs
    assert {"dense", "auto", "masked_linear", "masked_dense"} <= set(cs)
    cs["decompress"](torch.zeros(2, 32), ws[0])
    assert calls == ["decompress"]


def test_bench_linear_no_graph_flag_parses():
    bench = _bench_linear()
    seen = []
    bench.run = lambda args: seen.append(args.graph) or []
    bench.main(["--device", "cpu", "--no-graph", "--shapes", "16x32", "--batches", "1"])
    bench.main(["--device", "cpu", "--shapes", "16x32", "--batches", "1"])
    assert seen == [False, True]


# ---------------------------------------------------------------- gpu_check.sh dry run, a few steps
def test_gpu_check_dry_run_error_probe_and_step_selection(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET_S="120", PYTHON=sys.executable,
               GPU_CHECK_STEPS="info error_probe tests_gpu")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "skip  env: not in GPU_CHECK_STEPS" in summary and "skip  bench_linear_quick" in summary
    assert "end   error_probe rc=0 ok" in summary
    assert "[error_probe] error_probe: ok" in summary
    from sparse_kernels import _extension

    if _extension.load()["loaded"]:  # the C++ error path ran and kept its numbers
        assert "sparse_linear_cpp: ValueError: x: last dim is 16" in summary
        assert "libstdc++ symbols _C exports" in summary
    assert "end   tests_gpu rc=0 ok" in summary
    assert "not run 0" in summary and "slowest" in summary
    assert (tmp_path / "gpu_check.tgz").exists()


# ---------------------------------------------------------------- bench_sparsegpt: GPU timer
@pytest.mark.parametrize("first_ms", [120.0, 10.0])
def test_sparsegpt_gpu_timer_times_long_runs_directly(monkeypatch, first_ms):
    """A whole-layer run of >= LONG_RUN_MS is timed run by run (reps runs in all, the first
    included); a shorter one goes to do_bench, sized by the first run."""
    triton_testing = pytest.importorskip("triton.testing")
    bench = load_benchmark("bench_sparsegpt")
    durations = iter([first_ms, 100.0, 110.0])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(durations)

    bench_calls = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(triton_testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: bench_calls.append((warmup, rep)) or [5.0, 4.0, 6.0])
    runs = []
    out = bench.time_gpu(lambda: runs.append(1), reps=3)
    if first_ms >= bench.LONG_RUN_MS:
        assert len(runs) == 3 and not bench_calls
        assert out[0] == pytest.approx(0.110) and out[3] is None
    else:
        assert len(runs) == 1 and bench_calls == [(10.0, 30.0)]
        assert out == [0.005, 0.004, 0.006, None]
