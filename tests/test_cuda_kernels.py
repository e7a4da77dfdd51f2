"""The ``_cuda`` kernels of csrc/cuda/ against the references (run on a GPU machine).

* 2:4 format (mask/compress/decompress) and the metadata layout (reorder_meta_mma): bit-exact;
* sparse_linear_cuda (sparse tensor cores): ``assert_matmul_close`` against fp64, with torch's
  own fp16/bf16 ``F.linear`` as the error yardstick;
* sparsegpt_block_update_cuda: bit-exact against a NumPy emulation with the kernel's float32
  rounding order, and (when the SparseGPT family is present) within 99.9% mask agreement and
  0.1% loss of the PyTorch reference.

Every check is a helper taking ``(device, backend)``; the GPU tests call it with
("cuda", "cuda").  ``test_helpers_dry_run_cpu`` runs the same helpers on CPU with the reference
backend so the test logic itself is exercised where no GPU exists.  Nothing touches CUDA at
import or collection time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_bitexact, assert_matmul_close, requires_cuda, requires_sm80, skip_unless_backend
from sparse_kernels.ops import _registry as R
from sparse_kernels.reference import sparse24 as s24

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
OPS = torch.ops.sparse_kernels


def _op(name, backend):
    return R.get_op(name, backend)


def _poison_allocator(device):
    """Fill freed CUDA cache blocks with NaN so outputs a kernel never writes show up as NaN."""
    if device != "cuda":
        return
    big = torch.full((16 << 20,), float("nan"), device=device)  # 64 MB, large pool
    small = [torch.full((1 << 18,), float("nan"), device=device) for _ in range(8)]  # 1 MB each, small pool
    del big, small


def _adversarial(rows, cols, dtype, device, seed):
    """Random values with ties, all-zero groups, -0.0 and inf sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    r = torch.rand(rows, cols, generator=gen)
    w = torch.where(r < 0.08, torch.zeros(()), w)
    w = torch.where((r >= 0.08) & (r < 0.12), -torch.zeros(()), w)
    w = torch.where((r >= 0.12) & (r < 0.14), torch.full((), float("inf")), w)
    w = torch.where((r >= 0.14) & (r < 0.20), torch.full((), 0.5), w)  # ties
    if rows > 1 and cols >= 8:
        w[0, :4] = 0.0  # all-zero group
        w[1, 4:8] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    return w.to(dtype).to(device)


def _sparse24_like(rows, cols, dtype, device, seed):
    """A 2:4 weight (pruned by the reference mask) keeping -0.0 and sub-2 groups."""
    w = _adversarial(rows, cols, dtype, "cpu", seed)
    keep = s24.mask_2to4(w.float().nan_to_num())
    w = torch.where(keep, w, torch.zeros((), dtype=dtype))
    return w.to(device)


# ------------------------------------------------------------------ 2:4 format
SHAPES = [(1, 16), (7, 48), (129, 64), (33, 4096)]


def check_sparse24(device, backend, dtype, rows, cols):
    seed = rows * 31 + cols
    w = _adversarial(rows, cols, dtype, device, seed)
    _poison_allocator(device)
    m = _op("mask_2to4", backend)(w, None)
    assert_bitexact(m.cpu(), s24.mask_2to4(w.cpu()), "mask_2to4")
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    scores[:, ::5] = 0.25  # ties in the scores too
    m = _op("mask_2to4", backend)(w, scores)
    assert_bitexact(m.cpu(), s24.mask_2to4(w.cpu(), scores.cpu()), "mask_2to4(scores)")

    for prune in (False, True):
        src = _sparse24_like(rows, cols, dtype, device, seed) if not prune else w
        _poison_allocator(device)
        v, me = _op("compress_2to4", backend)(src, prune)
        rv, rme = s24.compress_2to4(src.cpu(), prune)
        assert_bitexact(v.cpu(), rv, f"values(prune={prune})")
        assert_bitexact(me.cpu(), rme, f"meta(prune={prune})")
        _poison_allocator(device)
        d = _op("decompress_2to4", backend)(v, me)
        assert_bitexact(d.cpu(), s24.decompress_2to4(rv, rme), "decompress")
        if not prune:
            assert_bitexact(d.cpu(), src.cpu(), "round trip")


