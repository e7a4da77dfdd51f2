"""The bitmask format for unstructured sparse weights, and its matmul: the pure-PyTorch reference.

A weight ``W [N, K]`` with any pattern of zeros is stored as

* ``values [nnz]``: its nonzero elements in row-major order, in W's dtype (NaN counts as nonzero;
  ``-0.0`` counts as zero and comes back ``+0.0``, an equal value);
* ``bitmask [N, ceil(K/8)]`` uint8: bit ``c % 8`` of byte ``c // 8`` of row ``n`` is set where
  ``W[n, c]`` is stored (:func:`sparse_kernels.pack_mask`'s bit order); the bits past ``K`` are 0;
* ``row_ptr [N + 1]`` int64: row ``n``'s values are ``values[row_ptr[n]:row_ptr[n + 1]]``, so
  ``row_ptr[0] == 0``, ``row_ptr[N] == nnz`` and each row's span equals its bitmask's popcount.

At a fraction ``s`` of zeros it takes ``(1 - s) + 1/(8 * bytes per element)`` of the dense bytes
(plus 8 bytes a row): 0.5625x of a 16-bit weight at 50% (as 2:4), 0.36x at 70%, and it keeps any
pattern.  It is the checkpoint layout of unstructured layers too (``sparse_kernels.llm.checkpoint``).

``bitmask_linear(x, values, bitmask, row_ptr, bias) = x @ W^T + bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import pack_mask, unpack_mask


def compress_bitmask(w: torch.Tensor, mask: torch.Tensor | None = None):
    """``W [N, K]`` -> ``(values, bitmask, row_ptr)``; ``mask`` (bool, W's shape) chooses the stored
    elements instead of ``W != 0``."""
    keep = (w != 0) if mask is None else mask
    values = w[keep]
    counts = keep.sum(dim=1)
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    return values, pack_mask(keep), row_ptr


def decompress_bitmask(values: torch.Tensor, bitmask: torch.Tensor, row_ptr: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`compress_bitmask`: the dense ``[N, cols]`` weight (zeros where unset)."""
    keep = unpack_mask(bitmask, cols)
    n_set = int(keep.sum())
    if n_set != values.shape[0]:
        raise ValueError(f"bitmask: {n_set} bits are set in its first {cols} columns but values holds "
                         f"{values.shape[0]}; they do not describe one weight")
    w = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    w[keep] = values
    return w


def bitmask_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_ptr: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` for the bitmask-stored ``W [N, K]``: decompress, then F.linear."""
    w = decompress_bitmask(values, bitmask, row_ptr, x.shape[-1])
    return F.linear(x, w, bias)


def bitmask_linear_backward(grad_y, x, values, bitmask, row_ptr, need_x: bool, need_values: bool):
    """``(grad_x, grad_values)``: ``grad_y @ W`` and ``grad_y^T x`` at the stored positions."""
    keep = unpack_mask(bitmask, x.shape[-1])
    gx = gv = None
    if need_x:
        gx = grad_y @ decompress_bitmask(values, bitmask, row_ptr, x.shape[-1])
    if need_values:
        gv = (grad_y.transpose(0, 1).to(torch.float32) @ x.to(torch.float32))[keep].to(values.dtype)
    return gx, gv
