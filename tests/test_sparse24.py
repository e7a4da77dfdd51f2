"""2:4 format: reference semantics, every kernel backend bit-exact against it, errors, interop.

Triton on CPU (TRITON_INTERPRET=1) is covered in test_sparse24_triton.py; here Triton runs
only on CUDA.  Tests that need a GPU are marked ``requires_cuda``.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparse_kernels as sk
from sparse_kernels.ops import _registry as R
from sparse_kernels.reference import sparse24 as ref

from conftest import assert_bitexact, devices, requires_cuda, skip_unless_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
KERNELS = ["cpp", "cuda", "triton"]
SHAPES = [(1, 16), (7, 48), (33, 432), (6, 128)]
OPS = ("mask_2to4", "compress_2to4", "decompress_2to4")
NAN, INF = float("nan"), float("inf")


def _skip(op, backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("triton on CPU runs in test_sparse24_triton.py")
    skip_unless_backend(op, backend, device)


def _rand(rows, cols, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype).to(device)


def _sparse24(rows, cols, dtype, device="cpu", seed=0):
    """Random 2:4-sparse w with random +0.0/-0.0 in the dropped slots and some all-zero groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(ref.mask_2to4(w), w, torch.zeros((), dtype=dtype))
    neg = torch.rand(rows, cols, generator=g) < 0.3
    w = torch.where((w == 0) & neg, torch.tensor(-0.0, dtype=dtype), w)
    few = torch.rand(rows, cols // 4, 1, generator=g) < 0.2  # groups with 0 or 1 nonzero
    drop = torch.rand(rows, cols // 4, 4, generator=g) < 0.5
    w = w.view(rows, cols // 4, 4).masked_fill(few & drop, 0.0).view(rows, cols)
    return w.to(device)


def _adversarial(dtype):
    """One row per special case, 16 columns each (4 groups)."""
    z, n = 0.0, -0.0
    rows = [
        [0, 0, .5, .5, 1, 1, 1, 1, 0, 0, 0, 0, n, n, n, n],
        [n, z, z, z, z, n, z, z, z, z, n, n, z, z, z, n],
        [INF, 0, 0, -INF, 0, INF, n, 0, -INF, n, n, 0, 3, 0, n, 0],
        [z, z, z, 2, 1, z, z, z, n, z, 7, z, -1, -1, z, z],
        [1e-7, 0, 0, 0, 0, 6e4, 0, 0, 0, 0, -2.5, 0, 0, 0, 0, 65504],
    ]
    return torch.tensor(rows, dtype=torch.float32).to(dtype)


def _valid_meta(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    nibs = torch.tensor(ref._VALID_NIBBLES)[torch.randint(0, 6, (rows, cols // 16, 4), generator=g)]
    word = (nibs << torch.tensor([0, 4, 8, 12])).sum(-1)
    return torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)


def _special_values(rows, half, dtype, seed=0):
    """Values with -0.0, inf and NaN payloads mixed in (decompress must move bits, not floats)."""
    v = _rand(rows, half, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, 8, (rows, half), generator=g)
    v = torch.where(pick == 0, torch.tensor(-0.0, dtype=dtype), v)
    v = torch.where(pick == 1, torch.tensor(INF, dtype=dtype), v)
    v = torch.where(pick == 2, torch.tensor(NAN, dtype=dtype), v)
    return v


def _run(op, backend, *args, **kw):
    return getattr(sk, op)(*args, backend=backend, **kw)


# ---------------------------------------------------------------- reference semantics
def test_reference_tie_rule_and_scores():
    w = torch.tensor([[0, 0, .5, .5, 1, 1, 1, 1, 3, -4, 0, 2, -1, 1, -1, 1]])
    assert sk.mask_2to4(w, backend="reference").tolist() == [
        [False, False, True, True, True, True, False, False, True, True, False, False, True, True, False, False]]
    scores = torch.tensor([[4.0, 3, 2, 1] * 4])
    assert sk.mask_2to4(w, scores, backend="reference").tolist() == [[True, True, False, False] * 4]
    # signed scores: -0.0 == +0.0, -1 < 0
    s = torch.tensor([[-1.0, -0.0, 0.0, -2.0]])
    assert sk.mask_2to4(s[:, :4], s, backend="reference").tolist() == [[False, True, True, False]]


def test_reference_encoding_by_hand():
    w = torch.zeros(1, 16)
    w[0, 1], w[0, 3] = 1.0, 2.0        # group 0: (1, 3) -> 13
    w[0, 4], w[0, 6] = 3.0, 4.0        # group 1: (0, 2) -> 8
    w[0, 9] = 5.0                      # group 2: one nonzero at 1 -> (0, 1) -> 4
    w[0, 14], w[0, 15] = -0.0, 6.0     # group 3: (2, 3) -> 14
    values, meta = sk.compress_2to4(w, backend="reference")
    assert values.tolist() == [[1, 2, 3, 4, 0, 5, -0.0, 6]]
    assert torch.signbit(values[0, 6])
    assert int(meta[0, 0]) & 0xFFFF == 13 | 8 << 4 | 4 << 8 | 14 << 12
    assert meta.dtype == torch.int16 and int(meta[0, 0]) < 0
    assert_bitexact(sk.decompress_2to4(values, meta, backend="reference"), w)


def test_reference_index_choice_for_sparse_groups():
    w = _adversarial(torch.float32)
    values, meta = sk.compress_2to4(w[1:2], backend="reference")
    # -0.0 beats +0.0, ties go to the lower index; all-(+0.0) groups store (0, 1)
    assert ref.meta_nibbles(meta)[0].tolist() == [4, 4, 14, 12]
    assert_bitexact(sk.decompress_2to4(values, meta, backend="reference"), w[1:2])
    values, meta = sk.compress_2to4(w[0:1], prune=True, backend="reference")
    # [0,0,.5,.5] -> (2, 3); [1,1,1,1] -> (0, 1); zeros -> (0, 1); [-0,-0,-0,-0] -> (0, 1)
    assert ref.meta_nibbles(meta)[0].tolist() == [14, 4, 4, 4]
    want = torch.tensor([[0, 0, .5, .5, 1, 1, 0, 0, 0, 0, 0, 0, -0.0, -0.0, 0, 0]])
    assert_bitexact(sk.decompress_2to4(values, meta, backend="reference"), want)
    with pytest.raises(ValueError, match=r"row 0, columns 4\.\.7 has 4 nonzeros"):
        sk.compress_2to4(w, backend="reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_roundtrip_and_prune(dtype):
    w = _sparse24(9, 64, dtype)
    rt = ref.decompress_2to4(*ref.compress_2to4(w, False))
    assert torch.equal(rt, w)  # equal as floats; a group with > 2 signed zeros keeps only 2 of them
    assert torch.signbit(rt).sum() > 0
    assert_bitexact(ref.decompress_2to4(*ref.compress_2to4(rt, False)), rt, "round trip")
    d = _rand(9, 64, dtype)
    pruned = ref.decompress_2to4(*ref.compress_2to4(d, True))
    assert_bitexact(pruned, torch.where(ref.mask_2to4(d), d, torch.zeros((), dtype=dtype)), "prune")


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_bitexact(shape, dtype, backend, device):
    _skip("mask_2to4", backend, device)
    w = _rand(*shape, dtype, device, seed=shape[0])
    w[0, :4] = torch.tensor([0, 0, .5, .5])
    w[-1, -8:] = torch.tensor([1, 1, 1, 1, -0.0, 0.0, -INF, INF])
    assert_bitexact(_run("mask_2to4", backend, w), ref.mask_2to4(w), "mask")
    for sdt in DTYPES + [torch.float64]:
        s = _rand(*shape, sdt, device, seed=7)
        s[0, :4] = torch.tensor([-0.0, 0.0, -1.0, -1.0])
        assert_bitexact(_run("mask_2to4", backend, w, s), ref.mask_2to4(w, s), f"mask scores {sdt}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compress_decompress_bitexact(shape, dtype, backend, device):
    _skip("compress_2to4", backend, device)
    w = _sparse24(*shape, dtype, device, seed=shape[1])
    v, m = _run("compress_2to4", backend, w)
    rv, rm = ref.compress_2to4(w, False)
    assert_bitexact(v, rv, "values")
    assert_bitexact(m, rm, "meta")
    assert_bitexact(_run("decompress_2to4", backend, v, m), ref.decompress_2to4(rv, rm), "round trip")
    assert torch.equal(_run("decompress_2to4", backend, v, m), w)

    d = _rand(*shape, dtype, device, seed=3)
    v, m = _run("compress_2to4", backend, d, prune=True)
    rv, rm = ref.compress_2to4(d, True)
    assert_bitexact(v, rv, "pruned values")
    assert_bitexact(m, rm, "pruned meta")

    vals = _special_values(shape[0], shape[1] // 2, dtype).to(device)
    meta = _valid_meta(*shape, seed=shape[0]).to(device)
    assert_bitexact(_run("decompress_2to4", backend, vals, meta), ref.decompress_2to4(vals, meta), "decompress")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_groups(dtype, backend, device):
    _skip("compress_2to4", backend, device)
    w = _adversarial(dtype).to(device)
    assert_bitexact(_run("mask_2to4", backend, w), ref.mask_2to4(w.cpu()), "mask")
    v, m = _run("compress_2to4", backend, w, prune=True)
    rv, rm = ref.compress_2to4(w.cpu(), True)
    assert_bitexact(v, rv, "values")
    assert_bitexact(m, rm, "meta")
    strict = w[1:2]  # at most 2 non-(+0.0) per group: round-trips exactly, -0.0 included
    assert_bitexact(_run("decompress_2to4", backend, *_run("compress_2to4", backend, strict)), strict)
    inf_row = torch.tensor([[INF, 0, 0, -INF] * 4], dtype=dtype, device=device)
    assert_bitexact(_run("decompress_2to4", backend, *_run("compress_2to4", backend, inf_row)), inf_row)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, backend, device):
    _skip("compress_2to4", backend, device)
    big = _sparse24(64, 96, dtype, device, seed=5)
    views = {
        "transposed": _sparse24(32, 48, dtype, device, seed=6).t().contiguous().t(),  # strides (1, 32)
        "column slice": big[:, 16:80],
        "row step": big[::3],
    }
    for name, w in views.items():
        assert not w.is_contiguous(), name
        rv, rm = ref.compress_2to4(w.contiguous(), False)
        v, m = _run("compress_2to4", backend, w)
        assert_bitexact(v, rv, f"{name} values")
        assert_bitexact(m, rm, f"{name} meta")
        assert_bitexact(_run("mask_2to4", backend, w), ref.mask_2to4(w.contiguous()), f"{name} mask")
        s = torch.randn(w.shape[1], w.shape[0], dtype=torch.float64, device=device).t()
        assert_bitexact(_run("mask_2to4", backend, w, s), ref.mask_2to4(w.contiguous(), s.contiguous()),
                        f"{name} mask scores")
        vv = torch.cat([rv, rv], dim=1)[:, rv.shape[1]:]
        mm = rm.t().contiguous().t()
        assert not vv.is_contiguous() and not mm.is_contiguous()
        assert_bitexact(_run("decompress_2to4", backend, vv, mm), ref.decompress_2to4(rv, rm), f"{name} decompress")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_mask_any_leading_dims(backend, device):
    _skip("mask_2to4", backend, device)
    w = torch.randn(3, 5, 12, dtype=torch.bfloat16, device=device)
    out = _run("mask_2to4", backend, w)
    assert out.shape == w.shape and out.dtype == torch.bool
    assert_bitexact(out, ref.mask_2to4(w.reshape(-1, 12)).reshape(3, 5, 12))
    assert (out.view(3, 5, 3, 4).sum(-1) == 2).all()
    e = torch.empty(0, 8, device=device)
    assert _run("mask_2to4", backend, e).shape == (0, 8)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_empty_rows(backend, device):
    _skip("compress_2to4", backend, device)
    w = torch.empty(0, 32, device=device)
    v, m = _run("compress_2to4", backend, w)
    assert v.shape == (0, 16) and m.shape == (0, 2)
    assert _run("decompress_2to4", backend, v, m).shape == (0, 32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", KERNELS)
def test_outputs_fully_written(backend, device):
    """Free a NaN/-1 filled block of the output's size first: on CUDA the caching allocator hands
    it back to the kernel, so an element the kernel never writes shows up."""
    _skip("compress_2to4", backend, device)
    w = _sparse24(37, 400 - 400 % 16, torch.float16, device, seed=11)
    for _ in range(2):
        junk = torch.full((w.numel(),), NAN, dtype=w.dtype, device=device)
        del junk
        v, m = _run("compress_2to4", backend, w)
        assert_bitexact(v, ref.compress_2to4(w, False)[0])
        junk = torch.full((w.numel(),), -1, dtype=torch.int16, device=device)
        del junk
        assert_bitexact(_run("decompress_2to4", backend, v, m), ref.decompress_2to4(v, m))


# ---------------------------------------------------------------- meta device, opcheck, compile
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_meta_and_fake_tensors(backend):
    w = torch.empty(24, 64, dtype=torch.bfloat16, device="meta")
    v, m = _run("compress_2to4", backend, w)
    assert (v.shape, v.dtype, m.shape, m.dtype) == ((24, 32), torch.bfloat16, (24, 4), torch.int16)
    assert v.device.type == "meta"
    assert _run("decompress_2to4", backend, v, m).shape == (24, 64)
    assert _run("mask_2to4", backend, torch.empty(2, 3, 8, device="meta")).dtype == torch.bool
    with FakeTensorMode():
        fw = torch.empty(24, 64, dtype=torch.float16)
        for b in ["reference"] + KERNELS:
            fv, fm = R.get_op("compress_2to4", b)(fw, False)
            assert fv.shape == (24, 32) and fm.shape == (24, 4)
            assert R.get_op("decompress_2to4", b)(fv, fm).shape == (24, 64)
            assert R.get_op("mask_2to4", b)(fw, None).shape == (24, 64)


def _opcheck_args(device):
    w = _sparse24(8, 32, torch.float16, device, seed=1)
    d = _rand(8, 32, torch.float32, device, seed=2)
    v, m = ref.compress_2to4(w, False)
    return {
        "mask_2to4": [(d, None), (w, d)],
        "compress_2to4": [(w, False), (d, True)],
        "decompress_2to4": [(v, m)],
    }


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend, device):
    _skip(op, backend, device)
    for args in _opcheck_args(device)[op]:
        torch.library.opcheck(R.get_op(op, backend), args)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_torch_compile_fullgraph(backend):
    skip_unless_backend("compress_2to4", backend, "cpu")
    compress, decompress = R.get_op("compress_2to4", backend), R.get_op("decompress_2to4", backend)

    def f(w):
        v, m = compress(w, True)
        return decompress(v, m) * 2, m

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True)
    for rows in (8, 24):
        w = _rand(rows, 64, torch.float32, seed=rows)
        got, want = g(w), f(w)
        assert_bitexact(got[0], want[0])
        assert_bitexact(got[1], want[1])


@pytest.mark.parametrize("backend", [None, "reference", "cpp"])
def test_torch_compile_public_wrapper_fullgraph(backend):
    if backend is not None:
        skip_unless_backend("compress_2to4", backend, "cpu")

    def f(w):
        m = sk.mask_2to4(w, backend=backend)
        v, meta = sk.compress_2to4(w, prune=True, backend=backend)
        return sk.decompress_2to4(v, meta, backend=backend), m

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True)
    for rows in (16, 40):
        w = _rand(rows, 32, torch.float16, seed=rows)
        got, want = g(w), f(w)
        assert_bitexact(got[0], want[0])
        assert_bitexact(got[1], want[1])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input_messages(backend):
    skip_unless_backend("compress_2to4", backend, "cpu")
    c = lambda *a, **k: sk.compress_2to4(*a, backend=backend, **k)  # noqa: E731
    d = lambda *a: sk.decompress_2to4(*a, backend=backend)  # noqa: E731
    mk = lambda *a: sk.mask_2to4(*a, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"w: expected a 2-D tensor, got 3-D"):
        c(torch.zeros(2, 2, 16))
    with pytest.raises(ValueError, match=r"multiple of 16, got 24.*pad"):
        c(torch.zeros(4, 24))
    with pytest.raises(TypeError, match=r"w: dtype float64 is not supported"):
        c(torch.zeros(4, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"w: dtype int32"):
        mk(torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"w: expected a torch.Tensor, got list"):
        c([[0.0] * 16])
    with pytest.raises(TypeError, match="prune: expected a bool"):
        c(torch.zeros(4, 16), prune=1)
    with pytest.raises(ValueError, match=r"the last dim must be a multiple of 4, got 6"):
        mk(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"scores: shape \(2, 4\) must equal w's shape \(4, 4\)"):
        mk(torch.zeros(4, 4), torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"scores: dtype int64"):
        mk(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"scores: is on meta but w is on cpu"):
        mk(torch.zeros(4, 4), torch.zeros(4, 4, device="meta"))
    v = torch.zeros(4, 8)
    m = torch.full((4, 1), (4 | 8 << 4 | 9 << 8 | 12 << 12) - 2**16, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"meta: shape \(4, 2\) does not match values \(4, 8\); expected \(4, 1\)"):
        d(v, torch.zeros(4, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"meta: shape \(3, 1\) does not match"):
        d(v, m[:3])
    with pytest.raises(TypeError, match=r"meta: dtype int32 is not supported; expected one of int16"):
        d(v, m.int())
    with pytest.raises(TypeError, match=r"values: dtype int16"):
        d(m, m)
    with pytest.raises(ValueError, match=r"values: the number of columns \(values.shape\[1\]\) must be a multiple of 8"):
        d(torch.zeros(4, 6), m)
    with pytest.raises(ValueError, match=r"values: expected a 2-D tensor, got 1-D"):
        d(torch.zeros(8), m)
    with pytest.raises(ValueError, match=r"meta: is on meta but values is on cpu"):
        d(v, m.to("meta"))
    assert d(v, m).shape == (4, 16)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_data_errors(dtype, backend, device):
    _skip("compress_2to4", backend, device)
    w = _sparse24(9, 48, dtype, device, seed=2)
    w[5, 0:4] = torch.tensor([1, 2, 3, 0])       # later row, earlier column
    w[3, 40:44] = torch.tensor([1, -2, 3, 4])     # first bad group in row-major order
    w[3, 44:48] = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"not 2:4 sparse: the group at row 3, columns 40\.\.43 has 4 nonzeros.*prune=True"):
        _run("compress_2to4", backend, w)
    w2 = w.clone()
    w2[3] = 0
    with pytest.raises(ValueError, match=r"row 5, columns 0\.\.3 has 3 nonzeros"):
        _run("compress_2to4", backend, w2)
    w[7, 9] = NAN
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _run("mask_2to4", backend, w)
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _run("compress_2to4", backend, w, prune=True)
    s = torch.rand(9, 48, device=device)
    s[8, 47] = NAN
    with pytest.raises(ValueError, match="mask_2to4: scores contains NaN"):
        _run("mask_2to4", backend, torch.zeros_like(s, dtype=dtype), s)
    meta = _valid_meta(9, 48).to(device)
    vals = torch.zeros(9, 24, dtype=dtype, device=device)
    meta[6, 1] = 4 | 8 << 4 | 0 << 8     # group 6: nibble 0 (i0=0 >= i1=0)
    meta[8, 0] = 15                      # later row
    with pytest.raises(ValueError, match=r"meta is corrupt: row 6, group 6 \(columns 24\.\.27\) has nibble 0 "
                                         r"with i0=0 >= i1=0; valid nibbles are \(4, 8, 9, 12, 13, 14\)"):
        _run("decompress_2to4", backend, vals, meta)
    meta[6, 1] = 4 | 8 << 4 | 9 << 8 | 6 << 12   # nibble 6: i0=2 >= i1=1, group 7
    with pytest.raises(ValueError, match=r"row 6, group 7 \(columns 28\.\.31\) has nibble 6 with i0=2 >= i1=1"):
        _run("decompress_2to4", backend, vals, meta)


def test_cpp_validates_direct_calls():
    """The C++ kernels check their inputs themselves (no Python wrapper in front of torch.ops)."""
    skip_unless_backend("compress_2to4", "cpp", "cpu")
    ops = torch.ops.sparse_kernels
    with pytest.raises(ValueError, match="expected a 2-D tensor"):
        ops.compress_2to4_cpp(torch.zeros(16), False)
    with pytest.raises(ValueError, match="multiple of 16, got 20"):
        ops.compress_2to4_cpp(torch.zeros(2, 20), False)
    with pytest.raises(TypeError, match="dtype Double is not supported"):
        ops.compress_2to4_cpp(torch.zeros(2, 16, dtype=torch.float64), False)
    with pytest.raises(ValueError, match="multiple of 4, got 5"):
        ops.mask_2to4_cpp(torch.zeros(2, 5), None)
    with pytest.raises(ValueError, match="scores: shape"):
        ops.mask_2to4_cpp(torch.zeros(2, 4), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="scores: dtype Long"):
        ops.mask_2to4_cpp(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"meta: shape \[2, 2\] does not match values \[2, 8\]"):
        ops.decompress_2to4_cpp(torch.zeros(2, 8), torch.zeros(2, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match="multiple of 8, got 4"):
        ops.decompress_2to4_cpp(torch.zeros(2, 4), torch.zeros(2, 0, dtype=torch.int16))
    with pytest.raises(TypeError, match="meta: dtype Int"):
        ops.decompress_2to4_cpp(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta: expected a 2-D tensor"):
        ops.decompress_2to4_cpp(torch.zeros(2, 8), torch.zeros(2, dtype=torch.int16))


# ---------------------------------------------------------------- backend choice
def test_backend_forcing_errors():
    with pytest.raises(sk.BackendUnavailableError, match=r"backend='cuda' cannot run compress_2to4 on cpu.*Available here: reference"):
        sk.compress_2to4(torch.zeros(2, 16), backend="cuda")
    with pytest.raises(ValueError, match=r"backend: got 'fast', expected one of auto, reference, cpp"):
        sk.decompress_2to4(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int16), backend="fast")
    with pytest.raises(sk.BackendUnavailableError, match="op compress_2to4 has no cusparselt backend"):
        sk.compress_2to4(torch.zeros(2, 16), backend="cusparselt")
    if not R.triton_interpreted():
        with pytest.raises(sk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            sk.mask_2to4(torch.zeros(2, 16), backend="triton")


def test_env_var(monkeypatch):
    w = torch.zeros(2, 16)
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "reference")
    assert R.select("compress_2to4", None, w.device) == "reference"
    assert R.select("compress_2to4", "cpp", w.device) == "cpp" or not R.available("compress_2to4", "cpu").count("cpp")
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "cuda")
    with pytest.raises(sk.BackendUnavailableError, match="Available here"):
        sk.compress_2to4(w)
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "cusparselt")  # compress has none: env var ignored
    assert sk.compress_2to4(w)[1].shape == (2, 1)
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPARSE_KERNELS_BACKEND: got 'nope'"):
        sk.mask_2to4(w)
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "auto")
    want = "cpp" if "cpp" in R.available("compress_2to4", "cpu") else "reference"
    assert R.select("compress_2to4", None, w.device) == want


def test_auto_runs_the_kernel(monkeypatch):
    """auto on CPU picks the C++ kernel when it is built."""
    skip_unless_backend("compress_2to4", "cpp", "cpu")
    monkeypatch.delenv("SPARSE_KERNELS_BACKEND", raising=False)
    called = []
    orig = R.get_op
    monkeypatch.setattr(R, "get_op", lambda name, b: called.append(b) or orig(name, b))
    sk.compress_2to4(torch.zeros(2, 16))
    assert called == ["cpp"]


# ---------------------------------------------------------------- interop with PyTorch's CUTLASS layout
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 64), (96, 128), (64, 288)])
def test_interop_torch_cutlass(shape, dtype):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones((), dtype=dtype), w)  # every group has exactly two nonzeros
    w = torch.where(ref.mask_2to4(w), w, torch.zeros((), dtype=dtype))
    want_packed, want_meta = sparse_semi_structured_from_dense_cutlass(w)
    values, meta = sk.compress_2to4(w)
    packed, meta_r = sk.to_torch_cutlass(values, meta)
    assert_bitexact(packed, want_packed, "packed")
    assert_bitexact(meta_r, want_meta, "reordered meta")
    back_v, back_m = sk.from_torch_cutlass(want_packed, want_meta)
    assert_bitexact(back_v, values)
    assert_bitexact(back_m, meta)
    assert_bitexact(sk.decompress_2to4(back_v, back_m), w)


def test_interop_errors():
    v, m = sk.compress_2to4(torch.zeros(16, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of 32"):
        sk.to_torch_cutlass(v, m)
    v, m = sk.compress_2to4(torch.zeros(32, 32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        sk.to_torch_cutlass(v, m)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sk.to_semi_structured(v, m)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matmul_cuda(dtype, backend):
    w = _sparse24(128, 256, dtype, "cuda", seed=9)
    x = torch.randn(256, 64, dtype=dtype, device="cuda")
    try:
        st = sk.to_semi_structured(*sk.compress_2to4(w), backend=backend)
        got = torch.mm(st, x)
    except (RuntimeError, NotImplementedError) as e:  # no CUTLASS 2:4 kernels for sm_90, no cuSPARSELt
        if backend == "auto":
            raise  # auto must pick one that runs here
        pytest.skip(f"PyTorch's {backend} semi-structured matmul unavailable: {e}")
    torch.testing.assert_close(got, w @ x, rtol=2e-2, atol=2e-2)


def test_semi_structured_bad_backend():
    v, m = sk.compress_2to4(_sparse24(32, 32, torch.float16, "cpu", seed=1))
    with pytest.raises(ValueError, match="backend: got 'nope', expected one of auto, cutlass, cusparselt"):
        sk.to_semi_structured(v, m, backend="nope")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", KERNELS)
def test_first_error_across_parallel_chunks(backend, device):
    """Enough rows that the kernels split the work; the error still names the first bad group."""
    _skip("compress_2to4", backend, device)
    w = _sparse24(2048, 64, torch.float16, device, seed=8)
    w[1900, 0:4] = 1.0
    w[301, 60:64] = 1.0
    w[301, 40:44] = torch.tensor([1.0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"row 301, columns 40\.\.43 has 3 nonzeros"):
        _run("compress_2to4", backend, w)
    v, m = ref.compress_2to4(_sparse24(2048, 64, torch.float16, seed=8), False)
    m = m.to(device)
    m[2000, 3] = 0
    m[777, 2] = 0x0F00 | 0x00C4
    with pytest.raises(ValueError, match=r"row 777, group 10 \(columns 40\.\.43\) has nibble 15"):
        _run("decompress_2to4", backend, v.to(device), m)


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    """No GPU needed: lower the Triton 2:4 kernels to sm_80/sm_90 code for each element width
    and the launchers' extreme tile shapes (skips where this triton cannot target CUDA)."""
    from test_linear import _gpu_compile, require_triton_gpu_compiler

    from sparse_kernels.triton import sparse24 as T

    require_triton_gpu_compiler(arch)
    i32, cx = "i32", "constexpr"
    for it, (abs_mask, sign), inf in (("*i16", T._BITS[2], T._INF[torch.float16]),
                                      ("*i32", T._BITS[4], T._INF[torch.float32])):
        for br, bg in ((1, T._MAX_BLOCK_G), (T._TILE // 16, 4)):
            sig = dict(s_ptr=it, out_ptr="*u8", flag_ptr="*i32", rows=i32, cols=i32, n_gblocks=i32,
                       ABS=cx, F64=cx, ABS_MASK=cx, INF=cx, BLOCK_R=cx, BLOCK_G=cx)
            consts = dict(ABS=True, F64=False, ABS_MASK=abs_mask, INF=inf, BLOCK_R=br, BLOCK_G=bg)
            _gpu_compile(T._mask_kernel, sig, consts, arch)
            sig = dict(w_ptr=it, v_ptr=it, m_ptr="*i16", bad_ptr="*i32", flag_ptr="*i32", rows=i32, cols=i32,
                       n_gblocks=i32, PRUNE=cx, ABS_MASK=cx, SIGN=cx, INF=cx, BLOCK_R=cx, BLOCK_G=cx)
            _gpu_compile(T._compress_kernel, sig, dict(PRUNE=True, ABS_MASK=abs_mask, SIGN=sign, INF=inf,
                                                       BLOCK_R=br, BLOCK_G=bg), arch)
            sig = dict(v_ptr=it, m_ptr="*i16", out_ptr=it, bad_ptr="*i32", rows=i32, cols=i32, n_gblocks=i32,
                       BLOCK_R=cx, BLOCK_G=cx)
            _gpu_compile(T._decompress_kernel, sig, dict(BLOCK_R=br, BLOCK_G=bg), arch)
    sig = dict(s_ptr="*fp64", out_ptr="*u8", flag_ptr="*i32", rows=i32, cols=i32, n_gblocks=i32,
               ABS=cx, F64=cx, ABS_MASK=cx, INF=cx, BLOCK_R=cx, BLOCK_G=cx)
    _gpu_compile(T._mask_kernel, sig, dict(ABS=False, F64=True, ABS_MASK=0, INF=0, BLOCK_R=4, BLOCK_G=64), arch)
