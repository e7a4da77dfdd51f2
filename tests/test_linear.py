"""sparse_linear / masked_linear / pack_mask: every backend vs the reference, autograd, opcheck, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_kernels as sk
from sparse_kernels.reference import linear as ref
from conftest import assert_bitexact, assert_close, assert_matmul_close, devices, requires_cuda, skip_unless_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, N, K): batch 1, odd leading dims, K % 32 == 16 tails, N not a multiple of 4.
SHAPES = [((1,), 37, 48), ((3, 5), 64, 160), ((2, 1, 7), 129, 32), ((9,), 20, 16), ((17,), 70, 96),
          ((40,), 33, 64)]


def _problem(lead, n, k, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    values, meta = sk.compress_2to4(w.to(dtype), prune=True)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x), mv(values), mv(meta), mv(b)


def _exact(x, values, meta, bias):
    w = sk.decompress_2to4(values.cpu(), meta.cpu()).double()
    y = x.cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def _check_matmul(y, x, values, meta, bias, what):
    exact = _exact(x, values, meta, bias)
    lowp = ref.sparse_linear(x, values, meta, bias)  # torch in the same precision
    assert y.dtype == x.dtype and y.shape == lowp.shape
    assert_matmul_close(y, exact, lowp, what)


BACKENDS = ["reference", "cpp", "cuda", "triton", "cusparselt", "decompress"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("device", devices())
def test_sparse_linear_vs_reference(backend, dtype, lead, n, k, device):
    skip_unless_backend("sparse_linear", backend, device)
    if backend in ("cuda", "cusparselt") and dtype == torch.float32:
        pytest.skip("sparse tensor cores take float16/bfloat16")
    x, values, meta, bias = _problem(lead, n, k, dtype, device)
    y = sk.sparse_linear(x, values, meta, bias, backend=backend)
    assert y.shape == (*lead, n)
    _check_matmul(y, x, values, meta, bias, f"sparse_linear/{backend}/{dtype}")
    y0 = sk.sparse_linear(x, values, meta, None, backend=backend)
    _check_matmul(y0, x, values, meta, None, f"sparse_linear/{backend}/{dtype}/nobias")


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_cpp_every_isa(isa, dtype, monkeypatch):
    skip_unless_backend("sparse_linear", "cpp", "cpu")
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)  # falls back to the best available path
    monkeypatch.setenv("SPARSE_KERNELS_CPU_GEMM_MIN_M", str(1 << 40))  # direct kernels only
    # K % 64 == 0 shapes take the bf16 dot-product kernel where the CPU has AVX512-BF16
    for lead, n, k in SHAPES + [((1,), 36, 64), ((7,), 70, 256), ((2, 3), 9, 1024)]:
        x, values, meta, bias = _problem(lead, n, k, dtype, seed=3)
        _check_matmul(sk.sparse_linear(x, values, meta, bias, backend="cpp"), x, values, meta, bias, f"cpp/{isa}")


def test_sparse_linear_cpp_noncontiguous():
    skip_unless_backend("sparse_linear", "cpp", "cpu")
    x, values, meta, bias = _problem((6,), 40, 64, torch.float32, seed=4)
    xt = torch.randn(64, 6).T  # non-contiguous x
    vt = values.T.contiguous().T  # non-contiguous values
    assert not xt.is_contiguous() and not vt.is_contiguous()
    y = sk.sparse_linear(xt, vt, meta, bias, backend="cpp")
    _check_matmul(y, xt, values, meta, bias, "cpp/noncontiguous")


def test_sparse_linear_zero_batch_and_meta_device():
    x, values, meta, bias = _problem((0,), 8, 16, torch.float32)
    for b in ("reference", "cpp"):
        skip_unless_backend("sparse_linear", b, "cpu")
        assert sk.sparse_linear(x, values, meta, bias, backend=b).shape == (0, 8)
    xm, vm, mm = x.to("meta"), values.to("meta"), meta.to("meta")
    assert sk.sparse_linear(xm.new_empty(3, 2, 16), vm, mm).shape == (3, 2, 8)


# ---------------------------------------------------------------- autograd
def test_sparse_linear_gradcheck_fp64_reference():
    x, values, meta, bias = _problem((3,), 8, 32, torch.float32)
    x, values, bias = (t.double().requires_grad_() for t in (x, values, bias))
    # the public wrapper accepts fp16/bf16/fp32; the reference op itself runs in fp64
    torch.autograd.gradcheck(lambda a, v, b: torch.ops.sparse_kernels.sparse_linear(a, v, meta, b, None),
                             (x, values, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_sparse_linear_grads_every_backend(backend, device):
    skip_unless_backend("sparse_linear", backend, device)
    dtype = torch.float16 if backend in ("cuda", "cusparselt") else torch.float32
    x, values, meta, bias = _problem((2, 3), 24, 48, dtype, device, seed=5)
    gy = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    outs = []
    for b in (backend, "reference"):
        xs, vs, bs = (t.detach().clone().requires_grad_() for t in (x, values, bias))
        sk.sparse_linear(xs, vs, meta, bs, backend=b).backward(gy)
        outs.append((xs.grad, vs.grad, bs.grad))
    for got, want, name in zip(outs[0], outs[1], ("x", "values", "bias")):
        assert_close(got, want, f"grad {name} ({backend})")
    # values grad = (gy^T x) at the kept positions, computed independently here:
    g = gy.reshape(-1, 24).double().T @ x.reshape(-1, 48).double()
    dense_mask = sk.decompress_2to4(torch.ones_like(values), meta) != 0
    assert_close(outs[1][1], g[dense_mask.cpu()].reshape(24, 24).to(dtype).to(device), "values grad formula",
                 **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))


# ---------------------------------------------------------------- masked_linear
def _masked_problem(lead, n, k, dtype, packed, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.rand(n, k, generator=g) < 0.4
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    mask = sk.pack_mask(m) if packed else m
    return x.to(device), w.to(device), mask.to(device), b.to(device), m


ML_BACKENDS = ["reference", "cpp", "triton"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ML_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lead,n,k", [((1,), 7, 13), ((2, 3), 33, 64), ((5,), 16, 100)])
def test_masked_linear_vs_reference(device, backend, dtype, packed, lead, n, k):
    skip_unless_backend("masked_linear", backend, device)
    x, w, mask, b, m = _masked_problem(lead, n, k, dtype, packed)
    y = sk.masked_linear(x.to(device), w.to(device), mask.to(device), b.to(device), backend=backend).cpu()
    wm = torch.where(m, w, torch.zeros((), dtype=dtype))
    exact = x.double() @ wm.double().T + b.double()
    assert_matmul_close(y, exact, F.linear(x, wm, b), f"masked_linear/{backend}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("m", [1, 3, 4, 9, 70])
@pytest.mark.parametrize("gemm", [False, True])
def test_masked_linear_cpp_paths_and_dropped_nan(dtype, packed, m, gemm, monkeypatch):
    """Every cpp path (direct 1..4 rows of x at a time and the remainders, the bf16 dot-product
    kernel at K % 32 == 0, the blocked GEMM) against the reference, with NaN in every dropped
    weight: a masked-out entry must never reach the output."""
    skip_unless_backend("masked_linear", "cpp", "cpu")
    monkeypatch.setenv("SPARSE_KERNELS_CPU_GEMM_MIN_M", "1" if gemm else "1000000")
    x, w, mask, b, keep = _masked_problem((m,), 24, 96, dtype, packed, seed=m)
    w = torch.where(keep, w, torch.full((), float("nan"), dtype=dtype))
    y = sk.masked_linear(x, w, mask, b, backend="cpp")
    wm = torch.where(keep, w, torch.zeros((), dtype=dtype))
    assert_matmul_close(y, x.double() @ wm.double().T + b.double(), F.linear(x, wm, b), "masked_linear/cpp")


def test_masked_linear_gradcheck_fp64():
    x, w, mask, b, _ = _masked_problem((3,), 6, 20, torch.float64, True)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    torch.autograd.gradcheck(lambda a, ww, bb: torch.ops.sparse_kernels.masked_linear(a, ww, mask, bb), args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ML_BACKENDS)
def test_masked_linear_grads(device, backend):
    skip_unless_backend("masked_linear", backend, device)
    x, w, mask, b, m = _masked_problem((4,), 12, 40, torch.float32, True, seed=2)
    gy = torch.randn(4, 12)
    xs, ws, bs = (t.clone().to(device).requires_grad_() for t in (x, w, b))
    sk.masked_linear(xs, ws, mask.to(device), bs, backend=backend).backward(gy.to(device))
    xs, ws, bs = (t.grad.cpu() for t in (xs, ws, bs))
    wm = torch.where(m, w, 0.0)
    assert_close(xs, gy @ wm, "grad x")
    assert_close(ws, (gy.T @ x) * m, "grad w")
    assert_close(bs, gy.sum(0), "grad bias")
    assert (ws[~m] == 0).all()


# ---------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_pack_unpack_mask(backend):
    skip_unless_backend("pack_mask", backend, "cpu")
    m = torch.rand(3, 5, 21, generator=torch.Generator().manual_seed(0)) < 0.5
    p = sk.pack_mask(m, backend=backend)
    assert p.shape == (3, 5, 3) and p.dtype == torch.uint8
    assert_bitexact(sk.unpack_mask(p, 21, backend=backend), m, "round trip")
    # documented bit order: mask[..., c] is bit c % 8 of byte c // 8; padding bits are zero
    one = torch.zeros(1, 10, dtype=torch.bool)
    one[0, 9] = True
    one[0, 0] = True
    assert sk.pack_mask(one, backend=backend).tolist() == [[1, 2]]


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    x, values, meta, bias = _problem((5,), 24, 32, torch.float32)
    xw, w, mask, b, _ = _masked_problem((3,), 6, 20, torch.float32, True)
    return {
        "sparse_linear": (x, values, meta, bias, None),
        "masked_linear": (xw, w, mask, b),
        "pack_mask": (torch.rand(4, 19) < 0.5,),
        "unpack_mask": (mask, 20),
    }


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("op", ["sparse_linear", "masked_linear", "pack_mask", "unpack_mask"])
def test_opcheck(op, backend):
    from sparse_kernels.ops import _registry as R

    skip_unless_backend(op, backend, "cpu")
    args = _opcheck_cases()[op]
    if op in ("sparse_linear", "masked_linear"):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(R.get_op(op, backend), args)


# ---------------------------------------------------------------- bad inputs
def test_errors_sparse_linear():
    x, values, meta, bias = _problem((2,), 8, 32, torch.float32)
    with pytest.raises(ValueError, match="x: last dim is 16 but the 2:4 weight"):
        sk.sparse_linear(x[:, :16], values, meta)
    with pytest.raises(TypeError, match="values: dtype torch.float32 does not match x's dtype torch.bfloat16"):
        sk.sparse_linear(x.bfloat16(), values, meta)
    with pytest.raises(TypeError, match="bias: dtype float16 is not supported"):
        sk.sparse_linear(x, values, meta, bias.half())
    with pytest.raises(ValueError, match=r"bias: shape \(7,\) does not match the 8 output features"):
        sk.sparse_linear(x, values, meta, bias[:7])
    with pytest.raises(ValueError, match="meta: shape"):
        sk.sparse_linear(x, values, meta[:, :1])
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        sk.sparse_linear(x, values.to("meta"), meta.to("meta"))
    with pytest.raises(ValueError, match="backend: got 'fast'"):
        sk.sparse_linear(x, values, meta, backend="fast")
    with pytest.raises(sk.BackendUnavailableError, match="cusparselt"):
        sk.sparse_linear(x, values, meta, backend="cusparselt")


def test_cuda_kernel_entry_checks_and_fake():
    """sparse_linear_cuda_kernel (the cuda backend with its kernel named): argument errors come
    before the device check, the CPU gets BackendUnavailableError, and its fake gives the shape
    (its numbers are tested on a GPU: test_cuda_kernels.py)."""
    from sparse_kernels.ops import linear as L

    x, values, meta, bias = _problem((2, 3), 8, 32, torch.float16)
    with pytest.raises(ValueError, match="kernel: got 'wide', expected one of auto, gemv, gemm, splitk, wgmma"):
        L.sparse_linear_cuda_kernel(x, values, meta, kernel="wide")
    with pytest.raises(ValueError, match="x: last dim is 16"):
        L.sparse_linear_cuda_kernel(x[..., :16], values, meta, kernel="splitk")
    with pytest.raises(TypeError, match="values: dtype"):
        L.sparse_linear_cuda_kernel(x.float(), values, meta)
    if not torch.cuda.is_available():
        with pytest.raises(sk.BackendUnavailableError, match="sparse_linear_cuda_kernel cannot run on cpu"):
            L.sparse_linear_cuda_kernel(x, values, meta, bias, kernel="splitk")
    y = torch.ops.sparse_kernels.sparse_linear_cuda_kernel(x.reshape(-1, 32).to("meta"), values.to("meta"),
                                                           meta.to("meta"), None, None, "splitk")
    assert y.shape == (6, 8) and y.dtype == torch.float16


def test_errors_cpp_kernel_direct():
    """The C++ kernel validates its own inputs before touching pointers."""
    skip_unless_backend("sparse_linear", "cpp", "cpu")
    x, values, meta, bias = _problem((2,), 8, 32, torch.float32)
    op = torch.ops.sparse_kernels.sparse_linear_cpp
    with pytest.raises(ValueError, match="x: last dim is 16 but the weight has 32"):
        op(x[:, :16], values, meta, None, None)
    with pytest.raises(TypeError, match="does not match x's dtype"):
        op(x.half(), values, meta, None, None)
    with pytest.raises(ValueError, match="meta: expected shape"):
        op(x, values, meta[:4], None, None)
    with pytest.raises(ValueError, match="bias: expected shape"):
        op(x, values, meta, bias[:3], None)
    with pytest.raises(ValueError, match="mask: expected shape"):
        torch.ops.sparse_kernels.masked_linear_cpp(x, torch.randn(8, 32), torch.zeros(8, 3, dtype=torch.uint8), None)


@pytest.mark.parametrize("rows,k", [(5, 64), (3, 16)])  # 20 meta words (SWAR chunks of 4); 3 words (the tail loop)
def test_cpp_kernels_refuse_corrupt_meta(rows, k):
    """A nibble with i0 >= i1 would make the 2:4 kernels pick the wrong x entries (never out of
    bounds): the CPU kernels refuse it as decompress_2to4 does, naming the first bad group. Every
    one of the 16 nibble values, at the first and the last group of the meta."""
    skip_unless_backend("sparse_linear", "cpp", "cpu")
    torch.manual_seed(0)
    values, meta = sk.compress_2to4(torch.randn(rows, k), prune=True)
    q, _, scales = sk.compress_2to4_int4(torch.randn(rows, k), 16, prune=True)
    x, gy = torch.randn(2, k), torch.randn(2, rows)
    ops = torch.ops.sparse_kernels
    calls = {"sparse_linear": lambda m: ops.sparse_linear_cpp(x, values, m, None, None),
             "sparse_linear_int4": lambda m: ops.sparse_linear_int4_cpp(x, q, m, scales, None),
             "grad_x": lambda m: ops.sparse_linear_grad_x_cpp(gy, values, m),
             "grad_values": lambda m: ops.sparse_linear_grad_values_cpp(gy, x, m)}
    groups = k // 4
    for r, g in ((0, 0), (rows - 1, groups - 1)):
        for nib in range(16):
            bad = meta.clone()
            word = int(bad[r, g // 4]) & 0xFFFF
            word = (word & ~(0xF << (4 * (g % 4)))) | (nib << (4 * (g % 4)))
            bad[r, g // 4] = word - 0x10000 if word >= 0x8000 else word
            for name, call in calls.items():
                if (nib & 3) < (nib >> 2):
                    assert torch.isfinite(call(bad)).all(), (name, nib)
                    continue
                with pytest.raises(ValueError, match=rf"meta is corrupt: row {r}, group {g} \(columns {4 * g}\.\."
                                                     rf"{4 * g + 3}\) has nibble {nib} with"):
                    call(bad)
    # the public op on the reference backend says the same
    bad = meta.clone()
    bad[0, 0] = bad[0, 0] & ~0xF
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match=r"meta is corrupt: row 0, group 0 \(columns 0\.\.3\) has nibble 0"):
            sk.sparse_linear(x, values, bad, backend=backend)


def test_cpp_kernels_refuse_widths_whose_product_overflows():
    """A 0-stride operand can claim any width; K = 4 * width must not wrap around (it did to 0)."""
    skip_unless_backend("sparse_linear", "cpp", "cpu")
    ops = torch.ops.sparse_kernels
    huge = torch.zeros(1, 1, dtype=torch.uint8).expand(1, 2 ** 62)
    with pytest.raises(ValueError, match="qvalues: 4611686018427387904 columns; no weight has that many"):
        ops.sparse_linear_int4_cpp(torch.zeros(2, 0), huge, torch.zeros(1, 0, dtype=torch.int16), torch.ones(1, 1),
                                   torch.tensor([7.0]))
    with pytest.raises(ValueError, match="values: 4611686018427387904 columns"):
        ops.sparse_linear_cpp(torch.zeros(2, 0), torch.zeros(1, 1).expand(1, 2 ** 62),
                              torch.zeros(1, 0, dtype=torch.int16), None, None)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_zero_size_inputs_give_empty_results_on_every_cpu_backend(backend):
    skip_unless_backend("sparse_linear_int4", backend, "cpu")
    from sparse_kernels.ops.permutation import nm_split_scores

    assert sk.mask_2to4(torch.zeros(3, 0), backend=backend).shape == (3, 0)
    y = sk.sparse_linear_int4(torch.randn(2, 64), torch.zeros(0, 16, dtype=torch.uint8),
                              torch.zeros(0, 4, dtype=torch.int16), torch.ones(0, 1), backend=backend)
    assert y.shape == (2, 0)
    s = nm_split_scores(torch.rand(16, 20), torch.zeros(0, 8, dtype=torch.int64), torch.arange(8).reshape(1, 8), 2,
                        backend=backend)
    assert s.shape == (0, 1)


def test_errors_masked_linear():
    x, w, mask, b, m = _masked_problem((2,), 6, 20, torch.float32, True)
    with pytest.raises(ValueError, match=r"mask: shape \(6, 2\) is wrong for a bit-packed uint8 mask"):
        sk.masked_linear(x, w, mask[:, :2])
    with pytest.raises(ValueError, match=r"mask: shape \(6, 19\) is wrong for a bool mask"):
        sk.masked_linear(x, w, m[:, :19])
    with pytest.raises(TypeError, match="mask: dtype int32 is not supported"):
        sk.masked_linear(x, w, m.int())
    with pytest.raises(ValueError, match="x: last dim is 19 but weight has 20"):
        sk.masked_linear(x[:, :19], w, mask)
    with pytest.raises(TypeError, match="weight: dtype torch.float16 does not match"):
        sk.masked_linear(x, w.half(), mask)
    with pytest.raises(ValueError, match="packed: last dim 3 does not hold 30 bits"):
        sk.unpack_mask(mask, 30)


def test_auto_rule_cpu():
    from sparse_kernels.ops import _registry as R

    want = "cpp" if R.why_unavailable("sparse_linear", "cpp", "cpu") is None else "reference"
    for m in (1, 16, 4096):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            assert R.select("sparse_linear", "auto", torch.device("cpu"), m, dt) == want


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("op", ["sparse_linear", "masked_linear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_both_paths(path, op, dtype, isa, monkeypatch):
    """The cpp ops switch to a blocked expand + GEMM for large batches; both paths must agree."""
    skip_unless_backend(op, "cpp", "cpu")
    monkeypatch.setenv("SPARSE_KERNELS_CPU_GEMM_MIN_M", "1" if path == "gemm" else str(1 << 40))
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)
    for lead, n, k in SHAPES + [((40,), 300, 64)]:  # 300 rows: more than one 256-row GEMM block
        if op == "sparse_linear":
            x, values, meta, bias = _problem(lead, n, k, dtype, seed=7)
            _check_matmul(sk.sparse_linear(x, values, meta, bias, backend="cpp"), x, values, meta, bias,
                          f"cpp/{path}")
        else:
            x, w, mask, b, m = _masked_problem(lead, n, k + 3, dtype, True, seed=7)
            wm = torch.where(m, w, torch.zeros((), dtype=dtype))
            y = sk.masked_linear(x, w, mask, b, backend="cpp")
            assert_matmul_close(y, x.double() @ wm.double().T + b.double(), F.linear(x, wm, b), f"masked cpp/{path}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_rule_cuda_follows_the_h200_table(dtype):
    """The CUDA rule in ops/linear.py, from benchmarks/results/gpu/h200_2026-11-28: mma.sp (cuda)
    for f16/bf16 up to batch 255, decompress + cuBLAS from 1024 (from 256 for >= 2^25 weights)."""
    from sparse_kernels.ops import linear as L

    avail = ["reference", "cuda", "triton", "cusparselt", "decompress"]
    small, large = 4096 * 4096, 4096 * 14336
    half = dtype != torch.float32
    for m, nk, want in [(1, small, "cuda"), (16, large, "cuda"), (255, large, "cuda"), (256, small, "cuda"),
                        (256, large, "decompress"), (1023, small, "cuda"), (1024, small, "decompress"),
                        (8192, large, "decompress")]:
        got = L._sparse_linear_auto("cuda", avail, m, dtype, nk)
        assert got == (want if half else "decompress"), (m, nk, dtype, got)
    # never the per-call cuSPARSELt path; fallbacks when kernels are missing
    assert L._sparse_linear_auto("cuda", ["reference", "triton"], 1, dtype, small) == "triton"
    assert L._sparse_linear_auto("cuda", ["reference"], 1, dtype, small) == "reference"
    assert L._masked_linear_auto("cuda", ["reference", "triton"], 1, dtype) == "reference"


class _FakeCslt:
    """CPU stand-ins for torch._cslt_compress / _cslt_sparse_mm with cuSPARSELt's row rule."""

    def compress(self, w):
        if w.shape[0] % 16:
            raise RuntimeError("CUDA error: operation not supported")
        return w.clone()

    def sparse_mm(self, packed, dense, bias=None, transpose_result=False, alg_id=0):
        assert bias is None and not transpose_result
        # cuSPARSELt takes the dense operand as contiguous or contiguous-transposed only
        assert dense.is_contiguous() or dense.t().is_contiguous(), dense.stride()
        return packed @ dense