def check_sparse24_noncontiguous(device, backend, dtype):
    base = _sparse24_like(64, 96, dtype, device, 5)
    w = base.t().contiguous().t()  # same values, column-major strides
    assert not w.is_contiguous()
    v, me = _op("compress_2to4", backend)(w, False)
    rv, rme = s24.compress_2to4(base.cpu(), False)
    assert_bitexact(v.cpu(), rv, "values")
    assert_bitexact(me.cpu(), rme, "meta")
    vs = torch.cat([v, v], dim=1)[:, : v.shape[1]]  # a strided view
    assert_bitexact(_op("decompress_2to4", backend)(vs, me).cpu(), base.cpu(), "decompress(view)")
    m = _op("mask_2to4", backend)(w[:, 16:48], None)
    assert_bitexact(m.cpu(), s24.mask_2to4(base[:, 16:48].cpu()), "mask(view)")


def check_sparse24_errors(device, backend):
    w = torch.randn(5, 32).to(device)
    with pytest.raises(ValueError, match=r"row 0, columns 0\.\.3 has 4 nonzeros"):
        _op("compress_2to4", backend)(w, False)
    w2 = torch.zeros(5, 32)
    w2[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 3, columns 8\.\.11 has 3 nonzeros"):
        _op("compress_2to4", backend)(w2.to(device), False)
    wn = torch.randn(4, 16)
    wn[2, 5] = float("nan")
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _op("mask_2to4", backend)(wn.to(device), None)
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _op("compress_2to4", backend)(wn.to(device), True)
    with pytest.raises(ValueError, match="mask_2to4: scores contains NaN"):
        _op("mask_2to4", backend)(torch.randn(4, 16).to(device), wn.to(device))
    v, me = s24.compress_2to4(_sparse24_like(3, 32, torch.float32, "cpu", 1), False)
    me = me.clone()
    me[1, 1] = 0x0044 | (0x7 << 8)  # group 6 (nibble index 2 of word 1): i0=3 >= i1=1
    with pytest.raises(ValueError, match=r"row 1, group 6 \(columns 24\.\.27\) has nibble 7 with i0=3 >= i1=1"):
        _op("decompress_2to4", backend)(v.to(device), me.to(device))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_sparse24_cuda(dtype, rows, cols):
    for name in ("mask_2to4", "compress_2to4", "decompress_2to4"):
        skip_unless_backend(name, "cuda", "cuda")
    check_sparse24("cuda", "cuda", dtype, rows, cols)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_cuda_noncontiguous(dtype):
    skip_unless_backend("compress_2to4", "cuda", "cuda")
    check_sparse24_noncontiguous("cuda", "cuda", dtype)


@requires_cuda
def test_sparse24_cuda_errors():
    skip_unless_backend("compress_2to4", "cuda", "cuda")
    check_sparse24_errors("cuda", "cuda")


@requires_cuda
def test_sparse24_cuda_opcheck():
    skip_unless_backend("compress_2to4", "cuda", "cuda")
    w = _sparse24_like(17, 64, torch.float16, "cuda", 3)
    torch.library.opcheck(OPS.mask_2to4_cuda.default, (w, None))
    torch.library.opcheck(OPS.compress_2to4_cuda.default, (w, False))
    v, me = OPS.compress_2to4_cuda(w, False)
    torch.library.opcheck(OPS.decompress_2to4_cuda.default, (v, me))


# ------------------------------------------------------------------ metadata layout
def check_mma_layout(device, backend, rows, cols):
    from sparse_kernels.reference import mma_layout as ref

    meta = torch.randint(-(2**15), 2**15, (rows, cols // 16), dtype=torch.int16,
                         generator=torch.Generator().manual_seed(rows + cols)).to(device)
    _poison_allocator(device)
    dev = _op("reorder_meta_mma", backend)(meta)
    assert_bitexact(dev.cpu(), ref.reorder_meta_mma(meta.cpu()), "reorder_meta_mma")
    back = _op("unreorder_meta_mma", backend)(dev, rows, cols)
    assert_bitexact(back.cpu(), meta.cpu(), "unreorder_meta_mma")


@requires_cuda
@pytest.mark.parametrize("rows,cols", [(1, 16), (17, 80), (200, 4096), (4096, 64)])
def test_mma_layout_cuda(rows, cols):
    skip_unless_backend("reorder_meta_mma", "cuda", "cuda")
    check_mma_layout("cuda", "cuda", rows, cols)
    meta = torch.zeros(17, 5, dtype=torch.int16, device="cuda")
    torch.library.opcheck(OPS.reorder_meta_mma_cuda.default, (meta,))


# ------------------------------------------------------------------ sparse_linear_cuda
LINEAR_CASES = [  # (M, N, K): odd batches, N not a multiple of 128 (or 16), K tails
    (1, 4096, 4096), (3, 200, 64), (8, 24, 80), (9, 136, 4096), (16, 16, 64),
    (17, 200, 4096), (129, 330, 64), (300, 1000, 208),
    (1100, 2048, 128),  # >= 132 CTAs of 128 rows: the 8-warp GEMM tile (the others take the 4-warp one)
]


def check_sparse_linear(device, backend, dtype, M, N, K, with_bias, with_meta_dev, kernel=None):
    gen = torch.Generator().manual_seed(M * 7 + N + K)
    w = torch.randn(N, K, generator=gen)
    w = torch.where(s24.mask_2to4(w), w, torch.zeros(())).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    values, meta = s24.compress_2to4(w, False)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0.0)
    lowp = F.linear(x.to(device), w.to(device), b.to(device) if with_bias else None)
    md = None
    if with_meta_dev:
        from sparse_kernels.reference import mma_layout as ref

        md = ref.reorder_meta_mma(meta).to(device)
    _poison_allocator(device)
    args = (x.to(device), values.to(device), meta.to(device), b.to(device) if with_bias else None, md)
    if kernel is None:
        y = _op("sparse_linear", backend)(*args)
    else:
        y = OPS.sparse_linear_cuda_kernel(*args, kernel)
    assert y.dtype == dtype and tuple(y.shape) == (M, N)
    assert_matmul_close(y, exact, lowp, what=f"sparse_linear {dtype} M={M} N={N} K={K} kernel={kernel}")
    return y


def _need_linear_cuda():
    if "sparse_linear" not in R.OPS:
        pytest.skip("sparse_linear is not defined here (the linear family's module is not merged)")
    skip_unless_backend("sparse_linear", "cuda", "cuda")


@requires_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", LINEAR_CASES)
def test_sparse_linear_cuda(dtype, M, N, K):
    _need_linear_cuda()
    check_sparse_linear("cuda", "cuda", dtype, M, N, K, with_bias=(M % 2 == 1), with_meta_dev=(N % 3 == 0))
    check_sparse_linear("cuda", "cuda", dtype, M, N, K, with_bias=(M % 2 == 0), with_meta_dev=(N % 3 != 0))


# Split-K cases (csrc/cuda/linear.h: split until ~3 CTAs per SM, >= 8 spans of 64 columns per
# split, <= 16 splits): with N <= 300 there are at most 3 row tiles, so each of these splits K
# (e.g. M=5, N=200, K=4096: 2 CTAs before splitting, 64 spans -> 8 splits), with K tails
# inside the last span (K % 64 != 0) and batch tiles of 32, 64 and 128 rows.
SPLITK_CASES = [(5, 200, 4096), (17, 136, 2064), (40, 300, 1040), (64, 48, 4096 + 16), (100, 130, 8192),
                (300, 200, 2048)]


def _need_wgmma():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("kernel='wgmma' runs on sm_90 GPUs only")
    try:
        x = torch.zeros(1, 64, dtype=torch.half, device="cuda")
        w = torch.zeros(16, 32, dtype=torch.half, device="cuda")
        OPS.sparse_linear_cuda_kernel(x, w, torch.full((16, 4), 0x4444, dtype=torch.int16, device="cuda"), None,
                                      None, "wgmma")
    except ValueError as e:  # a build without sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)
        pytest.skip(str(e))


@requires_sm80
@pytest.mark.parametrize("kernel", ["gemv", "gemm", "splitk", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", LINEAR_CASES + SPLITK_CASES)
def test_sparse_linear_cuda_kernels(kernel, dtype, M, N, K):
    """Every kernel of the cuda backend, forced (sparse_linear_cuda_kernel), against fp64."""
    _need_linear_cuda()
    if kernel == "wgmma":
        _need_wgmma()
    if kernel == "gemv" and M > 16:
        with pytest.raises(ValueError, match="gemv takes at most 16 rows"):
            check_sparse_linear("cuda", "cuda", dtype, M, N, K, False, False, kernel=kernel)
        return
    check_sparse_linear("cuda", "cuda", dtype, M, N, K, with_bias=(M % 2 == 1), with_meta_dev=(N % 3 == 0),
                        kernel=kernel)
    check_sparse_linear("cuda", "cuda", dtype, M, N, K, with_bias=(M % 2 == 0), with_meta_dev=(N % 3 != 0),
                        kernel=kernel)


@requires_sm80
@pytest.mark.parametrize("kernel", ["splitk", "gemm", "wgmma"])
def test_sparse_linear_cuda_kernel_deterministic_and_capturable(kernel):
    """The split-K reduction runs in a fixed order (same bits every call) and allocates its
    workspace from the caching allocator without a host sync (so a CUDA graph can hold it)."""
    _need_linear_cuda()
    if kernel == "wgmma":
        _need_wgmma()
    y0 = check_sparse_linear("cuda", "cuda", torch.float16, 24, 200, 4096, True, True, kernel=kernel)
    gen = torch.Generator().manual_seed(24 * 7 + 200 + 4096)  # check_sparse_linear's inputs again
    w = torch.randn(200, 4096, generator=gen)
    w = torch.where(s24.mask_2to4(w), w, torch.zeros(())).half()
    x = torch.randn(24, 4096, generator=gen).half().cuda()
    b = torch.randn(200, generator=gen).half().cuda()
    values, meta = (t.cuda() for t in s24.compress_2to4(w, False))
    from sparse_kernels.reference import mma_layout as ref

    md = ref.reorder_meta_mma(meta.cpu()).cuda()
    assert_bitexact(OPS.sparse_linear_cuda_kernel(x, values, meta, b, md, kernel), y0, f"{kernel} rerun")
    torch.cuda.set_sync_debug_mode("error")
    try:
        y1 = OPS.sparse_linear_cuda_kernel(x, values, meta, b, md, kernel)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_bitexact(y1, y0, f"{kernel} without a sync")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OPS.sparse_linear_cuda_kernel(x, values, meta, b, md, kernel)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = OPS.sparse_linear_cuda_kernel(x, values, meta, b, md, kernel)
    yg.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_bitexact(yg, y0, f"{kernel} replayed from a CUDA graph")


@requires_sm80
def test_sparse_linear_cuda_opcheck_and_errors():
    _need_linear_cuda()
    w = torch.where(s24.mask_2to4(torch.randn(48, 64)), torch.randn(48, 64), torch.zeros(())).half()
    values, meta = (t.cuda() for t in s24.compress_2to4(w, False))
    x = torch.randn(5, 64, dtype=torch.half, device="cuda")
    torch.library.opcheck(OPS.sparse_linear_cuda.default, (x, values, meta, None, None))
    with pytest.raises(TypeError, match="float16, bfloat16"):
        OPS.sparse_linear_cuda(x.float(), values.float(), meta, None, None)
    with pytest.raises(ValueError, match="does not match x's last dim"):
        OPS.sparse_linear_cuda(x[:, :32].contiguous(), values, meta, None, None)
    with pytest.raises(ValueError, match="meta_dev: shape"):
        OPS.sparse_linear_cuda(x, values, meta, None, torch.zeros(1, 1, 32, dtype=torch.int32, device="cuda"))
    for kernel in ("gemv", "gemm", "splitk"):
        torch.library.opcheck(OPS.sparse_linear_cuda_kernel.default, (x, values, meta, None, None, kernel))
    with pytest.raises(ValueError, match="kernel: got 'wide'"):
        OPS.sparse_linear_cuda_kernel(x, values, meta, None, None, "wide")
    if torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(ValueError, match="kernel: 'wgmma' needs an sm_90 GPU"):
            OPS.sparse_linear_cuda_kernel(x, values, meta, None, None, "wgmma")


# ------------------------------------------------------------------ sparsegpt_block_update_cuda
def numpy_block_update(W1, Hinv1, mask1, n, m):
    """The kernel's arithmetic in NumPy float32, same rounding order (loss summed column by column)."""
    w = W1.astype(np.float32).copy()
    H = Hinv1.astype(np.float32)
    rows, B = w.shape
    Q = np.zeros_like(w)
    E = np.zeros_like(w)
    loss = np.zeros(rows, dtype=np.float32)
    keep = mask1.copy() if m == 0 else np.zeros((rows, B), dtype=bool)
    for i in range(B):
        if m > 0 and i % m == 0:
            end = min(i + m, B)
            d = np.diag(H)[i:end]
            s = (w[:, i:end] * w[:, i:end]) / (d * d)
            idx = np.arange(end - i)
            beats = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None]) & (idx[None, :] < idx[:, None]))[None]
            keep[:, i:end] = beats.sum(-1) < n
        d = H[i, i]
        q = np.where(keep[:, i], w[:, i], np.float32(0))
        diff = w[:, i] - q
        err = diff / d
        loss = loss + (diff * diff) / (d * d)
        Q[:, i] = q
        E[:, i] = err
        w[:, i + 1:] = w[:, i + 1:] - err[:, None] * H[i, i + 1:][None, :]
    return Q, E, loss * np.float32(0.5)


