"""Triton ``sparse_linear`` decode path (M <= 16): split-K kernel + deterministic reduction.

Run: ``TRITON_INTERPRET=1 PYTHONPATH=$PWD python -m pytest tests/test_triton_linear_decode.py``.
Under the interpreter the split rule is ``min(3, cdiv(K, 64))`` with BLOCK_N=16, BLOCK_K=64, so the
shapes below give 1, 2 and 3 splits, K tails inside the last busy split, an empty third split
(K=208: 4 steps of 64 over 3 splits -> 2, 2, 0 steps) and N tails.  Without the variable every
interpreter test skips; ``test_splitk_kernels_compile_for_gpu`` runs only without it (it lowers the
kernels to sm_80/sm_90 code, no GPU needed).
"""

from __future__ import annotations

import pytest
import torch

import sparse_kernels as sk
from conftest import TRITON_INTERPRET, assert_matmul_close, skip_unless_backend
from sparse_kernels.reference import linear as ref

interpreted = pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton tests run under TRITON_INTERPRET=1")
pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEADS = {1: (1,), 3: (1, 3), 16: (2, 8)}  # M = 1, 3, 16 through odd leading dims
SHAPES = [(33, 208), (40, 80), (5, 16)]  # (N, K): 3 splits (one empty), 2 splits (K tail), 1 split


def _T():
    from sparse_kernels.triton import linear as T

    return T


