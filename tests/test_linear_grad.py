"""Backward ops of the linear family: masked_linear_grad_x/_w, sparse_linear_grad_x/_values.

Every cpp kernel against the reference and an fp64 result (both of its paths, the AVX-512 and the
plain build of the direct loops), exact zeros where the mask is off, the autograd wiring (the
backward runs the forward's backend), opcheck, and the kernels' own argument checks.
"""

from __future__ import annotations

import pytest
import torch

import sparse_kernels as sk
from sparse_kernels.ops import _registry as R
from sparse_kernels.ops import linear as L
from sparse_kernels.reference import linear as ref
from conftest import assert_bitexact, assert_matmul_close, skip_unless_backend

OPS = torch.ops.sparse_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K): batch 1, odd M and N, K % 16 != 0 (masked only), N over one 256-row GEMM block,
# K over one 256-column tile, M over one 16-row tile.
MASKED_SHAPES = [(1, 7, 13), (5, 33, 100), (17, 70, 272), (3, 300, 40)]
SPARSE_SHAPES = [(1, 8, 16), (5, 37, 48), (17, 70, 272), (3, 300, 64)]
PATHS = {"direct": str(1 << 40), "gemm": "1"}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _poison(nbytes):
    """Fill freed CPU allocations of about this size with 0xFF (NaN in every float dtype), so an
    output element a kernel never writes shows up as NaN instead of a lucky zero."""
    bufs = [torch.full((max(nbytes, 1),), 255, dtype=torch.uint8) for _ in range(4)]
    del bufs


def _noncontig(t):
    """The same values in a transposed (non-contiguous) layout."""
    out = t.T.contiguous().T
    assert not out.is_contiguous() or min(t.shape) <= 1
    return out


