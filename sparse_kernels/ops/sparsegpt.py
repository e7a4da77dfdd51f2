"""The SparseGPT block op ``sparsegpt_block_update``: one block of the column loop, fused.

Algorithm and conventions: :mod:`sparse_kernels.reference.sparsegpt`.
Backends: reference (the column loop in PyTorch, default everywhere), cpp
(csrc/cpu/sparsegpt.cpp), cuda (csrc/cuda/sparsegpt.cu), triton (sparse_kernels/triton/sparsegpt.py).
They agree to fp32 rounding (not bit for bit: the order of the rank-1 updates differs).
The whole-layer algorithm is :func:`sparse_kernels.pruning.sparsegpt_prune`.

``sparsegpt_block_update_int4`` is the same loop with joint int4 quantization (each kept
weight rounded to a group-scaled int4 value before its error is computed): reference, cpp
(csrc/cpu/sparsegpt.cpp), cuda (csrc/cuda/sparsegpt.cu; compiled, not yet run on a GPU) and
triton; :func:`sparse_kernels.pruning.sparsegpt_prune_int4` runs it.

``sparsegpt_lazy_update(W, Err1, U)`` is the layer's other step, ``W -= Err1 @ U`` in place:
reference (``addmm_``) and cpp (csrc/cpu/sparsegpt.cpp, which skips Err1's zeros).
"""

from __future__ import annotations

import torch

from ..reference import sparsegpt as ref
from . import _registry as R
from . import _validate as V

NAME = "sparsegpt_block_update"
SCHEMA = "(Tensor W1, Tensor Hinv1, Tensor? mask1, int n, int m) -> (Tensor, Tensor, Tensor)"


def _fake(W1, Hinv1, mask1, n, m):
    rows = W1.shape[0]
    return torch.empty_like(W1), torch.empty_like(W1), W1.new_empty(rows)


R.define(NAME, SCHEMA, fake=_fake, reference=ref.sparsegpt_block_update)

