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

With ``G > 0`` (``sparsegpt_block_update_int4_triton``) each kept weight becomes its int4 value
``clamp(round(w / s), -8, 7) * s`` with the row's group scale ``s``, set at each group start
from the group's max ``|w|`` (conventions: the reference ``sparsegpt_block_update_int4``);
codes, the keep mask and the scales are stored too.  Rounding is half to even, done exactly
with ``floor`` (no libdevice call, so the interpreter runs the same code).

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
    W_ptr, H_ptr, M_ptr, Q_ptr, E_ptr, L_ptr, K_ptr, C_ptr, S_ptr,
    rows, B,
    stride_wr, stride_wc, stride_hr, stride_hc, stride_mr, stride_mc,
    N: tl.constexpr, M: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    G: tl.constexpr, SCALE_KIND: tl.constexpr, TINY: tl.constexpr,
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
    # joint int4 (G > 0): codes, and the current group's scale per row
    c_acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
    scale = tl.full([BLOCK_R], 1.0, dtype=tl.float32)

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
        if G > 0:
            if i % G == 0:
                a = tl.abs(w)
                if M == 0:
                    a = a * keep.to(tl.float32)
                in_grp = (c >= i) & (c < i + G)
                amax = tl.max(tl.where(in_grp[None, :], a, 0.0), axis=1)
                # a NaN in the group (|inf| * 0 of a pruned inf too) makes torch.amax NaN, so the
                # reference's scale 1; tl.max would skip it
                nan_in = tl.sum(tl.where(in_grp[None, :] & (a != a), 1, 0), axis=1) > 0
                scale = tl.where((amax > 0) & (~nan_in), tl.div_rn(amax, 7.0), 1.0)
                if SCALE_KIND == 1:
                    scale = scale.to(tl.float16).to(tl.float32)
                if SCALE_KIND == 2:  # to bfloat16, nearest even, in bits (the interpreter's cast truncates)
                    bits = scale.to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                    scale = bits.to(tl.float32, bitcast=True)
                scale = tl.where(scale > 0, scale, TINY)
                tl.store(S_ptr + r64 * (B // G) + i // G, scale, mask=rmask)
            # round half to even, exactly: floor, then up past .5 (or at .5 onto an even value)
            x = tl.div_rn(wi, scale)  # IEEE division, as the reference (GPU `/` is approximate)
            fl = tl.floor(x)
            frac = x - fl
            odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0
            code = tl.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl)
            code = tl.where(x == x, tl.minimum(tl.maximum(code, -8.0), 7.0), x)  # NaN stays NaN, as torch.clamp
            code = tl.where(ki != 0, code + 0.0, 0.0)
            c_acc = tl.where(sel, tl.where(code == code, code, 0.0).to(tl.int32)[:, None], c_acc)
            q = code * scale
        else:
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
    if G > 0:
        tl.store(K_ptr + out, keep.to(tl.uint8), mask=m2)
        tl.store(C_ptr + out, c_acc.to(tl.int8), mask=m2)


def _launch(W1, Hinv1, mask1, n, m, group_size=0, scale_dtype=torch.float32):
    rows, B = W1.shape
    Q = torch.empty((rows, B), device=W1.device, dtype=torch.float32)
    E = torch.empty_like(Q)
    L = torch.empty(rows, device=W1.device, dtype=torch.float32)
    int4 = group_size > 0
    K = torch.empty((rows, B) if int4 else (0,), device=W1.device, dtype=torch.bool)
    C = torch.empty((rows, B) if int4 else (0,), device=W1.device, dtype=torch.int8)
    S = torch.empty((rows, B // group_size) if int4 else (0,), device=W1.device, dtype=torch.float32)
    outs = (Q, E, L, K, C, S) if int4 else (Q, E, L)
    if rows == 0 or B == 0:
        L.zero_()
        return outs
    has_mask = m == 0
    mk = mask1.view(torch.uint8) if has_mask else W1
    smr, smc = (mk.stride(0), mk.stride(1)) if has_mask else (0, 0)
    BLOCK_B = triton.next_power_of_2(B)
    BLOCK_R = max(1, min(64, _TILE // BLOCK_B))
    grid = (triton.cdiv(rows, BLOCK_R),)
    _sparsegpt_block_kernel[grid](
        W1, Hinv1, mk, Q, E, L, K.view(torch.uint8), C, S, rows, B,
        W1.stride(0), W1.stride(1), Hinv1.stride(0), Hinv1.stride(1), smr, smc,
        N=n if m > 0 else 0, M=m, HAS_MASK=has_mask, BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B,
        G=group_size, SCALE_KIND={torch.float16: 1, torch.bfloat16: 2}.get(scale_dtype, 0),
        TINY=torch.finfo(scale_dtype).tiny,
    )
    return outs


def sparsegpt_block_update(W1: torch.Tensor, Hinv1: torch.Tensor, mask1, n: int, m: int):
    """Launch the kernel; arguments are validated by :func:`sparse_kernels.ops.sparsegpt_block_update`."""
    return _launch(W1, Hinv1, mask1, n, m)


def sparsegpt_block_update_int4(W1: torch.Tensor, Hinv1: torch.Tensor, mask1, n: int, m: int, group_size: int,
                                scale_dtype: torch.dtype):
    """Launch the kernel with joint int4 quantization (``G = group_size``); arguments are
    validated by :func:`sparse_kernels.ops.sparsegpt_block_update_int4`.  Returns
    ``(Q1, Err1, losses, keep, codes, scales)``."""
    return _launch(W1, Hinv1, mask1, n, m, group_size, scale_dtype)
