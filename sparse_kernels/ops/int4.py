"""2:4 int4 weights: ``sparse_linear_int4`` and the (de)compressors.

Format and math: :mod:`sparse_kernels.reference.int4`.  Backends of ``sparse_linear_int4``:
reference (dequantize all of W to float32, then ``F.linear``), cpp (csrc/cpu/int4.cpp: per block
of 16 output rows it dequantizes the codes into an in-cache float32 values buffer and runs the
2:4 row kernels of csrc/cpu/linear_kernels.h on it: the dense weight is never formed and the
memory traffic is the int4 codes, the meta and the scales), triton (sparse_kernels/triton/int4.py:
codes, meta and scales loaded per tile, dequantized and expanded in registers).
Autograd: grads for x and bias (the quantized weight is frozen).
"""

from __future__ import annotations

import math

import torch

from ..reference import int4 as ref
from . import _registry as R
from . import _validate as V

_TRITON_DEVICES = ["cuda"] + (["cpu"] if R.triton_interpreted() else [])

# auto: cpp on CPU (the reference dequantizes all of W on every call), the reference elsewhere
# (Triton's kernel is compiled, not yet run on a GPU, so it is taken only when asked for).
_auto = R.cpp_on_cpu


def _fake(x, qvalues, meta, scales, bias):
    return x.new_empty(x.shape[0], qvalues.shape[0])


R.define("sparse_linear_int4", "(Tensor x, Tensor qvalues, Tensor meta, Tensor scales, Tensor? bias) -> Tensor",
         fake=_fake, reference=ref.sparse_linear_int4, backends=("reference", "cpp", "triton"), auto=_auto)


def _launch(x, qvalues, meta, scales, bias):
    from ..triton import int4 as t
    from ..triton import on_device

    with on_device(x):
        return t.sparse_linear_int4(x, qvalues, meta, scales, bias)


R.impl_python("sparse_linear_int4", "triton", _launch, _TRITON_DEVICES)


def _setup(ctx, inputs, output):
    x, qvalues, meta, scales, bias = inputs
    ctx.save_for_backward(qvalues, meta, scales)
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _backward(ctx, grad_y):
    qvalues, meta, scales = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = (grad_y.to(torch.float32) @ ref.decompress_2to4_int4(qvalues, meta, scales)).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad_y.sum(0)
    return gx, None, None, None, gb


R.register_autograd("sparse_linear_int4", _backward, _setup)


def check_int4(qvalues, meta, scales) -> int:
    """Shapes, dtypes and devices of a 2:4 int4 weight; returns its group size (ValueError or
    TypeError naming the argument)."""
    V.tensor("qvalues", qvalues, ndim=2, dtypes=(torch.uint8,))
    V.tensor("scales", scales, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("meta", meta, ndim=2, dtypes=(torch.int16,))
    n, k = qvalues.shape[0], 4 * qvalues.shape[1]
    if k % 16:
        raise ValueError(f"qvalues: shape {tuple(qvalues.shape)} holds {k} columns; the 2:4 int4 format needs a "
                         f"multiple of 16 (qvalues [N, K/4])")
    if tuple(meta.shape) != (n, k // 16):
        raise ValueError(f"meta: shape {tuple(meta.shape)} does not fit qvalues {tuple(qvalues.shape)}; expected "
                         f"({n}, {k // 16})")
    g = scales.shape[1]
    if scales.shape[0] != n or g == 0 or k % g or (k // g) % 16:
        raise ValueError(f"scales: shape {tuple(scales.shape)} does not fit a [{n}, {k}] weight; expected ({n}, "
                         f"K/G) with the group size G a multiple of 16 dividing K={k}")
    V.same_device(qvalues=qvalues, meta=meta, scales=scales)
    return k // g


def compress_2to4_int4(w: torch.Tensor, group_size: int = 128, *, prune: bool = False):
    """``W [N, K]`` (2:4, or any with ``prune=True``) -> ``(qvalues, meta, scales)``: the 2:4
    compression, then round-to-nearest symmetric int4 of the kept values in groups of
    ``group_size`` input columns (a multiple of 16 dividing K; ``group_size=K``: per row), scales
    in W's dtype.  :func:`decompress_2to4_int4` gives the rounded weight back."""
    from .sparse24 import compress_2to4

    V.tensor("w", w, ndim=2, dtypes=V.FLOAT_DTYPES)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
    k = w.shape[1]
    if group_size <= 0 or group_size % 16 or k % group_size:
        raise ValueError(f"group_size: got {group_size}; it must be a positive multiple of 16 that divides the "
                         f"{k} input columns")
    values, meta = compress_2to4(w, prune=prune)
    qvalues, scales = ref.quantize_values(values, group_size)
    return qvalues, meta, scales


def decompress_2to4_int4(qvalues, meta, scales, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight of a 2:4 int4 one, in ``dtype`` (float32: exact)."""
    check_int4(qvalues, meta, scales)
    return ref.decompress_2to4_int4(qvalues, meta, scales, dtype)  # ValueError for corrupt meta nibbles


def sparse_linear_int4(x, qvalues, meta, scales, bias=None, *, backend=None):
    """``y = x @ W^T + bias`` for a 2:4 int4 ``W [N, K]`` (:mod:`sparse_kernels.reference.int4`).

    Args:
        x: ``[..., K]`` float16/bfloat16/float32 (leading dims flattened and restored).
        qvalues, meta, scales: from :func:`compress_2to4_int4` (scales in any float dtype).
        bias: ``[N]`` in x's dtype, or None.
        backend: ``auto | reference | cpp | triton``.

    Returns ``[..., N]`` in x's dtype, with fp32 accumulation.  The weight is exact (``q * scale``
    in fp32) in the reference, Triton with fp32/fp16 x, and cpp with fp32 x or with bf16 x at
    batch <= 4 (the fused kernel, G a multiple of 64 or 16 / 32); otherwise (bf16 x at larger
    batch, Triton with bf16 x) it is rounded to x's dtype first, as torch's own bf16 matmul of
    the dequantized weight would round it.  Raises
    ValueError/TypeError for mismatched shapes, dtypes or devices (naming the argument).
    """
    V.tensor("x", x, min_ndim=1, dtypes=V.FLOAT_DTYPES)
    check_int4(qvalues, meta, scales)
    n, k = qvalues.shape[0], 4 * qvalues.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim is {x.shape[-1]} but the weight has {k} input features")
    V.bias(bias, n, x)
    V.same_device(x=x, qvalues=qvalues)
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    # auto (cpp on CPU, else the reference) reads no shape: nothing symbolic reaches the choice under compile
    y = R.call("sparse_linear_int4", backend, x2.device, x2, qvalues, meta, scales, bias)
    return y.reshape(*x.shape[:-1], n)
