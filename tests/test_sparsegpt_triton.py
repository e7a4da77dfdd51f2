"""Triton SparseGPT block op against the reference (TRITON_INTERPRET=1 on CPU, or a CUDA GPU).

Skips cleanly when neither is available.  Tiny shapes: the interpreter runs the column loop
in numpy.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, skip_unless_backend
from sparse_kernels.ops import _registry as R
from sparse_kernels.ops.sparsegpt import NAME, sparsegpt_block_update
from sparse_kernels.pruning import sparsegpt_prune
from test_sparsegpt import block_inputs, hessian

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


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_for_gpu(arch):
    """No GPU needed: lower the block kernel to sm_80/sm_90 code, explicit mask and N:M."""
    from test_linear import _gpu_compile, require_triton_gpu_compiler

    from sparse_kernels.triton import sparsegpt as T

    require_triton_gpu_compiler(arch)
    cx = "constexpr"
    for n, m in ((0, 0), (2, 4)):
        sig = dict(W_ptr="*fp32", H_ptr="*fp32", M_ptr="*u8" if m == 0 else "*fp32", Q_ptr="*fp32", E_ptr="*fp32",
                   L_ptr="*fp32", rows="i32", B="i32",
                   **{s: "i32" for s in ("stride_wr", "stride_wc", "stride_hr", "stride_hc", "stride_mr", "stride_mc")},
                   N=cx, M=cx, HAS_MASK=cx, BLOCK_R=cx, BLOCK_B=cx)
        consts = dict(N=n, M=m, HAS_MASK=m == 0, BLOCK_R=T._TILE // 128, BLOCK_B=128)
        _gpu_compile(T._sparsegpt_block_kernel, sig, consts, arch)
