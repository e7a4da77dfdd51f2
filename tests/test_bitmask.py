"""The bitmask format for unstructured sparse weights: compress/decompress and ``bitmask_linear``.

cpp (both the AVX-512 and the scalar path) against the reference and float64 on random data with
odd shapes, empty and full rows, NaN; bad inputs (including bitmasks that disagree with row_ptr,
which the kernel must reject before reading values); opcheck; autograd.
"""

from __future__ import annotations

import pytest
import torch

import sparse_kernels as sk
from conftest import assert_bitexact, assert_close, assert_matmul_close, skip_unless_backend

OPS = torch.ops.sparse_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(n, k, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = torch.where(torch.rand(n, k, generator=g) < sparsity, torch.zeros(()), w)
    if n > 2:
        w[0] = 0.0  # an empty row
        w[1] = torch.randn(k, generator=g)  # a full row
    return w.to(dtype)


SHAPES = [(1, 1, 7), (3, 37, 100), (5, 64, 64), (9, 130, 129), (2, 17, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.93])
def test_compress_decompress_round_trip(dtype, sparsity):
    w = _weight(41, 77, sparsity, dtype, seed=1)
    w[5, 3] = float("nan")
    w[6, 4] = -0.0  # stored as zero (an equal value)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    assert values.dtype == dtype and bitmask.shape == (41, 10) and row_ptr.shape == (42,)
    assert int(row_ptr[-1]) == values.numel() == int((w != 0).sum())
    back = sk.decompress_bitmask(values, bitmask, row_ptr, 77)
    assert_bitexact(back, torch.where(w == 0, torch.zeros((), dtype=dtype), w), "round trip")
    mask = torch.rand(41, 77) < 0.3  # an explicit mask keeps exactly those elements, zeros included
    v2, b2, r2 = sk.compress_bitmask(w, mask)
    assert v2.numel() == int(mask.sum())
    assert_bitexact(sk.decompress_bitmask(v2, b2, r2, 77) != 0, mask & (w != 0), "explicit mask")


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cpp_matches_reference(m, n, k, dtype, isa, monkeypatch):
    skip_unless_backend("bitmask_linear", "cpp", "cpu")
    monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)
    w = _weight(n, k, 0.6, dtype, seed=m * 7 + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    for bias in (b, None):
        y = sk.bitmask_linear(x, values, bitmask, row_ptr, bias, backend="cpp")
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        lowp = torch.nn.functional.linear(x, w, bias)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_matmul_close(y, exact, lowp, f"cpp/{isa} {dtype} {m}x{n}x{k}")
        ref = sk.bitmask_linear(x, values, bitmask, row_ptr, bias, backend="reference")
        assert_matmul_close(ref, exact, lowp, "reference")


@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (9, 300, 129), (33, 260, 64), (12, 1, 7)])
def test_cpp_bf16_both_paths(path, m, n, k, monkeypatch):
    """bf16 takes a GEMM path from 9 rows of x (rows expanded to a bf16 tile, oneDNN GEMM): both
    paths, forced with SPARSE_KERNELS_CPU_GEMM_MIN_M, against float64 and the reference; more rows
    than one 256-row tile, K not a multiple of 16, with and without bias."""
    skip_unless_backend("bitmask_linear", "cpp", "cpu")
    monkeypatch.setenv("SPARSE_KERNELS_CPU_GEMM_MIN_M", "1" if path == "gemm" else "1000000000")
    w = _weight(n, k, 0.6, torch.bfloat16, seed=m + n + k)
    g = torch.Generator().manual_seed(k + 1)
    x = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    for bias in (b, None):
        y = sk.bitmask_linear(x, values, bitmask, row_ptr, bias, backend="cpp")
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert_matmul_close(y, exact, torch.nn.functional.linear(x, w, bias), f"cpp {path} bf16 {m}x{n}x{k}")
    moved = row_ptr.clone()
    if n > 4:
        moved[4] += 1  # rows 3 and 4 disagree with the bitmask: rejected before any value is read
        with pytest.raises(ValueError, match="bitmask: row 3 has .* bits set but row_ptr gives it"):
            sk.bitmask_linear(x, values, bitmask, moved, backend="cpp")


def test_leading_dims_batch_one_and_empty():
    w = _weight(24, 48, 0.5, torch.float32, seed=3)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    x = torch.randn(2, 3, 48)
    assert_close(sk.bitmask_linear(x, values, bitmask, row_ptr), x @ w.T, "leading dims")
    assert sk.bitmask_linear(x[:0], values, bitmask, row_ptr).shape == (0, 3, 24)
    empty = sk.compress_bitmask(torch.zeros(8, 16))
    assert_bitexact(sk.bitmask_linear(torch.randn(2, 16), *empty), torch.zeros(2, 8), "all-zero weight")


def test_nan_weight_propagates():
    w = _weight(6, 32, 0.5, torch.float32, seed=4)
    w[2, 5] = float("nan")
    x = torch.randn(3, 32)
    for b in ("reference", "cpp"):
        skip_unless_backend("bitmask_linear", b, "cpu")
        y = sk.bitmask_linear(x, *sk.compress_bitmask(w), backend=b)
        assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, 3, 4, 5]]).any(), b