def _sparsegpt_problem(rows, B, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * B, B, generator=gen, dtype=torch.float64)
    H = X.T @ X / X.shape[0] + 0.01 * torch.eye(B, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    W1 = torch.randn(rows, B, generator=gen)
    mask = torch.rand(rows, B, generator=gen) > 0.5
    return W1, U, mask


def check_sparsegpt(device, backend, rows, B, n, m):
    W1, U, mask = _sparsegpt_problem(rows, B, rows + B + n + m)
    mask1 = mask if m == 0 else None
    W1c = W1.clone()
    _poison_allocator(device)
    Q, E, L = _op("sparsegpt_block_update", backend)(W1.to(device), U.to(device),
                                                     mask1.to(device) if mask1 is not None else None, n, m)
    assert torch.equal(W1, W1c), "W1 was modified"
    if backend == "cuda":  # the kernel's rounding order is the emulation's: bit for bit
        Qn, En, Ln = numpy_block_update(W1.numpy(), U.numpy(), mask.numpy(), n, m)
        assert_bitexact(Q.cpu(), torch.from_numpy(Qn), "Q1")
        assert_bitexact(E.cpu(), torch.from_numpy(En), "Err1")
        assert_bitexact(L.cpu(), torch.from_numpy(Ln), "losses")
    from sparse_kernels.reference import sparsegpt as ref  # present once the SparseGPT family is merged

    Qr, Er, Lr = ref.sparsegpt_block_update(W1, U, mask1, n, m)
    agree = ((Q.cpu() != 0) == (Qr != 0)).float().mean().item()
    assert agree >= 0.999, f"mask agreement {agree:.5f}"
    rel = abs(L.cpu().double().sum().item() - Lr.double().sum().item()) / max(Lr.double().sum().item(), 1e-30)
    assert rel <= 1e-3, f"total loss differs by {rel:.2e}"


def _need_sparsegpt_cuda():
    if "sparsegpt_block_update" not in R.OPS:
        pytest.skip("sparsegpt_block_update is not defined here (the SparseGPT family is not merged)")
    skip_unless_backend("sparsegpt_block_update", "cuda", "cuda")


@requires_cuda
@pytest.mark.parametrize("rows,B", [(1, 16), (37, 128), (300, 200), (64, 256), (1000, 128)])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (0, 0)])
def test_sparsegpt_cuda(rows, B, n, m):
    _need_sparsegpt_cuda()
    check_sparsegpt("cuda", "cuda", rows, B, n, m)


