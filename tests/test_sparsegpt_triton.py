"""Triton SparseGPT block ops (plain and joint int4) against the reference (TRITON_INTERPRET=1 on CPU, or a CUDA GPU).

Skips cleanly when neither is available.  Tiny shapes: the interpreter runs the column loop
in numpy.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_bitexact, assert_close, skip_unless_backend
from sparse_kernels.ops import _registry as R
from sparse_kernels.ops.sparsegpt import INT4_NAME, NAME, sparsegpt_block_update, sparsegpt_block_update_int4
from sparse_kernels.pruning import sparsegpt_prune
from sparse_kernels.pruning.sparsegpt import sparsegpt_prune_int4
from test_sparsegpt import block_inputs, hessian, int4_edge_inputs

pytestmark = pytest.mark.triton


def _device():
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@pytest.fixture
def device():
    dev = _device()
    skip_unless_backend(NAME, "triton", dev)
    return dev


@pytest.mark.parametrize("rows,B", [(5, 24), (19, 16), (3, 40)])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (4, 8), (1, 4)])
def test_triton_block_matches_reference(device, rows, B, nm):
    n, m = nm
    if m and B % m:
        pytest.skip("B must be a multiple of m")
    W, U, mask = block_inputs(rows, B, seed=rows + B)
    mk = mask if m == 0 else None
    Qr, Er, Lr = sparsegpt_block_update(W, U, mk, n, m, backend="reference")
    dev = torch.device(device)
    Q, E, L = sparsegpt_block_update(W.to(dev), U.to(dev), None if mk is None else mk.to(dev), n, m, backend="triton")
    agree = ((Q.cpu() != 0) == (Qr != 0)).float().mean().item()
    assert agree >= 0.999, f"mask agreement {agree:.5f}"
    assert abs(L.sum().item() - Lr.sum().item()) <= 1e-3 * Lr.sum().item()
    assert_close(Q.cpu(), Qr, "Q1", atol=1e-4, rtol=1e-4)
    assert_close(E.cpu(), Er, "Err1", atol=1e-4, rtol=1e-4)


def test_triton_noncontiguous_and_ties(device):
    dev = torch.device(device)
    W, U, mask = block_inputs(6, 16, seed=9)
    big = torch.randn(6, 40)
    big[:, 5:21] = W
    Ubig = torch.zeros(20, 20)
    Ubig[2:18, 3:19] = U
    a = sparsegpt_block_update(big.to(dev)[:, 5:21], Ubig.to(dev)[2:18, 3:19], mask.to(dev), 0, 0, backend="triton")
    b = sparsegpt_block_update(W, U, mask, 0, 0, backend="reference")
    for x, y, what in zip(a, b, ("Q1", "Err1", "losses")):
        assert_close(x.cpu(), y, what, atol=1e-5, rtol=1e-5)
    Q, _, _ = sparsegpt_block_update(torch.ones(3, 8, device=dev), torch.eye(8, device=dev), None, 2, 4, backend="triton")
    assert torch.equal((Q != 0).cpu(), torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 3, dtype=torch.bool))


@pytest.mark.parametrize("spec", [0.5, "2:4"])
def test_triton_layer_matches_reference(device, spec):
    H = hessian(48, seed=4)
    W = torch.randn(10, 48) / 7
    Wr, mr, lr = sparsegpt_prune(W, H, spec, blocksize=16, backend="reference")
    Wt, mt, lt = sparsegpt_prune(W.to(device), H.to(device), spec, blocksize=16, backend="triton")
    assert (mt.cpu() == mr).float().mean().item() >= 0.999
    assert abs(lt - lr) <= 1e-3 * lr
    assert_close(Wt.cpu(), Wr, "W_pruned", atol=1e-4, rtol=1e-3)


def test_triton_opcheck(device):
    op = R.get_op(NAME, "triton")
    W, U, mask = block_inputs(4, 8, seed=2)
    dev = torch.device(device)
    torch.library.opcheck(op, (W.to(dev), U.to(dev), None, 2, 4))
    torch.library.opcheck(op, (W.to(dev), U.to(dev), mask.to(dev), 0, 0))


# ---------------------------------------------------------------- joint int4
def _int4_agrees(got, want, device):
    """Under the interpreter the kernel does the reference's float32 operations: bit-equal.  On a
    GPU the error division is approximate, so a weight on a rounding boundary may take the
    neighbouring code; the codes, masks and loss must still agree."""
    names = ("Q1", "Err1", "losses", "keep", "codes", "scales")
    if device == "cpu":
        for a, b, what in zip(got, want, names):
            if what == "losses":
                assert_close(a, b, what, atol=1e-5, rtol=1e-5)
            else:
                assert_bitexact(a, b, what)
        return
    for i in (3, 4):
        agree = (got[i].cpu() == want[i]).float().mean().item()
        assert agree >= 0.99, f"{names[i]} agreement {agree:.5f}"
    assert abs(got[2].sum().item() - want[2].sum().item()) <= 1e-2 * want[2].sum().item()


@pytest.mark.parametrize("rows,B,group", [(5, 32, 16), (19, 16, 16), (3, 48, 8)])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (1, 4)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_int4_block_matches_reference(device, rows, B, group, nm, scale_dtype):
    skip_unless_backend(INT4_NAME, "triton", device)
    n, m = nm
    W, U, mask = block_inputs(rows, B, seed=rows + B)
    mk = mask if m == 0 else None
    want = sparsegpt_block_update_int4(W, U, mk, n, m, group, scale_dtype, backend="reference")
    dev = torch.device(device)
    got = sparsegpt_block_update_int4(W.to(dev), U.to(dev), None if mk is None else mk.to(dev), n, m, group,
                                      scale_dtype, backend="triton")
    _int4_agrees([t.cpu() for t in got], want, device)


def test_triton_int4_strided_and_tiny_groups(device):
    """Strided inputs, an all-pruned group (scale 1) and a group of 1e-9 weights (its scale
    underflows float16: the smallest normal instead; a normal bfloat16)."""
    skip_unless_backend(INT4_NAME, "triton", device)
    dev = torch.device(device)
    W, U, mask, big = int4_edge_inputs(13)
    for sd in (torch.float16, torch.bfloat16):
        got = sparsegpt_block_update_int4(big.to(dev)[:, 9:41], U.t().contiguous().t().to(dev), mask.to(dev), 0, 0,
                                          16, sd, backend="triton")
        want = sparsegpt_block_update_int4(W, U, mask, 0, 0, 16, sd, backend="reference")
        _int4_agrees([t.cpu() for t in got], want, device)
        assert float(got[5][0, 0]) == 1.0


def test_triton_int4_nan_and_inf_as_the_reference(device):
    """A NaN in a group (or a pruned inf: |inf| * 0) gives the reference's scale 1 and NaN outputs,
    not a scale from the other weights and finite -8 codes (tl.max skips NaN, clamp would hide it)."""
    skip_unless_backend(INT4_NAME, "triton", device)
    W = torch.tensor([[1.0, float("nan"), 2.0, 3.0], [4.0, float("inf"), 1.0, 2.0], [1.0, 2.0, 3.0, 5.0]])
    mask = torch.tensor([[True] * 4, [True, False, True, True], [True] * 4])
    U = torch.eye(4)
    want = sparsegpt_block_update_int4(W, U, mask, 0, 0, 4, torch.float32, backend="reference")
    got = sparsegpt_block_update_int4(W.to(device), U.to(device), mask.to(device), 0, 0, 4, torch.float32,
                                      backend="triton")
    assert want[5][:2].tolist() == [[1.0], [1.0]] and bool(want[0][0, 1:].isnan().all())
    for a, b, what in zip(got, want, ("Q1", "Err1", "losses", "keep", "codes", "scales")):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6 if what == "losses" else 0, equal_nan=True,
                                   msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("spec", [0.5, "2:4"])
def test_triton_int4_layer_matches_reference(device, spec):
    skip_unless_backend(INT4_NAME, "triton", device)
    H = hessian(64, seed=5)
    W = torch.randn(10, 64) / 7
    Wr, mr, lr, cr, sr = sparsegpt_prune_int4(W, H, spec, 16, blocksize=32, backend="reference")
    Wt, mt, lt, ct, st = sparsegpt_prune_int4(W.to(device), H.to(device), spec, 16, blocksize=32, backend="triton")
    assert (mt.cpu() == mr).float().mean().item() >= 0.99
    assert (ct.cpu() == cr).float().mean().item() >= 0.99
    assert abs(lt - lr) <= 1e-2 * lr
    assert_bitexact(Wt.cpu(), (ct.float() * st.float().repeat_interleave(16, 1)).cpu(), "W_q = codes * scales")


def test_triton_int4_opcheck(device):
    skip_unless_backend(INT4_NAME, "triton", device)
    op = R.get_op(INT4_NAME, "triton")
    W, U, mask = block_inputs(4, 16, seed=2)
    dev = torch.device(device)
    torch.library.opcheck(op, (W.to(dev), U.to(dev), None, 2, 4, 8, torch.bfloat16))
    torch.library.opcheck(op, (W.to(dev), U.to(dev), mask.to(dev), 0, 0, 16, torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_for_gpu(arch):
    """No GPU needed: lower the block kernel to sm_80/sm_90 code, explicit mask and N:M."""
    from test_linear import _gpu_compile, require_triton_gpu_compiler

    from sparse_kernels.triton import sparsegpt as T

    require_triton_gpu_compiler(arch)
    cx = "constexpr"
    for (n, m), (g, kind) in itertools.product(((0, 0), (2, 4)), ((0, 0), (32, 0), (128, 1), (64, 2))):
        sig = dict(W_ptr="*fp32", H_ptr="*fp32", M_ptr="*u8" if m == 0 else "*fp32", Q_ptr="*fp32", E_ptr="*fp32",
                   L_ptr="*fp32", K_ptr="*u8", C_ptr="*i8", S_ptr="*fp32", rows="i32", B="i32",
                   **{s: "i32" for s in ("stride_wr", "stride_wc", "stride_hr", "stride_hc", "stride_mr", "stride_mc")},
                   N=cx, M=cx, HAS_MASK=cx, BLOCK_R=cx, BLOCK_B=cx, G=cx, SCALE_KIND=cx, TINY=cx)
        consts = dict(N=n, M=m, HAS_MASK=m == 0, BLOCK_R=T._TILE // 128, BLOCK_B=128, G=g, SCALE_KIND=kind,
                      TINY=6.103515625e-05)
        _gpu_compile(T._sparsegpt_block_kernel, sig, consts, arch)
