"""Triton sparse matmuls: ``sparse_linear`` (2:4) forward, ``masked_linear`` forward and backward.

Same math as :mod:`sparse_kernels.reference.linear` (layouts there):

* ``sparse_linear``: per step of ``BLOCK_K`` input columns a program loads
  ``values [BLOCK_N, BLOCK_K/2]`` and the matching meta nibbles, expands them in registers to the
  dense ``[BLOCK_N, BLOCK_K]`` weight tile (position ``p`` of a group takes ``v0`` where
  ``i0 == p``, ``v1`` where ``i1 == p``, else 0) and accumulates the transposed tile
  ``tl.dot(w_tile, x_tile^T)`` in fp32 (the register-built tile is the A operand; see the
  kernel).  The dense weight never reaches memory.  Two launch shapes:

  - large M (``M > 16``): each program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and walks
    all of K.
  - decode (``M <= 16``), split-K: grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; program ``(j, s)``
    covers the contiguous K range ``[s * span, (s + 1) * span)``, ``span = cdiv(cdiv(K,
    BLOCK_K), SPLIT_K) * BLOCK_K`` (whole steps, BLOCK_K a multiple of 64 so meta words never
    straddle two splits), and writes its fp32 partial sums to a workspace ``[SPLIT_K, M, N]``
    (``torch.empty``: every element is written, a split past K writes zeros).  A second kernel
    sums the splits in order (deterministic: no atomics, same input -> same bits within a process;
    another process may autotune a different BLOCK_K, hence another summation order), adds the bias
    in fp32 and casts to x's dtype.  M == 1 multiplies the expanded tile by the broadcast x row
    and sums over K on the CUDA cores (no tensor-core layout conversion of the register-built
    tile, no 15 wasted rows); 2 <= M <= 16 uses ``tl.dot`` with BLOCK_M=16 (one MMA row block;
    the broadcast product ``[16, BLOCK_N, BLOCK_K]`` would not fit in registers).
    SPLIT_K (:func:`decode_split_k`): enough splits for 4 programs per SM,
    ``cdiv(4 * SMs, cdiv(N, 32))``, capped at ``K // 256`` and 16 (H200, 132 SMs: 4096x4096 and
    4096x14336 -> 5 splits, 640 programs; 14336x4096 -> 2, 896 programs).  A first guess:
    compiled for sm_80/sm_90 (triton 3.6 and 3.8), not yet run on a GPU.  The previous decode
    launch (grid ``(1, N/BLOCK_N)``, all of K per program) ran at 0.09-0.27x of dense cuBLAS on
    an H200 (benchmarks/results/gpu/h200_2026-11-28).
* ``masked_linear`` (and its two gradient kernels): the weight tile is loaded with its mask
  (bool, or bit ``c % 8`` of byte ``c // 8`` when packed) and zeroed in registers; ``W * M``
  is never written to global memory.

fp32 inputs use ``input_precision="ieee"`` (no TF32), matching ``F.linear``'s default.
Autotuning (key: batch bucket, N, K and the dtypes), under ``TRITON_INTERPRET=1`` a single small
config (the split-K decode: BLOCK_N=16, BLOCK_K=64 and ``min(3, cdiv(K, 64))`` splits, so the
tests run several splits).  The configs are the usual Triton GEMM starting points, not measured
choices.  Few on purpose: every config of every key is compiled and timed on first use (about
1-3 s to compile, 0.15 s to time each), and the benchmark table alone has
4 shapes x 2 dtypes x 7 batch sizes = 56 keys per kernel.

* sparse_linear decode (split-K): BLOCK_N=32 (fixed: the split rule counts N tiles of 32),
  (BLOCK_K, warps) = (128, 4), (128, 8), (256, 8); register counts next to ``_SPLITK``;
* masked_linear decode (``M <= 16``): BLOCK_M=16 with (BLOCK_N, BLOCK_K) = (32, 128), (64, 128),
  (32, 256): memory-bound, so narrow N tiles and long K steps;
* large M: (BLOCK_M, BLOCK_N) = (64, 64), (64, 128) for a batch bucket <= 256 (more programs
  when few rows of tiles exist) and (128, 128), (128, 256) above it, all BLOCK_K=64; each key
  times only the two configs of its range (``_prune_by_m``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


if _INTERPRET:
    _DECODE = _LARGE = [_cfg(16, 16, 32, 1, 1)]
else:
    _DECODE = [_cfg(16, bn, bk, w, s) for bn, bk, w, s in ((32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 4))]
    _LARGE = [_cfg(bm, bn, bk, w, s) for bm, bn, bk, w, s in
              ((64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3))]
_KEY = ["M_BUCKET", "N", "K"]
_SMALL_M_BUCKET = 256  # large-M kernels: 64-row tiles up to this batch bucket, 128-row tiles above


def _prune_by_m(configs, named_args, **kwargs):
    """Autotuner ``early_config_prune``: the large-M configs whose BLOCK_M suits the batch bucket."""
    bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    if bucket is None:
        return configs
    want = 64 if bucket <= _SMALL_M_BUCKET else 128
    return [c for c in configs if c.kwargs["BLOCK_M"] == want] or configs


_PRUNE = {"early_config_prune": _prune_by_m}


def _upcast(dtype):
    return _INTERPRET and dtype == torch.bfloat16


def _out_dtype(dtype):
    """The interpreter truncates fp32 -> bf16 stores; there we store fp32 and round with torch."""
    return torch.float32 if _upcast(dtype) else dtype
_DECODE_MAX_M = 16


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32.  UPCAST: bf16 operands go through fp32 (the interpreter's bf16 dot is
    wrong in triton 3.8; on GPUs bf16 feeds the tensor cores directly)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _expand_2to4(v_ptrs, meta_ptrs, shifts, vmask, gmask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from values [BLOCK_N, BLOCK_K/2] and meta nibbles."""
    v = tl.load(v_ptrs, mask=vmask, other=0.0)  # [BLOCK_N, BLOCK_K/2]
    v = tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2))
    v0, v1 = tl.split(v)  # [BLOCK_N, BLOCK_K/4]
    word = tl.load(meta_ptrs, mask=gmask, other=0x4).to(tl.int32) & 0xFFFF
    return expand_pairs(v0, v1, word, shifts, BLOCK_N, BLOCK_K)


