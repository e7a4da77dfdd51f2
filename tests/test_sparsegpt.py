"""SparseGPT: the block op (every backend against the reference) and the layer algorithm."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import (
    assert_bitexact,
    assert_close,
    assert_matmul_close,
    devices,
    poisoned_like,
    requires_cuda,
    skip_unless_backend,
)
from sparse_kernels.ops.sparsegpt import (
    INT4_NAME,
    LAZY_NAME,
    NAME,
    sparsegpt_block_update,
    sparsegpt_block_update_int4,
    sparsegpt_lazy_update,
)
from sparse_kernels.pruning import HessianAccumulator, HessianWarning, sparsegpt_prune
from sparse_kernels.reference import sparsegpt as ref

FUSED = ["cpp", "cuda"]  # triton: tests/test_sparsegpt_triton.py


def correlated_inputs(tokens, cols, rank=8, seed=0):
    """LLM-like activations: low-rank-plus-noise covariance, heavy-tailed per-channel scales."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, cols, generator=g)
    X = torch.randn(tokens, rank, generator=g) @ A / rank ** 0.5 + 0.3 * torch.randn(tokens, cols, generator=g)
    return X * torch.exp(torch.randn(cols, generator=g))


def hessian(cols, tokens=2048, seed=0):
    acc = HessianAccumulator(cols)
    acc.add(correlated_inputs(tokens, cols, seed=seed))
    return acc.H


def block_inputs(rows, B, seed=0):
    H = hessian(B, tokens=4 * B, seed=seed)
    H += 0.01 * torch.diag(H).mean() * torch.eye(B)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, B, generator=g)
    mask = torch.rand(rows, B, generator=g) > 0.5
    return W, U, mask


def _device(backend, device):
    skip_unless_backend(NAME, backend, device)


# ---------------------------------------------------------------- the block op
def test_reference_matches_a_hand_written_two_column_case():
    W = torch.tensor([[2.0, 1.0]])
    U = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    Q, E, L = ref.sparsegpt_block_update(W, U, torch.tensor([[False, True]]), 0, 0)
    # column 0 pruned: err = 2/2 = 1, w1 -= 1 * 0.5 -> 0.5, kept.
    assert_bitexact(Q, torch.tensor([[0.0, 0.5]]))
    assert_bitexact(E, torch.tensor([[1.0, 0.0]]))
    assert_bitexact(L, torch.tensor([0.5]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("rows,B", [(37, 128), (5, 24), (130, 64)])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (4, 8), (1, 4)])
