"""Triton 2:4 format kernels: ``mask_2to4``, ``compress_2to4``, ``decompress_2to4``.

Same algorithm as :mod:`sparse_kernels.reference.sparse24`, bit for bit (layout there and in
docs/FORMAT.md): W ``[rows, cols]`` with groups of 4 along cols; values ``[rows, cols/2]``;
meta ``[rows, cols/16]`` int16 with group ``g``'s nibble ``i0 | i1 << 2`` at bits
``4 * (g % 4)`` of ``meta[r, g // 4]``.  dtypes float16, bfloat16, float32 (mask scores may
also be float64).

Each program owns a ``BLOCK_R x 4*BLOCK_G`` tile of W (``BLOCK_G`` groups per row), loads it
with contiguous, masked loads and splits it into the four group positions with
``tl.reshape`` + ``tl.split``.  compress/decompress move raw bits (int16/int32 views), so
``-0.0``, inf and NaN payloads survive; ``|w|`` is compared as ``bits & ~sign``, which orders
exactly like the float magnitude.

Data-dependent errors (NaN in a mask, a group with more than two nonzeros, an invalid
nibble) are reported by the kernel into a small int32 buffer, one entry per program and row:
the smallest bad group index, or ``_NONE``.  The launcher reads it and raises the same
ValueError as the reference.  Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1``.

Block sizes: ``BLOCK_G`` up to 64 groups (256 columns) and ``BLOCK_R`` rows so a tile holds
about 4096 elements; not yet tuned on a GPU (compiled, not yet run on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.sparse24 import _VALID_NIBBLES

_NONE = 2**31 - 1
_TILE = 4096
_MAX_BLOCK_G = 64
_INT = {2: torch.int16, 4: torch.int32}
# (abs mask, sign bit as a signed int, +inf bits) by element size
_BITS = {2: (0x7FFF, -(2**15)), 4: (0x7FFFFFFF, -(2**31))}
_INF = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}


@triton.jit
def _split4(x, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_R, 4*BLOCK_G] -> the four group positions, each [BLOCK_R, BLOCK_G]."""
    x = tl.reshape(x, (BLOCK_R, BLOCK_G, 2, 2))
    a, b = tl.split(x)  # a: positions 0, 2; b: positions 1, 3
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def _join4(x0, x1, x2, x3, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Inverse of _split4."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (BLOCK_R, 4 * BLOCK_G))


@triton.jit
def _keep_top2(k0, k1, k2, k3):
    """Keep flags of the two largest keys; position j beats i if k_j > k_i, or equal and j < i."""
    g01 = (k0 >= k1).to(tl.int32)
    g02 = (k0 >= k2).to(tl.int32)
    g03 = (k0 >= k3).to(tl.int32)
    g12 = (k1 >= k2).to(tl.int32)
    g13 = (k1 >= k3).to(tl.int32)
    g23 = (k2 >= k3).to(tl.int32)
    c0 = 3 - g01 - g02 - g03
    c1 = g01 + 2 - g12 - g13
    c2 = g02 + g12 + 1 - g23
    c3 = g03 + g13 + g23
    return c0 < 2, c1 < 2, c2 < 2, c3 < 2


@triton.jit
def _mask_kernel(s_ptr, out_ptr, flag_ptr, rows, cols, n_gblocks,
                 ABS: tl.constexpr, F64: tl.constexpr, ABS_MASK: tl.constexpr, INF: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    inb = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    x = tl.load(s_ptr + offs, mask=inb, other=0)
    if ABS:  # x: int16/int32 bits of w; key = |w| as an integer
        k = x.to(tl.int32) & ABS_MASK
        nan = k > INF
    else:  # x: float scores, compared as floats (-0.0 == +0.0)
        if F64:
            k = x.to(tl.float64)
        else:
            k = x.to(tl.float32)
        nan = k != k
    k0, k1, k2, k3 = _split4(k, BLOCK_R, BLOCK_G)
    m0, m1, m2, m3 = _keep_top2(k0, k1, k2, k3)
    keep = _join4(m0, m1, m2, m3, BLOCK_R, BLOCK_G)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=inb)
    any_nan = tl.max(tl.max(nan.to(tl.int32), axis=1), axis=0)
    tl.store(flag_ptr + pid_r * n_gblocks + pid_g, any_nan)


@triton.jit
def _compress_kernel(w_ptr, v_ptr, m_ptr, bad_ptr, flag_ptr, rows, cols, n_gblocks,
                     PRUNE: tl.constexpr, ABS_MASK: tl.constexpr, SIGN: tl.constexpr, INF: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r64 = r.to(tl.int64)
    c = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    x = tl.load(w_ptr + r64[:, None] * cols + c[None, :], mask=rmask[:, None] & (c[None, :] < cols), other=0)
    x0, x1, x2, x3 = _split4(x, BLOCK_R, BLOCK_G)
    zero = tl.zeros_like(x0)
    nan = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.int32)
    if PRUNE:  # apply mask_2to4(w): keep the two largest |w|
        a0 = x0.to(tl.int32) & ABS_MASK
        a1 = x1.to(tl.int32) & ABS_MASK
        a2 = x2.to(tl.int32) & ABS_MASK
        a3 = x3.to(tl.int32) & ABS_MASK
        nan = ((a0 > INF) | (a1 > INF) | (a2 > INF) | (a3 > INF)).to(tl.int32)
        p0, p1, p2, p3 = _keep_top2(a0, a1, a2, a3)
        x0 = tl.where(p0, x0, zero)
        x1 = tl.where(p1, x1, zero)
        x2 = tl.where(p2, x2, zero)
        x3 = tl.where(p3, x3, zero)
    # priority: 2 nonzero, 1 -0.0, 0 +0.0
    n0 = ((x0.to(tl.int32) & ABS_MASK) != 0).to(tl.int32)
    n1 = ((x1.to(tl.int32) & ABS_MASK) != 0).to(tl.int32)
    n2 = ((x2.to(tl.int32) & ABS_MASK) != 0).to(tl.int32)
    n3 = ((x3.to(tl.int32) & ABS_MASK) != 0).to(tl.int32)
    k0, k1, k2, k3 = _keep_top2(2 * n0 + (x0.to(tl.int32) == SIGN).to(tl.int32),
                                2 * n1 + (x1.to(tl.int32) == SIGN).to(tl.int32),
                                2 * n2 + (x2.to(tl.int32) == SIGN).to(tl.int32),
                                2 * n3 + (x3.to(tl.int32) == SIGN).to(tl.int32))
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    v0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
    v1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))

    cv = pid_g * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
    vals = tl.reshape(tl.join(v0, v1), (BLOCK_R, 2 * BLOCK_G))
    tl.store(v_ptr + r64[:, None] * (cols // 2) + cv[None, :], vals,
             mask=rmask[:, None] & (cv[None, :] < cols // 2))

    shift = (tl.arange(0, BLOCK_G) % 4) * 4
    nib = (i0 | (i1 << 2)) << shift[None, :]
    word = tl.sum(tl.reshape(nib, (BLOCK_R, BLOCK_G // 4, 4)), axis=2)
    cm = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)
    tl.store(m_ptr + r64[:, None] * (cols // 16) + cm[None, :], word.to(tl.int16),
             mask=rmask[:, None] & (cm[None, :] < cols // 16))

    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    bad = (n0 + n1 + n2 + n3) > 2
    first = tl.min(tl.where(bad, g[None, :], 2147483647), axis=1)
    tl.store(bad_ptr + r64 * n_gblocks + pid_g, first, mask=rmask)
    tl.store(flag_ptr + pid_r * n_gblocks + pid_g, tl.max(tl.max(nan, axis=1), axis=0))


@triton.jit
def _decompress_kernel(v_ptr, m_ptr, out_ptr, bad_ptr, rows, cols, n_gblocks,
                       BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r64 = r.to(tl.int64)
    cm = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)
    m = tl.load(m_ptr + r64[:, None] * (cols // 16) + cm[None, :],
                mask=rmask[:, None] & (cm[None, :] < cols // 16), other=0)
    m = m.to(tl.int32) & 0xFFFF
    nib = (m[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 0xF
    nib = tl.reshape(nib, (BLOCK_R, BLOCK_G))
    i0 = nib & 3
    i1 = nib >> 2

    cv = pid_g * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
    v = tl.load(v_ptr + r64[:, None] * (cols // 2) + cv[None, :],
                mask=rmask[:, None] & (cv[None, :] < cols // 2), other=0)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_R, BLOCK_G, 2)))
    zero = tl.zeros_like(v0)
    x0 = tl.where(i0 == 0, v0, zero)
    x1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    x2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    x3 = tl.where(i1 == 3, v1, zero)
    out = _join4(x0, x1, x2, x3, BLOCK_R, BLOCK_G)
    c = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    tl.store(out_ptr + r64[:, None] * cols + c[None, :], out, mask=rmask[:, None] & (c[None, :] < cols))

    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    bad = (i0 >= i1) & (g[None, :] < cols // 4)
    first = tl.min(tl.where(bad, g[None, :], 2147483647), axis=1)
    tl.store(bad_ptr + r64 * n_gblocks + pid_g, first, mask=rmask)


# ---------------------------------------------------------------- launchers
def _blocks(rows: int, groups: int) -> tuple[int, int]:
    block_g = min(_MAX_BLOCK_G, triton.next_power_of_2(max(groups, 1)))
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE // (4 * block_g)))
    return block_r, block_g


def _first_bad(bad: torch.Tensor) -> tuple[int, int] | None:
    """bad [rows, n_gblocks] of group indices (or _NONE) -> first (row, group) in row-major order."""
    per_row = bad.min(dim=1).values
    hit = (per_row != _NONE).nonzero()
    if hit.numel() == 0:
        return None
    r = int(hit[0, 0])
    return r, int(per_row[r])


def _nan_error(what: str) -> ValueError:
    return ValueError(f"mask_2to4: {what} contains NaN; a 2:4 mask needs comparable values")


def mask_2to4(w: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """bool [..., cols]: the two largest |w| (or scores) of each group of 4 along the last dim."""
    from ..ops.sparse24 import check_mask_args

    check_mask_args(w, scores)
    out = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    if w.numel() == 0:
        return out
    cols = w.shape[-1]
    rows = w.numel() // cols
    if scores is None:
        src = w.contiguous().view(_INT[w.element_size()])
        abs_mask, inf = _BITS[w.element_size()][0], _INF[w.dtype]
    else:
        src, abs_mask, inf = scores.contiguous(), 0, 0
    block_r, block_g = _blocks(rows, cols // 4)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols // 4, block_g))
    flags = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=w.device)
    _mask_kernel[grid](src, out.view(torch.uint8), flags, rows, cols, grid[1],
                       ABS=scores is None, F64=scores is not None and scores.dtype == torch.float64,
                       ABS_MASK=abs_mask, INF=inf, BLOCK_R=block_r, BLOCK_G=block_g)
    if bool(flags.any()):
        raise _nan_error("w" if scores is None else "scores")
    return out


def compress_2to4(w: torch.Tensor, prune: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (values [rows, cols/2], meta [rows, cols/16] int16); strict unless prune."""
    from ..ops.sparse24 import _check_2d_w

    _check_2d_w(w)
    rows, cols = w.shape
    values = torch.empty(rows, cols // 2, dtype=w.dtype, device=w.device)
    meta = torch.empty(rows, cols // 16, dtype=torch.int16, device=w.device)
    if w.numel() == 0:
        return values, meta
    ibits = _INT[w.element_size()]
    abs_mask, sign = _BITS[w.element_size()]
    block_r, block_g = _blocks(rows, cols // 4)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols // 4, block_g))
    bad = torch.empty(rows, grid[1], dtype=torch.int32, device=w.device)
    flags = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=w.device)
    _compress_kernel[grid](w.contiguous().view(ibits), values.view(ibits), meta, bad, flags, rows, cols, grid[1],
                           PRUNE=bool(prune), ABS_MASK=abs_mask, SIGN=sign, INF=_INF[w.dtype],
                           BLOCK_R=block_r, BLOCK_G=block_g)
    if prune and bool(flags.any()):
        raise _nan_error("w")
    first = None if prune else _first_bad(bad)
    if first is not None:
        r, g = first
        c = 4 * g
        n = int((w[r, c:c + 4] != 0).sum())
        raise ValueError(
            f"compress_2to4: w is not 2:4 sparse: the group at row {r}, columns {c}..{c + 3} has {n} "
            f"nonzeros (at most 2 allowed); pass prune=True to keep the 2 largest of each group"
        )
    return values, meta


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [rows, cols/2], meta [rows, cols/16] int16) -> w [rows, cols]."""
    from ..ops.sparse24 import check_packed

    check_packed(values, meta)
    rows, half = values.shape
    cols = 2 * half
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    ibits = _INT[values.element_size()]
    meta = meta.contiguous()
    block_r, block_g = _blocks(rows, cols // 4)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols // 4, block_g))
    bad = torch.empty(rows, grid[1], dtype=torch.int32, device=values.device)
    _decompress_kernel[grid](values.contiguous().view(ibits), meta, out.view(ibits), bad, rows, cols, grid[1],
                             BLOCK_R=block_r, BLOCK_G=block_g)
    first = _first_bad(bad)
    if first is not None:
        r, g = first
        nib = (int(meta[r, g // 4]) & 0xFFFF) >> (4 * (g % 4)) & 0xF
        i0, i1 = nib & 3, nib >> 2
        raise ValueError(
            f"decompress_2to4: meta is corrupt: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has nibble "
            f"{nib} with i0={i0} >= i1={i1}; valid nibbles are {_VALID_NIBBLES}"
        )
    return out
