"""Reference 2:4 format: mask, compress, decompress, in plain vectorized PyTorch.

The format (docs/FORMAT.md has the full story):

* ``w`` is ``[rows, cols]``; groups of 4 run along ``cols`` (the input dimension of a
  Linear weight ``[out_features, in_features]``).
* ``values`` is ``[rows, cols // 2]``, ``w.dtype``: group ``g`` keeps ``w[r, 4g + i0]`` at
  ``values[r, 2g]`` and ``w[r, 4g + i1]`` at ``values[r, 2g + 1]`` with ``i0 < i1``.
* ``meta`` is ``[rows, cols // 16]`` int16: group ``g`` stores the nibble ``i0 | i1 << 2``
  at bits ``4 * (g % 4)`` of ``meta[r, g // 4]`` (PyTorch/CUTLASS order, before CUTLASS's
  reordering).  The six valid nibbles are 4, 8, 9, 12, 13, 14.

Index choice when compressing (deterministic, bit-exact across backends): each position
gets a priority, 2 for a nonzero value (NaN and inf included), 1 for ``-0.0``, 0 for
``+0.0``; the two positions with the highest priority are kept, ties going to the lower
index.  So every group with at most two entries other than ``+0.0`` round-trips bit for bit,
``-0.0`` included, and an all-zero group stores indices (0, 1).

``mask_2to4`` keeps the two largest ``|w|`` (or ``scores``) of each group; ties go to the
lower index; NaN raises.
"""

from __future__ import annotations

import torch

# Valid nibble -> True.  Index by (meta >> 4j) & 0xF.
_VALID_NIBBLES = (4, 8, 9, 12, 13, 14)
# Values are moved as raw bits: CPU gather/scatter on bfloat16 rewrite NaN payloads.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_top2(s: torch.Tensor) -> torch.Tensor:
    """s: [..., 4] comparable values -> bool [..., 4] with exactly two True per group.

    Position j beats position i when s_j > s_i, or s_j == s_i and j < i; a position is
    kept when fewer than two positions beat it.
    """
    a = s.unsqueeze(-1)  # s_i  [..., 4, 1]
    b = s.unsqueeze(-2)  # s_j  [..., 1, 4]
    idx = torch.arange(4, device=s.device)
    lower = idx.view(1, 4) < idx.view(4, 1)  # [i, j]: j < i
    beats = (b > a) | ((b == a) & lower)
    return beats.sum(-1) < 2


def mask_2to4(w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    s = w.abs() if scores is None else scores
    if torch.isnan(s).any():
        what = "w" if scores is None else "scores"
        raise ValueError(f"mask_2to4: {what} contains NaN; a 2:4 mask needs comparable values")
    shape = w.shape
    g = s.reshape(s.numel() // max(shape[-1], 1), shape[-1] // 4, 4)  # (explicit sizes: 0 columns too)
    return _keep_top2(g).reshape(shape)


def _first_bad_group(nnz: torch.Tensor) -> tuple[int, int, int]:
    bad = (nnz > 2).nonzero()
    r, g = int(bad[0, 0]), int(bad[0, 1])
    return r, 4 * g, int(nnz[r, g])


def compress_2to4(w: torch.Tensor, prune: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    if prune:
        w = torch.where(mask_2to4(w), w, torch.zeros((), dtype=w.dtype, device=w.device))
    g = w.reshape(rows, cols // 4, 4)
    nonzero = g != 0
    nnz = nonzero.sum(-1)
    if (nnz > 2).any():
        r, c, n = _first_bad_group(nnz)
        raise ValueError(
            f"compress_2to4: w is not 2:4 sparse: the group at row {r}, columns {c}..{c + 3} has {n} "
            f"nonzeros (at most 2 allowed); pass prune=True to keep the 2 largest of each group"
        )
    negzero = (g == 0) & torch.signbit(g)
    priority = nonzero.to(torch.int8) * 2 + negzero.to(torch.int8)
    keep = _keep_top2(priority)
    idx = keep.nonzero()[:, 2].reshape(rows, cols // 4, 2)  # ascending within each group
    ibits = _BITS[w.element_size()]
    values = torch.gather(g.view(ibits), 2, idx).reshape(rows, cols // 2).view(w.dtype)
    return values, pack_nibbles((idx[..., 0] | (idx[..., 1] << 2)).reshape(rows, cols // 4))


def pack_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """int64 [rows, cols/4] of nibbles ``i0 | i1 << 2`` -> int16 meta [rows, cols/16] (the inverse
    of :func:`meta_nibbles`)."""
    shifts = torch.arange(0, 16, 4, device=nib.device)
    meta = (nib.reshape(nib.shape[0], nib.shape[1] // 4, 4) << shifts).sum(-1)  # int64, < 2**16
    return torch.where(meta >= 2**15, meta - 2**16, meta).to(torch.int16)


def meta_nibbles(meta: torch.Tensor) -> torch.Tensor:
    """int16 [rows, cols/16] -> int64 [rows, cols/4] of nibbles ``i0 | i1 << 2``."""
    m = meta.to(torch.int64) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=meta.device)
    return ((m.unsqueeze(-1) >> shifts) & 0xF).reshape(meta.shape[0], meta.shape[1] * 4)


def check_meta(meta: torch.Tensor) -> None:
    nib = meta_nibbles(meta)
    i0, i1 = nib & 3, nib >> 2
    bad = i0 >= i1
    if bad.any():
        r, g = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"decompress_2to4: meta is corrupt: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has nibble "
            f"{int(nib[r, g])} with i0={int(i0[r, g])} >= i1={int(i1[r, g])}; valid nibbles are {_VALID_NIBBLES}"
        )


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    check_meta(meta)
    rows, half = values.shape
    cols = half * 2
    nib = meta_nibbles(meta)
    idx = torch.stack((nib & 3, nib >> 2), dim=-1)  # [rows, cols/4, 2]
    ibits = _BITS[values.element_size()]
    out = torch.zeros(rows, cols // 4, 4, dtype=ibits, device=values.device)
    out.scatter_(2, idx, values.reshape(rows, cols // 4, 2).view(ibits))
    return out.reshape(rows, cols).view(values.dtype)