def _masked(m, n, k, dtype, packed, seed=0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = torch.rand(n, k, generator=g) < 0.4
    gy = torch.randn(m, n, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    return gy, x, w, (sk.pack_mask(keep) if packed else keep), keep


def _sparse(m, n, k, dtype, seed=0):
    g = _gen(seed)
    values, meta = sk.compress_2to4(torch.randn(n, k, generator=g).to(dtype), prune=True)
    gy = torch.randn(m, n, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    return gy, x, values, meta


def _env(monkeypatch, path, isa):
    monkeypatch.setenv("SPARSE_KERNELS_CPU_GEMM_MIN_M", PATHS[path])
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)


# ---------------------------------------------------------------- masked_linear grads
@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_grads_cpp_vs_reference(dtype, packed, path, isa, monkeypatch):
    skip_unless_backend("masked_linear_grad_x", "cpp", "cpu")
    _env(monkeypatch, path, isa)
    for i, (m, n, k) in enumerate(MASKED_SHAPES):
        gy, x, w, mask, keep = _masked(m, n, k, dtype, packed, seed=i)
        gyn, xn, wn = _noncontig(gy), _noncontig(x), _noncontig(w)
        wm = torch.where(keep, w, torch.zeros((), dtype=dtype))
        tag = f"{dtype}/{'packed' if packed else 'bool'}/{path}/{isa}/{(m, n, k)}"

        _poison(m * k * 4)
        gx = OPS.masked_linear_grad_x_cpp(gyn, wn, mask)
        assert gx.shape == (m, k) and gx.dtype == dtype
        assert_matmul_close(gx, gy.double() @ wm.double(), OPS.masked_linear_grad_x(gy, w, mask), f"grad_x {tag}")

        _poison(n * k * 4)
        gw = OPS.masked_linear_grad_w_cpp(gyn, xn, wn, mask)
        assert gw.shape == (n, k) and gw.dtype == dtype
        exact = (gy.double().T @ x.double()) * keep
        assert_matmul_close(gw, exact, OPS.masked_linear_grad_w(gy, x, w, mask), f"grad_w {tag}")
        # masked-out entries are exact +0.0 (bit pattern 0), whatever the product there
        assert_bitexact(gw[~keep], torch.zeros(int((~keep).sum()), dtype=dtype), f"grad_w zeros {tag}")


@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_grads_cpp_special_masks(dtype, path, monkeypatch):
    """All-false and all-true masks; a weight full of NaN where the mask is off never leaks."""
    skip_unless_backend("masked_linear_grad_x", "cpp", "cpu")
    _env(monkeypatch, path, "avx512")
    gy, x, w, _, keep = _masked(9, 20, 37, dtype, False, seed=3)
    w = torch.where(keep, w, torch.full((), float("nan"), dtype=dtype))
    for mask in (keep, sk.pack_mask(keep)):
        gx = OPS.masked_linear_grad_x_cpp(gy, w, mask)
        assert not gx.isnan().any()
    none = torch.zeros_like(keep)
    assert_bitexact(OPS.masked_linear_grad_w_cpp(gy, x, w, none), torch.zeros(20, 37, dtype=dtype), "all-false grad_w")
    assert_bitexact(OPS.masked_linear_grad_x_cpp(gy, w, none), torch.zeros(9, 37, dtype=dtype), "all-false grad_x")
    ones = torch.ones_like(keep)
    w1 = torch.randn(20, 37, generator=_gen(4)).to(dtype)
    gx = OPS.masked_linear_grad_x_cpp(gy, w1, sk.pack_mask(ones))
    assert_matmul_close(gx, gy.double() @ w1.double(), gy @ w1, "all-true grad_x")


@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_cpp_long_batch_accumulates_in_fp32(dtype, path, monkeypatch):
    """M = 3000 summed into each grad_W / grad_values entry: a low-precision accumulator fails this."""
    skip_unless_backend("masked_linear_grad_w", "cpp", "cpu")
    _env(monkeypatch, path, "avx512")
    gy, x, w, mask, keep = _masked(3000, 12, 32, dtype, True, seed=5)
    gw = OPS.masked_linear_grad_w_cpp(gy, x, w, mask)
    assert_matmul_close(gw, (gy.double().T @ x.double()) * keep, OPS.masked_linear_grad_w(gy, x, w, mask), "grad_w")
    gy, x, values, meta = _sparse(3000, 12, 32, dtype, seed=5)
    gv = OPS.sparse_linear_grad_values_cpp(gy, x, meta)
    exact = (gy.double().T @ x.double()).gather(1, ref.kept_columns(meta))
    assert_matmul_close(gv, exact, OPS.sparse_linear_grad_values(gy, x, meta), "grad_values")


# ---------------------------------------------------------------- sparse_linear grads
@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_grads_cpp_vs_reference(dtype, path, isa, monkeypatch):
    skip_unless_backend("sparse_linear_grad_x", "cpp", "cpu")
    _env(monkeypatch, path, isa)
    for i, (m, n, k) in enumerate(SPARSE_SHAPES):
        gy, x, values, meta = _sparse(m, n, k, dtype, seed=10 + i)
        w = sk.decompress_2to4(values, meta)
        tag = f"{dtype}/{path}/{isa}/{(m, n, k)}"

        _poison(m * k * 4)
        gx = OPS.sparse_linear_grad_x_cpp(_noncontig(gy), _noncontig(values), meta)
        assert gx.shape == (m, k) and gx.dtype == dtype
        assert_matmul_close(gx, gy.double() @ w.double(), OPS.sparse_linear_grad_x(gy, values, meta), f"grad_x {tag}")

        _poison(n * k * 2)
        gv = OPS.sparse_linear_grad_values_cpp(_noncontig(gy), _noncontig(x), meta)
        assert gv.shape == values.shape and gv.dtype == dtype
        # independent formula: grad_y^T x at the positions where the 2:4 pattern keeps a value
        kept = sk.decompress_2to4(torch.ones_like(values), meta) != 0
        exact = (gy.double().T @ x.double())[kept].reshape(n, k // 2)
        assert_matmul_close(gv, exact, OPS.sparse_linear_grad_values(gy, x, meta), f"grad_values {tag}")


def test_zero_sizes():
    skip_unless_backend("sparse_linear_grad_x", "cpp", "cpu")
    gy, x, w, mask, _ = _masked(0, 6, 20, torch.float32, True)
    assert OPS.masked_linear_grad_x_cpp(gy, w, mask).shape == (0, 20)
    assert_bitexact(OPS.masked_linear_grad_w_cpp(gy, x, w, mask), torch.zeros(6, 20), "M=0 grad_w")
    gy, x, values, meta = _sparse(0, 8, 32, torch.float32)
    assert OPS.sparse_linear_grad_x_cpp(gy, values, meta).shape == (0, 32)
    assert_bitexact(OPS.sparse_linear_grad_values_cpp(gy, x, meta), torch.zeros(8, 16), "M=0 grad_values")


# ---------------------------------------------------------------- autograd end to end
def _record_grad_ops(monkeypatch):
    seen = []
    real = R.get_op

    def get_op(name, backend):
        seen.append((name, backend))
        return real(name, backend)

    monkeypatch.setattr(L.R, "get_op", get_op)
    return seen


def _grads_per_backend(monkeypatch, forward, inputs, gy, grad_ops):
    """``{backend: grads of inputs}`` for cpp and reference, checking each ran its own grad ops."""
    grads = {}
    for backend in ("cpp", "reference"):
        seen = _record_grad_ops(monkeypatch)
        leaves = [t.clone().requires_grad_() for t in inputs]
        forward(*leaves, backend=backend).backward(gy)
        grads[backend] = tuple(t.grad for t in leaves)
        assert all((op, backend) in seen for op in grad_ops), seen
        monkeypatch.undo()
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_linear_autograd_cpp_vs_reference(dtype, monkeypatch):
    skip_unless_backend("masked_linear_grad_x", "cpp", "cpu")
    g = _gen(20)
    x = torch.randn(3, 5, 40, generator=g).to(dtype)
    w = torch.randn(24, 40, generator=g).to(dtype)
    b = torch.randn(24, generator=g).to(dtype)
    keep = torch.rand(24, 40, generator=g) < 0.3
    gy = torch.randn(3, 5, 24, generator=g).to(dtype)
    for mask in (keep, sk.pack_mask(keep)):
        grads = _grads_per_backend(
            monkeypatch, lambda xs, ws, bs, backend: sk.masked_linear(xs, ws, mask, bs, backend=backend),
            (x, w, b), gy, ("masked_linear_grad_x", "masked_linear_grad_w"))
        gy2, x2 = gy.reshape(-1, 24).double(), x.reshape(-1, 40).double()
        wm = torch.where(keep, w, torch.zeros((), dtype=dtype)).double()
        assert_matmul_close(grads["cpp"][0], (gy2 @ wm).reshape(3, 5, 40), grads["reference"][0], "grad x")
        assert_matmul_close(grads["cpp"][1], (gy2.T @ x2) * keep, grads["reference"][1], "grad w")
        assert_bitexact(grads["cpp"][1][~keep], torch.zeros(int((~keep).sum()), dtype=dtype), "grad w zeros")
        assert_matmul_close(grads["cpp"][2], gy2.sum(0), grads["reference"][2], "grad bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_autograd_cpp_vs_reference(dtype, monkeypatch):
    skip_unless_backend("sparse_linear_grad_x", "cpp", "cpu")
    g = _gen(21)
    values, meta = sk.compress_2to4(torch.randn(24, 48, generator=g).to(dtype), prune=True)
    x = torch.randn(2, 7, 48, generator=g).to(dtype)
    b = torch.randn(24, generator=g).to(dtype)
    gy = torch.randn(2, 7, 24, generator=g).to(dtype)
    grads = _grads_per_backend(
        monkeypatch, lambda xs, vs, bs, backend: sk.sparse_linear(xs, vs, meta, bs, backend=backend),
        (x, values, b), gy, ("sparse_linear_grad_x", "sparse_linear_grad_values"))
    gy2, x2 = gy.reshape(-1, 24).double(), x.reshape(-1, 48).double()
    w = sk.decompress_2to4(values, meta).double()
    assert_matmul_close(grads["cpp"][0], (gy2 @ w).reshape(2, 7, 48), grads["reference"][0], "grad x")
    gv = (gy2.T @ x2).gather(1, ref.kept_columns(meta))
    assert_matmul_close(grads["cpp"][1], gv, grads["reference"][1], "grad values")
    assert_matmul_close(grads["cpp"][2], gy2.sum(0), grads["reference"][2], "grad bias")


def test_sparse_linear_backward_without_grad_ops_falls_back(monkeypatch):
    """A backend without grad ops (here: a pretend one) runs the reference grads."""
    assert L._grad_backend("sparse_linear_grad_x", "cusparselt", torch.device("cpu")) == "reference"
    assert L._grad_backend("masked_linear_grad_x", "triton", torch.device("meta")) == "reference"


def test_sparse_linear_gradcheck_fp64_reference_grad_ops():
    gy, x, values, meta = _sparse(3, 8, 32, torch.float32, seed=22)  # compress_2to4 takes fp16/bf16/fp32
    xs, vs = x.double().requires_grad_(), values.double().requires_grad_()
    torch.autograd.gradcheck(lambda a, v: OPS.sparse_linear(a, v, meta, None, None), (xs, vs))


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    gy, x, w, mask, _ = _masked(5, 24, 40, torch.float32, True, seed=30)
    sgy, sx, values, meta = _sparse(5, 24, 32, torch.float32, seed=31)
    return {
        "masked_linear_grad_x": [(gy, w, mask), (gy, w, sk.unpack_mask(mask, 40))],
        "masked_linear_grad_w": [(gy, x, w, mask)],
        "sparse_linear_grad_x": [(sgy, values, meta)],
        "sparse_linear_grad_values": [(sgy, sx, meta)],
    }


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("op", ["masked_linear_grad_x", "masked_linear_grad_w", "sparse_linear_grad_x",
                                "sparse_linear_grad_values"])
def test_opcheck(op, backend):
    skip_unless_backend(op, backend, "cpu")
    for args in _opcheck_cases()[op]:
        torch.library.opcheck(R.get_op(op, backend), args)


# ---------------------------------------------------------------- bad inputs
def test_errors_cpp_masked_grads():
    skip_unless_backend("masked_linear_grad_x", "cpp", "cpu")
    gy, x, w, mask, keep = _masked(4, 6, 20, torch.float32, True)
    with pytest.raises(ValueError, match="grad_y: last dim is 5 but the weight has 6 output features"):
        OPS.masked_linear_grad_x_cpp(gy[:, :5], w, mask)
    with pytest.raises(ValueError, match="grad_y: expected a 2-D tensor"):
        OPS.masked_linear_grad_x_cpp(gy[0], w, mask)
    with pytest.raises(TypeError, match="weight: dtype BFloat16 does not match grad_y's dtype Float"):
        OPS.masked_linear_grad_x_cpp(gy, w.bfloat16(), mask)
    with pytest.raises(TypeError, match="grad_y: dtype Double is not supported"):
        OPS.masked_linear_grad_x_cpp(gy.double(), w.double(), mask)
    with pytest.raises(ValueError, match=r"mask: expected shape \(6, 3\), got \[6, 2\]"):
        OPS.masked_linear_grad_x_cpp(gy, w, mask[:, :2])
    with pytest.raises(ValueError, match=r"mask: expected shape \(6, 20\), got \[6, 19\]"):
        OPS.masked_linear_grad_w_cpp(gy, x, w, keep[:, :19])
    with pytest.raises(TypeError, match="mask: dtype Int is not supported"):
        OPS.masked_linear_grad_w_cpp(gy, x, w, keep.int())
    with pytest.raises(ValueError, match="x: has 3 rows but grad_y has 4"):
        OPS.masked_linear_grad_w_cpp(gy, x[:3], w, mask)
    with pytest.raises(ValueError, match="x: last dim is 19 but weight has 20 input features"):
        OPS.masked_linear_grad_w_cpp(gy, x[:, :19], w, mask)
    with pytest.raises(TypeError, match="x: dtype Half does not match grad_y's dtype Float"):
        OPS.masked_linear_grad_w_cpp(gy, x.half(), w, mask)


def test_errors_cpp_sparse_grads():
    skip_unless_backend("sparse_linear_grad_x", "cpp", "cpu")
    gy, x, values, meta = _sparse(4, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="grad_y: last dim is 7 but the weight has 8 output features"):
        OPS.sparse_linear_grad_x_cpp(gy[:, :7], values, meta)
    with pytest.raises(ValueError, match="values: the number of columns must be a multiple of 8"):
        OPS.sparse_linear_grad_x_cpp(gy, values[:, :12], meta)
    with pytest.raises(TypeError, match="meta: dtype Int is not supported; expected int16"):
        OPS.sparse_linear_grad_x_cpp(gy, values, meta.int())
    with pytest.raises(ValueError, match=r"meta: expected shape \(8, 2\), got \[4, 2\]"):
        OPS.sparse_linear_grad_x_cpp(gy, values, meta[:4])
    with pytest.raises(TypeError, match="values: dtype Half does not match grad_y's dtype Float"):
        OPS.sparse_linear_grad_x_cpp(gy, values.half(), meta)
    with pytest.raises(ValueError, match="x: last dim is 16 but the 2:4 weight"):
        OPS.sparse_linear_grad_values_cpp(gy, x[:, :16], meta)
    with pytest.raises(ValueError, match="x: has 2 rows but grad_y has 4"):
        OPS.sparse_linear_grad_values_cpp(gy, x[:2], meta)
    with pytest.raises(ValueError, match="meta: expected a 2-D tensor"):
        OPS.sparse_linear_grad_values_cpp(gy, x, meta[0])
