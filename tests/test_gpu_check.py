"""The GPU check's own machinery, and GPU-only details of the launchers that CPU tests can reach.

* benchmarks/gpu_check.sh parses (``bash -n``); its pytest plugin records every outcome as it
  happens and stops a process whose CUDA context faulted;
* bench_linear ``--resume`` measures only the cases an earlier run lacks, and writes as it goes;
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
from conftest import assert_matmul_close, requires_cuda, skip_unless_backend
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