@requires_cuda
def test_sparsegpt_cuda_opcheck_and_errors():
    _need_sparsegpt_cuda()
    W1, U, mask = (t.cuda() for t in _sparsegpt_problem(9, 32, 2))
    torch.library.opcheck(OPS.sparsegpt_block_update_cuda.default, (W1, U, None, 2, 4))
    torch.library.opcheck(OPS.sparsegpt_block_update_cuda.default, (W1, U, mask, 0, 0))
    with pytest.raises(ValueError, match="at most 256"):
        OPS.sparsegpt_block_update_cuda(torch.zeros(2, 288, device="cuda"), torch.eye(288, device="cuda"), None, 2, 4)
    with pytest.raises(ValueError, match="mask1: required when m == 0"):
        OPS.sparsegpt_block_update_cuda(W1, U, None, 0, 0)
    with pytest.raises(TypeError, match="W1: dtype"):
        OPS.sparsegpt_block_update_cuda(W1.double(), U, None, 2, 4)


def test_numpy_emulation_matches_reference():
    """The emulation used as the CUDA kernel's bit-exact yardstick follows the published algorithm."""
    pytest.importorskip("sparse_kernels.reference.sparsegpt")
    from sparse_kernels.reference import sparsegpt as ref

    for n, m in ((2, 4), (0, 0)):
        W1, U, mask = _sparsegpt_problem(40, 32, 9)
        Qn, En, Ln = numpy_block_update(W1.numpy(), U.numpy(), mask.numpy(), n, m)
        Qr, Er, Lr = ref.sparsegpt_block_update(W1, U, mask if m == 0 else None, n, m)
        assert ((torch.from_numpy(Qn) != 0) == (Qr != 0)).all()
        assert torch.allclose(torch.from_numpy(En), Er, rtol=1e-4, atol=1e-5)
        assert torch.allclose(torch.from_numpy(Ln), Lr, rtol=1e-4)


