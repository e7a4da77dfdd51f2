"""Triton 2:4 kernels bit-exact against the reference.

On CPU this runs under ``TRITON_INTERPRET=1`` (tiny shapes: the interpreter is slow); on a
GPU it runs on CUDA tensors.  Without either the whole file is skipped.
"""

from __future__ import annotations

import pytest
import torch

import sparse_kernels as sk
from sparse_kernels.ops import _registry as R
from sparse_kernels.reference import sparse24 as ref

from conftest import TRITON_INTERPRET, assert_bitexact, skip_unless_backend
from test_sparse24 import _adversarial, _rand, _sparse24, _special_values, _valid_meta

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not TRITON_INTERPRET and not torch.cuda.is_available(),
        reason="Triton needs a GPU or TRITON_INTERPRET=1",
    ),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (rows, cols): one group block, ragged row tails, ragged column-block tails (cols/4 > 64), a multi-block grid
SHAPES = [(1, 16), (7, 48), (5, 272), (33, 432), (40, 1024)]
DEVICE = "cpu" if TRITON_INTERPRET else "cuda"
NAN = float("nan")


@pytest.fixture(autouse=True)
def _need_triton():
    skip_unless_backend("compress_2to4", "triton", DEVICE)


def _t(op, *args, **kw):
    return getattr(sk, op)(*args, backend="triton", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_bitexact(shape, dtype):
    w = _rand(*shape, dtype, DEVICE, seed=shape[1])
    w[0, :4] = torch.tensor([0, 0, .5, .5])
    assert_bitexact(_t("mask_2to4", w), ref.mask_2to4(w), "mask")
    s = _rand(*shape, torch.float64, DEVICE, seed=1)
    assert_bitexact(_t("mask_2to4", w, s), ref.mask_2to4(w, s), "mask scores")

    v, m = _t("compress_2to4", w, prune=True)
    rv, rm = ref.compress_2to4(w, True)
    assert_bitexact(v, rv, "pruned values")
    assert_bitexact(m, rm, "pruned meta")

    sw = _sparse24(*shape, dtype, DEVICE, seed=shape[0])
    v, m = _t("compress_2to4", sw)
    rv, rm = ref.compress_2to4(sw, False)
    assert_bitexact(v, rv, "values")
    assert_bitexact(m, rm, "meta")

    vals = _special_values(shape[0], shape[1] // 2, dtype).to(DEVICE)
    meta = _valid_meta(*shape, seed=2).to(DEVICE)
    assert_bitexact(_t("decompress_2to4", vals, meta), ref.decompress_2to4(vals, meta), "decompress")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_adversarial_and_views(dtype):
    w = _adversarial(dtype).to(DEVICE)
    assert_bitexact(_t("mask_2to4", w), ref.mask_2to4(w))
    v, m = _t("compress_2to4", w, prune=True)
    assert_bitexact(m, ref.compress_2to4(w, True)[1])
    strict = w[1:2]
    assert_bitexact(_t("decompress_2to4", *_t("compress_2to4", strict)), strict)
    t = _sparse24(5, 32, dtype, DEVICE).t().contiguous().t()
    assert not t.is_contiguous()
    v, m = _t("compress_2to4", t)
    rv, rm = ref.compress_2to4(t.contiguous(), False)
    assert_bitexact(v, rv)
    assert_bitexact(m, rm)
    assert_bitexact(_t("decompress_2to4", rv.t().contiguous().t(), rm.t().contiguous().t()),
                    ref.decompress_2to4(rv, rm))
    w3 = _rand(6, 12, dtype, DEVICE).view(2, 3, 12)
    assert_bitexact(_t("mask_2to4", w3), ref.mask_2to4(w3))


def test_triton_errors():
    w = _sparse24(6, 32, torch.float16, DEVICE, seed=3)
    w[4, 0:4] = torch.tensor([1, 2, 3, 0])
    w[2, 20:24] = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"the group at row 2, columns 20\.\.23 has 4 nonzeros"):
        _t("compress_2to4", w)
    w[3, 5] = NAN
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _t("mask_2to4", w)
    with pytest.raises(ValueError, match="mask_2to4: w contains NaN"):
        _t("compress_2to4", w, prune=True)
    s = torch.rand(6, 32, device=DEVICE)
    s[5, 31] = NAN
    with pytest.raises(ValueError, match="mask_2to4: scores contains NaN"):
        _t("mask_2to4", torch.zeros(6, 32, device=DEVICE), s)
    meta = _valid_meta(6, 32).to(DEVICE)
    meta[3, 1] = 4 | 8 << 4 | 5 << 8   # row 3, group 6: nibble 5 (i0=1 >= i1=1)
    meta[5, 0] = 0
    with pytest.raises(ValueError, match=r"meta is corrupt: row 3, group 6 \(columns 24\.\.27\) has nibble 5 "
                                         r"with i0=1 >= i1=1"):
        _t("decompress_2to4", torch.zeros(6, 16, device=DEVICE), meta)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.sparse_kernels.compress_2to4_triton(torch.zeros(2, 8, device=DEVICE), False)
    with pytest.raises(ValueError, match=r"meta: shape \(2, 2\) does not match"):
        torch.ops.sparse_kernels.decompress_2to4_triton(torch.zeros(2, 8, device=DEVICE),
                                                         torch.zeros(2, 2, dtype=torch.int16, device=DEVICE))
    with pytest.raises(TypeError, match="w: dtype float64"):
        torch.ops.sparse_kernels.mask_2to4_triton(torch.zeros(2, 8, dtype=torch.float64, device=DEVICE), None)


@pytest.mark.parametrize("op", ["mask_2to4", "compress_2to4", "decompress_2to4"])
def test_triton_opcheck(op):
    w = _sparse24(4, 32, torch.float16, DEVICE, seed=1)
    args = {
        "mask_2to4": (w, None),
        "compress_2to4": (w, False),
        "decompress_2to4": ref.compress_2to4(w, False),
    }[op]
    torch.library.opcheck(R.get_op(op, "triton"), args)


def test_triton_is_selected_when_forced(monkeypatch):
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "triton")
    assert R.select("decompress_2to4", None, torch.device(DEVICE)) == "triton"


def test_triton_first_error_across_programs():
    w = _sparse24(200, 288, torch.bfloat16, DEVICE, seed=4)  # a 13 x 2 grid of programs
    w[150, 0:4] = 1.0
    w[37, 280:284] = 1.0
    w[37, 264:268] = torch.tensor([1.0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"row 37, columns 264\.\.267 has 3 nonzeros"):
        _t("compress_2to4", w)
    v, m = ref.compress_2to4(_sparse24(200, 288, torch.bfloat16, seed=4), False)
    m = m.to(DEVICE)
    m[199, 0] = 0
    m[40, 17] = 0x0C84 | 0x3000   # groups 68, 69, 70 valid, 71 has nibble 3
    m[40, 2] = 0x00C0             # group 8: nibble 0 comes first
    with pytest.raises(ValueError, match=r"row 40, group 8 \(columns 32\.\.35\) has nibble 0"):
        _t("decompress_2to4", v.to(DEVICE), m)
    m[40, 2] = 0x4444
    with pytest.raises(ValueError, match=r"row 40, group 71 \(columns 284\.\.287\) has nibble 3 with i0=3 >= i1=0"):
        _t("decompress_2to4", v.to(DEVICE), m)
