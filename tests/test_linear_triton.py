"""Triton sparse_linear / masked_linear (forward and backward) under TRITON_INTERPRET=1, tiny shapes.

Run: ``TRITON_INTERPRET=1 PYTHONPATH=$PWD python -m pytest tests/test_linear_triton.py``.  Without
the variable (and without a GPU) every test skips.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_kernels as sk
from conftest import TRITON_INTERPRET, assert_close, assert_matmul_close, skip_unless_backend
from sparse_kernels.reference import linear as ref

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton tests run under TRITON_INTERPRET=1")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", [((1,), 5, 16), ((2, 3), 24, 48), ((17,), 33, 80)])
def test_sparse_linear_forward(dtype, lead, n, k):
    skip_unless_backend("sparse_linear", "triton", "cpu")
    g = _gen(0)
    values, meta = sk.compress_2to4(torch.randn(n, k, generator=g).to(dtype), prune=True)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y = sk.sparse_linear(x, values, meta, b, backend="triton")
    exact = x.double() @ sk.decompress_2to4(values, meta).double().T + b.double()
    assert_matmul_close(y, exact, ref.sparse_linear(x, values, meta, b), f"triton sparse_linear {dtype}")


def test_sparse_linear_backward():
    skip_unless_backend("sparse_linear", "triton", "cpu")
    g = _gen(1)
    values, meta = sk.compress_2to4(torch.randn(12, 32, generator=g), prune=True)
    x, b, gy = torch.randn(3, 32, generator=g), torch.randn(12, generator=g), torch.randn(3, 12, generator=g)
    grads = []
    for backend in ("triton", "reference"):
        xs, vs, bs = (t.clone().requires_grad_() for t in (x, values, b))
        sk.sparse_linear(xs, vs, meta, bs, backend=backend).backward(gy)
        grads.append((xs.grad, vs.grad, bs.grad))
    for got, want, name in zip(*grads, ("x", "values", "bias")):
        assert_close(got, want, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lead,n,k", [((1,), 7, 13), ((2, 9), 20, 40)])
def test_masked_linear_forward_backward(dtype, packed, lead, n, k):
    skip_unless_backend("masked_linear", "triton", "cpu")
    g = _gen(2)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.rand(n, k, generator=g) < 0.4
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    gy = torch.randn(*lead, n, generator=g).to(dtype)
    mask = sk.pack_mask(m) if packed else m
    wm = torch.where(m, w, torch.zeros((), dtype=dtype))
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = sk.masked_linear(xs, ws, mask, bs, backend="triton")
    assert_matmul_close(y, x.double() @ wm.double().T + b.double(), F.linear(x, wm, b), "triton masked fwd")
    y.backward(gy)
    g2, x2 = gy.reshape(-1, n), x.reshape(-1, k)
    assert_matmul_close(xs.grad.reshape(-1, k), g2.double() @ wm.double(), g2 @ wm, "triton grad x")
    gw_exact = (g2.double().T @ x2.double()) * m
    gw_lowp = torch.where(m, g2.T @ x2, torch.zeros((), dtype=dtype))
    assert_matmul_close(ws.grad, gw_exact, gw_lowp, "triton grad w")
    assert (ws.grad[~m] == 0).all()
    assert_close(bs.grad.float(), g2.float().sum(0), "grad bias", atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("op", ["sparse_linear", "masked_linear", "masked_linear_grad_x", "masked_linear_grad_w"])
def test_opcheck_triton(op):
    from sparse_kernels.ops import _registry as R

    skip_unless_backend(op, "triton", "cpu")
    g = _gen(3)
    values, meta = sk.compress_2to4(torch.randn(8, 32, generator=g), prune=True)
    x, w = torch.randn(3, 32, generator=g), torch.randn(8, 32, generator=g)
    mask = sk.pack_mask(torch.rand(8, 32, generator=g) < 0.5)
    gy = torch.randn(3, 8, generator=g)
    args = {
        "sparse_linear": (x.requires_grad_(), values, meta, None, None),
        "masked_linear": (x.requires_grad_(), w.requires_grad_(), mask, None),
        "masked_linear_grad_x": (gy, w, mask),
        "masked_linear_grad_w": (gy, x, w, mask),
    }[op]
    torch.library.opcheck(R.get_op(op, "triton"), args, test_utils=("test_schema", "test_faketensor",
                                                                    "test_autograd_registration"))