def test_block_op_matches_reference(backend, device, rows, B, nm):
    _device(backend, device)
    W, U, mask = block_inputs(rows, B, seed=rows)
    n, m = nm
    mk = mask if m == 0 else None
    Qr, Er, Lr = sparsegpt_block_update(W, U, mk, n, m, backend="reference")
    dev = torch.device(device)
    Q, E, L = sparsegpt_block_update(W.to(dev), U.to(dev), None if mk is None else mk.to(dev), n, m, backend=backend)
    agree = ((Q.cpu() != 0) == (Qr != 0)).float().mean().item()
    assert agree >= 0.999, f"mask agreement {agree:.5f}"
    assert abs(L.sum().item() - Lr.sum().item()) <= 1e-3 * Lr.sum().item()
    assert_close(Q.cpu(), Qr, "Q1", atol=1e-4, rtol=1e-4)
    assert_close(E.cpu(), Er, "Err1", atol=1e-4, rtol=1e-4)
    assert_close(L.cpu(), Lr, "losses", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_op_nm_exact_and_input_untouched(backend):
    skip_unless_backend(NAME, backend, "cpu")
    W, U, _ = block_inputs(19, 64, seed=3)
    W0 = W.clone()
    Q, E, L = sparsegpt_block_update(W, U, None, 2, 4, backend=backend)
    assert_bitexact(W, W0, "W1 must not be modified")
    nnz = (Q.view(19, 16, 4) != 0).sum(-1)
    assert (nnz <= 2).all()
    # err = (w - q) / d, so the loss (w - q)^2 / d^2 / 2 is sum(err^2) / 2
    assert_close(L, E.pow(2).sum(1) / 2, "loss", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_op_given_mask_is_obeyed_and_ties_go_low(backend):
    skip_unless_backend(NAME, backend, "cpu")
    W, U, mask = block_inputs(9, 16, seed=4)
    Q, _, _ = sparsegpt_block_update(W, U, mask, 0, 0, backend=backend)
    assert not (Q[~mask] != 0).any()
    # identity Hinv (no updates) and a row of equal weights: N:M keeps the lower indices
    Q, _, _ = sparsegpt_block_update(torch.ones(2, 8), torch.eye(8), None, 2, 4, backend=backend)
    assert_bitexact(Q != 0, torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 2, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_op_noncontiguous_inputs(backend):
    skip_unless_backend(NAME, backend, "cpu")
    W, U, mask = block_inputs(11, 32, seed=5)
    big = torch.randn(11, 80)
    big[:, 7:39] = W
    Wv = big[:, 7:39]
    Ubig = torch.zeros(48, 48)
    Ubig[3:35, 5:37] = U
    Uv = Ubig[3:35, 5:37]
    a = sparsegpt_block_update(Wv, Uv, mask, 0, 0, backend=backend)
    b = sparsegpt_block_update(W, U, mask, 0, 0, backend="reference")
    for x, y, what in zip(a, b, ("Q1", "Err1", "losses")):
        assert_close(x, y, what, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_op_opcheck(backend):
    skip_unless_backend(NAME, backend, "cpu")
    from sparse_kernels.ops import _registry as R

    op = R.get_op(NAME, backend)
    W, U, mask = block_inputs(7, 16, seed=6)
    torch.library.opcheck(op, (W, U, mask, 0, 0))
    torch.library.opcheck(op, (W, U, None, 2, 4))


def test_block_op_meta():
    W = torch.empty(5, 8, device="meta")
    Q, E, L = sparsegpt_block_update(W, torch.empty(8, 8, device="meta"), None, 2, 4)
    assert Q.shape == (5, 8) and E.shape == (5, 8) and L.shape == (5,)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_op_bad_inputs(backend):
    skip_unless_backend(NAME, backend, "cpu")
    W, U, mask = block_inputs(4, 8)
    with pytest.raises(TypeError, match="W1: dtype float16"):
        sparsegpt_block_update(W.half(), U, mask, backend=backend)
    with pytest.raises(ValueError, match=r"Hinv1: shape \(8, 7\)"):
        sparsegpt_block_update(W, U[:, :7], mask, backend=backend)
    with pytest.raises(ValueError, match="mask1: is required"):
        sparsegpt_block_update(W, U, None, 0, 0, backend=backend)
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsegpt_block_update(W, U, None, 4, 4, backend=backend)
    with pytest.raises(ValueError, match="multiple of 3"):
        sparsegpt_block_update(W, U, None, 1, 3, backend=backend)
    with pytest.raises(ValueError, match="mask1: must be None"):
        sparsegpt_block_update(W, U, mask, 2, 4, backend=backend)
    with pytest.raises(TypeError, match="mask1: dtype"):
        sparsegpt_block_update(W, U, mask.float(), 0, 0, backend=backend)


def test_cpp_kernel_checks_its_own_arguments():
    skip_unless_backend(NAME, "cpp", "cpu")
    from sparse_kernels.ops import _registry as R

    op = R.get_op(NAME, "cpp")
    W, U, mask = block_inputs(4, 8)
    with pytest.raises(ValueError, match="0 < n < m"):
        op(W, U, None, 5, 4)
    with pytest.raises(ValueError, match="mask1"):
        op(W, U, None, 0, 0)
    with pytest.raises(TypeError, match="W1: dtype"):
        op(W.double(), U, mask, 0, 0)


# ---------------------------------------------------------------- the lazy update
# ---------------------------------------------------------------- the joint int4 block op
def test_int4_reference_matches_a_hand_written_case():
    """Scale from the KEPT weights' max (3.5 -> 0.5, not the pruned 5.0), 1.25 / 0.5 = 2.5 rounds
    half to even (2), the pruned column carries the update from column 1."""
    W = torch.tensor([[3.5, 1.25, 5.0]])
    U = torch.tensor([[1.0, 0.5, 0.25], [0.0, 1.0, 0.5], [0.0, 0.0, 2.0]])
    Q, E, L, K, C, S = ref.sparsegpt_block_update_int4(W, U, torch.tensor([[True, True, False]]), 0, 0, 3,
                                                       torch.float32)
    assert_bitexact(S, torch.tensor([[0.5]]))
    assert_bitexact(C, torch.tensor([[7, 2, 0]], dtype=torch.int8))
    assert_bitexact(Q, torch.tensor([[3.5, 1.0, 0.0]]))
    assert_bitexact(E, torch.tensor([[0.0, 0.25, 2.4375]]))  # w2 = 5 - 0.25 * 0.5 = 4.875; / 2
    assert_bitexact(L, torch.tensor([(0.0625 + 4.875 ** 2 / 4) / 2]))
    assert_bitexact(K, torch.tensor([[True, True, False]]))


@pytest.mark.parametrize("rows,B,group", [(37, 128, 32), (5, 64, 16), (130, 128, 128), (3, 24, 8)])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_block_cpp_is_the_reference_bit_for_bit(rows, B, group, nm, scale_dtype):
    """The cpp kernel does the reference's float32 operations in its order: every output but the
    loss (summed in double) is bit-equal."""
    skip_unless_backend(INT4_NAME, "cpp", "cpu")
    W, U, mask = block_inputs(rows, B, seed=rows + B)
    n, m = nm
    mk = mask if m == 0 else None
    r = sparsegpt_block_update_int4(W, U, mk, n, m, group, scale_dtype, backend="reference")
    c = sparsegpt_block_update_int4(W, U, mk, n, m, group, scale_dtype, backend="cpp")
    for a, b, what in zip(c, r, ("Q1", "Err1", "losses", "keep", "codes", "scales")):
        if what == "losses":
            assert_close(a, b, what, atol=1e-5, rtol=1e-5)
        else:
            assert_bitexact(a, b, what)
    Q, _, _, K, C, S = c
    assert int(C.min()) >= -8 and int(C.max()) <= 7 and not bool(C[~K].any())
    assert_bitexact(S, S.to(scale_dtype).float(), "scales are values of scale_dtype")
    assert_bitexact(Q, C.float() * S.repeat_interleave(group, 1), "Q1 = codes * scales")
    if m:
        assert bool((K.view(rows, -1, m).sum(-1) == n).all())
    else:
        assert_bitexact(K, mask, "the given mask")


def int4_edge_inputs(seed):
    """A 6x32 block (groups of 16) whose row 0 has an all-pruned first group and row 1 a first
    group of 1e-9 weights (kept), and ``big``, a wider tensor holding W at columns 9:41."""
    W, U, mask = block_inputs(6, 32, seed=seed)
    mask[0, :16] = False
    W[1, :16] = 1e-9
    mask[1, :16] = True
    big = torch.randn(6, 50)
    big[:, 9:41] = W
    return W, U, mask, big


@requires_cuda
@pytest.mark.parametrize("rows,B,group", [(37, 128, 32), (130, 256, 128), (5, 48, 16)])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (4, 8)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_block_cuda_against_the_reference(rows, B, group, nm, scale_dtype):
    """On a GPU: the CUDA kernel does the reference's float32 operations (_rn intrinsics, rintf),
    so it is bit-equal but for the loss.  (Triton's: tests/test_sparsegpt_triton.py, on CUDA too.)"""
    backend = "cuda"
    skip_unless_backend(INT4_NAME, backend, "cuda")
    W, U, mask = block_inputs(rows, B, seed=rows + B)
    n, m = nm
    mk = mask if m == 0 else None
    want = sparsegpt_block_update_int4(W, U, mk, n, m, group, scale_dtype, backend="reference")
    got = [t.cpu() for t in sparsegpt_block_update_int4(W.cuda(), U.cuda(), None if mk is None else mk.cuda(), n, m,
                                                        group, scale_dtype, backend=backend)]
    assert abs(got[2].sum().item() - want[2].sum().item()) <= 1e-3 * want[2].sum().item()
    for a, b, what in zip(got, want, ("Q1", "Err1", "losses", "keep", "codes", "scales")):
        if what != "losses":
            assert_bitexact(a, b, what)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_int4_block_edge_cases(backend):
    """An all-pruned group (amax 0 -> scale 1), a group whose scale underflows float16 (the
    smallest normal instead of 0), codes clamped to [-8, 7], W1 untouched, strided inputs."""
    skip_unless_backend(INT4_NAME, backend, "cpu")
    W, U, mask, big = int4_edge_inputs(11)
    W0 = big.clone()
    Q, E, L, K, C, S = sparsegpt_block_update_int4(big[:, 9:41], U.t().contiguous().t(), mask, 0, 0, 16,
                                                   torch.float16, backend=backend)
    assert_bitexact(big, W0, "W1 must not be modified")
    assert float(S[0, 0]) == 1.0 and not bool(C[0, :16].any())
    assert float(S[1, 0]) == torch.finfo(torch.float16).tiny and bool(torch.isfinite(Q).all())
    r = sparsegpt_block_update_int4(W, U, mask, 0, 0, 16, torch.float16, backend="reference")
    for a, b, what in zip((Q, E, K, C, S), (r[0], r[1], r[3], r[4], r[5]), ("Q1", "Err1", "keep", "codes", "scales")):
        assert_bitexact(a, b, what)
    # a kept weight pushed past 7 s by an earlier column's update is clamped, not wrapped: the
    # scale comes from the kept max |w| = 1 (s = 1/7); the pruned 7.4 adds 7.4 * 4 to column 1
    Wc = torch.tensor([[7.4, 1.0, 0.0, 0.0]])
    Uc = torch.eye(4)
    Uc[0, 1] = -4.0
    mk = torch.tensor([[False, True, True, True]])
    _, _, _, _, C, S = sparsegpt_block_update_int4(Wc, Uc, mk, 0, 0, 4, torch.float32, backend=backend)
    assert_bitexact(S, torch.tensor([[1.0]]) / 7, "scale")
    assert C.tolist() == [[0, 7, 0, 0]]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_int4_block_opcheck_meta_and_errors(backend):
    skip_unless_backend(INT4_NAME, backend, "cpu")
    from sparse_kernels.ops import _registry as R

    op = R.get_op(INT4_NAME, backend)
    W, U, mask = block_inputs(7, 16, seed=6)
    torch.library.opcheck(op, (W, U, mask, 0, 0, 8, torch.bfloat16))
    torch.library.opcheck(op, (W, U, None, 2, 4, 16, torch.float32))
    out = sparsegpt_block_update_int4(W.to("meta"), U.to("meta"), None, 2, 4, 8, torch.float16)
    assert [tuple(t.shape) for t in out] == [(7, 16), (7, 16), (7,), (7, 16), (7, 16), (7, 2)]
    assert [t.dtype for t in out[3:]] == [torch.bool, torch.int8, torch.float32]
    with pytest.raises(ValueError, match="group_size: got 5"):
        sparsegpt_block_update_int4(W, U, mask, 0, 0, 5, torch.float32, backend=backend)
    with pytest.raises(TypeError, match="scale_dtype: got torch.float64"):
        sparsegpt_block_update_int4(W, U, mask, 0, 0, 8, torch.float64, backend=backend)
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsegpt_block_update_int4(W, U, None, 4, 4, 8, torch.float32, backend=backend)
    if backend == "cpp":  # the kernel's own checks, past the Python wrapper
        with pytest.raises(ValueError, match="group_size: got 5"):
            op(W, U, mask, 0, 0, 5, torch.float32)
        with pytest.raises(TypeError, match="scale_dtype"):
            op(W, U, mask, 0, 0, 8, torch.float64)
        with pytest.raises(ValueError, match="mask1: is required"):
            op(W, U, None, 0, 0, 8, torch.float32)


def lazy_inputs(rows, B, L, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(rows, B, generator=g)
    E[torch.rand(rows, B, generator=g) >= density] = 0
    return E, torch.randn(B, L, generator=g), torch.randn(rows, L, generator=g)


@pytest.mark.parametrize("backend,isa", [("reference", None), ("cpp", None), ("cpp", "scalar")])
@pytest.mark.parametrize("rows,B,L", [(1, 1, 1), (37, 128, 100), (64, 24, 32), (130, 64, 65), (3, 8, 31)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_lazy_update_matches_addmm(backend, isa, rows, B, L, density, monkeypatch):
    skip_unless_backend(LAZY_NAME, backend, "cpu")
    if isa is not None:
        monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)  # the portable path (read per call)
    E, U, W = lazy_inputs(rows, B, L, density, seed=rows + L)
    E[rows // 2] = 0  # a row with no terms
    exact = W.double() - E.double() @ U.double()
    out = W.clone()
    sparsegpt_lazy_update(out, E, U, backend=backend)
    assert_matmul_close(out, exact, torch.addmm(W, E, U, alpha=-1), "W - Err1 @ U")
    if density == 0.0:
        assert_bitexact(out, W, "an all-zero Err1 leaves W as it was")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_lazy_update_strided_views_touch_only_the_view(backend):
    skip_unless_backend(LAZY_NAME, backend, "cpu")
    E, U, W = lazy_inputs(29, 40, 70, 0.5, seed=3)
    big = poisoned_like(torch.empty(29, 77))  # NaN outside the view: a stray write or read shows up
    big[:, 5:75] = W
    Ebig = torch.randn(40, 29).t()  # non-contiguous Err1 (column-major)
    Ebig.copy_(E)
    Ubig = torch.randn(50, 90)[7:47, 11:81]  # U with a row stride of 90
    Ubig.copy_(U)
    sparsegpt_lazy_update(big[:, 5:75], Ebig, Ubig, backend=backend)
    assert torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 75:]).all()
    assert_close(big[:, 5:75], torch.addmm(W, E, U, alpha=-1), "view", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_lazy_update_opcheck_and_errors(backend):
    skip_unless_backend(LAZY_NAME, backend, "cpu")
    from sparse_kernels.ops import _registry as R

    E, U, W = lazy_inputs(9, 16, 40, 0.5, seed=4)
    torch.library.opcheck(R.get_op(LAZY_NAME, backend), (W.clone(), E, U))
    with pytest.raises(TypeError, match="W: dtype float64"):
        sparsegpt_lazy_update(W.double(), E, U, backend=backend)
    with pytest.raises(ValueError, match=r"U: shape \(16, 39\) must be \(B, L\) = \(16, 40\)"):
        sparsegpt_lazy_update(W, E, U[:, :39], backend=backend)
    with pytest.raises(ValueError, match="Err1: shape .* must have W's 9 rows"):
        sparsegpt_lazy_update(W, E[:8], U, backend=backend)
    with pytest.raises(ValueError, match="W: the columns must be contiguous"):
        sparsegpt_lazy_update(W.t().contiguous().t(), E, U, backend=backend)
    with pytest.raises(ValueError, match="W: rows overlap in memory"):
        sparsegpt_lazy_update(torch.zeros(1, 40).expand(9, 40), E, U, backend=backend)


def test_lazy_update_cpp_kernel_checks_its_own_arguments():
    skip_unless_backend(LAZY_NAME, "cpp", "cpu")
    from sparse_kernels.ops import _registry as R

    op = R.get_op(LAZY_NAME, "cpp")
    E, U, W = lazy_inputs(9, 16, 40, 0.5, seed=5)
    with pytest.raises(ValueError, match="U: shape"):
        op(W, E, U[:, :30])
    with pytest.raises(TypeError, match="float32"):
        op(W, E.double(), U)
    with pytest.raises(ValueError, match="columns must be contiguous"):
        op(W.t().contiguous().t(), E, U)
    with pytest.raises(ValueError, match="rows overlap"):
        op(torch.zeros(1, 40).expand(9, 40), E, U)


def test_lazy_update_auto_rule():
    from sparse_kernels.ops import _registry as R
    from sparse_kernels.ops.sparsegpt import LAZY_CPP_MAX_DENSITY

    cpu = torch.device("cpu")
    if "cpp" in R.available(LAZY_NAME, "cpu"):
        assert R.select(LAZY_NAME, "auto", cpu, 0.5) == "cpp"
    assert R.select(LAZY_NAME, "auto", cpu, min(1.0, LAZY_CPP_MAX_DENSITY + 0.1)) == "reference"


# ---------------------------------------------------------------- the layer
def _ref_layer(W, H, spec, blocksize=128, percdamp=0.01):
    return sparsegpt_prune(W, H, spec, blocksize=blocksize, percdamp=percdamp, backend="reference")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("spec", [0.5, 0.7, "2:4", "4:8"])
@pytest.mark.parametrize("rows,cols,blocksize", [(96, 320, 128), (33, 72, 24)])
def test_layer_matches_reference(backend, spec, rows, cols, blocksize):
    skip_unless_backend(NAME, backend, "cpu")
    H = hessian(cols, seed=cols)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) / cols ** 0.5
    Wr, mr, lr = _ref_layer(W, H, spec, blocksize)
    Wb, mb, lb = sparsegpt_prune(W, H, spec, blocksize=blocksize, backend=backend)
    assert (mr == mb).float().mean().item() >= 0.999
    assert abs(lb - lr) <= 1e-3 * lr
    assert_close(Wb, Wr, "W_pruned", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_exact(spec, n, m):
    H = hessian(96, seed=1)
    W = torch.randn(50, 96)
    Wp, mask, _ = sparsegpt_prune(W, H, spec, blocksize=32)
    assert_bitexact(mask.view(50, -1, m).sum(-1), torch.full((50, 96 // m), n, dtype=torch.int64), "kept per group")
    assert not (Wp[~mask] != 0).any()
    assert ((Wp != 0).view(50, -1, m).sum(-1) <= n).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.9])
def test_unstructured_exact_sparsity_per_block(sparsity):
    rows, cols, bs = 21, 200, 64
    H = hessian(cols, seed=2)
    W = torch.randn(rows, cols)
    Wp, mask, loss = sparsegpt_prune(W, H, sparsity, blocksize=bs)
    for i1 in range(0, cols, bs):
        blk = mask[:, i1:i1 + bs]
        assert int((~blk).sum()) == round(blk.numel() * sparsity), f"block at column {i1}"
    assert not (Wp[~mask] != 0).any()
    assert loss > 0


def test_dead_columns_are_zeroed():
    cols = 48
    X = correlated_inputs(512, cols)
    X[:, [3, 17]] = 0
    acc = HessianAccumulator(cols)
    acc.add(X)
    assert acc.H[3, 3] == 0
    W = torch.randn(10, cols)
    Wp, mask, loss = sparsegpt_prune(W, acc.H, 0.5, blocksize=16)
    assert not (Wp[:, [3, 17]] != 0).any()
    assert torch.isfinite(Wp).all() and loss == loss


def test_non_pd_hessian_retries_with_warning():
    cols = 32
    g = torch.Generator().manual_seed(0)
    v = torch.randn(cols, 4, generator=g)
    H = v @ v.T - 0.05 * torch.eye(cols)  # indefinite: 1% dampening is not enough
    W = torch.randn(8, cols, generator=g)
    with pytest.warns(HessianWarning, match="succeeded with percdamp"):
        Wp, mask, loss = sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert torch.isfinite(Wp).all()
    assert int((~mask).sum()) == W.numel() // 2


def test_hopeless_hessian_falls_back_without_crashing():
    cols = 16
    H = torch.full((cols, cols), float("nan"))
    with pytest.warns(HessianWarning, match="falling back to diag"):
        Wp, mask, loss = sparsegpt_prune(torch.randn(4, cols), H, "2:4", blocksize=8)
    assert torch.isfinite(Wp).all()
    assert (mask.view(4, -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_hopeless_hessian_fallback_with_a_column_major_weight(backend):
    """The diag(H) fallback must hand the layer loop a row-major W like the normal path does: the
    lazy-update op needs contiguous columns (a transposed weight, e.g. GPT-2's Conv1D, has none)."""
    cols = 64
    W = torch.randn(cols, 12, generator=torch.Generator().manual_seed(1)).t()  # [12, 64], stride (1, 12)
    H = torch.full((cols, cols), float("nan"))
    with pytest.warns(HessianWarning, match="falling back to diag"):
        Wp, mask, loss = sparsegpt_prune(W, H, 0.5, blocksize=16, backend=backend)
    with pytest.warns(HessianWarning, match="falling back to diag"):
        Wc, maskc, lossc = sparsegpt_prune(W.contiguous(), H, 0.5, blocksize=16, backend=backend)
    assert_bitexact(Wp, Wc, "fallback, column-major vs row-major W")
    assert torch.equal(mask, maskc) and int((~mask).sum()) == W.numel() // 2


def test_positive_definite_hessian_does_not_warn():
    H = hessian(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegpt_prune(torch.randn(6, 40), H, 0.5, blocksize=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights(dtype):
    H = hessian(64, seed=7)
    W = torch.randn(24, 64) / 8
    Wp, mask, loss = sparsegpt_prune(W.to(dtype), H, "2:4", blocksize=32)
    assert Wp.dtype == dtype
    W32, m32, l32 = sparsegpt_prune(W.to(dtype).float(), H, "2:4", blocksize=32)
    assert_bitexact(Wp, W32.to(dtype))
    assert_bitexact(mask, m32)
    assert not (Wp[~mask] != 0).any()


def test_h_is_not_modified_and_float64_h_accepted():
    H = hessian(32).double()
    H0 = H.clone()
    sparsegpt_prune(torch.randn(4, 32), H, 0.5, blocksize=16)
    assert_bitexact(H, H0)


def test_layer_bad_inputs():
    H = hessian(16)
    W = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"sparsity: got 1.5, expected .* \(0, 1\)"):
        sparsegpt_prune(W, H, 1.5)
    with pytest.raises(ValueError, match="sparsity: got 0"):
        sparsegpt_prune(W, H, 0)
    with pytest.raises(ValueError, match="0 < N < M"):
        sparsegpt_prune(W, H, "4:4")
    with pytest.raises(ValueError, match="'N:M'"):
        sparsegpt_prune(W, H, "half")
    with pytest.raises(ValueError, match="multiple of M=8"):
        sparsegpt_prune(torch.randn(4, 12), hessian(12), "4:8")
    with pytest.raises(ValueError, match="blocksize: got 6"):
        sparsegpt_prune(W, H, "2:4", blocksize=6)
    with pytest.raises(ValueError, match=r"H: shape \(16, 15\)"):
        sparsegpt_prune(W, H[:, :15], 0.5)
    with pytest.raises(TypeError, match="W: dtype int64"):
        sparsegpt_prune(W.long(), H, 0.5)
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt_prune(W, H, 0.5, percdamp=-1.0)


def test_hessian_accumulator_any_leading_shape_running_mean():
    X = torch.randn(6, 10, 12, dtype=torch.float64)
    acc = HessianAccumulator(12)
    acc.add(X[:2].half().float())
    acc.add(X[2:].float())
    Xf = torch.cat([X[:2].half().float(), X[2:].float()]).reshape(-1, 12).double()
    assert acc.nsamples == 60
    assert_close(acc.H, (2 / 60 * Xf.T @ Xf).float(), "H", atol=1e-5, rtol=1e-5)
    lin = torch.nn.Linear(12, 3)
    acc2 = HessianAccumulator(12)
    h = acc2.attach(lin)
    lin(X.float())
    h.remove()
    lin(X.float())
    assert acc2.nsamples == 60
    with pytest.raises(ValueError, match="last dim 5"):
        acc2.add(torch.randn(3, 5))


@pytest.mark.parametrize("n", [5, 100, 300])
def test_fast_inverse_factor_equals_the_papers(n):
    from sparse_kernels.pruning.sparsegpt import fast_upper_inverse_factor

    H = hessian(n, tokens=4 * n, seed=n).double()
    H += 0.01 * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    U = fast_upper_inverse_factor(H)
    assert_bitexact(U.tril(-1), torch.zeros_like(U), "strict lower triangle")
    assert_close(U, ref.upper_inverse_factor(H), "U", atol=1e-9, rtol=1e-7)
    assert_close(U.T @ U, torch.linalg.inv(H), "U^T U", atol=1e-9, rtol=1e-6)


def test_flat_selection_matches_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 200, (1,), generator=g))
        s = torch.randint(0, 4, (n,), generator=g).float()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        assert_bitexact(ref.keep_top_n_flat(s, k), ref.keep_top_n(s, k), f"n={n} keep={k}")


def test_gpu_flat_selection_matches_cpu_path():
    """The GPU path of keep_top_n_flat (one stable sort, no host sync) picks exactly the CPU
    path's mask (numpy introselect + tie rule), ties and NaN included; run here on CPU."""
    g = torch.Generator().manual_seed(1)
    for trial in range(150):
        n = int(torch.randint(2, 3000, (1,), generator=g))
        s = torch.randint(0, 9, (n,), generator=g).float() if trial % 2 else torch.randn(n, generator=g)
        if trial % 5 == 0:
            s[torch.randint(0, n, (max(1, n // 10),), generator=g)] = float("nan")
        k = int(torch.randint(1, n, (1,), generator=g))
        got = ref._keep_top_n_sorted(torch.nan_to_num(s, nan=float("inf")), k)
        assert_bitexact(got, ref.keep_top_n_flat(s, k), f"n={n} keep={k}")


# ---------------------------------------------------------------- the published algorithm
def published_sparsegpt(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """An independent transcription of SparseGPT's layer algorithm as published (Frantar &
    Alistarh 2023, Algorithm 1, and the authors' ``fasterprune``), kept deliberately literal.

    ``prunen:prunem`` is the paper's reading: ``prunen`` of every ``prunem`` weights PRUNED
    (for 2:4 and 4:8 the same as ours).  Returns ``(W, pruned_mask, total_loss)``.
    """
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(columns)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Losses = torch.zeros(rows)
    pruned = torch.zeros(rows, columns, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned, float(torch.sum(Losses))


def _paper_case(rows, cols, seed):
    H = hessian(cols, tokens=4 * cols, seed=seed)
    H[7, :] = 0
    H[:, 7] = 0  # a dead column
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100)) / cols ** 0.5
    return W, H


@pytest.mark.parametrize("spec,prunen,prunem", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("rows,cols,blocksize", [(40, 320, 128), (17, 96, 32)])
def test_reference_is_the_published_algorithm_nm(spec, prunen, prunem, rows, cols, blocksize):
    """N:M: the reference layer (backend="reference") equals the transcription bit for bit
    (weights and mask, fp32), dead column included."""
    W, H = _paper_case(rows, cols, seed=cols + prunem)
    Wp, pruned, loss_p = published_sparsegpt(W, H, prunen=prunen, prunem=prunem, blocksize=blocksize)
    Wr, keep, loss_r = sparsegpt_prune(W, H, spec, blocksize=blocksize, backend="reference")
    assert_bitexact(keep, ~pruned, "mask")
    assert_bitexact(Wr, Wp, "W_pruned")
    assert (Wr[:, 7] == 0).all() and loss_p > 0
    assert abs(loss_r - loss_p) <= 1e-6 * loss_p


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("rows,cols,blocksize", [(64, 320, 128), (96, 200, 128)])
def test_reference_is_the_published_algorithm_unstructured(sparsity, rows, cols, blocksize):
    """Unstructured: the published code prunes every score ``<=`` the sorted score at index
    ``int(numel * sparsity)`` of each block, i.e. one weight more than ``int(numel * s)`` (and
    every tie at the threshold); the project prunes exactly ``round(numel * s)`` per block
    (docs/PRUNING.md, reference/sparsegpt.py ``unstructured_block_mask``).  So the two agree
    on >= 99.9% of mask entries, and the total loss is within 0.2%."""
    W, H = _paper_case(rows, cols, seed=cols)
    Wp, pruned, loss_p = published_sparsegpt(W, H, sparsity=sparsity, blocksize=blocksize)
    Wr, keep, loss_r = sparsegpt_prune(W, H, sparsity, blocksize=blocksize, backend="reference")
    agree = (keep == ~pruned).float().mean().item()
    assert agree >= 0.999, agree
    assert abs(loss_r - loss_p) <= 2e-3 * loss_p, (loss_r, loss_p)
    for i1 in range(0, cols, blocksize):  # the documented difference, block by block
        n = pruned[:, i1:i1 + blocksize].numel()
        assert int((~keep[:, i1:i1 + blocksize]).sum()) == round(n * sparsity)
        assert int(pruned[:, i1:i1 + blocksize].sum()) == int(n * sparsity) + 1
    assert (Wr[:, 7] == 0).all()


@pytest.mark.parametrize("factor", ["paper", "fast"])
def test_dampening_of_a_diagonal_hessian(factor):
    """With H = diag(d) the inverse factor used is diag(1 / sqrt(d + 0.01 * mean(d)))."""
    from sparse_kernels.pruning.sparsegpt import _inverse_factor, fast_upper_inverse_factor

    g = torch.Generator().manual_seed(12)
    d = torch.rand(150, generator=g) * 5 + 0.1
    W = torch.randn(9, 150, generator=g)
    fn = ref.upper_inverse_factor if factor == "paper" else fast_upper_inverse_factor
    W2, U, used = _inverse_factor(W, torch.diag(d), 0.01, "", fn)
    want = torch.diag(1 / torch.sqrt(d.double() + 0.01 * d.double().mean())).float()
    assert used == 0.01
    assert_close(U, want, "U", atol=1e-7, rtol=2e-6)
    assert_bitexact(W2, W, "W (no dead columns)")
