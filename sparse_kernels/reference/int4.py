"""2:4 with int4 values ("2:4 int4", Sparse-Marlin's kind of weight): the pure-PyTorch reference.

A 2:4 weight ``W [N, K]`` (``K % 16 == 0``) whose kept values are symmetric 4-bit integers
times a scale per row and group of ``G`` input columns is stored as

* ``qvalues [N, K/4]`` uint8: kept value ``j`` of row ``n`` (the same order as the 2:4 format's
  ``values [N, K/2]``) is the code ``q + 8`` (``q`` in ``-8..7``) in the low nibble of byte
  ``j // 2`` when ``j`` is even, in the high nibble when it is odd;
* ``meta [N, K/16]`` int16: the 2:4 format's metadata, unchanged (docs/FORMAT.md);
* ``scales [N, K/G]`` float16/bfloat16/float32: ``G`` a multiple of 16 that divides ``K``
  (``G = K``: one scale per row), so each 16-column chunk of meta has one scale.  The group size
  is ``K // scales.shape[1]``.

The weight is ``W[n, c] = (code - 8) * scales[n, c // G]`` at the kept positions, the product
taken in float32, where it is exact (a 4-bit integer times a 16-bit float needs at most 15
significant bits; a float32 scale can round).  Kept value ``j`` of a row sits in group-of-4
``j // 2``, whose columns ``4 (j // 2) .. + 3`` share one scale column, ``j // (G / 2)``.

Bytes per dense weight: 1/4 of codes and 1/8 of meta (3 bits), against 1 + 1/8 for a 16-bit 2:4
weight (9 bits: so 1/3 of its bytes) and 2 for a dense float16 one (3/16), plus ``2/G`` bytes of
float16 scales.

``sparse_linear_int4(x, qvalues, meta, scales, bias) = x @ W^T + bias`` (fp32 accumulation,
the result in x's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse24 import decompress_2to4

MAX_CODE = 7  # symmetric int4: q in -8..7, scales from |w|max / 7 (so -8 is never produced)


def unpack_codes(qvalues: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/4]`` -> int16 ``q`` ``[N, K/2]`` (``code - 8``), in kept-value order."""
    b = qvalues.to(torch.int16)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(qvalues.shape[0], qvalues.shape[1] * 2) - 8


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_codes`: integer ``q [N, K/2]`` in ``-8..7`` -> uint8 ``[N, K/4]``."""
    c = (q.to(torch.int16) + 8).reshape(q.shape[0], q.shape[1] // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def dequantize_values(qvalues: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The kept values ``[N, K/2]`` in float32: ``(code - 8) * scale`` (exact)."""
    q = unpack_codes(qvalues).to(torch.float32)
    half_group = q.shape[1] // scales.shape[1]
    return q * scales.to(torch.float32).repeat_interleave(half_group, dim=1)


def quantize_values(values: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric int4 of 2:4 ``values [N, K/2]`` in groups of ``group_size``
    input columns (``group_size / 2`` kept values): ``scale = max |v| / 7`` per group (1 for an
    all-zero group), ``q = clamp(round(v / scale), -7, 7)``.  Returns ``(qvalues, scales)``,
    scales in ``values``' dtype (the rounding is done against those rounded scales)."""
    n, half = values.shape
    v = values.to(torch.float32).reshape(n, half // (group_size // 2), group_size // 2)
    amax = v.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / MAX_CODE, torch.ones_like(amax)).to(values.dtype)
    # a tiny group's scale can round to 0 in a 16-bit dtype: the smallest normal instead
    scales = torch.where(scales > 0, scales, torch.full_like(scales, torch.finfo(values.dtype).tiny))
    s = scales.to(torch.float32).unsqueeze(-1)
    q = torch.clamp(torch.round(v / s), -MAX_CODE, MAX_CODE).reshape(n, half)
    return pack_codes(q), scales


def decompress_2to4_int4(qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight (float32 by default: exact) of a 2:4 int4 one."""
    return decompress_2to4(dequantize_values(qvalues, scales), meta).to(dtype)


def sparse_linear_int4(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` in fp32 from the exact weight, then x's dtype."""
    w = decompress_2to4_int4(qvalues, meta, scales)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
