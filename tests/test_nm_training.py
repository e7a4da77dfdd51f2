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
def test_forward_is_masked_and_backward_is_straight_through_plus_decay(decay):
    model, x = _net(), torch.randn(4, 3, 6, 6)
    ref = copy.deepcopy(model)
    nm = NMSparseTraining(model, "2:4", decay=decay)
    assert nm.layers == ["conv", "fc", "head"] and [n for n, _ in nm.skipped] == ["stem"]
    # the forward: the dense model with every trained weight replaced by its masked copy
    masks = {name: nm_mask(getattr(ref, name).weight, 2, 4) for name in nm.layers}
    masked_params = {}
    for name, keep in masks.items():
        layer = getattr(ref, name)
        masked = (layer.weight.detach() * keep).requires_grad_(True)
        masked_params[name] = masked
        layer.weight = nn.Parameter(masked)  # a leaf of the masked values
    y, y_ref = model(x), ref(x)
    assert_close(y, y_ref, atol=0, rtol=0)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for name, keep in masks.items():
        orig = getattr(model, name).parametrizations.weight.original
        want = getattr(ref, name).weight.grad + decay * orig.detach() * (~keep)
        assert_close(orig.grad, want, atol=1e-6, rtol=1e-6)  # pruned weights get gradient too
        assert (orig.grad[~keep] != 0).any()


def test_training_moves_masks_then_finalize_leaves_nm_weights():
    model, x, y = _net(), torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)  # built before: the parameters stay the same objects
    params_before = {id(p) for p in model.parameters()}
    nm = NMSparseTraining(model, "2:4", decay=2e-4)
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


def test_sr_ste_decay_settles_masks_more_than_plain_ste():
    def run(decay):
        model, x, y = _net(1), torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,))
        nm = NMSparseTraining(model, "2:4", decay=decay)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        nm.flips()
        for _ in range(40):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return nm.flips()

    assert run(0.5) < run(0.0)


def test_include_exclude_and_refusals():
    model = _net()
    nm = NMSparseTraining(model, "4:8", exclude=["head"], decay=0.0)
    assert nm.layers == ["conv", "fc"]
    with pytest.raises(ValueError, match="include: stem cannot be trained 2:4: in_channels 3 is not a multiple of M=4"):
        NMSparseTraining(_net(), "2:4", include=["stem", "conv"])
    with pytest.raises(ValueError, match="pattern: N:M training needs an 'N:M' pattern"):
        NMSparseTraining(_net(), 0.5)
    with pytest.raises(ValueError, match=r"decay: expected a finite number >= 0"):
        NMSparseTraining(_net(), "2:4", decay=-1.0)
    with pytest.raises(ValueError, match="model: no layer can be trained 2:4"):
        NMSparseTraining(nn.Sequential(nn.Linear(3, 3)), "2:4")
    with pytest.raises(ValueError, match="already parametrized"):
        NMSparseTraining(model, "2:4", include=["conv"])  # conv has NM parametrization from above
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        NMSparseTraining("model", "2:4")
