"""The sparse-tensor-core metadata layout (reorder_meta_mma), checked against the PTX ISA.

Three kinds of checks, all on CPU:
* the reference permutation round-trips bit for bit and matches the documented formula;
* an emulator of ``mma.sp.m16n8k32`` written from the PTX ISA's fragment description (not from
  our layout code) runs the exact data flow of both CUDA kernels of csrc/cuda/linear.cu (which
  lane loads which bytes, which word goes to which register, which selector) and must reproduce
  ``x @ W.T`` exactly on integer data; likewise ``wgmma.mma_async.sp`` (descriptors, core-matrix
  shared-memory layout) for csrc/cuda/linear_wgmma.cu;
* the same emulation with a deliberately wrong metadata form fails (the test can fail).
CUDA-backend comparisons live in tests/test_cuda_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitexact
from sparse_kernels.ops import mma_layout as L
from sparse_kernels.reference import mma_layout as ref
from sparse_kernels.reference import sparse24 as s24

SHAPES = [(1, 16), (15, 48), (16, 64), (17, 80), (33, 128), (130, 272)]


def _random_meta(rows, cols, gen):
    return torch.randint(-(2**15), 2**15, (rows, cols // 16), dtype=torch.int16, generator=gen)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_round_trip_bitexact(rows, cols):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    meta = _random_meta(rows, cols, gen)
    dev = L.reorder_meta_mma(meta, backend="reference")
    assert tuple(dev.shape) == L.meta_dev_shape(rows, cols) and dev.dtype == torch.int32
    assert_bitexact(L.unreorder_meta_mma(dev, rows, cols, backend="reference"), meta, "round trip")


def test_inverse_is_a_bijection_on_full_tiles():
    gen = torch.Generator().manual_seed(7)
    dev = torch.randint(-(2**31), 2**31, (3, 2, 32), dtype=torch.int64, generator=gen).to(torch.int32)
    meta = L.unreorder_meta_mma(dev, 48, 128, backend="reference")
    assert_bitexact(L.reorder_meta_mma(meta, backend="reference"), dev, "reorder(unreorder)")


@pytest.mark.parametrize("rows,cols", [(17, 80), (33, 128)])
def test_matches_documented_formula(rows, cols):
    """Lane 4g+t: bits 4j = nibble t of meta[16b+g, 4s+j], bits 16+4j = same for row 16b+g+8; pad 0x4."""
    gen = torch.Generator().manual_seed(3)
    meta = _random_meta(rows, cols, gen)
    dev = L.reorder_meta_mma(meta, backend="reference")
    m = meta.to(torch.int64) & 0xFFFF
    nb, ns, _ = dev.shape
    for b in range(nb):
        for s in range(ns):
            for lane in range(32):
                g, t = divmod(lane, 4)
                word = 0
                for h in range(2):
                    for j in range(4):
                        r, c = 16 * b + 8 * h + g, 4 * s + j
                        w = int(m[r, c]) if r < rows and c < cols // 16 else 0x4444
                        word |= ((w >> (4 * t)) & 0xF) << (16 * h + 4 * j)
                assert int(dev[b, s, lane]) & 0xFFFFFFFF == word, (b, s, lane)


def test_padding_nibbles_are_valid_ordered_pairs():
    meta = torch.full((3, 1), 0x4444, dtype=torch.int16)  # all (0, 1)
    dev = L.reorder_meta_mma(meta, backend="reference")
    assert torch.all((dev.to(torch.int64) & 0xFFFFFFFF) == 0x44444444)


def test_natural_words_is_the_canonical_chunk():
    gen = torch.Generator().manual_seed(11)
    meta = _random_meta(32, 128, gen)
    nat = ref.natural_words(L.reorder_meta_mma(meta, backend="reference"))
    m = meta.to(torch.int64) & 0xFFFF
    for b in range(2):
        for s in range(2):
            for lane in range(32):
                g, t = divmod(lane, 4)
                want = int(m[16 * b + g, 4 * s + t]) | int(m[16 * b + g + 8, 4 * s + t]) << 16
                assert int(nat[b, s, lane]) == want


# ------------------------------------------------------------------ ISA emulation
def mma_sp_m16n8k32(a, b, e, sel):
    """D = A @ B for one warp, from the PTX ISA's description of sparse mma.m16n8k32 (.f16/.bf16).

    a, b: [32 lanes, 8] values (a0..a7, b0..b7); e: [32] uint32 metadata; sel: sparsity selector.
    A fragment (compressed 16 x 16, same as dense m16n8k16): a_i is row g (+8 for i in {2,3,6,7}),
    compressed col 2t + (i & 1) (+8 for i >= 4); compressed cols 2L, 2L+1 are logical group L's
    two values.  Metadata: lanes with t = 2*sel + h give logical groups 4h..4h+3, nibble at bits
    4j (row g) and 16+4j (row g+8), i0 = nib & 3 < i1 = nib >> 2 (ordered metadata).
    B: b_i is K row 2t + (i & 1) + 8*(i // 2), column g.  Returns D [16, 8].
    """
    A = torch.zeros(16, 32, dtype=torch.float64)
    for r in range(16):
        g, hi = r % 8, int(r >= 8)
        for Lg in range(8):
            word = int(e[4 * g + 2 * sel + Lg // 4]) & 0xFFFFFFFF
            nib = (word >> (16 * hi + 4 * (Lg % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, "ordered metadata needs i0 < i1"
            vals = []
            for c in (2 * Lg, 2 * Lg + 1):
                lane = 4 * g + (c % 8) // 2
                reg = (c & 1) + 2 * hi + 4 * int(c >= 8)
                vals.append(a[lane, reg])
            A[r, 4 * Lg + i0] += vals[0]
            A[r, 4 * Lg + i1] += vals[1]
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        for i in range(8):
            B[2 * (lane % 4) + (i & 1) + 8 * (i // 2), lane // 4] = b[lane, i]
    return A @ B


def _problem(N, K, M, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-4, 5, (N, K), generator=gen).to(torch.float64)
    w = torch.where(s24.mask_2to4(w), w, torch.zeros((), dtype=w.dtype))
    x = torch.randint(-4, 5, (M, K), generator=gen).to(torch.float64)
    values, meta = s24.compress_2to4(w, False)
    return w, x, values, meta


def _get(t, r, c0, n):
    """t[r, c0:c0+n] with zeros outside t (the kernels' predicated / zero-filled loads)."""
    out = torch.zeros(n, dtype=torch.float64)
    if r < t.shape[0]:
        hi = min(c0 + n, t.shape[1])
        if hi > c0:
            out[: hi - c0] = t[r, c0:hi]
    return out


def emulate_gemv(x, values, meta_dev, N, K):
    """The data flow of gemv_kernel (csrc/cuda/linear.cu), lane by lane."""
    M = x.shape[0]
    nb, ns, _ = meta_dev.shape
    y = torch.zeros(M, N, dtype=torch.float64)
    for blk in range(nb):
        for nt in range((M + 7) // 8):
            D = torch.zeros(16, 8, dtype=torch.float64)
            for s in range(ns):
                aw0, aw1, bw, e = [], [], [], []
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    q, p = divmod(t, 2)
                    ok = 64 * s + 16 * t + 16 <= K
                    aw0.append(_get(values, 16 * blk + g, 32 * s + 8 * t, 8) if ok else torch.zeros(8, dtype=torch.float64))
                    aw1.append(_get(values, 16 * blk + g + 8, 32 * s + 8 * t, 8) if ok else torch.zeros(8, dtype=torch.float64))
                    kb = 64 * s + 16 * q + 32 * p
                    n = 8 * nt + g
                    bw.append(_get(x, n, kb, 16) if (n < M and kb + 16 <= K) else torch.zeros(16, dtype=torch.float64))
                    e.append(int(meta_dev[blk, s, lane]))
                for m in range(2):
                    a = torch.zeros(32, 8, dtype=torch.float64)
                    b = torch.zeros(32, 8, dtype=torch.float64)
                    for lane in range(32):
                        p = lane & 1
                        # 32-bit word k of a lane = values 2k, 2k+1 of its 16-byte load
                        own = [bw[lane][4 * k + 2 * p: 4 * k + 2 * p + 2] for k in range(4)]
                        recv = [bw[lane ^ 1][4 * k + 2 * p: 4 * k + 2 * p + 2] for k in range(4)]
                        s0 = recv if p else own
                        s1 = own if p else recv
                        apairs = [aw0[lane][4 * m: 4 * m + 2], aw1[lane][4 * m: 4 * m + 2],
                                  aw0[lane][4 * m + 2: 4 * m + 4], aw1[lane][4 * m + 2: 4 * m + 4]]
                        bpairs = [s0[2 * m], s1[2 * m], s0[2 * m + 1], s1[2 * m + 1]]
                        a[lane] = torch.cat(apairs)
                        b[lane] = torch.cat(bpairs)
                    D += mma_sp_m16n8k32(a, b, e, m)
            for r in range(16):
                for c in range(8):
                    if 16 * blk + r < N and 8 * nt + c < M:
                        y[8 * nt + c, 16 * blk + r] = D[r, c]
    return y


def emulate_gemm(x, values, meta_dev, N, K):
    """The data flow of gemm_kernel: canonical K order, ldmatrix.x4 fragments, quad-transposed metadata."""
    M = x.shape[0]
    nb, ns, _ = meta_dev.shape
    nat = ref.natural_words(meta_dev)  # the kernel's quad_transpose_nibbles of meta_dev
    y = torch.zeros(M, N, dtype=torch.float64)
    for blk in range(nb):
        for nt in range((M + 7) // 8):
            D = torch.zeros(16, 8, dtype=torch.float64)
            for s in range(ns):
                e = [int(nat[blk, s, lane]) for lane in range(32)]
                for m in range(2):
                    a = torch.zeros(32, 8, dtype=torch.float64)
                    b = torch.zeros(32, 8, dtype=torch.float64)
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        for i in range(4):
                            # ldmatrix: lane gets row lane // 4, cols 2t, 2t+1 of matrix i
                            ra = 16 * blk + (i % 2) * 8 + g
                            ca = 32 * s + 16 * m + (i // 2) * 8 + 2 * t
                            ck = (ca - 32 * s) // 8  # cp.async chunk: 8 values = 16 columns of W
                            okA = 64 * s + 16 * ck + 16 <= K
                            a[lane, 2 * i: 2 * i + 2] = _get(values, ra, ca, 2) if okA else 0
                            cb = 64 * s + 32 * m + 8 * i + 2 * t
                            b[lane, 2 * i: 2 * i + 2] = _get(x, 8 * nt + g, cb, 2) if cb + 2 <= K else 0
                    D += mma_sp_m16n8k32(a, b, e, m)
            for r in range(16):
                for c in range(8):
                    if 16 * blk + r < N and 8 * nt + c < M:
                        y[8 * nt + c, 16 * blk + r] = D[r, c]
    return y


CASES = [(16, 64, 1), (24, 96, 3), (32, 128, 11), (40, 80, 16)]


@pytest.mark.parametrize("N,K,M", CASES)
def test_gemv_data_flow_matches_isa(N, K, M):
    w, x, values, meta = _problem(N, K, M, seed=N + K + M)
    meta_dev = L.reorder_meta_mma(meta, backend="reference")
    y = emulate_gemv(x, values, meta_dev, N, K)
    assert torch.equal(y, x @ w.T), (y - x @ w.T).abs().max()


@pytest.mark.parametrize("N,K,M", CASES)
def test_gemm_data_flow_matches_isa(N, K, M):
    w, x, values, meta = _problem(N, K, M, seed=2 * N + K + M)
    meta_dev = L.reorder_meta_mma(meta, backend="reference")
    y = emulate_gemm(x, values, meta_dev, N, K)
    assert torch.equal(y, x @ w.T), (y - x @ w.T).abs().max()


# ------------------------------------------------------------------ wgmma.sp kernel (linear_wgmma.cu)
WG_BM, WG_BN, SBO = 256, 128, 128  # the kernel's kWgBM, kWgBN, kSbo
A_LBO, X_LBO = WG_BM // 8 * 128, WG_BN // 8 * 128  # kALbo, kXLbo


def desc_read(buf, start, lbo, sbo, rows, cols):
    """A K-major, no-swizzle matrix [rows, cols] of 16-bit elements read through a wgmma
    descriptor, as the PTX ISA describes it: core matrices of 8 rows x 16 bytes stored as 128
    contiguous bytes, LBO between core matrices adjacent in K, SBO between those adjacent in
    M/N; element (r, c) at byte start + (c // 8) * lbo + (r // 8) * sbo + (r % 8) * 16 + (c % 8) * 2."""
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    off = start + (c // 8) * lbo + (r // 8) * sbo + (r % 8) * 16 + (c % 8) * 2
    assert int(off.max()) + 2 <= 2 * buf.numel(), "descriptor reads past its stage buffer"
    return buf[off // 2]


def wgmma_sp_m64n128k32(a_comp, b, e_words, sel):
    """D [64, 128] = A @ B for one warpgroup, sparse A from the ISA: warp w gives rows
    16w..16w+15 with the mma.m16n8k32 metadata layout (lanes t = 2*sel + h, groups 4h + j)."""
    A = torch.zeros(64, 32, dtype=torch.float64)
    for r in range(64):
        w, rr = divmod(r, 16)
        g, hi = rr % 8, int(rr >= 8)
        for Lg in range(8):
            word = int(e_words[w][4 * g + 2 * sel + Lg // 4]) & 0xFFFFFFFF
            nib = (word >> (16 * hi + 4 * (Lg % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, "ordered metadata needs i0 < i1"
            A[r, 4 * Lg + i0] += a_comp[r, 2 * Lg]
            A[r, 4 * Lg + i1] += a_comp[r, 2 * Lg + 1]
    return A @ b


def emulate_wgmma(x, values, meta_dev, N, K):
    """The data flow of wgmma_kernel: cp.async chunk placement into the core-matrix layout
    (shared memory poisoned with NaN first), the descriptors it builds, its metadata words,
    its epilogue's accumulator indexing."""
    M = x.shape[0]
    nb, spans, _ = meta_dev.shape
    nat = ref.natural_words(meta_dev)  # quad_transpose_nibbles
    y = torch.full((M, N), float("nan"), dtype=torch.float64)
    for n0 in range(0, N, WG_BM):
        for m0 in range(0, M, WG_BN):
            acc = torch.zeros(2, 2, 64, 128, dtype=torch.float64)
            for s in range(spans):
                kbase = 64 * s
                abuf = torch.full((WG_BM * 64 // 2,), float("nan"), dtype=torch.float64)
                xbuf = torch.full((WG_BN * 128 // 2,), float("nan"), dtype=torch.float64)
                for c in range(4 * WG_BM):
                    row, ck = (c >> 1) % WG_BM, 2 * (c // (2 * WG_BM)) + (c & 1)
                    ok = n0 + row < N and kbase + 16 * ck + 16 <= K
                    dst = (ck * A_LBO + (row >> 3) * SBO + (row & 7) * 16) // 2
                    abuf[dst:dst + 8] = _get(values, n0 + row, 32 * s + 8 * ck, 8) if ok else 0
                for c in range(8 * WG_BN):
                    row, ck = (c >> 1) % WG_BN, 2 * (c // (2 * WG_BN)) + (c & 1)
                    ok = m0 + row < M and kbase + 8 * ck + 8 <= K
                    dst = (ck * X_LBO + (row >> 3) * SBO + (row & 7) * 16) // 2
                    xbuf[dst:dst + 8] = _get(x, m0 + row, kbase + 8 * ck, 8) if ok else 0
                ebuf = [[int(nat[n0 // 16 + b, s, ln]) if n0 // 16 + b < nb else 0x44444444 for ln in range(32)]
                        for b in range(WG_BM // 16)]
                for wgi in range(2):
                    for b in range(2):
                        words = [ebuf[wgi * 8 + b * 4 + wq] for wq in range(4)]
                        for ks in range(2):
                            a_comp = desc_read(abuf, wgi * 2048 + b * 1024 + 2 * ks * A_LBO, A_LBO, SBO, 64, 16)
                            bmat = desc_read(xbuf, 4 * ks * X_LBO, X_LBO, SBO, 128, 32).T  # B = x^T: [K, N]
                            acc[wgi, b] += wgmma_sp_m64n128k32(a_comp, bmat, words, ks)
            for wgi in range(2):
                for b in range(2):
                    for wq in range(4):
                        for lane in range(32):
                            g, t = divmod(lane, 4)
                            for h in range(2):
                                row = n0 + wgi * 128 + b * 64 + wq * 16 + g + 8 * h
                                for j in range(16):
                                    for c in range(2):
                                        n = m0 + 8 * j + 2 * t + c
                                        # register d[4j + 2h + c] of this lane, from the ISA's D layout
                                        d = acc[wgi, b, 16 * wq + g + 8 * h, 8 * j + 2 * t + c]
                                        if row < N and n < M:
                                            y[n, row] = d
    return y


@pytest.mark.parametrize("N,K,M", [(40, 80, 5), (300, 208, 130)])
def test_wgmma_data_flow_matches_isa(N, K, M):
    """Two CTAs along N and M where the shape allows, K tails inside a span, rows past N."""
    w, x, values, meta = _problem(N, K, M, seed=3 * N + K + M)
    meta_dev = L.reorder_meta_mma(meta, backend="reference")
    y = emulate_wgmma(x, values, meta_dev, N, K)
    assert torch.equal(y, x @ w.T), (y - x @ w.T).abs().max()


def test_wrong_metadata_form_is_detected():
    """The decode flow fed natural (untransposed) words must give a wrong product."""
    w, x, values, meta = _problem(16, 64, 4, seed=5)
    meta_dev = L.reorder_meta_mma(meta, backend="reference")
    wrong = ref.natural_words(meta_dev)
    wrong = torch.where(wrong >= 2**31, wrong - 2**32, wrong).to(torch.int32)
    assert not torch.equal(meta_dev, wrong)
    assert not torch.equal(emulate_gemv(x, values, wrong, 16, 64), x @ w.T)


# ------------------------------------------------------------------ op plumbing
def test_opcheck_reference():
    gen = torch.Generator().manual_seed(1)
    meta = _random_meta(17, 80, gen)
    torch.library.opcheck(torch.ops.sparse_kernels.reorder_meta_mma.default, (meta,))
    dev = L.reorder_meta_mma(meta)
    torch.library.opcheck(torch.ops.sparse_kernels.unreorder_meta_mma.default, (dev, 17, 80))


def test_bad_inputs():
    with pytest.raises(TypeError, match="meta: dtype int32"):
        L.reorder_meta_mma(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta: expected a 2-D tensor"):
        L.reorder_meta_mma(torch.zeros(2, dtype=torch.int16))
    dev = L.reorder_meta_mma(torch.zeros(16, 4, dtype=torch.int16))
    with pytest.raises(ValueError, match="does not match a 16 x 128 weight"):
        L.unreorder_meta_mma(dev, 16, 128)
    with pytest.raises(ValueError, match="cols: the dense column count must be a multiple of 16"):
        L.unreorder_meta_mma(dev, 16, 60)
    with pytest.raises(ValueError, match="backend"):
        L.reorder_meta_mma(torch.zeros(16, 4, dtype=torch.int16), backend="nope")