@pytest.mark.parametrize("lead,n", [((5,), 33), ((2, 3), 20), ((16,), 48)])
def test_cslt_padding_and_layout_cpu(lead, n, monkeypatch):
    """The cuSPARSELt wrapper pads rows (weight to 16, batch to 16), transposes back, slices and
    adds the bias: checked on CPU against the reference with fakes that enforce the row rule."""
    from sparse_kernels.ops import linear as L

    fake = _FakeCslt()
    monkeypatch.setattr(torch, "_cslt_compress", fake.compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm)
    x, values, meta, bias = _problem(lead, n, 64, torch.float32, seed=11)
    x2 = x.reshape(-1, 64)
    for b in (bias, None):
        y = L._sparse_linear_cusparselt(x2, values, meta, b, None)
        assert y.shape == (x2.shape[0], n) and y.is_contiguous()
        _check_matmul(y.reshape(*lead, n), x, values, meta, b, "cslt (fake)")
    # a row-strided view of x (batch a multiple of 16, so no padding copy): still right
    wide = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    xs = wide[:, :64]
    _check_matmul(L._sparse_linear_cusparselt(xs, values, meta, bias, None), xs, values, meta, bias, "cslt strided")
    assert L._sparse_linear_cusparselt(xs[:0], values, meta, bias, None).shape == (0, n)


