"""Permuted 2:4 SparseLinear (input-channel permutation): forward/backward against the masked dense
layer in the original column order, the in_perm checks, state_dict and checkpoint round trips."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_kernels as sk
from conftest import (TRITON_INTERPRET, assert_bitexact, assert_close, assert_matmul_close, requires_cuda,
                      sgd_losses, skip_unless_backend)
from sparse_kernels.nn import SparseLinear, check_in_perm


def _linear(i, o, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype)


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _perm(n, seed=5):
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(p, torch.argsort(p)), "the test permutation must not be its own inverse"
    return p


def _expected_weight(w, p):
    """Magnitude 2:4 of ``W[:, p]`` (zero-padded to 16), put back in the original column order:
    ``Wm[:, p] = S``.  Built without SparseLinear."""
    n = w.shape[1]
    wp = F.pad(w[:, p], (0, (-n) % 16))
    s = torch.where(sk.mask_2to4(wp), wp, torch.zeros((), dtype=w.dtype))[:, :n]
    wm = torch.zeros_like(w)
    wm[:, p] = s
    return wm, s


def _w_24_after_perm(out_f, in_f, p, seed=2):
    """A weight that is 2:4 in the column order ``p`` (``W[:, p]`` is 2:4) but not in its own."""
    s = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    s = torch.where(sk.mask_2to4(s), s, torch.zeros(()))
    w = s[:, torch.argsort(p)]
    assert torch.equal(w[:, p], s)
    return w


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", [None, "reference", "cpp"])
@pytest.mark.parametrize("in_f", [48, 40, 7])  # 40, 7: padded to 48 / 16 internally
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_masked_dense_layer(backend, in_f, bias):
    if backend is not None:
        skip_unless_backend("sparse_linear", backend, "cpu")
    lin = _linear(in_f, 24, bias)
    p = _perm(in_f)
    sl = SparseLinear.from_dense(lin, in_perm=p, backend=backend)
    wm, s = _expected_weight(lin.weight.detach(), p)
    assert_bitexact(sl.dense_weight(), wm, "dense_weight (original order)")
    assert_bitexact(sl.to_dense().weight.detach(), wm, "to_dense")
    assert_bitexact(sk.decompress_2to4(sl.values.detach(), sl.meta)[:, :in_f], s, "stored S (permuted order)")
    assert sl.in_perm.dtype == torch.int64 and torch.equal(sl.in_perm, p)
    b = lin.bias.detach() if bias else None
    for shape in [(3, 5, in_f), (1, in_f), (2, 1, 3, in_f)]:
        x = _x(*shape)
        with torch.no_grad():
            y = sl(x)
        exact = x.double() @ wm.double().T + (b.double() if bias else 0)
        assert_matmul_close(y, exact, F.linear(x, wm, b), f"permuted SparseLinear {shape}")
        assert y.shape == (*shape[:-1], 24)
        # the test can fail: gathering with argsort(p) (the inverse) gives another answer
        wrong = x[..., torch.argsort(p)] @ s.T + (b if bias else 0)
        assert (wrong - y).abs().max() > 1e-2


def test_stored_weight_is_strict_2to4_and_nbytes_repr():
    lin = _linear(64, 16)
    p = _perm(64)
    sl = SparseLinear.from_dense(lin, in_perm=p)
    s = sk.decompress_2to4(sl.values.detach(), sl.meta)
    values, meta = sk.compress_2to4(s)  # strict: raises if any group has more than two nonzeros
    assert_bitexact(values, sl.values.detach(), "recompressed values")
    assert_bitexact(meta, sl.meta, "recompressed meta")
    plain = SparseLinear.from_dense(lin)
    assert sl.nbytes() == plain.nbytes() + 64 * 8
    assert "permuted=True" in repr(sl) and "permuted" not in repr(plain)
    assert plain.in_perm is None and "in_perm" not in plain.state_dict()


def test_a_weight_2to4_only_after_the_permutation():
    p = _perm(32)
    w = _w_24_after_perm(8, 32, p)
    lin = _linear(32, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    assert int((w.reshape(8, -1, 4) != 0).sum(-1).max()) > 2, "W itself must not be 2:4"
    with pytest.raises(ValueError, match="mask: is not 2:4 sparse along in_features \\("):
        SparseLinear.from_dense(lin, mask=w != 0)
    sl = SparseLinear.from_dense(lin, mask=w != 0, in_perm=p)
    assert_bitexact(sl.dense_weight(), w, "exact weight back, nothing pruned")
    pruned = SparseLinear.from_dense(lin, in_perm=p)  # mask=None prunes W[:, p], already 2:4: same layer
    assert_bitexact(pruned.values.detach(), sl.values.detach(), "mask=None values")
    with pytest.raises(ValueError, match=r"not 2:4 sparse along in_features after the permutation in_perm"):
        SparseLinear.from_dense(lin, mask=w != 0, in_perm=torch.argsort(p))
    x = _x(4, 32)
    with torch.no_grad():
        assert_matmul_close(sl(x), x.double() @ w.double().T + lin.bias.double(), lin(x), "2:4 after permutation")


def test_mask_is_in_the_original_order():
    lin = _linear(32, 8)
    p = _perm(32)
    wp = lin.weight.detach()[:, p]
    m_perm = sk.mask_2to4(-wp)  # a valid 2:4 choice in permuted order, not the magnitude one
    mask = torch.zeros_like(m_perm)
    mask[:, p] = m_perm
    sl = SparseLinear.from_dense(lin, mask=mask, in_perm=p)
    assert_bitexact(sl.dense_weight(), torch.where(mask, lin.weight.detach(), torch.zeros(())), "explicit mask")


# ---------------------------------------------------------------- autograd
@pytest.mark.parametrize("in_f", [32, 40])
def test_backward_matches_the_dense_reference(in_f):
    lin = _linear(in_f, 12)
    p = _perm(in_f)
    sl = SparseLinear.from_dense(lin, in_perm=p)
    wm, _ = _expected_weight(lin.weight.detach(), p)
    x = _x(2, 3, in_f)
    gy = _x(2, 3, 12, seed=4)
    xa = x.clone().requires_grad_()
    sl(xa).backward(gy)
    xb = x.clone().requires_grad_()
    wd = wm.clone().requires_grad_()
    F.linear(xb, wd, lin.bias.detach()).backward(gy)
    assert_close(xa.grad, xb.grad, "grad x")
    assert_close(sl.bias.grad, gy.reshape(-1, 12).sum(0), "grad bias")
    # values hold S = W[:, p] (padded): their grads are dL/dW[:, p] at the kept positions, row-major
    pad = sl.in_padded - in_f
    kept = sk.decompress_2to4(torch.ones_like(sl.values), sl.meta) != 0
    gs = F.pad(wd.grad[:, p], (0, pad))
    assert_close(sl.values.grad, gs[kept].reshape(12, -1), "grad values")


def test_training_keeps_the_permutation_and_the_pattern():
    torch.manual_seed(0)
    sl = SparseLinear.from_dense(_linear(32, 8), in_perm=_perm(32))
    before = sl.dense_weight() != 0
    losses = sgd_losses(sl, _x(16, 32), _x(16, 8, seed=2), steps=4)
    assert losses[-1] < losses[0]
    assert ((sl.dense_weight() != 0) <= before).all()
    assert list(dict(sl.named_parameters())) == ["values", "bias"]  # in_perm is a buffer, never trained


# ---------------------------------------------------------------- in_perm checks
def test_bad_in_perm_arguments():
    lin = _linear(32, 8)
    p = _perm(32)
    dup = p.clone()
    dup[3] = dup[7]
    oob = p.clone()
    oob[5] = 32
    neg = p.clone()
    neg[0] = -1
    with pytest.raises(ValueError, match=r"in_perm: shape \(31,\) must be \(32,\)"):
        SparseLinear.from_dense(lin, in_perm=p[:31])
    with pytest.raises(ValueError, match=r"in_perm: shape \(4, 8\) must be \(32,\)"):
        SparseLinear.from_dense(lin, in_perm=p.reshape(4, 8))
    with pytest.raises(TypeError, match="in_perm: dtype torch.float32 is not an integer dtype"):
        SparseLinear.from_dense(lin, in_perm=p.float())
    with pytest.raises(TypeError, match="in_perm: expected a 1-D integer tensor .* got list"):
        SparseLinear.from_dense(lin, in_perm=p.tolist())
    with pytest.raises(ValueError, match=rf"in_perm: index {int(p[7])} appears 2 times"):
        SparseLinear.from_dense(lin, in_perm=dup)
    with pytest.raises(ValueError, match=r"in_perm: holds 32 at position 5, outside 0..31"):
        SparseLinear.from_dense(lin, in_perm=oob)
    with pytest.raises(ValueError, match=r"in_perm: holds -1 at position 0"):
        SparseLinear.from_dense(lin, in_perm=neg)
    with pytest.raises(ValueError, match="in_perm: .* only supported with pattern='2:4'"):
        SparseLinear.from_dense(lin, pattern=None, in_perm=p)
    with pytest.raises(ValueError, match="permuted: .* only supported with pattern='2:4'"):
        SparseLinear(32, 8, pattern="bitmask", permuted=True)
    check_in_perm(p.int(), 32)  # any integer dtype is a valid argument; the layer stores int64
    assert SparseLinear.from_dense(lin, in_perm=p.int()).in_perm.dtype == torch.int64


# ---------------------------------------------------------------- state_dict
def test_state_dict_round_trip_bitexact():
    sl = SparseLinear.from_dense(_linear(40, 12), in_perm=_perm(40))
    sd = sl.state_dict()
    assert set(sd) == {"values", "meta", "bias", "in_perm"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = SparseLinear(40, 12, permuted=True)
    assert torch.equal(fresh.in_perm, torch.arange(40))  # identity until loaded
    fresh.load_state_dict(torch.load(buf))
    x = _x(3, 40)
    with torch.no_grad():
        assert_bitexact(fresh(x), sl(x), "after load")
    assert torch.equal(fresh.in_perm, sl.in_perm)


def test_corrupted_or_mismatched_in_perm_in_a_state_dict():
    model = nn.Sequential(SparseLinear.from_dense(_linear(32, 8), in_perm=_perm(32)))
    good = model.state_dict()
    sd = {k: v.clone() for k, v in good.items()}
    sd["0.in_perm"][1] = sd["0.in_perm"][0]
    fresh = nn.Sequential(SparseLinear(32, 8, permuted=True))
    with pytest.raises(ValueError, match=r"0\.in_perm \(layer '0'\): index \d+ appears 2 times"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh[0].in_perm, torch.arange(32))  # nothing half-loaded into in_perm
    sd["0.in_perm"] = good["0.in_perm"][:-1]
    with pytest.raises(ValueError, match=r"0\.in_perm \(layer '0'\): shape \(31,\) must be \(32,\)"):
        fresh.load_state_dict(sd)
    plain = nn.Sequential(SparseLinear(32, 8))
    for strict in (True, False):
        with pytest.raises(ValueError, match="layer '0' was built without a channel permutation"):
            plain.load_state_dict(good, strict=strict)
        no_perm = {k: v for k, v in good.items() if k != "0.in_perm"}
        with pytest.raises(ValueError, match="layer '0' is permuted .* no in_perm"):
            fresh.load_state_dict(no_perm, strict=strict)


def test_to_dtype_keeps_in_perm_int64_and_pickles():
    sl = SparseLinear.from_dense(_linear(32, 8), in_perm=_perm(32))
    w, b = sl.dense_weight().bfloat16(), sl.bias.detach().bfloat16()
    sl16 = sl.to(torch.bfloat16)  # in place, as nn.Module.to
    assert sl16.values.dtype == torch.bfloat16 and sl16.in_perm.dtype == torch.int64
    assert_bitexact(sl16.dense_weight(), w, "bf16 dense_weight")
    x = _x(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = sl16(x)
    assert_matmul_close(y, x.double() @ w.double().T + b.double(), F.linear(x, w, b), "bf16")
    buf = io.BytesIO()
    torch.save(nn.Sequential(sl16), buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert_bitexact(again(x), y, "pickled")
    old = SparseLinear.from_dense(_linear(32, 8))
    with torch.no_grad():
        y_old = old(x.float())
    del old._buffers["in_perm"]  # as a layer pickled before permuted layers existed
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.in_perm is None and "in_perm" not in again.state_dict()
    with torch.no_grad():
        assert_bitexact(again(x.float()), y_old, "old pickle")


# ---------------------------------------------------------------- compile
def test_compile_fullgraph_forward_and_backward():
    sl = SparseLinear.from_dense(_linear(40, 16), in_perm=_perm(40))
    x = _x(3, 40)
    with torch.no_grad():
        want = sl(x)
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), want, "compiled no_grad")
    xa = x.clone().requires_grad_()
    compiled(xa).sum().backward()
    g, gx = sl.values.grad.clone(), xa.grad.clone()
    sl.values.grad = None
    xb = x.clone().requires_grad_()
    sl(xb).sum().backward()
    assert_close(g, sl.values.grad, "compiled grad values")
    assert_close(gx, xb.grad, "compiled grad x")


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    model = nn.Sequential(SparseLinear.from_dense(_linear(48, 32), in_perm=_perm(48)), nn.GELU())
    x = _x(5, 48)
    with torch.no_grad():
        assert_close(torch.compile(model, fullgraph=True)(x), model(x), "inductor")


# ---------------------------------------------------------------- other backends
@pytest.mark.triton
@pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton tests run under TRITON_INTERPRET=1")
def test_triton_backend_interpreted():
    skip_unless_backend("sparse_linear", "triton", "cpu")
    lin = _linear(40, 16)
    p = _perm(40)
    sl = SparseLinear.from_dense(lin, in_perm=p, backend="triton")
    wm, _ = _expected_weight(lin.weight.detach(), p)
    x = _x(3, 40)
    with torch.no_grad():
        assert_matmul_close(sl(x), x.double() @ wm.double().T + lin.bias.double(), F.linear(x, wm, lin.bias),
                            "triton permuted")


@requires_cuda
@pytest.mark.parametrize("backend", [None, "cuda", "triton", "cusparselt"])
def test_cuda_forward_and_graph_capture(backend):
    if backend is not None:
        skip_unless_backend("sparse_linear", backend, "cuda")
    lin = _linear(200, 128, dtype=torch.float16).cuda()
    p = _perm(200).cuda()
    sl = SparseLinear.from_dense(lin, in_perm=p, backend=backend).eval()
    assert sl.in_perm.device.type == "cuda"
    x = _x(7, 200, dtype=torch.float16).cuda()
    w = sl.dense_weight()
    with torch.no_grad():
        y = sl(x)
        exact = x.double() @ w.double().T + lin.bias.double()
        assert_matmul_close(y, exact, F.linear(x, w, lin.bias), f"cuda permuted {backend}")
        static_x = x.clone()
        sl(static_x)  # warm up (backend choice cached) before capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = sl(static_x)
        static_x.copy_(_x(7, 200, dtype=torch.float16, seed=9).cuda())
        g.replay()
        assert_bitexact(static_y, sl(static_x), "graph replay")
    with pytest.raises(ValueError, match="x: is on cpu but in_perm is on cuda"):
        sl(x.cpu())


# ---------------------------------------------------------------- checkpoints
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(40, 64)
        self.down = nn.Linear(64, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _tiny_permuted():
    torch.manual_seed(0)
    m = _Tiny()
    m.up = SparseLinear.from_dense(m.up, in_perm=_perm(40))
    m.down = SparseLinear.from_dense(m.down)  # one plain 2:4 layer next to the permuted one
    return m


@pytest.fixture()
def permuted_ck(tmp_path):
    pytest.importorskip("safetensors")
    from sparse_kernels.llm import checkpoint

    m = _tiny_permuted()
    cfg = checkpoint.save(m, str(tmp_path / "ck"))
    return m, cfg, tmp_path / "ck"


def test_checkpoint_round_trip(permuted_ck):
    from sparse_kernels.llm import checkpoint

    m, cfg, ck = permuted_ck
    assert cfg["layers"]["up"]["in_perm"] is True and "in_perm" not in cfg["layers"]["down"]
    assert cfg["tensors"]["up.in_perm"] == {"shape": [40], "dtype": "int64"}
    assert cfg["format_version"] == 3  # permuted layers: version 3 (earlier readers refuse it by version)
    up_bytes = 64 * 24 * 4 + 64 * 3 * 2 + 64 * 4 + 40 * 8  # values + meta + bias + in_perm
    down_bytes = 24 * 32 * 4 + 24 * 4 * 2
    assert cfg["sizes"]["sparse_layers_bytes"] == up_bytes + down_bytes
    loaded, _ = checkpoint.load(str(ck), model=_Tiny())
    assert loaded.up.in_perm is not None and loaded.down.in_perm is None
    assert torch.equal(loaded.up.in_perm, m.up.in_perm)
    x = _x(5, 40)
    with torch.no_grad():
        assert_bitexact(loaded(x), m(x), "checkpoint round trip")


def test_a_2to4_layer_listed_as_masked_is_refused(tmp_path):
    from sparse_kernels.llm import checkpoint

    m = _tiny_permuted()
    with pytest.raises(ValueError, match=r"save: layers \['up'\] are 2:4 SparseLinear layers listed as 'masked'"):
        checkpoint.save(m, str(tmp_path / "ck"), layers={"up": "masked", "down": "2:4"})
    assert isinstance(m.up, SparseLinear) and not os.path.exists(tmp_path / "ck" / checkpoint.CONFIG_NAME)


def test_as_linear_un_permutes():
    from sparse_kernels.llm import checkpoint

    sl = SparseLinear.from_dense(_linear(40, 12), in_perm=_perm(40))
    lin = checkpoint.as_linear(sl)
    assert type(lin) is nn.Linear
    assert_bitexact(lin.weight.detach(), sl.dense_weight(), "as_linear weight")
    x = _x(3, 40)
    with torch.no_grad():
        assert_close(lin(x), sl(x), "as_linear forward")


def test_checkpoint_of_a_hugging_face_model_with_a_permuted_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from sparse_kernels.llm import checkpoint

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    mlp = m.model.layers[0].mlp
    mlp.down_proj = SparseLinear.from_dense(mlp.down_proj, in_perm=_perm(128))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(input_ids=ids, use_cache=False).logits
    checkpoint.save(m, str(tmp_path / "ck"), layers={"model.layers.0.mlp.down_proj": "2:4"})
    loaded, _ = checkpoint.load(str(tmp_path / "ck"))
    assert loaded.model.layers[0].mlp.down_proj.in_perm is not None
    with torch.no_grad():
        assert_bitexact(loaded(input_ids=ids, use_cache=False).logits, want, "HF logits")


def _rewrite(ck, edit, edit_cfg=None):
    """Rewrite the tensors file (and manifest) consistently so only the structural checks can fail."""
    from safetensors.torch import load_file, save_file

    from sparse_kernels.llm import checkpoint

    tpath = ck / checkpoint.TENSORS_NAME
    t = load_file(str(tpath))
    edit(t)
    cfg = json.loads((ck / checkpoint.CONFIG_NAME).read_text())
    save_file(t, str(tpath), metadata={"format": checkpoint.FORMAT_NAME, "format_version": str(cfg["format_version"])})
    cfg["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in t.items()
                      if k in cfg["tensors"] or k.endswith("in_perm")}
    cfg["tensors_bytes"] = os.path.getsize(tpath)
    cfg["tensors_sha256"] = checkpoint.sha256_file(str(tpath))
    if edit_cfg is not None:
        edit_cfg(cfg)
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))


def _dup(t):
    t["up.in_perm"][4] = t["up.in_perm"][9]


def _oob(t):
    t["up.in_perm"][0] = 40


def _as_int32(t):
    t["up.in_perm"] = t["up.in_perm"].int()


def _drop(t):
    del t["up.in_perm"]


def _add_to_down(t):
    t["down.in_perm"] = torch.arange(64)


def _not_permuted(cfg):
    cfg["layers"]["up"].pop("in_perm")


@pytest.mark.parametrize("edit,edit_cfg,msg", [
    (_dup, None, r"2:4 layer 'up': up\.in_perm: index \d+ appears 2 times"),
    (_oob, None, r"2:4 layer 'up': up\.in_perm: holds 40 at position 0, outside 0..39"),
    (_as_int32, None, r"2:4 layer 'up': up\.in_perm must be int64, got int32"),
    (_drop, None, r"2:4 layer 'up': recorded as permuted but up\.in_perm is missing"),
    (lambda t: None, _not_permuted, r"2:4 layer 'up': up\.in_perm is stored but the layer is not recorded as permuted"),
    (_add_to_down, None, r"2:4 layer 'down': down\.in_perm is stored but the layer is not recorded as permuted"),
], ids=["duplicate", "out-of-range", "int32", "missing", "unrecorded", "extra"])
def test_checkpoint_with_a_corrupted_permutation_is_rejected(permuted_ck, edit, edit_cfg, msg):
    from sparse_kernels.llm import checkpoint
    from sparse_kernels.llm.checkpoint import CheckpointError

    _, _, ck = permuted_ck
    _rewrite(ck, edit, edit_cfg)
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.load(str(ck), model=_Tiny())


def test_checkpoint_version_follows_the_permutation(permuted_ck, tmp_path):
    import shutil

    from sparse_kernels.llm import checkpoint

    _, _, ck = permuted_ck
    # without permuted layers a checkpoint stays version 2, which earlier readers load
    plain = nn.Sequential(nn.Linear(32, 16))
    with torch.no_grad():
        plain[0].weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(8))
    assert checkpoint.save(plain, str(tmp_path / "plain"))["format_version"] == 2
    # a permuted layer in a checkpoint that claims version 2 is refused
    bad = tmp_path / "v2"
    shutil.copytree(ck, bad)
    cfg = json.loads((bad / checkpoint.CONFIG_NAME).read_text())
    cfg["format_version"] = 2
    (bad / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    _rewrite(bad, lambda t: None)  # the tensors file's metadata says version 2 as well
    with pytest.raises(checkpoint.CheckpointError, match="recorded as permuted, which needs format_version 3"):
        checkpoint.load(str(bad), model=_Tiny(), verify_hash=False)