def test_errors():
    w = _weight(10, 40, 0.5, torch.float32, seed=5)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="bitmask: shape .* does not hold 41 columns"):
        sk.bitmask_linear(torch.randn(2, 41), values, bitmask, row_ptr)
    with pytest.raises(TypeError, match="values: dtype torch.float16 does not match x's dtype"):
        sk.bitmask_linear(x, values.half(), bitmask, row_ptr)
    with pytest.raises(TypeError, match="row_ptr: dtype int32 is not supported"):
        sk.bitmask_linear(x, values, bitmask, row_ptr.int())
    with pytest.raises(ValueError, match=r"row_ptr: shape \(10,\) does not fit a bitmask of 10 rows"):
        sk.bitmask_linear(x, values, bitmask, row_ptr[:-1])
    with pytest.raises(ValueError, match="row_ptr: must run from 0 to values.numel()"):
        sk.bitmask_linear(x, values[:-1], bitmask, row_ptr)
    with pytest.raises(ValueError, match=r"bias: shape \(9,\) does not match the 10 output features"):
        sk.bitmask_linear(x, values, bitmask, row_ptr, torch.zeros(9))
    with pytest.raises(ValueError, match="mask: shape"):
        sk.compress_bitmask(w, torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_inconsistent_bitmask_is_rejected(backend):
    """A bitmask whose rows disagree with row_ptr (same total), and set padding bits: a ValueError
    before any value is read (cpp) or from the decompression (reference), never a wrong answer."""
    skip_unless_backend("bitmask_linear", backend, "cpu")
    w = _weight(10, 40, 0.5, torch.float32, seed=6)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    x = torch.randn(2, 40)
    moved = row_ptr.clone()
    moved[4] += 1  # row 3 one longer, row 4 one shorter: the total still matches
    msg = "bitmask: row 3 has .* bits set but row_ptr gives it" if backend == "cpp" else "popcounts do not match"
    with pytest.raises(ValueError, match=msg):
        sk.bitmask_linear(x, values, bitmask, moved, backend=backend)
    if backend == "cpp":  # an empty batch still checks the rows
        with pytest.raises(ValueError, match=msg):
            OPS.bitmask_linear_cpp(x[:0], values, bitmask, moved, None)
    with pytest.raises(ValueError, match="popcounts do not match row_ptr"):
        sk.decompress_bitmask(values, bitmask, moved, 40)
    w37 = _weight(10, 37, 0.5, torch.float32, seed=6)
    v37, b37, r37 = sk.compress_bitmask(w37)
    b37[0, -1] |= 0x80  # column 39 of a 37-column weight
    with pytest.raises(ValueError, match="bits are set past column 37"):
        sk.bitmask_linear(torch.randn(2, 37), v37, b37, r37, backend=backend)
    with pytest.raises(ValueError, match="bits are set past column 37"):
        sk.decompress_bitmask(v37, b37, r37, 37)
    extra = bitmask.clone()
    extra[0, 0] |= 0x01 if not (extra[0, 0] & 1) else 0x02  # one more bit than values holds
    with pytest.raises(ValueError, match="bits|popcount|row 0"):
        sk.bitmask_linear(x, values, extra, row_ptr, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck(backend):
    skip_unless_backend("bitmask_linear", backend, "cpu")
    w = _weight(12, 48, 0.5, torch.float32, seed=7)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    op = OPS.bitmask_linear if backend == "reference" else OPS.bitmask_linear_cpp
    torch.library.opcheck(op.default, (torch.randn(3, 48), values, bitmask, row_ptr, torch.randn(12)))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autograd(backend):
    skip_unless_backend("bitmask_linear", backend, "cpu")
    w = _weight(12, 40, 0.5, torch.float32, seed=8)
    values, bitmask, row_ptr = sk.compress_bitmask(w)
    x = torch.randn(2, 3, 40, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(12, requires_grad=True)
    gy = torch.randn(2, 3, 12)
    sk.bitmask_linear(x, v, bitmask, row_ptr, b, backend=backend).backward(gy)
    wd = w.clone().requires_grad_()
    xd, bd = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(xd, wd, bd).backward(gy)
    assert_close(x.grad, xd.grad, "grad x")
    assert_close(b.grad, bd.grad, "grad bias")
    assert_close(v.grad, wd.grad[w != 0], "grad values = dense grad at the stored positions")


def test_gradcheck_reference_fp64():
    from sparse_kernels.reference import bitmask as ref

    w = _weight(5, 16, 0.5, torch.float64, seed=9)
    values, bitmask, row_ptr = ref.compress_bitmask(w)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, vv, bb: OPS.bitmask_linear(a, vv, bitmask, row_ptr, bb), (x, v, b))


def test_zero_rows_and_columns():
    for shape in [(0, 5), (4, 0), (0, 0)]:
        w = torch.randn(*shape)
        values, bitmask, row_ptr = sk.compress_bitmask(w)
        assert bitmask.shape == (shape[0], (shape[1] + 7) // 8) and row_ptr.shape == (shape[0] + 1,)
        assert sk.decompress_bitmask(values, bitmask, row_ptr, shape[1]).shape == shape
        y = sk.bitmask_linear(torch.randn(3, shape[1]), values, bitmask, row_ptr)
        assert_bitexact(y, torch.zeros(3, shape[0]), f"shape {shape}")
