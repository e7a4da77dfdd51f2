"""Reference sparse matmuls: ``sparse_linear`` (2:4), ``masked_linear`` (any mask), mask packing.

Shapes (op level; the public wrappers in :mod:`sparse_kernels.ops.linear` flatten leading dims):

* ``x``: ``[M, K]``, float16/bfloat16/float32.
* ``sparse_linear``: ``values [N, K/2]`` and ``meta [N, K/16]`` int16 in the canonical 2:4 format
  (:mod:`sparse_kernels.reference.sparse24`), ``bias [N]`` or None.  Returns
  ``x @ decompress(values, meta).T + bias``, ``[M, N]``, x's dtype.  ``meta_dev`` (a device-layout
  copy of ``meta`` used by the CUDA backend) is ignored here.
* Backward ops take ``grad_y [M, N]``: ``sparse_linear_grad_x -> [M, K]``,
  ``sparse_linear_grad_values -> [N, K/2]``, ``masked_linear_backward`` (grad_x ``[M, K]``, grad_W
  ``[N, K]`` with exact zeros where the mask is False).
* ``masked_linear``: ``weight [N, K]``, ``mask`` either bool ``[N, K]`` or bit-packed uint8
  ``[N, ceil(K/8)]`` (see :func:`pack_mask`), ``bias [N]`` or None.  Returns
  ``x @ (weight * mask).T + bias``.

Bit order of a packed mask (numpy ``packbits(..., bitorder="little")`` along the last dim):
``mask[r, c]`` is bit ``c % 8`` (value ``1 << (c % 8)``) of byte ``packed[r, c // 8]``; the
padding bits of a last partial byte are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse24 import decompress_2to4, meta_nibbles

_BIT = (1 << torch.arange(8)).to(torch.uint8)


def sparse_linear(x, values, meta, bias=None, meta_dev=None):
    w = decompress_2to4(values, meta)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def kept_columns(meta: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, K/2]``: the column of ``W`` that each entry of ``values`` holds."""
    nib = meta_nibbles(meta)  # [N, K/4]
    base = 4 * torch.arange(nib.shape[1], device=meta.device)
    idx = torch.stack((base + (nib & 3), base + (nib >> 2)), dim=-1)
    return idx.reshape(meta.shape[0], -1)


def sparse_linear_grad_x(grad_y, values, meta):
    """``grad_y [M, N] @ decompress(values, meta) [N, K]`` -> ``[M, K]`` in grad_y's dtype."""
    return grad_y @ decompress_2to4(values, meta).to(grad_y.dtype)


def sparse_linear_grad_values(grad_y, x, meta):
    """``(grad_y^T x)`` gathered at the kept positions: ``[N, K/2]`` in x's dtype (accumulated in
    fp32, or fp64 for fp64 inputs; one rounding): ``out[n, 2g+j] = sum_m grad_y[m, n] * x[m, 4g + i_j]``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    gw = grad_y.to(acc).t() @ x.to(acc)  # [N, K]
    return gw.gather(1, kept_columns(meta)).to(x.dtype)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 ``[..., ceil(cols/8)]`` -> bool ``[..., cols]``."""
    bits = _BIT.to(packed.device)
    m = (packed.unsqueeze(-1) & bits) != 0  # [..., nbytes, 8]
    return m.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :cols].contiguous()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., cols]`` -> uint8 ``[..., ceil(cols/8)]`` (bit order in the module docstring)."""
    cols = mask.shape[-1]
    pad = (-cols) % 8
    m = mask.to(torch.uint8)
    if pad:
        m = F.pad(m, (0, pad))
    m = m.reshape(*mask.shape[:-1], (cols + pad) // 8, 8)
    return (m << torch.arange(8, device=mask.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def dense_mask(mask: torch.Tensor, cols: int) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else unpack_mask(mask, cols)


def masked_weight(weight, mask):
    m = dense_mask(mask, weight.shape[-1])
    return torch.where(m, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(x, weight, mask, bias=None):
    return F.linear(x, masked_weight(weight, mask).to(x.dtype), None if bias is None else bias.to(x.dtype))


def masked_linear_backward(grad_y, x, weight, mask, need_x: bool, need_w: bool):
    """(grad_x = grad_y @ (W*M), grad_W = (grad_y^T x) * M), each None when not needed."""
    gx = gw = None
    if need_x:
        gx = grad_y @ masked_weight(weight, mask).to(grad_y.dtype)
    if need_w:
        gw = masked_weight((grad_y.float().t() @ x.float()).to(weight.dtype), mask)
    return gx, gw