@triton.jit
def expand_pairs(v0, v1, word, shifts, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from each group's two kept values ``v0``, ``v1``
    [BLOCK_N, BLOCK_K/4] and its meta word (int32, the 16 bits) shifted by ``shifts``."""
    nib = (word >> shifts) & 0xF
    i0 = nib & 3
    i1 = nib >> 2
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [..., a, b] = w_{2a+b}
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _load_step(x_rows, v_rows, m_rows, k0, rm, rn, M, N, K, sxk, svk, smk,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K step of both sparse_linear kernels: the x tile ``[len(rm), BLOCK_K]`` and the
    expanded W tile ``[BLOCK_N, BLOCK_K]`` at columns ``k0..``; ``*_rows`` are the tiles' row
    pointers (int64 offsets), k0 a multiple of BLOCK_K (itself a multiple of 64)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    hh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rg = tl.arange(0, BLOCK_K // 4)
    gg = k0 // 4 + rg
    x = tl.load(x_rows + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
    w = _expand_2to4(v_rows + hh[None, :] * svk, m_rows + (gg // 4)[None, :] * smk, (4 * (rg % 4))[None, :],
                     (rn[:, None] < N) & (hh[None, :] < K // 2), (rn[:, None] < N) & (gg[None, :] < K // 4),
                     BLOCK_N, BLOCK_K)
    return x, w


@triton.jit
def _sparse_linear_kernel(x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                          sxm, sxk, svn, svk, smn, smk, sym, syn,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # row offsets in int64: rows x stride pass 2^31 for large batches or large weights
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
    v_rows = v_ptr + rn[:, None].to(tl.int64) * svn
    m_rows = meta_ptr + rn[:, None].to(tl.int64) * smn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile: see below
    for k0 in range(0, K, BLOCK_K):
        x, w = _load_step(x_rows, v_rows, m_rows, k0, rm, rn, M, N, K, sxk, svk, smk, BLOCK_N, BLOCK_K)
        # y^T += W x^T: the register-built W tile is the dot's A operand.  As the B operand
        # (x @ W^T) triton 3.6 fails to compile it for sm_90 ("Illegal shared layout" in
        # TritonGPUOptimizeDotOperands, BLOCK_M >= 64, 16-bit dtypes); 3.8 accepts both.
        acc = _dot(w, tl.trans(x), acc, IEEE, UPCAST)
    acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_sl_large = triton.autotune(configs=_LARGE, key=_KEY, prune_configs_by=_PRUNE)(_sparse_linear_kernel)


# ---------------------------------------------------------------- sparse_linear, decode (M <= 16): split-K
@triton.jit
def split_bounds(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)`` of this program's split (program_id 1): whole BLOCK_K steps, so no step
    straddles two splits; empty for a split past K."""
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = tl.program_id(1) * span
    return k_lo, tl.minimum(k_lo + span, K)


@triton.jit
def _sparse_linear_splitk_kernel(x_ptr, v_ptr, meta_ptr, ws_ptr, M, N, K, SPLIT_K, M_BUCKET,
                                 sxm, sxk, svn, svk, smn, smk,
                                 IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums ``ws[s, :M, n-tile]`` (fp32) over split ``s``'s K range; grid (N tiles, SPLIT_K).

    Split ``s`` covers columns ``[s * steps * BLOCK_K, (s + 1) * steps * BLOCK_K) & [0, K)`` with
    ``steps = cdiv(cdiv(K, BLOCK_K), SPLIT_K)``: whole BLOCK_K steps, so no step straddles two splits.
    A split past K (possible when SPLIT_K does not divide the step count) writes zeros: every
    element of ``ws[:SPLIT_K, :M, :N]`` is written by exactly one program.
    BLOCK_M == 1: ``w * x`` broadcast and summed over K on the CUDA cores (no dot layout
    conversion of the register-built tile); BLOCK_M == 16: ``tl.dot`` as in the large-M kernel.
    """
    pid_s = tl.program_id(1)
    k_lo, k_hi = split_bounds(K, SPLIT_K, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm  # int64: a strided x can have a huge row stride
    v_rows = v_ptr + rn[:, None].to(tl.int64) * svn
    m_rows = meta_ptr + rn[:, None].to(tl.int64) * smn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile, as in _sparse_linear_kernel
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = _load_step(x_rows, v_rows, m_rows, k0, rm, rn, M, N, K, sxk, svk, smk, BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1, keep_dims=True)
        else:
            acc = _dot(w, tl.trans(x), acc, IEEE, UPCAST)
    acc = tl.trans(acc)
    tl.store(ws_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, M, N, SPLIT_K, sym, syn,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[m, n] = sum_s ws[s, m, n] (+ bias[n])`` in fp32, s in order (deterministic); grid (M, N tiles)."""
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m).to(tl.int64) * N + rn, mask=inb, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=inb, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * sym + rn * syn, acc.to(y_ptr.dtype.element_ty), mask=inb)