INT4_NAME = "sparsegpt_block_update_int4"
INT4_SCHEMA = ("(Tensor W1, Tensor Hinv1, Tensor? mask1, int n, int m, int group_size, ScalarType scale_dtype) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _fake_int4(W1, Hinv1, mask1, n, m, group_size, scale_dtype):
    rows, B = W1.shape
    return (torch.empty_like(W1), torch.empty_like(W1), W1.new_empty(rows), W1.new_empty((rows, B), dtype=torch.bool),
            W1.new_empty((rows, B), dtype=torch.int8), W1.new_empty((rows, B // group_size)))


def _int4_auto(device_type, avail, *args):
    """cpp on CPU; on a GPU Triton before cuda: the Triton kernel is tested bit for bit under the
    interpreter, the CUDA one is compiled, not yet run on a GPU (move cuda first once the GPU
    check's tests pass)."""
    order = ("triton", "cuda") if device_type == "cuda" else ("cpp",)
    return next((b for b in order if b in avail), "reference")


R.define(INT4_NAME, INT4_SCHEMA, fake=_fake_int4, reference=ref.sparsegpt_block_update_int4,
         backends=("reference", "cpp", "cuda", "triton"), auto=_int4_auto)

# The lazy update W[:, later] -= Err1 @ Hinv[block, later], in place.  Reference: one addmm_
# (cuBLAS on GPU, the CPU BLAS); cpp: skips Err1's zeros (err = 0 at every kept weight).
LAZY_NAME = "sparsegpt_lazy_update"
# cpp beats the BLAS when at most this fraction of Err1 is nonzero (the pruned fraction).
# Measured once by hand, 1 thread, dev box (AMD EPYC, MKL sgemm), time of cpp / addmm_ at
# 11008x128 @ 128x3968: 0.68 at 50% nonzero, 1.25 at 100%; 4096x128 @ 128x2048: 0.23 at 10%,
# 0.72 at 50% (bench_sparsegpt's "lazy update" rows: 0.72-0.81 at 50% and 2:4, 2 threads).
LAZY_CPP_MAX_DENSITY = 0.75


def _lazy_auto(device_type, avail, density=0.5):
    return "cpp" if "cpp" in avail and density <= LAZY_CPP_MAX_DENSITY else "reference"


R.define(LAZY_NAME, "(Tensor(a!) W, Tensor Err1, Tensor U) -> ()", fake=lambda W, Err1, U: None,
         reference=ref.sparsegpt_lazy_update, backends=("reference", "cpp"), auto=_lazy_auto)


def _triton_launch(W1, Hinv1, mask1, n, m):
    from ..triton import on_device
    from ..triton import sparsegpt as t

    with on_device(W1):
        return t.sparsegpt_block_update(W1, Hinv1, mask1, n, m)


R.impl_python(NAME, "triton", _triton_launch, ["cuda"] + (["cpu"] if R.triton_interpreted() else []))


def _triton_launch_int4(W1, Hinv1, mask1, n, m, group_size, scale_dtype):
    from ..triton import on_device
    from ..triton import sparsegpt as t

    with on_device(W1):
        return t.sparsegpt_block_update_int4(W1, Hinv1, mask1, n, m, group_size, scale_dtype)


R.impl_python(INT4_NAME, "triton", _triton_launch_int4, ["cuda"] + (["cpu"] if R.triton_interpreted() else []))


def check_block_args(W1, Hinv1, mask1, n, m) -> None:
    V.tensor("W1", W1, ndim=2, dtypes=(torch.float32,))
    V.tensor("Hinv1", Hinv1, ndim=2, dtypes=(torch.float32,))
    rows, B = W1.shape
    if tuple(Hinv1.shape) != (B, B):
        raise ValueError(f"Hinv1: shape {tuple(Hinv1.shape)} must be (B, B) = ({B}, {B}) for W1 {tuple(W1.shape)}")
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if m < 0:
        raise ValueError(f"m: got {m}, expected 0 (use mask1) or a group size M > 0")
    if m == 0:
        if mask1 is None:
            raise ValueError("mask1: is required when m == 0 (unstructured pruning with a given mask)")
        V.tensor("mask1", mask1, ndim=2, dtypes=(torch.bool,))
        if mask1.shape != W1.shape:
            raise ValueError(f"mask1: shape {tuple(mask1.shape)} must equal W1's shape {tuple(W1.shape)}")
        V.same_device(W1=W1, Hinv1=Hinv1, mask1=mask1)
    else:
        if not 0 < n < m:
            raise ValueError(f"n: got n={n}, m={m}; N:M pruning keeps n of every m columns and needs 0 < n < m")
        V.multiple("W1", "the block width (W1.shape[1])", B, m, " so that groups of m columns do not straddle blocks")
        if mask1 is not None:
            raise ValueError("mask1: must be None when m > 0 (the N:M mask is chosen inside the op)")
        V.same_device(W1=W1, Hinv1=Hinv1)


def sparsegpt_block_update(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    mask1: torch.Tensor | None = None,
    n: int = 0,
    m: int = 0,
    *,
    backend: str | None = None,
):
    """Run SparseGPT's column loop over one block; returns ``(Q1, Err1, losses)``.

    Args:
        W1: float32 ``[rows, B]``, the block of weights (not modified).
        Hinv1: float32 ``[B, B]``, the diagonal block of the upper Cholesky factor of ``H^-1``
            (upper triangle read; any strides).
        mask1: bool ``[rows, B]``, True = keep; required when ``m == 0``, must be None when ``m > 0``.
        n, m: ``m == 0`` for a given mask; otherwise keep ``n`` of every ``m`` consecutive
            columns, chosen at each group start from the updated weights by ``w^2 / d^2``
            (ties to the lower column).  ``0 < n < m`` and ``B % m == 0``.
        backend: ``auto | reference | cpp | cuda | triton``.

    Returns ``Q1`` (float32 ``[rows, B]``, pruned weights), ``Err1`` (float32 ``[rows, B]``,
    ``(w - q) / d`` per column, for the lazy update of later columns) and ``losses``
    (float32 ``[rows]``, ``sum (w - q)^2 / d^2 / 2``).

    Raises TypeError for non-float32 ``W1``/``Hinv1`` or a non-bool mask, ValueError for
    mismatched shapes, devices, or ``n``/``m`` outside the rules above.
    """
    check_block_args(W1, Hinv1, mask1, n, m)
    return R.call(NAME, backend, W1.device, W1, Hinv1, mask1, n, m)


INT4_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_int4_block_args(W1, Hinv1, mask1, n, m, group_size, scale_dtype) -> None:
    check_block_args(W1, Hinv1, mask1, n, m)
    B = W1.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or B % group_size:
        raise ValueError(f"group_size: got {group_size!r}; it must be a positive int dividing the block width "
                         f"(W1.shape[1]) {B}")
    if scale_dtype not in INT4_SCALE_DTYPES:
        raise TypeError(f"scale_dtype: got {scale_dtype!r}, expected one of float32, float16, bfloat16")


def sparsegpt_block_update_int4(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    mask1: torch.Tensor | None = None,
    n: int = 0,
    m: int = 0,
    group_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    *,
    backend: str | None = None,
):
    """SparseGPT's column loop over one block with joint int4 quantization; returns
    ``(Q1, Err1, losses, keep, codes, scales)``.

    Arguments as :func:`sparsegpt_block_update`, plus ``group_size`` (columns per scale; it
    divides ``W1.shape[1]``) and ``scale_dtype`` (float32, float16 or bfloat16: each scale is
    rounded to it, as the checkpoint will store it).  The algorithm, and what the outputs are:
    :func:`sparse_kernels.reference.sparsegpt.sparsegpt_block_update_int4`.  ``backend``:
    ``auto | reference | cpp | cuda | triton`` (auto: cpp on CPU, Triton on a GPU).  Backends agree to float32 rounding (the cpp kernel
    does the reference's operations in its order); a weight on a rounding boundary may get the
    neighbouring code.

    Raises TypeError/ValueError as :func:`sparsegpt_block_update`, and for a ``group_size`` that
    does not divide the block or an unsupported ``scale_dtype``.
    """
    check_int4_block_args(W1, Hinv1, mask1, n, m, group_size, scale_dtype)
    return R.call(INT4_NAME, backend, W1.device, W1, Hinv1, mask1, n, m, group_size, scale_dtype)


def sparsegpt_lazy_update(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, *, backend: str | None = None,
                          density: float = 0.5) -> None:
    """``W -= Err1 @ U`` in place: SparseGPT's lazy update of the columns after a block.

    Args:
        W: float32 ``[rows, L]`` with contiguous columns (``W.stride(1) == 1``, e.g. the view
            ``W[:, i2:]``), updated in place.
        Err1: float32 ``[rows, B]``, the block op's scaled errors (zero at kept weights).  The
            cpp kernel skips its zeros, so an inf or NaN in ``U`` reaches ``W`` only through a
            nonzero error (``addmm_`` would spread it as ``0 * inf``); SparseGPT's ``U`` is
            checked finite.
        U: float32 ``[B, L]``, the rows of the upper inverse factor for the block, any strides.
        backend: ``auto | reference | cpp``.
        density: the expected fraction of nonzeros in ``Err1`` (the pruned fraction), for
            ``auto``: cpp on CPU up to ``LAZY_CPP_MAX_DENSITY``, else the BLAS.

    Raises TypeError for non-float32 tensors, ValueError for mismatched shapes or devices.
    """
    for name, t in (("W", W), ("Err1", Err1), ("U", U)):
        V.tensor(name, t, ndim=2, dtypes=(torch.float32,))
    rows, L = W.shape
    if Err1.shape[0] != rows:
        raise ValueError(f"Err1: shape {tuple(Err1.shape)} must have W's {rows} rows")
    if tuple(U.shape) != (Err1.shape[1], L):
        raise ValueError(f"U: shape {tuple(U.shape)} must be (B, L) = ({Err1.shape[1]}, {L}) "
                         f"for Err1 {tuple(Err1.shape)} and W {tuple(W.shape)}")
    if L > 1 and W.stride(1) != 1:
        raise ValueError(f"W: the columns must be contiguous (stride(1) == 1), got strides {W.stride()}")
    if rows > 1 and L > 0 and W.stride(0) < L:
        raise ValueError(f"W: rows overlap in memory (stride(0) = {W.stride(0)} < {L} columns); pass a writable, "
                         f"non-overlapping view such as W[:, i2:] of a row-major tensor")
    V.same_device(W=W, Err1=Err1, U=U)
    R.call(LAZY_NAME, backend, W.device, W, Err1, U, auto_args=(float(density),))
