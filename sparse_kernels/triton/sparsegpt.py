"""Triton SparseGPT block update: ``sparsegpt_block_update_triton``.

Same algorithm as :mod:`sparse_kernels.reference.sparsegpt` (conventions there): W1
``[rows, B]`` float32, Hinv1 ``[B, B]`` float32 (upper triangle read), mask1 bool
``[rows, B]`` (True = keep) when ``m == 0``; N:M chosen in the kernel when ``m > 0``.

Rows are independent, so each program owns ``BLOCK_R`` rows and keeps their whole block
``[BLOCK_R, BLOCK_B]`` (``BLOCK_B = next_pow2(B)``) in registers for the entire loop over the
``B`` columns: column ``i`` is extracted with a masked row reduction, its error computed, and
the rank-1 update ``w -= err (outer) Hinv1[i, :]`` (masked to ``j > i``) applied to the tile;
Hinv1's row ``i`` is one contiguous load shared by the ``BLOCK_R`` rows.  At an N:M group
start the ``m`` scores ``w^2 / d^2`` of the group are ranked (ties to the lower column).  Q1 and
Err1 accumulate in registers and are stored once.  One launch per block replaces the
reference's several kernels per column.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.  Tile size: about
2048 fp32 elements per program (BLOCK_R = 16 rows at B = 128); compiled, not yet tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 2048


@triton.jit
def _sparsegpt_block_kernel(
    W_ptr, H_ptr, M_ptr, Q_ptr, E_ptr, L_ptr,
    rows, B,
    stride_wr, stride_wc, stride_hr, stride_hc, stride_mr, stride_mc,
    N: tl.constexpr, M: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_B)
    rmask = r < rows
    cmask = c < B
    m2 = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    w = tl.load(W_ptr + r64[:, None] * stride_wr + c[None, :] * stride_wc, mask=m2, other=0.0)
    dvec = tl.load(H_ptr + c * stride_hr + c * stride_hc, mask=cmask, other=1.0)
    dd = dvec * dvec
    if HAS_MASK:
        keep = tl.load(M_ptr + r64[:, None] * stride_mr + c[None, :] * stride_mc, mask=m2, other=0).to(tl.int32)
    else:
        keep = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
    q_acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    e_acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)

    for i in range(0, B):
        if M > 0:
            if i % M == 0:
                s = (w * w) / dd[None, :]
                rank = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
                for k in tl.static_range(M):
                    sk = tl.sum(tl.where(c[None, :] == i + k, s, 0.0), axis=1)
                    beats = (sk[:, None] > s) | ((sk[:, None] == s) & (i + k < c[None, :]))
                    rank += beats.to(tl.int32)
                in_group = (c >= i) & (c < i + M)
                keep = tl.where(in_group[None, :], (rank < N).to(tl.int32), keep)
        sel = c[None, :] == i
        wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
        ki = tl.sum(tl.where(sel, keep, 0), axis=1)
        d = tl.load(H_ptr + i * stride_hr + i * stride_hc)
        q = tl.where(ki != 0, wi, 0.0)
        diff = wi - q
        err = diff / d
        loss += (diff * diff) / (d * d)
        q_acc = tl.where(sel, q[:, None], q_acc)
        e_acc = tl.where(sel, err[:, None], e_acc)
        h = tl.load(H_ptr + i * stride_hr + c * stride_hc, mask=cmask & (c > i), other=0.0)
        w = w - err[:, None] * h[None, :]

    out = r64[:, None] * B + c[None, :]
    tl.store(Q_ptr + out, q_acc, mask=m2)
    tl.store(E_ptr + out, e_acc, mask=m2)
    tl.store(L_ptr + r64, loss / 2, mask=rmask)


def sparsegpt_block_update(W1: torch.Tensor, Hinv1: torch.Tensor, mask1, n: int, m: int):
    """Launch the kernel; arguments are validated by :func:`sparse_kernels.ops.sparsegpt_block_update`."""
    rows, B = W1.shape
    Q = torch.empty((rows, B), device=W1.device, dtype=torch.float32)
    E = torch.empty_like(Q)
    L = torch.empty(rows, device=W1.device, dtype=torch.float32)
    if rows == 0 or B == 0:
        return Q, E, L.zero_()
    has_mask = m == 0
    mk = mask1.view(torch.uint8) if has_mask else W1
    smr, smc = (mk.stride(0), mk.stride(1)) if has_mask else (0, 0)
    BLOCK_B = triton.next_power_of_2(B)
    BLOCK_R = max(1, min(64, _TILE // BLOCK_B))
    grid = (triton.cdiv(rows, BLOCK_R),)
    _sparsegpt_block_kernel[grid](
        W1, Hinv1, mk, Q, E, L, rows, B,
        W1.stride(0), W1.stride(1), Hinv1.stride(0), Hinv1.stride(1), smr, smc,
        N=n if m > 0 else 0, M=m, HAS_MASK=has_mask, BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B,
    )
    return Q, E, L