_SPLIT_BLOCK_N = 16 if _INTERPRET else 32
if _INTERPRET:
    _SPLITK = [triton.Config({"BLOCK_N": _SPLIT_BLOCK_N, "BLOCK_K": 64}, num_warps=1, num_stages=1)]
else:
    # ptxas -v, sm_90a, fp16/bf16, BLOCK_M 1 / 16 (compiled, not run), triton 3.8 without the
    # launch's stride/divisibility specialization: (128, 4 warps) 114 / 153 registers, (128, 8)
    # 64-80 / 111, (256, 8) 148 / 164, no spills; (256, 4) was dropped: 224 / 246 registers leave
    # room for 2 programs per SM.  Triton 3.6 with the specialization: 48-128, no spills.
    _SPLITK = [triton.Config({"BLOCK_N": _SPLIT_BLOCK_N, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bk, w, s in ((128, 4, 4), (128, 8, 3), (256, 8, 3))]
_sl_splitk = triton.autotune(configs=_SPLITK, key=_KEY)(_sparse_linear_splitk_kernel)
_SPLIT_WAVES = 4  # programs >= 4 x the SM count (first guess: compiled, not yet run on a GPU)
_SPLIT_MIN_COLS = 256  # each split gets at least one 256-column step of the largest BLOCK_K
_SPLIT_MAX = 16
_SPLIT_INTERPRET = 3  # under the interpreter: up to 3 splits of 64 columns, so tests exercise the split path
_REDUCE_BLOCK = 256


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_split_k(N, K, device):
    """SPLIT_K of the decode path for an ``[M <= 16, K] x [N, K]^T`` product on ``device``.

    CUDA: ``cdiv(4 * SMs, cdiv(N, 32))`` (enough splits for 4 programs per SM), at most
    ``K // 256`` and 16, at least 1, then lowered so that no split of 256-column steps is empty;
    e.g. H200 (132 SMs) 4096x4096 -> 4 splits of 4 steps (512 programs), 14336x4096 -> 2 (896).
    Under the interpreter (or on CPU): ``min(3, cdiv(K, 64))``.
    """
    if _INTERPRET or torch.device(device).type != "cuda":
        return max(1, min(_SPLIT_INTERPRET, triton.cdiv(K, 64)))
    dev = torch.device(device)
    sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    want = triton.cdiv(_SPLIT_WAVES * sms, triton.cdiv(N, _SPLIT_BLOCK_N))
    split = max(1, min(want, K // _SPLIT_MIN_COLS, _SPLIT_MAX))
    steps = max(1, triton.cdiv(K, _SPLIT_MIN_COLS))  # 256-column steps (the largest BLOCK_K)
    return triton.cdiv(steps, triton.cdiv(steps, split))  # as many splits as that leaves non-empty


def splitk_workspace(x, N, workspace=None):
    """``(SPLIT_K, workspace)`` of a decode launch on ``x [M, K]``: the given workspace checked
    (fp32 ``[SPLIT_K, M, N]``, contiguous; tests pass a poisoned one), else ``torch.empty``."""
    M, K = x.shape
    split = decode_split_k(N, K, x.device)
    if workspace is None:
        return split, torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    if tuple(workspace.shape) != (split, M, N) or workspace.dtype != torch.float32 or not workspace.is_contiguous():
        raise ValueError(f"workspace: got {tuple(workspace.shape)} {workspace.dtype}; "
                         f"expected a contiguous float32 ({split}, {M}, {N})")
    return split, workspace


def splitk_reduce(workspace, bias, x):
    """``y = sum over splits + bias`` (fp32, in order), in x's dtype."""
    split, M, N = workspace.shape
    bias = bias.contiguous() if bias is not None else None  # read with unit stride
    y = torch.empty(M, N, device=x.device, dtype=_out_dtype(x.dtype))
    _splitk_reduce_kernel[(M, triton.cdiv(N, _REDUCE_BLOCK))](
        workspace, bias if bias is not None else workspace, y, M, N, split, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK)
    return y.to(x.dtype)


def _sparse_linear_splitk(x, values, meta, bias, workspace=None):
    """Decode path (``1 <= M <= 16``, ``N >= 1``).  ``workspace``: optional fp32
    ``[SPLIT_K, M, N]`` (contiguous) for tests; by default ``torch.empty`` of that shape."""
    M, K = x.shape
    N = values.shape[0]
    split, workspace = splitk_workspace(x, N, workspace)
    grid = lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]), split)  # noqa: E731
    _sl_splitk[grid](x, values, meta, workspace, M, N, K, split, _bucket(M),
                     x.stride(0), x.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
                     IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype), BLOCK_M=1 if M == 1 else 16)
    return splitk_reduce(workspace, bias, x)