def _problem(lead, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values, meta = sk.compress_2to4(torch.randn(n, k, generator=g).to(dtype), prune=True)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, values, meta, b


def _exact(x, values, meta, b):
    y = x.double() @ sk.decompress_2to4(values, meta).double().T
    return y if b is None else y + b.double()


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_matches_reference(dtype, m, n, k, with_bias):
    skip_unless_backend("sparse_linear", "triton", "cpu")
    x, values, meta, b = _problem(LEADS[m], n, k, dtype)
    b = b if with_bias else None
    y = sk.sparse_linear(x, values, meta, b, backend="triton")
    assert y.shape == (*LEADS[m], n) and y.dtype == dtype
    assert_matmul_close(y, _exact(x, values, meta, b), ref.sparse_linear(x, values, meta, b),
                        f"triton decode {dtype} M={m} N={n} K={k} bias={with_bias}")


@interpreted
@pytest.mark.parametrize("m", [1, 16])
def test_decode_strided_x(m):
    skip_unless_backend("sparse_linear", "triton", "cpu")
    x, values, meta, b = _problem((m,), 24, 144, torch.float16, seed=1)
    wide = torch.randn(m, 2 * 144, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    wide[:, ::2] = x
    xs = wide[:, ::2]  # column stride 2
    assert not xs.is_contiguous()
    y = sk.sparse_linear(xs, values, meta, b, backend="triton")
    assert_matmul_close(y, _exact(x, values, meta, b), ref.sparse_linear(x, values, meta, b), "strided x")


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_workspace_every_element_written(dtype, m):
    """A NaN-filled workspace: every partial is overwritten, split s holds exactly its K range."""
    skip_unless_backend("sparse_linear", "triton", "cpu")
    T = _T()
    n, k = 33, 208
    x, values, meta, b = _problem((m,), n, k, dtype, seed=3)
    split = T.decode_split_k(n, k, x.device)
    assert split == 3
    ws = torch.full((split, m, n), float("nan"))
    y = T._sparse_linear_splitk(x, values, meta, b, workspace=ws)
    assert not ws.isnan().any(), "workspace elements left unwritten"
    assert not y.isnan().any()
    w = sk.decompress_2to4(values, meta).double()
    span = -(-(-(-k // 64)) // split) * 64  # cdiv(cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    for s in range(split):
        cols = slice(s * span, min((s + 1) * span, k))
        want = x.double()[:, cols] @ w[:, cols].T
        lowp = x[:, cols].float() @ w[:, cols].float().T  # the kernel's math: low-precision inputs, fp32 sums
        assert_matmul_close(ws[s], want, lowp, f"split {s}")
    assert (ws[2] == 0).all(), "K=208 over 3 splits of 128 columns: the third split is empty"
    assert_matmul_close(y, _exact(x, values, meta, b), ref.sparse_linear(x, values, meta, b), "y from workspace")


@interpreted
def test_workspace_checked():
    T = _T()
    x, values, meta, b = _problem((2,), 8, 80, torch.float32)
    with pytest.raises(ValueError, match=r"workspace: .*expected a contiguous float32 \(2, 2, 8\)"):
        T._sparse_linear_splitk(x, values, meta, b, workspace=torch.empty(3, 2, 8))
    with pytest.raises(ValueError, match="workspace"):
        T._sparse_linear_splitk(x, values, meta, b, workspace=torch.empty(2, 2, 8, dtype=torch.float16))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16])
def test_decode_deterministic(dtype, m):
    skip_unless_backend("sparse_linear", "triton", "cpu")
    x, values, meta, b = _problem((m,), 33, 208, dtype, seed=4)
    y1 = sk.sparse_linear(x, values, meta, b, backend="triton")
    y2 = sk.sparse_linear(x, values, meta, b, backend="triton")
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y1.view(bits), y2.view(bits)), "two calls on the same input differ"


@interpreted
def test_split_path_runs_from_public_api(monkeypatch):
    """M <= 16 goes through the split kernel with more than one split; M = 17 does not."""
    skip_unless_backend("sparse_linear", "triton", "cpu")
    T = _T()
    calls = []
    real = T._sparse_linear_splitk

    def spy(x, values, meta, bias, workspace=None):
        split = T.decode_split_k(values.shape[0], x.shape[1], x.device)
        ws = torch.full((split, x.shape[0], values.shape[0]), float("nan"))
        calls.append((x.shape[0], split))
        y = real(x, values, meta, bias, workspace=ws)
        assert not ws[1:].isnan().any() and ws[1:].abs().sum() > 0, "splits past the first did no work"
        return y

    monkeypatch.setattr(T, "_sparse_linear_splitk", spy)
    for lead in ((1,), (1, 3), (2, 8)):
        x, values, meta, b = _problem(lead, 40, 80, torch.float16, seed=5)
        y = sk.sparse_linear(x, values, meta, b, backend="triton")
        assert_matmul_close(y, _exact(x, values, meta, b), ref.sparse_linear(x, values, meta, b), f"{lead}")
    assert calls == [(1, 2), (3, 2), (16, 2)]
    x, values, meta, b = _problem((17,), 40, 80, torch.float16, seed=6)
    sk.sparse_linear(x, values, meta, b, backend="triton")
    assert len(calls) == 3, "M = 17 must take the large-M kernel"


def test_split_rule_cuda(monkeypatch):
    """The CUDA rule, checked without a GPU (SM count faked): programs >= 4 x SMs, capped."""
    T = _T()
    monkeypatch.setattr(T, "_INTERPRET", False)
    monkeypatch.setattr(T, "_SPLIT_BLOCK_N", 32)
    monkeypatch.setattr(T, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert T.decode_split_k(4096, 4096, dev) == 4  # 5 wanted; 16 steps of 256 -> 4 x 4 (5 would leave one empty)
    assert T.decode_split_k(4096, 14336, dev) == 5  # 56 steps -> 12, 12, 12, 12, 8
    assert T.decode_split_k(14336, 4096, dev) == 2  # 448 tiles x 2 = 896
    assert T.decode_split_k(11008, 4096, dev) == 2  # 344 x 2 = 688
    assert T.decode_split_k(4096, 512, dev) == 2  # capped at K // 256
    assert T.decode_split_k(4096, 128, dev) == 1
    assert T.decode_split_k(16, 1 << 16, dev) == 16  # capped at 16
    assert T.decode_split_k(65536, 4096, dev) == 1
    for n in (16, 40, 4096, 11008):  # never an empty split of 256-column steps
        for k in (256, 272, 1040, 4096, 14336):
            split, steps = T.decode_split_k(n, k, dev), -(-k // 256)
            assert split >= 1 and (split - 1) * -(-steps // split) < steps, (n, k, split)


@pytest.mark.slow
@pytest.mark.parametrize("triton_arch", [80, 90])
def test_splitk_kernels_compile_for_gpu(triton_arch):
    """No GPU needed: lower the split-K and reduce kernels to sm_80/sm_90 code (BLOCK_M 1 and 16,
    fp16/bf16/fp32), catching what the interpreter does not (dot shapes, layouts)."""
    from test_linear import _gpu_compile, require_triton_gpu_compiler

    require_triton_gpu_compiler(triton_arch)
    T = _T()
    i32 = "i32"
    for dt, bm, bk in (("*fp16", 16, 128), ("*fp16", 1, 256), ("*bf16", 16, 256), ("*bf16", 1, 128),
                       ("*fp32", 16, 128), ("*fp32", 1, 128)):
        sig = dict(x_ptr=dt, v_ptr=dt, meta_ptr="*i16", ws_ptr="*fp32", M=i32, N=i32, K=i32, SPLIT_K=i32,
                   M_BUCKET=i32, **{s: i32 for s in ("sxm", "sxk", "svn", "svk", "smn", "smk")},
                   **{c: "constexpr" for c in ("IEEE", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")})
        consts = dict(IEEE=dt == "*fp32", UPCAST=False, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=bk)
        _gpu_compile(T._sparse_linear_splitk_kernel, sig, consts, triton_arch)
        sig = dict(ws_ptr="*fp32", bias_ptr=dt, y_ptr=dt, M=i32, N=i32, SPLIT_K=i32, sym=i32, syn=i32,
                   HAS_BIAS="constexpr", BLOCK="constexpr")
        _gpu_compile(T._splitk_reduce_kernel, sig, dict(HAS_BIAS=True, BLOCK=256), triton_arch)


@interpreted
def test_decode_empty_k():
    """K = 0 (launcher level: the public wrapper cannot flatten a [..., 0] x): y = bias, or zeros."""
    T = _T()
    x, values, meta = torch.randn(3, 0), torch.zeros(5, 0), torch.zeros(5, 0, dtype=torch.int16)
    b = torch.randn(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(T.sparse_linear(x, values, meta, b, None), b.expand(3, 5))
    assert torch.equal(T.sparse_linear(x, values, meta, None, None), torch.zeros(3, 5))


@pytest.mark.skipif(TRITON_INTERPRET, reason="compiled Triton on a GPU (not the interpreter)")
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_decode_on_the_gpu_cuda(dtype, m):
    """The compiled split-K decode on a real layer shape: several splits, a NaN-poisoned
    workspace fully overwritten, bit-identical reruns, the reference's result."""
    skip_unless_backend("sparse_linear", "triton", "cuda")
    T = _T()
    n, k = 4096, 4096
    x, values, meta, b = (t.cuda() for t in _problem((m,), n, k, dtype, seed=m))
    split = T.decode_split_k(n, k, x.device)
    assert split > 1
    ws = torch.full((split, m, n), float("nan"), device="cuda")
    y = T._sparse_linear_splitk(x, values, meta, b, workspace=ws)
    assert not torch.isnan(ws).any()
    assert torch.equal(sk.sparse_linear(x, values, meta, b, backend="triton"), y)
    assert_matmul_close(y, _exact(x, values, meta, b), ref.sparse_linear(x, values, meta, b),
                        f"triton decode on the GPU {dtype} M={m}")


@pytest.mark.skipif(TRITON_INTERPRET, reason="compiled Triton on a GPU (not the interpreter)")
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_decode_config_on_the_gpu_cuda(dtype):
    """Each autotune config of the split-K kernel, launched directly (the autotuner checks only
    the winner's result), on shapes with N and K tails and an empty split, NaN workspace."""
    skip_unless_backend("sparse_linear", "triton", "cuda")
    T = _T()
    import triton

    for cfg in T._SPLITK:
        bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        for n, k, split in ((40, 400, 3), (4104, 4112, 4), (33, 272, 2)):
            for m in (1, 5, 16):
                x, values, meta, _ = (t.cuda() for t in _problem((m,), n, k, dtype, seed=n + k + m))
                ws = torch.full((split, m, n), float("nan"), device="cuda")
                T._sparse_linear_splitk_kernel[(triton.cdiv(n, bn), split)](
                    x, values, meta, ws, m, n, k, split, T._bucket(m), x.stride(0), x.stride(1),
                    values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
                    IEEE=dtype == torch.float32, UPCAST=False, BLOCK_M=1 if m == 1 else 16, BLOCK_N=bn, BLOCK_K=bk,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                assert not torch.isnan(ws).any(), (cfg, n, k, m)
                y = ws.sum(0)
                assert_matmul_close(y, _exact(x, values, meta, None), ref.sparse_linear(x, values, meta, None).float(),
                                    f"config {cfg} {dtype} N={n} K={k} M={m}")


@interpreted
def test_strided_bias():
    """The kernels read the bias with unit stride: a strided bias is made contiguous first."""
    skip_unless_backend("sparse_linear", "triton", "cpu")
    for lead in ((1,), (3,), (20,)):  # decode (M 1, 3) and the large-M kernel (20)
        x, values, meta, b = _problem(lead, 24, 128, torch.float32)
        bb = torch.randn(48)
        y = sk.sparse_linear(x, values, meta, bb[::2], backend="triton")
        assert_matmul_close(y, _exact(x, values, meta, bb[::2]), ref.sparse_linear(x, values, meta, bb[::2]),
                            f"strided bias M={lead[0]}")
        w = sk.decompress_2to4(values, meta)
        mask = w != 0
        ym = sk.masked_linear(x, w, mask, bb[::2], backend="triton")
        assert_matmul_close(ym, _exact(x, values, meta, bb[::2]), ref.sparse_linear(x, values, meta, bb[::2]),
                            f"masked_linear strided bias M={lead[0]}")
