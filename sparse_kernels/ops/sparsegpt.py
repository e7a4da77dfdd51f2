"""The SparseGPT block op ``sparsegpt_block_update``: one block of the column loop, fused.

Algorithm and conventions: :mod:`sparse_kernels.reference.sparsegpt`.
Backends: reference (the column loop in PyTorch, default everywhere), cpp
(csrc/cpu/sparsegpt.cpp), cuda (csrc/cuda/sparsegpt.cu), triton (sparse_kernels/triton/sparsegpt.py).
They agree to fp32 rounding (not bit for bit: the order of the rank-1 updates differs).
The whole-layer algorithm is :func:`sparse_kernels.pruning.sparsegpt_prune`.
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


def _triton_launch(W1, Hinv1, mask1, n, m):
    from ..triton import on_device
    from ..triton import sparsegpt as t

    with on_device(W1):
        return t.sparsegpt_block_update(W1, Hinv1, mask1, n, m)


R.impl_python(NAME, "triton", _triton_launch, ["cuda"] + (["cpu"] if R.triton_interpreted() else []))


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