# ------------------------------------------------------------------ the helpers on CPU
def test_helpers_dry_run_cpu():
    """Run the GPU tests' helpers on CPU with the reference backend: the test logic itself works."""
    check_sparse24("cpu", "reference", torch.float16, 7, 48)
    check_sparse24_noncontiguous("cpu", "reference", torch.bfloat16)
    check_sparse24_errors("cpu", "reference")
    check_mma_layout("cpu", "reference", 17, 80)
    if "sparse_linear" in R.OPS:
        check_sparse_linear("cpu", "reference", torch.bfloat16, 3, 24, 80, True, False)
    W1, U, mask = _sparsegpt_problem(8, 16, 1)
    Qn, En, Ln = numpy_block_update(W1.numpy(), U.numpy(), mask.numpy(), 2, 4)
    assert ((Qn != 0).reshape(8, 4, 4).sum(-1) <= 2).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_unchecked_decompress_and_the_decompress_backend_cuda(dtype):
    """decompress_2to4_unchecked_cuda: bit-exact with the checked kernel on valid metadata, no error
    and no fault on corrupt metadata; sparse_linear's "decompress" backend never syncs with the host
    (so it can be captured in a CUDA graph) and matches the reference."""
    skip_unless_backend("decompress_2to4", "cuda", "cuda")
    w = _sparse24_like(96, 128, dtype, "cuda", seed=21)
    v, m = OPS.compress_2to4_cuda(w, False)
    _poison_allocator("cuda")
    assert_bitexact(OPS.decompress_2to4_unchecked_cuda(v, m), OPS.decompress_2to4_cuda(v, m), "unchecked")
    bad = m.clone()
    bad[3, 1] = 0  # nibble 0: i0 == i1, rejected by the checked kernel
    with pytest.raises(ValueError, match="meta is corrupt"):
        OPS.decompress_2to4_cuda(v, bad)
    out = OPS.decompress_2to4_unchecked_cuda(v, bad)
    torch.cuda.synchronize()
    assert out.shape == w.shape
    g = torch.Generator().manual_seed(22)
    w = torch.randn(96, 128, generator=g)
    w = torch.where(s24.mask_2to4(w), w, torch.zeros(())).to(dtype).cuda()  # finite, for the matmul
    v, m = OPS.compress_2to4_cuda(w, False)
    x = torch.randn(5, 128, generator=g).to(dtype).cuda()
    b = torch.randn(96, generator=g).to(dtype).cuda()
    OPS.sparse_linear_decompress(x, v, m, b, None)  # warm up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = OPS.sparse_linear_decompress(x, v, m, b, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    exact = x.double() @ w.double().T + b.double()
    assert_matmul_close(y, exact, F.linear(x, w, b), f"decompress backend {dtype}")


