"""Structured channel pruning of any model (sparse_kernels.structured.channels): chain detection,
the shrunken model equal to the masked original, criteria, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from sparse_kernels.structured import ChannelChain, find_channel_chains, prune_channels


class Basic(nn.Module):  # ResNet basic block: conv-bn-relu-conv-bn + x
    def __init__(self, c, mid):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Inverted(nn.Module):  # MobileNetV2: 1x1 expand - bn - relu6 - depthwise - bn - relu6 - 1x1 project
    def __init__(self, c, e):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.act = nn.ReLU6()
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        return x + self.project(self.act(self.bn2(self.dw(self.act(self.bn1(self.expand(x)))))))


class Net(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1, self.b2 = Basic(c, 24), Inverted(c, 32)
        self.fc1, self.drop, self.fc2 = nn.Linear(c, 40), nn.Dropout(0.1), nn.Linear(40, 10)

    def forward(self, x):
        x = self.b2(self.b1(torch.relu(self.stem(x))))
        return self.fc2(self.drop(F.gelu(self.fc1(x.mean((2, 3))))))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


def test_chains_found_by_tracing():
    chains = find_channel_chains(_net())
    assert chains == [
        ChannelChain("b1.conv1", "b1.conv2", ("b1.bn1",)),
        ChannelChain("b2.expand", "b2.project", ("b2.bn1", "b2.dw", "b2.bn2")),
        ChannelChain("fc1", "fc2", ()),
    ]  # not the stem (its output feeds a residual add), nor b1.conv2 / b2.project (added to x)
    assert find_channel_chains(_net().b1, prefix="b1") == chains[:1]


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "wanda"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_pruned_model_equals_the_masked_original(criterion, sparsity):
    net = _net()
    x = torch.randn(6, 3, 8, 8)
    masked = copy.deepcopy(net)
    report = prune_channels(net, sparsity, calibration=x if criterion != "magnitude" else None,
                            criterion=criterion, batch_size=4)
    for producer, info in report.chains.items():
        c = info["channels"]
        assert info["kept"] == c - round(sparsity * c) and len(info["removed"]) == round(sparsity * c)
        with torch.no_grad():
            masked.get_submodule(info["consumer"]).weight[:, info["removed"]] = 0
    assert net.b1.conv1.out_channels == net.b1.bn1.num_features == net.b1.conv2.in_channels == 24 - round(24 * sparsity)
    assert net.b2.dw.groups == net.b2.dw.in_channels == net.b2.bn2.running_mean.numel() == 32 - round(32 * sparsity)
    assert net.fc1.out_features == net.fc2.in_features == 40 - round(40 * sparsity)
    assert report.params_after < report.params_before == sum(p.numel() for p in _net().parameters())
    with torch.no_grad():
        assert_close(net(x), masked(x), atol=1e-5, rtol=1e-5)
        y = net(x)
    # the forward still trains (shapes consistent for autograd, BatchNorm in train mode)
    net.train()
    net(x).sum().backward()
    assert net.b2.dw.weight.grad.shape == net.b2.dw.weight.shape
    assert torch.isfinite(y).all()


def test_criteria_rank_channels_as_documented():
    torch.manual_seed(0)
    producer, consumer = nn.Linear(8, 6), nn.Linear(6, 3)
    model = nn.Sequential(producer, nn.ReLU(), consumer)
    with torch.no_grad():
        consumer.weight.copy_(torch.tensor([[1., 5, 2, 0.1, 3, 4]]).repeat(3, 1))
    m = copy.deepcopy(model)
    report = prune_channels(m, 0.5, criterion="magnitude")
    assert report.chains["0"]["removed"] == [0, 2, 3]  # the three smallest consumer columns
    x = torch.randn(32, 8)
    acts = torch.relu(producer(x)).pow(2).sum(0)
    w = consumer.weight.pow(2).sum(0)
    for criterion, score in (("activation", acts), ("wanda", acts.sqrt() * w.sqrt())):
        m = copy.deepcopy(model)
        report = prune_channels(m, 0.5, calibration=x, criterion=criterion, batch_size=5)
        assert report.chains["0"]["removed"] == sorted(torch.sort(score, stable=True).indices[:3].tolist())


def test_round_to_and_zero_sparsity():
    net = _net()
    report = prune_channels(net, 0.3, round_to=8)
    assert {p: r["kept"] for p, r in report.chains.items()} == {"b1.conv1": 16, "b2.expand": 24, "fc1": 32}
    net = _net()
    report = prune_channels(net, 0.0)
    assert all(r["removed"] == [] for r in report.chains.values()) and net.fc1.out_features == 40


def test_shared_or_mixing_paths_are_not_chains():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)
            self.ln, self.d = nn.LayerNorm(6), nn.Linear(6, 6)
            self.e = nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h) + self.c(h)  # two consumers
            g = self.e(self.ln(self.d(x)))  # LayerNorm mixes the channels
            return y + g + self.e(self.d(x))  # e and d called twice

    assert find_channel_chains(Shared()) == []
    with pytest.raises(ValueError, match="model: no channel chain found in Shared"):
        prune_channels(Shared(), 0.5)


def test_bad_arguments():
    net = _net()
    with pytest.raises(ValueError, match=r"sparsity: must be in \[0, 1\)"):
        prune_channels(net, 1.0)
    with pytest.raises(TypeError, match="sparsity: expected a float, got str"):
        prune_channels(net, "2:4")
    with pytest.raises(ValueError, match="criterion: unknown 'taylor'"):
        prune_channels(net, 0.5, criterion="taylor")
    with pytest.raises(ValueError, match="calibration: criterion='wanda' needs calibration inputs"):
        prune_channels(net, 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="round_to: expected an int >= 1, got 0"):
        prune_channels(net, 0.5, round_to=0)
    before = copy.deepcopy(net.state_dict())
    bad = [ChannelChain("b1.conv1", "b1.conv2", ("b1.bn1",)), ChannelChain("b1.conv1", "b2.project")]
    with pytest.raises(ValueError, match=r"chains: .*producer has 24 output channels, the consumer 32 inputs"):
        prune_channels(net, 0.5, chains=bad[1:])
    with pytest.raises(ValueError, match="chains: a producer is listed twice"):
        prune_channels(net, 0.5, chains=[bad[0], bad[0]])
    with pytest.raises(ValueError, match=r"chains: .* names a module the model does not have"):
        prune_channels(net, 0.5, chains=[ChannelChain("nope", "b1.conv2")])
    with pytest.raises(ValueError, match=r"b1.bn2 is a BatchNorm2d; between producer and consumer only"):
        prune_channels(net, 0.5, chains=[ChannelChain("b1.conv1", "b1.conv2", ("b1.bn2",))])
    for k, v in net.state_dict().items():  # nothing changed by a refused call
        assert torch.equal(v, before[k]), k

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return x

    class Wrapper(nn.Module):  # does not trace; its children are searched instead
        def __init__(self):
            super().__init__()
            self.inner, self.gate = _net().b1, Untraceable()

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else x

    untraced = []
    assert find_channel_chains(Wrapper(), untraced=untraced) == [ChannelChain("inner.conv1", "inner.conv2", ("inner.bn1",))]
    assert untraced == ["Wrapper", "gate"]
    with pytest.raises(ValueError, match="no channel chain found in Untraceable.*torch.fx could not trace Untraceable"):
        prune_channels(Untraceable(), 0.5)


def test_layers_with_their_own_forward_are_not_chain_ends():
    class Scaled(nn.Linear):  # a subclass that changes what the weight means
        def forward(self, x):
            return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)

    assert find_channel_chains(nn.Sequential(Scaled(4, 6), nn.ReLU(), nn.Linear(6, 2))) == []
    assert find_channel_chains(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Scaled(6, 2))) == []
    assert find_channel_chains(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))) == [ChannelChain("0", "2")]