def test_env_backend(monkeypatch):
    x, values, meta, bias = _problem((2,), 8, 32, torch.float32)
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "reference")
    _check_matmul(sk.sparse_linear(x, values, meta, bias), x, values, meta, bias, "env")


@requires_cuda
def test_cusparselt_matches_reference_cuda():
    skip_unless_backend("sparse_linear", "cusparselt", "cuda")
    x, values, meta, bias = _problem((16,), 128, 128, torch.float16, "cuda")
    _check_matmul(sk.sparse_linear(x, values, meta, bias, backend="cusparselt"), x, values, meta, bias, "cslt")


@requires_cuda
def test_meta_dev_passthrough_cuda():
    skip_unless_backend("sparse_linear", "cuda", "cuda")
    from sparse_kernels.ops.linear import reorder_meta_mma_fn

    fn = reorder_meta_mma_fn()
    if fn is None:
        pytest.skip("sparse_kernels.ops.mma_layout not present")
    x, values, meta, bias = _problem((5,), 128, 256, torch.float16, "cuda")
    y = sk.sparse_linear(x, values, meta, bias, backend="cuda", meta_dev=fn(meta))
    _check_matmul(y, x, values, meta, bias, "cuda+meta_dev")



# ---------------------------------------------------------------- Triton: compile for real GPUs
def _gpu_compile(fn, sig, consts, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


def require_triton_gpu_compiler(arch):
    """Skip unless this triton can lower a kernel to CUDA code for sm_<arch> (not under the
    interpreter, whose ``triton.jit`` returns functions ``triton.compile`` cannot take)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _probe(p):
        tl.store(p, 1.0)

    try:
        _gpu_compile(_probe, {"p": "*fp32"}, {}, arch)
    except Exception as e:  # noqa: BLE001 -- no CUDA toolchain in this triton: nothing to check
        pytest.skip(f"triton cannot compile for CUDA here: {type(e).__name__}: {e}")


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    """No GPU needed: lower the Triton kernels to PTX/cubin for sm_80/sm_90 (catches shape and
    type errors the interpreter does not, e.g. tl.dot tile constraints)."""
    require_triton_gpu_compiler(arch)
    from sparse_kernels.triton import linear as T

    i32 = "i32"
    for dt, bm, bn, bk in (("*fp16", 16, 64, 128), ("*bf16", 128, 128, 64), ("*fp32", 16, 32, 64)):
        sig = dict(x_ptr=dt, v_ptr=dt, meta_ptr="*i16", bias_ptr=dt, y_ptr=dt, M=i32, N=i32, K=i32, M_BUCKET=i32,
                   **{s: i32 for s in ("sxm", "sxk", "svn", "svk", "smn", "smk", "sym", "syn")},
                   **{c: "constexpr" for c in ("HAS_BIAS", "IEEE", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")})
        consts = dict(HAS_BIAS=True, IEEE=dt == "*fp32", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        _gpu_compile(T._sparse_linear_kernel, sig, consts, arch)
    dt = "*bf16"
    sig = dict(x_ptr=dt, w_ptr=dt, mask_ptr="*u8", bias_ptr=dt, y_ptr=dt, M=i32, N=i32, K=i32, M_BUCKET=i32,
               **{s: i32 for s in ("sxm", "sxk", "swn", "swk", "smn", "sym", "syn")},
               **{c: "constexpr" for c in ("HAS_BIAS", "PACKED", "IEEE", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")})
    _gpu_compile(T._masked_linear_kernel, sig, dict(HAS_BIAS=True, PACKED=True, IEEE=False, UPCAST=False,
                                                     BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), arch)
    bwd = {c: "constexpr" for c in ("PACKED", "IEEE", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
    bwd_consts = dict(PACKED=True, IEEE=False, UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    sig = dict(gy_ptr=dt, w_ptr=dt, mask_ptr="*u8", gx_ptr=dt, M=i32, N=i32, K=i32, M_BUCKET=i32,
               **{s: i32 for s in ("sgm", "sgn", "swn", "swk", "smn", "sxm", "sxk")}, **bwd)
    _gpu_compile(T._grad_x_kernel, sig, bwd_consts, arch)
    sig = dict(gy_ptr=dt, x_ptr=dt, mask_ptr="*u8", gw_ptr=dt, M=i32, N=i32, K=i32, M_BUCKET=i32,
               **{s: i32 for s in ("sgm", "sgn", "sxm", "sxk", "smn", "swn", "swk")}, **bwd)
    _gpu_compile(T._grad_w_kernel, sig, bwd_consts, arch)
