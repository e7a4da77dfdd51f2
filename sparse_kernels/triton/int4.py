"""Triton ``sparse_linear_int4``: 2:4 weights with int4 values (:mod:`sparse_kernels.reference.int4`).

Decode (``M <= 16``): the 2:4 kernel's split-K launch (grid ``(cdiv(N, BLOCK_N), SPLIT_K)``,
fp32 partials in a workspace, then an in-order reduction with the bias: deterministic), so a
GEMV spreads over the SMs.  Larger M: grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``; each
program walks K in steps of ``BLOCK_K`` columns.  Per step it loads, for its ``BLOCK_N`` rows, one byte of codes per group of four
columns (the group's two kept values: low nibble first), that group's meta word and its scale
(``scales[n, 4g // G]``), dequantizes ``(code - 8) * scale`` in fp32 (exact), expands the pairs to
the dense ``[BLOCK_N, BLOCK_K]`` tile in registers (:func:`sparse_kernels.triton.linear.expand_pairs`)
and accumulates ``W x^T`` in fp32 (the register-built tile as the dot's A operand, as in the
2:4 kernel).  bfloat16 x feeds the tensor cores with the tile rounded to bf16; float32 and float16
x use the fp32 dot (``input_precision="ieee"``; an fp16 tile could overflow).  The weight read from memory is the codes, meta and
scales: the dense or 16-bit 2:4 weight never exists.

Not yet run on a GPU (written and tested under ``TRITON_INTERPRET=1``); the configs are the usual
Triton GEMM starting points, not measured choices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import (
    _DECODE_MAX_M,
    _INTERPRET,
    _SPLITK,
    _bucket,
    _dot,
    _out_dtype,
    _upcast,
    expand_pairs,
    split_bounds,
    splitk_reduce,
    splitk_workspace,
)

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
else:
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (64, 64, 64, 4, 4),
                                         (128, 128, 64, 8, 3))]


@triton.jit
def _load_int4_step(x_rows, q_rows, m_rows, s_rows, k0, rm, rn, M, N, K, G, sxk, sqk, smk, ssk,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K step: x ``[len(rm), BLOCK_K]`` and the dequantized, expanded weight tile
    ``[BLOCK_N, BLOCK_K]`` (fp32, exact)."""
    rg = tl.arange(0, BLOCK_K // 4)
    kk = k0 + tl.arange(0, BLOCK_K)
    gg = k0 // 4 + rg  # group of four columns = byte of codes
    xmask = (rm[:, None] < M) & (kk[None, :] < K)
    gmask = (rn[:, None] < N) & (gg[None, :] < K // 4)
    x = tl.load(x_rows + kk[None, :] * sxk, mask=xmask, other=0.0)
    byte = tl.load(q_rows + gg[None, :] * sqk, mask=gmask, other=0x88).to(tl.int32)  # 0x88: codes of 0
    scale = tl.load(s_rows + ((4 * gg) // G)[None, :] * ssk, mask=gmask, other=0.0).to(tl.float32)
    word = tl.load(m_rows + (gg // 4)[None, :] * smk, mask=gmask, other=0x4444).to(tl.int32) & 0xFFFF
    v0 = ((byte & 0xF) - 8).to(tl.float32) * scale
    v1 = ((byte >> 4) - 8).to(tl.float32) * scale
    return x, expand_pairs(v0, v1, word, (4 * (rg % 4))[None, :], BLOCK_N, BLOCK_K)


@triton.jit
def _int4_dot(w, x, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc += w @ x^T`` for the fp32 weight tile ``w``: the fp32 dot for fp32/fp16 x (IEEE) and
    upcast dtypes, else the tile rounded to x's dtype (bf16) on the tensor cores."""
    if IEEE or UPCAST:
        return _dot(w, tl.trans(x.to(tl.float32)), acc, True, False)
    return _dot(w.to(x.dtype), tl.trans(x), acc, False, False)


@triton.jit
def _sparse_linear_int4_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, G, M_BUCKET,
                               sxm, sxk, sqn, sqk, smn, smk, ssn, ssk, sym, syn,
                               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
    q_rows = q_ptr + rn[:, None].to(tl.int64) * sqn
    m_rows = meta_ptr + rn[:, None].to(tl.int64) * smn
    s_rows = s_ptr + rn[:, None].to(tl.int64) * ssn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
    for k0 in range(0, K, BLOCK_K):
        x, w = _load_int4_step(x_rows, q_rows, m_rows, s_rows, k0, rm, rn, M, N, K, G, sxk, sqk, smk, ssk,
                               BLOCK_N, BLOCK_K)
        acc = _int4_dot(w, x, acc, IEEE, UPCAST)
    acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_kernel = triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "G"])(_sparse_linear_int4_kernel)


# ---------------------------------------------------------------- decode (M <= 16): split-K
@triton.jit
def _sparse_linear_int4_splitk_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, ws_ptr, M, N, K, G, SPLIT_K, M_BUCKET,
                                      sxm, sxk, sqn, sqk, smn, smk, ssn, ssk,
                                      IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 2:4 kernel's split-K decode launch (:func:`sparse_kernels.triton.linear` module
    docstring) on int4 weights: partial sums ``ws[s, :M, n-tile]`` over split ``s``'s whole
    BLOCK_K steps (a split past K writes zeros); grid (N tiles, SPLIT_K).  BLOCK_M == 1: the
    products summed over K on the CUDA cores in fp32; BLOCK_M == 16: ``tl.dot``."""
    k_lo, k_hi = split_bounds(K, SPLIT_K, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
    q_rows = q_ptr + rn[:, None].to(tl.int64) * sqn
    m_rows = meta_ptr + rn[:, None].to(tl.int64) * smn
    s_rows = s_ptr + rn[:, None].to(tl.int64) * ssn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = _load_int4_step(x_rows, q_rows, m_rows, s_rows, k0, rm, rn, M, N, K, G, sxk, sqk, smk, ssk,
                               BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1, keep_dims=True)
        else:
            acc = _int4_dot(w, x, acc, IEEE, UPCAST)
    acc = tl.trans(acc)
    tl.store(ws_ptr + (tl.program_id(1) * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_splitk = triton.autotune(configs=_SPLITK, key=["M_BUCKET", "N", "K", "G"])(_sparse_linear_int4_splitk_kernel)


def _sparse_linear_int4_splitk(x, qvalues, meta, scales, bias, G, workspace=None):
    """Decode path (``1 <= M <= 16``, ``N >= 1``).  ``workspace``: optional fp32
    ``[SPLIT_K, M, N]`` (contiguous) for tests; by default ``torch.empty`` of that shape."""
    M, K = x.shape
    N = qvalues.shape[0]
    split, workspace = splitk_workspace(x, N, workspace)
    grid = lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]), split)  # noqa: E731
    _splitk[grid](x, qvalues, meta, scales, workspace, M, N, K, G, split, _bucket(M),
                  x.stride(0), x.stride(1), qvalues.stride(0), qvalues.stride(1), meta.stride(0), meta.stride(1),
                  scales.stride(0), scales.stride(1),
                  IEEE=x.dtype in (torch.float32, torch.float16), UPCAST=_upcast(x.dtype),
                  BLOCK_M=1 if M == 1 else 16)
    return splitk_reduce(workspace, bias, x)


def sparse_linear_int4(x, qvalues, meta, scales, bias):
    """Launch (shapes and dtypes checked by :func:`sparse_kernels.ops.int4.sparse_linear_int4`)."""
    M, K = x.shape
    N = qvalues.shape[0]
    G = K // scales.shape[1] if N else K
    if 0 < M <= _DECODE_MAX_M and N > 0:
        return _sparse_linear_int4_splitk(x, qvalues, meta, scales, bias, G)
    y = torch.empty(M, N, device=x.device, dtype=_out_dtype(x.dtype))
    if M == 0 or N == 0:
        return y.zero_().to(x.dtype) if bias is None or M == 0 else y.zero_().add_(bias).to(x.dtype)

    def grid(meta_):
        return triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(N, meta_["BLOCK_N"])

    _kernel[grid](x, qvalues, meta, scales, bias if bias is not None else x, y, M, N, K, G,
                  1 << max(0, (M - 1).bit_length()),
                  x.stride(0), x.stride(1), qvalues.stride(0), qvalues.stride(1), meta.stride(0), meta.stride(1),
                  scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
                  # fp16 x: the fp32 dot too (a weight tile rounded to fp16 could overflow: |q * scale| > 65504)
                  HAS_BIAS=bias is not None, IEEE=x.dtype in (torch.float32, torch.float16),
                  UPCAST=_upcast(x.dtype))
    return y.to(x.dtype)
