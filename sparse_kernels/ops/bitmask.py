"""The bitmask format for unstructured sparse weights: ``bitmask_linear`` and the (de)compressors.

Format and math: :mod:`sparse_kernels.reference.bitmask`.  Backends of ``bitmask_linear``:
reference (decompress, then ``F.linear``: cuBLAS on CUDA, the CPU BLAS) and cpp
(csrc/cpu/bitmask.cpp: reads the values and the bitmask directly, never the dense weight).
Autograd: grads for x, values (the pattern fixed: ``grad_y^T x`` at the stored positions) and bias.
"""

from __future__ import annotations

import math

import torch

from ..reference import bitmask as ref
from . import _registry as R
from . import _validate as V

# auto: the cpp kernel on CPU (it reads the compressed weight, never forming the dense one; the
# reference decompresses by boolean indexing, far slower on CPU), the reference elsewhere (on CUDA:
# decompress, then cuBLAS).  Measured against dense F.linear: benchmarks/bench_bitmask.py
# (results/cpu/bench_bitmask_cpu.csv; bf16 from batch 9 the cpp kernel's GEMM path:
# results/cpu/bench_bitmask_cpu_bf16_gemm.csv, 0.61-0.65x of dense at batch 16, 0.79-0.81x at 64).
_auto = R.cpp_on_cpu


def _fake(x, values, bitmask, row_ptr, bias):
    return x.new_empty(x.shape[0], bitmask.shape[0])


R.define("bitmask_linear", "(Tensor x, Tensor values, Tensor bitmask, Tensor row_ptr, Tensor? bias) -> Tensor",
         fake=_fake, reference=ref.bitmask_linear, backends=("reference", "cpp"), auto=_auto)


def _setup(ctx, inputs, output):
    x, values, bitmask, row_ptr, bias = inputs
    ctx.save_for_backward(x, values, bitmask, row_ptr)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, values, bitmask, row_ptr = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gv = ref.bitmask_linear_backward(grad_y, x, values, bitmask, row_ptr, need_x, need_v)
    gb = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return gx, gv, None, None, gb


R.register_autograd("bitmask_linear", _backward, _setup)


def check_bitmask(values, bitmask, row_ptr, cols=None):
    """Shapes and dtypes of a bitmask-stored weight (ValueError/TypeError naming the argument).
    The popcounts against ``row_ptr`` are checked by the kernels (cpp) or :func:`decompress_bitmask`."""
    V.tensor("values", values, ndim=1, dtypes=V.FLOAT_DTYPES)
    V.tensor("bitmask", bitmask, ndim=2, dtypes=(torch.uint8,))
    V.tensor("row_ptr", row_ptr, ndim=1, dtypes=(torch.int64,))
    if row_ptr.shape[0] != bitmask.shape[0] + 1:
        raise ValueError(f"row_ptr: shape {tuple(row_ptr.shape)} does not fit a bitmask of {bitmask.shape[0]} rows; "
                         f"expected ({bitmask.shape[0] + 1},)")
    if cols is not None and bitmask.shape[1] != (cols + 7) // 8:
        raise ValueError(f"bitmask: shape {tuple(bitmask.shape)} does not hold {cols} columns; expected "
                         f"({bitmask.shape[0]}, {(cols + 7) // 8})")
    V.same_device(values=values, bitmask=bitmask, row_ptr=row_ptr)


def compress_bitmask(w: torch.Tensor, mask: torch.Tensor | None = None):
    """``W [N, K]`` (any pattern of zeros) -> ``(values, bitmask, row_ptr)``; see
    :mod:`sparse_kernels.reference.bitmask`.  ``mask``: bool ``[N, K]``, the elements to store
    (default ``W != 0``)."""
    V.tensor("w", w, ndim=2, dtypes=V.FLOAT_DTYPES)
    if mask is not None:
        V.tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
        if mask.shape != w.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} must equal w's {tuple(w.shape)}")
        V.same_device(w=w, mask=mask)
    return ref.compress_bitmask(w, mask)


def _check_rows(values, bitmask, row_ptr, cols: int) -> None:
    """row_ptr runs from 0 to values.numel(), no bit is set past ``cols`` and every row's popcount
    equals its span: what the cpp kernel checks (same messages) before it reads a row's values."""
    from ..reference.linear import unpack_mask

    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != values.shape[0]:
        raise ValueError(f"row_ptr: must run from 0 to values.numel() = {values.shape[0]}, got "
                         f"{int(row_ptr[0])} .. {int(row_ptr[-1])}")
    full = unpack_mask(bitmask, bitmask.shape[1] * 8)
    if full[:, cols:].any():
        raise ValueError(f"bitmask: bits are set past column {cols} (the padding bits must be zero)")
    counts = full.sum(1)
    spans = row_ptr[1:] - row_ptr[:-1]
    if not torch.equal(counts, spans):
        raise ValueError("bitmask: its rows' popcounts do not match row_ptr (or row_ptr does not run from 0 to "
                         f"values.numel() = {values.shape[0]}); the three tensors do not describe one weight")


def decompress_bitmask(values, bitmask, row_ptr, cols: int) -> torch.Tensor:
    """The dense ``[N, cols]`` weight of a bitmask-stored one (zeros where no bit is set).  Raises
    ValueError when the bitmask's popcounts disagree with ``row_ptr`` or bits past ``cols`` are set."""
    check_bitmask(values, bitmask, row_ptr, cols)
    _check_rows(values, bitmask, row_ptr, cols)
    return ref.decompress_bitmask(values, bitmask, row_ptr, cols)


def bitmask_linear(x, values, bitmask, row_ptr, bias=None, *, backend=None):
    """``y = x @ W^T + bias`` for a bitmask-stored unstructured sparse ``W [N, K]``.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32 (leading dims flattened and restored).
        values, bitmask, row_ptr: from :func:`compress_bitmask`; values in x's dtype.
        bias: ``[N]`` in x's dtype, or None.
        backend: ``auto | reference | cpp``.

    Returns ``[..., N]`` in x's dtype (fp32 accumulation).  Raises ValueError/TypeError for
    mismatched shapes, dtypes or devices (naming the argument), and ValueError when the bitmask
    and row_ptr disagree.
    """
    V.tensor("x", x, min_ndim=1, dtypes=V.FLOAT_DTYPES)
    check_bitmask(values, bitmask, row_ptr, x.shape[-1])
    if values.dtype != x.dtype:
        raise TypeError(f"values: dtype {values.dtype} does not match x's dtype {x.dtype}; cast one of them")
    n = bitmask.shape[0]
    V.bias(bias, n, x)
    V.same_device(x=x, values=values)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1, 0) would be ambiguous for K == 0
    b = R.choose("bitmask_linear", backend, x2.device)  # its auto rule reads no shape (compile-safe)
    if b != "cpp":  # the cpp kernel makes the same checks itself, before it reads a row's values
        _check_rows(values, bitmask, row_ptr, x.shape[-1])
    y = R.get_op("bitmask_linear", b)(x2, values, bitmask, row_ptr, bias)
    return y.reshape(*x.shape[:-1], n)
