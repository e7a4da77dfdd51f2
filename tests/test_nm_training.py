"""N:M sparse training with dynamic masks (sparse_kernels.training.nm): the mask, the forward,
the straight-through / SR-STE gradients, training, finalize, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_bitexact, assert_close
from sparse_kernels.pruning import magnitude_prune
from sparse_kernels.pruning.layers import _get_weight
from sparse_kernels.training import NMSparseTraining, nm_mask


def test_nm_mask_matches_prune_on_linear_and_channels_last_conv():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    assert_bitexact(nm_mask(w, 2, 4), magnitude_prune(w, "2:4")[1], "linear 2:4")
    conv = nn.Conv2d(8, 5, 3)
    keep = nm_mask(conv.weight, 2, 4)
    assert keep.shape == conv.weight.shape
    view = _get_weight(conv)  # [out, kh*kw*C], the layout prune() uses
    assert_bitexact(keep.permute(0, 2, 3, 1).reshape(5, -1), magnitude_prune(view, "2:4")[1], "conv 2:4")
    keep48 = nm_mask(conv.weight, 4, 8)
    assert int(keep48.sum()) == conv.weight.numel() // 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 3 input channels: skipped for 2:4
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
def test_forward_is_masked_backward_straight_through_and_the_step_adds_the_decay(decay):
    model, x = _net(), torch.randn(4, 3, 6, 6)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    nm = NMSparseTraining(model, "2:4", optimizer=opt, decay=decay)
    assert nm.layers == ["conv", "fc", "head"] and [n for n, _ in nm.skipped] == ["stem"]
    # the forward: the dense model with every trained weight replaced by its masked copy
    masks = {name: nm_mask(getattr(ref, name).weight, 2, 4) for name in nm.layers}
    for name, keep in masks.items():
        layer = getattr(ref, name)
        layer.weight = nn.Parameter(layer.weight.detach() * keep)  # a leaf of the masked values
    y, y_ref = model(x), ref(x)
    assert_close(y, y_ref, atol=0, rtol=0)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    before = {}
    for name, keep in masks.items():
        orig = getattr(model, name).parametrizations.weight.original
        assert_close(orig.grad, getattr(ref, name).weight.grad, atol=1e-6, rtol=1e-6)  # straight through
        assert (orig.grad[~keep] != 0).any()  # pruned weights get gradient too
        before[name] = orig.detach().clone()
    opt.step()  # SR-STE's term joins in the step's pre-hook: W -= lr * (g + decay * W * ~mask)
    for name, keep in masks.items():
        orig = getattr(model, name).parametrizations.weight.original
        want = before[name] - (getattr(ref, name).weight.grad + decay * before[name] * ~keep)
        assert_close(orig.detach(), want, atol=1e-6, rtol=1e-6)


def test_the_decay_is_applied_once_per_step_after_the_grad_scaler_unscales():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler missing")
    model, x = _net(), torch.randn(4, 3, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    nm = NMSparseTraining(model, "2:4", optimizer=opt, decay=0.5, include=["fc"])
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    except Exception as e:  # noqa: BLE001 - a CPU GradScaler is recent
        pytest.skip(f"no CPU GradScaler here ({e})")
    w = model.fc.parametrizations.weight.original
    keep = nm_mask(w, 2, 4)
    for _ in range(2):  # the layer used twice per step and two accumulated batches: still one decay
        scaler.scale(model(x).sum() + model(x).sum()).backward()
    g = w.grad / scaler.get_scale()
    before = w.detach().clone()
    scaler.step(opt)
    assert_close(w.detach(), before - (g + 0.5 * before * ~keep), atol=1e-5, rtol=1e-5)


def test_training_moves_masks_then_finalize_leaves_nm_weights():
    model, x, y = _net(), torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)  # built before: the parameters stay the same objects
    params_before = {id(p) for p in model.parameters()}
    nm = NMSparseTraining(model, "2:4", optimizer=opt, decay=2e-4)
    assert {id(p) for p in model.parameters()} == params_before
    first = nm.masks()
    assert nm.flips() == 0.0
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert nm.flips() > 0  # dense weights kept learning and some masks moved
    assert any(not torch.equal(first[k], v) for k, v in nm.masks().items())
    y_before = model(x).detach()
    names = nm.finalize()
    assert names == ["conv", "fc", "head"]
    assert not any(".parametrizations." in k for k in model.state_dict())
    assert_close(model(x).detach(), y_before, atol=1e-6, rtol=1e-6)  # the same function, now plain
    for name in names:
        w = _get_weight(getattr(model, name))
        assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2
    assert {id(p) for p in model.parameters()} == params_before
    with pytest.raises(RuntimeError, match="flips: finalize\\(\\) was already called"):
        nm.flips()
    assert nm.finalize() == names  # again: nothing to do


def test_sr_ste_decay_settles_masks_more_than_plain_ste():
    def run(decay):
        model, x, y = _net(1), torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        nm = NMSparseTraining(model, "2:4", optimizer=opt, decay=decay)
        nm.flips()
        for _ in range(40):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return nm.flips()

    assert run(0.5) < run(0.0)


def test_include_exclude_and_refusals():
    model = _net()
    nm = NMSparseTraining(model, "4:8", exclude="head", decay=0.0)  # one pattern as a str
    assert nm.layers == ["conv", "fc"]
    with pytest.raises(ValueError, match="include: stem cannot be trained 2:4: in_channels 3 is not a multiple of M=4"):
        NMSparseTraining(_net(), "2:4", include=["stem", "conv"], decay=0.0)
    with pytest.raises(ValueError, match="include: pattern 'blocks.*' names no Linear or convolution layer"):
        NMSparseTraining(_net(), "2:4", include=["conv", "blocks.*"], decay=0.0)
    with pytest.raises(TypeError, match="exclude: expected fnmatch patterns \\(str\\), got int 3"):
        NMSparseTraining(_net(), "2:4", exclude=[3], decay=0.0)
    with pytest.raises(ValueError, match="pattern: N:M training needs an 'N:M' pattern"):
        NMSparseTraining(_net(), 0.5, decay=0.0)
    with pytest.raises(ValueError, match=r"decay: expected a finite number >= 0"):
        NMSparseTraining(_net(), "2:4", decay=-1.0)
    with pytest.raises(ValueError, match=r"optimizer: SR-STE \(decay > 0\) adds decay \* W"):
        NMSparseTraining(_net(), "2:4")
    with pytest.raises(ValueError, match="model: no layer can be trained 2:4"):
        NMSparseTraining(nn.Sequential(nn.Linear(3, 3)), "2:4", decay=0.0)
    with pytest.raises(ValueError, match="already parametrized"):
        NMSparseTraining(model, "2:4", include=["conv"], decay=0.0)  # conv has NM parametrization from above
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        NMSparseTraining("model", "2:4", decay=0.0)


def test_tied_weights_are_skipped_and_gpt2_conv1d_is_trained():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    wte = model.transformer.wte.weight.detach().clone()
    nm = NMSparseTraining(model, "2:4", decay=0.0)
    assert dict(nm.skipped)["lm_head"].startswith("its weight is shared with transformer.wte.weight")
    assert nm.layers == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    ids = torch.randint(0, 64, (2, 8))
    model(ids).logits.sum().backward()
    nm.finalize()
    assert torch.equal(model.transformer.wte.weight, wte)  # the tied embedding is untouched
    for name in nm.layers:  # Conv1D stores [in, out]: groups of 4 along the input rows
        w = model.get_submodule(name).weight
        assert int((w.t().reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_each_optimizer_decays_only_its_own_weights_and_fused_steps_under_a_scaler():
    model, x = _net(), torch.randn(4, 3, 6, 6)
    opt_a = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("fc.")], lr=1.0)
    opt_b = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("fc.")], lr=1.0)
    nm = NMSparseTraining(model, "2:4", optimizer=opt_a, decay=0.5, include=["fc", "head"])
    nm.attach(opt_b)
    model(x).sum().backward()
    w = {name: getattr(model, name).parametrizations.weight.original for name in ("fc", "head")}
    before = {k: v.detach().clone() for k, v in w.items()}
    grads = {k: v.grad.clone() for k, v in w.items()}
    opt_b.step()  # holds head only
    opt_a.step()  # holds fc only
    for name in ("fc", "head"):  # exactly one decay each
        keep = nm_mask(before[name], 2, 4)
        assert_close(w[name].detach(), before[name] - (grads[name] + 0.5 * before[name] * ~keep), atol=1e-6, rtol=1e-6)
    nm.finalize()
    with pytest.raises(RuntimeError, match="attach: finalize\\(\\) was already called"):
        nm.attach(opt_a)

    try:
        fused = torch.optim.SGD(_net().parameters(), lr=1.0, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except Exception as e:  # noqa: BLE001 - fused CPU SGD and a CPU GradScaler are recent
        pytest.skip(f"no fused CPU SGD / CPU GradScaler here ({e})")
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    NMSparseTraining(model, "2:4", optimizer=opt, decay=0.5, include=["fc"])
    wf = model.fc.parametrizations.weight.original
    scaler.scale(model(x).sum()).backward()
    g = wf.grad / scaler.get_scale()
    b = wf.detach().clone()
    scaler.step(opt)  # the fused step unscales inside: the decay was scaled alike
    assert_close(wf.detach(), b - (g + 0.5 * b * ~nm_mask(b, 2, 4)), atol=1e-5, rtol=1e-5)
    del fused


def test_finalized_2to4_linear_layers_convert_to_sparse_linear():
    import sparse_kernels as sk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nm = NMSparseTraining(model, "2:4", optimizer=opt)
    for _ in range(5):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    nm.finalize()
    want = model(x).detach()
    report = sk.sparsify(model, pattern="2:4")
    assert len(report.layers) == 2
    assert_close(model(x).detach(), want, atol=1e-5, rtol=1e-5)  # the 2:4 weights survive compression as they are


def test_nm_training_on_cuda():
    """GPU runs only (skipped without one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, x = _net().cuda(), torch.randn(4, 3, 6, 6, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nm = NMSparseTraining(model, "2:4", optimizer=opt)
    model(x).sum().backward()
    opt.step()
    nm.finalize()
    w = _get_weight(model.conv)
    assert w.is_cuda and int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2