# ------------------------------------------------------------------ tensors on two devices
@requires_cuda
def test_cuda_ops_reject_a_cpu_operand():
    """A CPU tensor next to CUDA ones is a ValueError naming it (the wrappers check devices
    before any pointer arithmetic), not a crash or a silent copy."""
    skip_unless_backend("decompress_2to4", "cuda", "cuda")
    w = _sparse24_like(32, 64, torch.float16, "cuda", seed=31)
    v, m = OPS.compress_2to4_cuda(w, False)
    with pytest.raises(ValueError, match="meta: .*cpu|all tensors must share one device"):
        OPS.decompress_2to4_cuda(v, m.cpu())
    if "sparse_linear" in R.OPS and R.why_unavailable("sparse_linear", "cuda", "cuda") is None:
        x = torch.randn(3, 64, dtype=torch.float16, device="cuda")
        with pytest.raises(ValueError, match="meta: expected a CUDA tensor|all tensors must share one device"):
            OPS.sparse_linear_cuda(x, v, m.cpu(), None, None)
        with pytest.raises(ValueError, match="values: is on cpu|all tensors must share one device"):
            OPS.sparse_linear_cuda(x, v.cpu(), m, None, None)
        with pytest.raises(ValueError, match="bias: is on cpu|all tensors must share one device"):
            OPS.sparse_linear_cuda(x, v, m, torch.zeros(32, dtype=torch.float16), None)
        with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
            OPS.sparse_linear_cuda_kernel(x.cpu(), v, m, None, None, "splitk")


@requires_cuda
def test_triton_masked_linear_never_materializes_the_masked_weight():
    """backend="triton" keeps W*M out of global memory: the call's peak allocation stays far
    below one N x K weight (the reference, which forms W*M, exceeds it)."""
    skip_unless_backend("masked_linear", "triton", "cuda")
    import sparse_kernels as sk

    n, k = 2048, 2048
    w = torch.randn(n, k, dtype=torch.float16, device="cuda")
    mask = sk.pack_mask(torch.rand(n, k, device="cuda") < 0.5)
    x = torch.randn(4, k, dtype=torch.float16, device="cuda")
    weight_bytes = n * k * w.element_size()

    def peak(backend):
        sk.masked_linear(x, w, mask, backend=backend)  # warm up (autotuning, lazy init)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = sk.masked_linear(x, w, mask, backend=backend)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, y

    fused, y_t = peak("triton")
    formed, y_r = peak("reference")
    assert formed >= weight_bytes  # the test can tell the two apart
    assert fused < weight_bytes // 4, (fused, weight_bytes)
    assert_matmul_close(y_t, x.double() @ (w.double() * sk.unpack_mask(mask, k)).T, y_r, "triton masked_linear")