def _bucket(m):
    return 1 << max(0, (m - 1).bit_length())


def sparse_linear(x, values, meta, bias, meta_dev):
    """``x [M, K]`` -> ``[M, N]``; see the module docstring.  ``meta_dev`` is ignored."""
    M, K = x.shape
    N = values.shape[0]
    if 0 < M <= _DECODE_MAX_M and N > 0:
        return _sparse_linear_splitk(x, values, meta, bias)
    y = torch.empty(M, N, device=x.device, dtype=_out_dtype(x.dtype))
    if M == 0 or N == 0:
        return y.to(x.dtype)
    kern = _sl_large
    grid = lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(N, meta_["BLOCK_N"]))  # noqa: E731
    b = bias.contiguous() if bias is not None else y  # read with unit stride
    kern[grid](x, values, meta, b, y, M, N, K, _bucket(M),
               x.stride(0), x.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
               y.stride(0), y.stride(1), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype))
    return y.to(x.dtype)


# ---------------------------------------------------------------- masked_linear
@triton.jit
def _load_masked_w(w_ptr, mask_ptr, rn, rk, N, K, swn, swk, smn, PACKED: tl.constexpr):
    """[len(rn), len(rk)] tile of W * M, zeroed in registers."""
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=inb, other=0.0)
    if PACKED:
        byte = tl.load(mask_ptr + rn[:, None] * smn + (rk // 8)[None, :], mask=inb, other=0).to(tl.int32)
        keep = ((byte >> (rk % 8)[None, :]) & 1) != 0
    else:
        keep = tl.load(mask_ptr + rn[:, None] * smn + rk[None, :], mask=inb, other=0) != 0
    return tl.where(keep, w, tl.zeros_like(w))


@triton.jit
def _masked_linear_kernel(x_ptr, w_ptr, mask_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                          sxm, sxk, swn, swk, smn, sym, syn,
                          HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _load_masked_w(w_ptr, mask_ptr, rn, rk, N, K, swn, swk, smn, PACKED)
        acc = _dot(x, tl.trans(w), acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_ml_decode = triton.autotune(configs=_DECODE, key=_KEY)(_masked_linear_kernel)
_ml_large = triton.autotune(configs=_LARGE, key=_KEY, prune_configs_by=_PRUNE)(_masked_linear_kernel)


@triton.jit
def _grad_x_kernel(gy_ptr, w_ptr, mask_ptr, gx_ptr, M, N, K, M_BUCKET,
                   sgm, sgn, swn, swk, smn, sxm, sxk,
                   PACKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_x [M, K] = grad_y [M, N] @ (W * M) [N, K]; tiles over (M, K), loop over N."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(gy_ptr + rm[:, None] * sgm + rn[None, :] * sgn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _load_masked_w(w_ptr, mask_ptr, rn, rk, N, K, swn, swk, smn, PACKED)
        acc = _dot(g, w, acc, IEEE, UPCAST)
    tl.store(gx_ptr + rm[:, None] * sxm + rk[None, :] * sxk, acc.to(gx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _grad_w_kernel(gy_ptr, x_ptr, mask_ptr, gw_ptr, M, N, K, M_BUCKET,
                   sgm, sgn, sxm, sxk, smn, swn, swk,
                   PACKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_W [N, K] = (grad_y^T [N, M] @ x [M, K]) * mask; tiles over (N, K), loop over M."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(gy_ptr + rm[:, None] * sgm + rn[None, :] * sgn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc = _dot(tl.trans(g), x, acc, IEEE, UPCAST)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    if PACKED:
        byte = tl.load(mask_ptr + rn[:, None] * smn + (rk // 8)[None, :], mask=inb, other=0).to(tl.int32)
        keep = ((byte >> (rk % 8)[None, :]) & 1) != 0
    else:
        keep = tl.load(mask_ptr + rn[:, None] * smn + rk[None, :], mask=inb, other=0) != 0
    acc = tl.where(keep, acc, 0.0)
    tl.store(gw_ptr + rn[:, None] * swn + rk[None, :] * swk, acc.to(gw_ptr.dtype.element_ty), mask=inb)


# Backward (training): three usual GEMM tiles, not measured.
_BWD = [_cfg(32, 32, 32, 1, 1)] if _INTERPRET else [
    _cfg(bm, bn, bk, w, s) for bm, bn, bk, w, s in ((64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3))]
_grad_x = triton.autotune(configs=_BWD, key=_KEY)(_grad_x_kernel)
_grad_w = triton.autotune(configs=_BWD, key=_KEY)(_grad_w_kernel)


def _mask_arg(mask):
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def masked_linear(x, weight, mask, bias):
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=_out_dtype(x.dtype))
    if M == 0 or N == 0:
        return y.to(x.dtype)
    mk = _mask_arg(mask.contiguous())
    bias = bias.contiguous() if bias is not None else None  # read with unit stride
    kern = _ml_decode if M <= _DECODE_MAX_M else _ml_large
    grid = lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(N, meta_["BLOCK_N"]))  # noqa: E731
    kern[grid](x, weight, mk, bias if bias is not None else y, y, M, N, K, _bucket(M),
               x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), mk.stride(0), y.stride(0), y.stride(1),
               HAS_BIAS=bias is not None, PACKED=mask.dtype == torch.uint8, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype))
    return y.to(x.dtype)


def masked_linear_grad_x(grad_y, weight, mask):
    M, N = grad_y.shape
    K = weight.shape[1]
    gx = torch.empty(M, K, device=grad_y.device, dtype=_out_dtype(grad_y.dtype))
    if M == 0 or K == 0 or N == 0:
        return gx.zero_().to(grad_y.dtype)
    mk = _mask_arg(mask.contiguous())
    grid = lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(K, meta_["BLOCK_K"]))  # noqa: E731
    _grad_x[grid](grad_y, weight, mk, gx, M, N, K, _bucket(M), grad_y.stride(0), grad_y.stride(1),
                  weight.stride(0), weight.stride(1), mk.stride(0), gx.stride(0), gx.stride(1),
                  PACKED=mask.dtype == torch.uint8, IEEE=grad_y.dtype == torch.float32, UPCAST=_upcast(grad_y.dtype))
    return gx.to(grad_y.dtype)


def masked_linear_grad_w(grad_y, x, weight, mask):
    M, N = grad_y.shape
    K = x.shape[1]
    gw = torch.empty(weight.shape, device=weight.device, dtype=_out_dtype(weight.dtype))
    if N == 0 or K == 0 or M == 0:
        return gw.zero_().to(weight.dtype)
    mk = _mask_arg(mask.contiguous())
    g = grad_y.to(x.dtype)
    grid = lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]), triton.cdiv(K, meta_["BLOCK_K"]))  # noqa: E731
    _grad_w[grid](g, x, mk, gw, M, N, K, _bucket(M), g.stride(0), g.stride(1), x.stride(0), x.stride(1),
                  mk.stride(0), gw.stride(0), gw.stride(1),
                  PACKED=mask.dtype == torch.uint8, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype))
    return gw.to(weight.dtype)
