"""SparseLinear and sparsify: equivalence with the masked dense Linear, save/load, compile, training."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_kernels as sk
from conftest import assert_bitexact, assert_close, assert_matmul_close, requires_cuda, sgd_losses, skip_unless_backend
from sparse_kernels.nn import SparseLinear, sparsify


def _linear(i, o, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype)


def _masked(w, m):
    return torch.where(m, w, torch.zeros((), dtype=w.dtype))


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", [None, "reference", "cpp"])
@pytest.mark.parametrize("in_f", [32, 40, 7])  # 40, 7: padded internally
@pytest.mark.parametrize("bias", [True, False])
def test_2to4_equals_masked_dense(backend, in_f, bias):
    if backend is not None:
        skip_unless_backend("sparse_linear", backend, "cpu")
    lin = _linear(in_f, 24, bias)
    sl = SparseLinear.from_dense(lin, backend=backend)
    dense = sl.to_dense()
    # the kept weights are the 2 largest |w| per group of 4 of the zero-padded weight
    wp = F.pad(lin.weight.detach(), (0, (-in_f) % 16))
    expect_w = _masked(wp, sk.mask_2to4(wp))[:, :in_f]
    assert_bitexact(dense.weight.detach(), expect_w, "to_dense weight")
    x = _x(3, 5, in_f)
    with torch.no_grad():
        y = sl(x)
        exact = x.double() @ expect_w.double().T + (lin.bias.double() if bias else 0)
        assert_matmul_close(y, exact, dense(x), "SparseLinear vs dense")
    assert y.shape == (3, 5, 24)


@pytest.mark.parametrize("packed_mask_from", ["explicit", "zeros"])
def test_unstructured_equals_masked_dense(packed_mask_from):
    lin = _linear(21, 10)
    m = torch.rand(10, 21, generator=torch.Generator().manual_seed(3)) < 0.3
    if packed_mask_from == "explicit":
        sl = SparseLinear.from_dense(lin, pattern=None, mask=m)
    else:
        with torch.no_grad():
            lin.weight.mul_(m)
        sl = SparseLinear.from_dense(lin, pattern=None)
    assert sl.mask.dtype == torch.uint8 and sl.mask.shape == (10, 3)
    assert_bitexact(sl.to_dense().weight.detach(), _masked(lin.weight.detach(), m), "unstructured to_dense")
    x = _x(4, 21)
    with torch.no_grad():
        assert_close(sl(x), F.linear(x, lin.weight * m, lin.bias), "unstructured forward")


def test_explicit_2to4_mask_and_errors():
    lin = _linear(16, 8)
    m = sk.mask_2to4(-lin.weight.detach())  # a different (valid) 2:4 choice than magnitude
    sl = SparseLinear.from_dense(lin, mask=m)
    assert_bitexact(sl.to_dense().weight.detach(), _masked(lin.weight.detach(), m), "explicit 2:4 mask")
    with pytest.raises(ValueError, match="mask: is not 2:4 sparse"):
        SparseLinear.from_dense(lin, mask=torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: shape \(8, 15\) must equal"):
        SparseLinear.from_dense(lin, mask=m[:, :15])
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        SparseLinear.from_dense(lin, mask=m.float())
    with pytest.raises(ValueError, match="pattern: got '1:4'"):
        SparseLinear.from_dense(lin, pattern="1:4")
    with pytest.raises(ValueError, match="x: last dim is 15 but this layer has in_features=16"):
        sl(_x(2, 15))


def test_nbytes_and_repr():
    lin = _linear(4096, 64, dtype=torch.bfloat16)
    sl = SparseLinear.from_dense(lin)
    assert sl.nbytes() == 64 * 2048 * 2 + 64 * 256 * 2 + 64 * 2  # values + meta + bias
    dense_bytes = 64 * 4096 * 2 + 64 * 2
    assert sl.nbytes() / dense_bytes < 0.57
    r = repr(sl)
    assert "pattern=2:4" in r and "backend=auto" in r
    assert "pattern=unstructured" in repr(SparseLinear.from_dense(lin, pattern=None, backend="reference"))
    assert "backend=reference" in repr(SparseLinear.from_dense(lin, backend="reference"))


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_state_dict_round_trip(pattern):
    sl = SparseLinear.from_dense(_linear(40, 12), pattern=pattern)
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    fresh = SparseLinear(40, 12, pattern=pattern)
    fresh.load_state_dict(torch.load(buf))
    x = _x(3, 40)
    with torch.no_grad():
        assert_bitexact(fresh(x), sl(x), "after load")
    assert set(sl.state_dict()) == ({"values", "meta", "bias"} if pattern else {"weight", "mask", "bias"})


def test_pickle_whole_model():
    model = nn.Sequential(nn.Linear(32, 8))
    sparsify(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _x(2, 32)
    with torch.no_grad():
        assert_bitexact(loaded(x), model(x), "pickled model")


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sl = SparseLinear.from_dense(_linear(48, 16, dtype=torch.bfloat16))
    st.save_file(sl.state_dict(), str(tmp_path / "sl.safetensors"))
    fresh = SparseLinear(48, 16, dtype=torch.bfloat16)
    fresh.load_state_dict(st.load_file(str(tmp_path / "sl.safetensors")))
    x = _x(2, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_bitexact(fresh(x), sl(x), "after safetensors load")


def test_to_dtype_keeps_meta():
    sl = SparseLinear.from_dense(_linear(32, 8))
    sl16 = sl.to(torch.bfloat16)
    assert sl16.values.dtype == torch.bfloat16 and sl16.meta.dtype == torch.int16
    x = _x(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = sl16(x)
        ref = F.linear(x, sl.to_dense().weight.bfloat16(), sl.bias.bfloat16())
    assert_matmul_close(y, x.double() @ sl.dense_weight().double().T + sl.bias.double(), ref, "bf16")


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_training_grads_flow_pattern_fixed(pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    rep = sparsify(model, pattern=pattern)
    assert rep.layers == ["0", "2"]
    before = [m.dense_weight() != 0 for m in model if isinstance(m, SparseLinear)]
    losses = sgd_losses(model, _x(8, 32), _x(8, 4, seed=2), steps=5)
    assert losses[-1] < losses[0]
    for m, nz in zip([m for m in model if isinstance(m, SparseLinear)], before):
        assert ((m.dense_weight() != 0) <= nz).all(), "pattern changed during training"
        if pattern is None:
            m_bits = sk.unpack_mask(m.mask, m.in_features)
            assert (m.weight.grad[~m_bits] == 0).all()


def test_sparse_linear_grads_match_dense_masked():
    lin = _linear(32, 8)
    sl = SparseLinear.from_dense(lin)
    dense = sl.to_dense()
    x = _x(5, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = _x(5, 8, seed=4)
    sl(xa).backward(gy)
    dense(xb).backward(gy)
    assert_close(xa.grad, xb.grad, "grad x")
    assert_close(sl.bias.grad, dense.bias.grad, "grad bias")
    gw = dense.weight.grad * (dense.weight != 0)
    assert_close(sl.values.grad, gw[dense.weight != 0].reshape(8, 16), "grad values")


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_compile_fullgraph(pattern):
    sl = SparseLinear.from_dense(_linear(48, 16), pattern=pattern)
    x = _x(3, 48)
    with torch.no_grad():
        want = sl(x)
        got = torch.compile(sl, fullgraph=True, backend="aot_eager")(x)
    assert_close(got, want, "compiled")


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_compile_fullgraph_inductor(pattern):
    """The default torch.compile backend (inductor) over a model holding SparseLinear layers: our
    ops stay opaque custom ops in its graph, the code around them is generated, the result
    matches eager."""
    torch._dynamo.reset()
    model = nn.Sequential(SparseLinear.from_dense(_linear(48, 32), pattern=pattern), nn.GELU(),
                          SparseLinear.from_dense(_linear(32, 16), pattern=pattern))
    x = _x(5, 48)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert_close(got, want, "inductor")


def test_compile_fullgraph_training():
    sl = SparseLinear.from_dense(_linear(32, 8))
    x = _x(4, 32)
    torch.compile(sl, fullgraph=True, backend="aot_eager")(x).sum().backward()
    g = sl.values.grad.clone()
    sl.values.grad = None
    sl(x).sum().backward()
    assert_close(g, sl.values.grad, "compiled grad")


def test_sparsify_include_exclude_report():
    model = nn.ModuleDict({
        "attn": nn.ModuleDict({"q": nn.Linear(32, 32), "k": nn.Linear(32, 32)}),
        "mlp": nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)),
        "head": nn.Linear(32, 10),
        "mha": nn.MultiheadAttention(32, 2),
    })
    rep = sparsify(model, include=["attn.*", "mlp.*"], exclude=lambda name, mod: name.endswith("k"))
    assert rep.layers == ["attn.q", "mlp.0", "mlp.2"]
    assert isinstance(model["attn"]["q"], SparseLinear) and isinstance(model["attn"]["k"], nn.Linear)
    assert type(model["head"]) is nn.Linear
    assert rep.bytes_before == sum(
        4 * (o * i + o) for i, o in ((32, 32), (32, 64), (64, 32)))
    assert rep.bytes_after < 0.6 * rep.bytes_before
    assert "3 layers swapped" in str(rep)
    rep2 = sparsify(model)  # the rest; MHA's out_proj (a Linear subclass) is skipped and reported
    assert set(rep2.layers) == {"attn.k", "head"}
    assert any("mha.out_proj" == n for n, _ in rep2.skipped)
    x = _x(2, 32)
    with torch.no_grad():
        model["mha"](x, x, x)  # still works


def test_sparsify_no_grad_inference_matches_masked_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    ref_model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    ref_model.load_state_dict(model.state_dict())
    sparsify(model)
    for i in (0, 2):
        ref_model[i].weight.data = model[i].dense_weight()
    x = _x(6, 64)
    with torch.no_grad():
        assert_close(model(x), ref_model(x), "sparsified model", atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("backend", [None, "cuda", "triton", "cusparselt"])
def test_sparse_linear_module_cuda(backend):
    if backend is not None:
        skip_unless_backend("sparse_linear", backend, "cuda")
    lin = _linear(256, 128, dtype=torch.float16).cuda()
    sl = SparseLinear.from_dense(lin, backend=backend).eval()
    x = _x(7, 256, dtype=torch.float16).cuda()
    with torch.no_grad():
        y = sl(x)
        dense = sl.to_dense()
        exact = x.double() @ dense.weight.double().T + dense.bias.double()
        assert_matmul_close(y, exact, dense(x), f"SparseLinear cuda/{backend}")
    if backend == "cusparselt":
        assert sl._cslt is not None  # eval() cached the compressed weight


def test_forward_resolved_matches_the_public_op_and_follows_the_env(monkeypatch):
    """SparseLinear's cached backend choice gives the public op's answer bit for bit, and
    SPARSE_KERNELS_BACKEND still switches it (it is part of the cache key)."""
    from sparse_kernels.ops import _registry as R

    lin = _linear(40, 24)
    sl = SparseLinear.from_dense(lin).eval()
    calls = []
    orig = R.get_op
    monkeypatch.setattr(R, "get_op", lambda name, b: calls.append(b) or orig(name, b))
    for m in (1, 3, 17, 300):
        x = _x(m, 40)
        with torch.no_grad():
            want = sk.sparse_linear(F.pad(x, (0, 8)), sl.values, sl.meta, sl.bias)
            assert_bitexact(sl(x), want, f"batch {m}")
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "reference")
    calls.clear()
    with torch.no_grad():
        y = sl(_x(3, 40))
    assert "reference" in calls
    ref_y = sk.sparse_linear(F.pad(_x(3, 40), (0, 8)), sl.values, sl.meta, sl.bias, backend="reference")
    assert_bitexact(y, ref_y, "reference via env")
    with pytest.raises(TypeError, match="dtype"):
        sl(_x(3, 40).double())


def test_module_pickles_after_forward_and_follows_backend_changes(tmp_path):
    """The per-module backend cache holds names (picklable), and it keys on ``self.backend``."""
    model = nn.Sequential(SparseLinear.from_dense(_linear(32, 16)), nn.ReLU())
    x = _x(3, 32)
    with torch.no_grad():
        y = model(x)
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert_bitexact(again(x), y, "reloaded whole model")
    del again[0].__dict__["_ops"]  # as a module pickled before the cache existed
    with torch.no_grad():
        assert_bitexact(again(x), y, "no cache attribute")
    sl = model[0]
    sl.backend = "reference"
    with torch.no_grad():
        got = sl(x)
    assert any(k[3] == "reference" and v == "reference" for k, v in sl._ops.items()), sl._ops
    assert_close(torch.relu(got), y, "reference after the change", atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- pattern="bitmask"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_bitmask_layer_matches_the_masked_dense_layer(dtype, bias, tmp_path):
    lin = _linear(45, 30, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight[torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(2)) < 0.6] = 0
    sl = SparseLinear.from_dense(lin, pattern="bitmask")
    assert sl.values.numel() == int((lin.weight != 0).sum()) and "pattern=bitmask" in repr(sl)
    assert sl.nbytes() < lin.weight.numel() * lin.weight.element_size() * 0.6
    assert_bitexact(sl.dense_weight(), lin.weight.detach(), "dense_weight")
    x = _x(3, 5, 45, dtype=dtype)
    with torch.no_grad():
        y = sl(x)
        exact = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
        assert_matmul_close(y, exact, lin(x), "bitmask layer")
    # state_dict into a fresh layer: values are sized from the stored nonzeros
    torch.save(sl.state_dict(), tmp_path / "sd.pt")
    fresh = SparseLinear(45, 30, bias=bias, pattern="bitmask", dtype=dtype)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    with torch.no_grad():
        assert_bitexact(fresh(x), y, "reloaded")
    assert_bitexact(sl.to_dense().weight.detach(), lin.weight.detach(), "to_dense")


def test_bitmask_layer_trains_with_the_pattern_fixed_and_sparsify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight[torch.rand(m.weight.shape) < 0.5] = 0
    report = sparsify(model, pattern="bitmask")
    assert len(report.layers) == 2 and report.bytes_after < report.bytes_before
    layer = model[0]
    keep = layer.dense_weight() != 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = torch.randn(16, 24), torch.randn(16, 8)
    loss0 = None
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(model(x), t)
        loss.backward()
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert loss.item() < loss0
    assert torch.equal(layer.dense_weight() != 0, keep & (layer.dense_weight() != 0))  # nothing new grew
    assert layer.to(torch.bfloat16).values.dtype == torch.bfloat16 and layer.bitmask.dtype == torch.uint8
