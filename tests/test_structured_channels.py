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
    with pytest.raises(TypeError, match="batch_size: expected an int >= 1, got float"):
        prune_channels(net, 0.5, batch_size=2.0)
    with pytest.raises(ValueError, match="chains: empty; give at least one ChannelChain"):
        prune_channels(net, 0.5, chains=[])
    with pytest.raises(TypeError, match="calibration: expected a tensor, a dict of keyword arguments or an iterable"):
        prune_channels(net, 0.5, calibration=5, criterion="wanda")
    with pytest.raises(ValueError, match="calibration: empty"):
        prune_channels(net, 0.5, calibration=iter([]), criterion="activation")
    before = copy.deepcopy(net.state_dict())
    bad = [ChannelChain("b1.conv1", "b1.conv2", ("b1.bn1",)), ChannelChain("b1.conv1", "b2.project")]
    with pytest.raises(ValueError, match=r"chains: .*producer has 24 output channels, the consumer 32 inputs"):
        prune_channels(net, 0.5, chains=bad[1:])
    with pytest.raises(ValueError, match="chains: producer 'b1.conv1' is listed twice"):
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


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_reparametrized_hooked_or_directly_read_layers_are_not_chain_members():
    from torch.nn.utils import parametrizations
    from torch.nn.utils import prune as torch_prune

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    base = [ChannelChain("0", "2")]
    assert find_channel_chains(mlp()) == base
    m = mlp()
    parametrizations.weight_norm(m[2])
    assert find_channel_chains(m) == []
    m = mlp()
    torch_prune.l1_unstructured(m[0], "weight", amount=0.5)
    assert find_channel_chains(m) == []
    m = mlp()
    m[2].register_forward_pre_hook(lambda mod, a: None)
    assert find_channel_chains(m) == []
    with pytest.raises(ValueError, match=r"chains: .*2 is a Linear with a parametrization, a pruning mask or forward"):
        prune_channels(m, 0.5, chains=base)

    class Tied(nn.Module):  # the encoder's weight is read again by the decoder
        def __init__(self):
            super().__init__()
            self.enc, self.mid = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):
            return F.linear(self.mid(torch.relu(self.enc(x))), self.enc.weight.t())

    assert find_channel_chains(Tied()) == []


def test_attach_mask_follows_the_weight():
    from sparse_kernels.training import attach_mask

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    attach_mask(m[0], torch.rand(6, 4) > 0.5)
    attach_mask(m[2], torch.rand(2, 6) > 0.5)
    x = torch.randn(5, 4)
    masked = copy.deepcopy(m)
    report = prune_channels(m, 0.5)
    with torch.no_grad():
        masked[2].weight[:, report.chains["0"]["removed"]] = 0
    assert m[0].weight_mask.shape == m[0].weight.shape == (3, 4) and m[2].weight_mask.shape == (2, 3)
    assert_close(m(x), masked(x), atol=1e-6, rtol=1e-6)


def test_train_only_branches_and_shared_modules():
    class Aux(nn.Module):  # an auxiliary head that runs in training only (Inception-style)
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.aux = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = self.c1(x)
            out = self.c2(torch.relu(h))
            return out + self.aux(h).sum() if self.training else out

    model = Aux().eval()
    assert find_channel_chains(model) == []  # c1 -> c2 holds only in eval mode
    assert not model.training and not model.c1.training  # modes restored

    class Untraceable(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.b1 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared)
            self.b2 = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return self.b2(self.b1(x)) if x.sum() > 0 else x

    model = Untraceable(nn.Linear(8, 8))  # one Linear registered in two children
    assert find_channel_chains(model) == []


def test_overlapping_user_chains_are_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    state = _snapshot(model)
    # two chains in a row (one module is a consumer and then a producer) are fine ...
    ok = [ChannelChain("0", "2"), ChannelChain("2", "4")]
    bad = [ChannelChain("0", "4"), ChannelChain("2", "4")]  # ... two producers of one consumer are not
    with pytest.raises(ValueError, match="chains: .* both change the same module"):
        prune_channels(model, 0.5, chains=bad)
    assert _same(model, state)
    x = torch.randn(3, 4)
    masked = copy.deepcopy(model)
    report = prune_channels(model, 0.5, chains=ok)
    with torch.no_grad():  # the masked original: both consumers' removed columns zeroed
        masked[2].weight[:, report.chains["0"]["removed"]] = 0
        masked[4].weight[:, report.chains["2"]["removed"]] = 0
    assert model[2].weight.shape == (3, 3)
    assert_close(model(x), masked(x), atol=1e-6, rtol=1e-6)


def test_a_failed_surgery_puts_every_module_back(monkeypatch):
    from sparse_kernels.structured import channels

    net = _net()
    state = _snapshot(net)
    sizes = (net.b1.conv1.out_channels, net.b1.bn1.num_features, net.b2.dw.groups)

    def boom(m, idx):
        raise RuntimeError("surgery failed")

    monkeypatch.setattr(channels, "_keep_inputs", boom)
    with pytest.raises(RuntimeError, match="surgery failed"):
        prune_channels(net, 0.5)
    assert _same(net, state)
    assert (net.b1.conv1.out_channels, net.b1.bn1.num_features, net.b2.dw.groups) == sizes
    x = torch.randn(2, 3, 8, 8)
    assert net(x).shape == (2, 10)


def test_scores_in_float64_and_calibration_forms():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 1.0 - 1e-9, 2.0]], dtype=torch.float64).repeat(2, 1))
    report = prune_channels(copy.deepcopy(model), 0.34)
    assert report.chains["0"]["removed"] == [1]  # 1e-9 apart: float32 would tie and take channel 0

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))

        def forward(self, pixel_values, scale=1.0):
            return self.mlp(pixel_values) * scale

    torch.manual_seed(0)
    kw, x = Kw(), torch.randn(5, 4)
    r1 = prune_channels(copy.deepcopy(kw), 0.5, calibration={"pixel_values": x}, criterion="activation")
    r2 = prune_channels(copy.deepcopy(kw), 0.5, calibration=[x], criterion="activation")
    acts = F.gelu(kw.mlp[0](x)).pow(2).sum(0)
    assert r1.chains == r2.chains and r1.chains["mlp.0"]["removed"] == sorted(acts.argsort()[:3].tolist())
    r3 = prune_channels(copy.deepcopy(kw), 0.5, calibration=x[0], criterion="activation")  # one unbatched input
    assert r3.chains["mlp.0"]["kept"] == 3


def test_hugging_face_models_built_from_a_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    models = {
        "resnet": transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)),
        "vit": transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=8, num_labels=10)),
        "convnext": transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),  # pwconv1 -> GELU -> pwconv2
        "mobilenet_v2": transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35, num_labels=10, tf_padding=False)),  # see the docs for True
    }
    for name, model in models.items():
        model.eval()
        masked = copy.deepcopy(model)
        report = prune_channels(model, 0.5, calibration=x, criterion="wanda")
        assert report.chains, name
        for producer, info in report.chains.items():
            with torch.no_grad():
                masked.get_submodule(info["consumer"]).weight[:, info["removed"]] = 0
        with torch.no_grad():
            assert_close(model(x).logits, masked(x).logits, atol=1e-4, rtol=1e-4)
        assert report.params_after < report.params_before


def test_spatial_padding_is_per_channel_but_channel_padding_is_not():
    class Padded(nn.Module):
        def __init__(self, pad):
            super().__init__()
            self.pad = pad
            self.a, self.dw, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.dw(F.pad(torch.relu(self.a(x)), self.pad)))

    torch.manual_seed(0)
    model = Padded((1, 1, 1, 1)).eval()
    assert find_channel_chains(model) == [ChannelChain("a", "b", ("dw",))]
    x = torch.randn(2, 3, 6, 6)
    masked = copy.deepcopy(model)
    report = prune_channels(model, 0.5)
    with torch.no_grad():
        masked.b.weight[:, report.chains["a"]["removed"]] = 0
    assert_close(model(x), masked(x), atol=1e-6, rtol=1e-6)
    assert find_channel_chains(Padded((1, 1, 1, 1, 0, 0))) == []  # would pad the channel dim


def test_prune_channels_on_cuda():
    """GPU runs only (skipped without one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    net, x = _net().cuda(), torch.randn(4, 3, 8, 8, device="cuda")
    masked = copy.deepcopy(net)
    report = prune_channels(net, 0.5, calibration=x, criterion="wanda")
    with torch.no_grad():
        for info in report.chains.values():
            masked.get_submodule(info["consumer"]).weight[:, info["removed"]] = 0
        assert_close(net(x), masked(x), atol=1e-4, rtol=1e-4)


def test_global_scope_ranks_normalized_scores_over_all_chains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # chain "0": two weak channels; chain "2": six weak ones, at another scale
        model[2].weight.copy_(torch.tensor([1, 1, 1, 1, 1, 1, 0.01, 0.01]).repeat(8, 1))
        model[4].weight.copy_(100 * torch.tensor([1, 1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]).repeat(2, 1))
    x = torch.randn(5, 4)
    masked = copy.deepcopy(model)
    report = prune_channels(model, 0.5, scope="global")
    removed = {p: r["removed"] for p, r in report.chains.items()}
    assert removed == {"0": [6, 7], "2": [2, 3, 4, 5, 6, 7]} and report.scope == "global"  # 8 of 16 in all
    with torch.no_grad():
        masked[2].weight[:, removed["0"]] = 0
        masked[4].weight[:, removed["2"]] = 0
    assert_close(model(x), masked(x), atol=1e-6, rtol=1e-6)
    # per chain, the same model loses half of each chain instead
    report = prune_channels(copy.deepcopy(masked), 0.5)
    assert [len(r["removed"]) for r in report.chains.values()] == [4, 4]
    # round_to keeps multiples (and at least round_to) in every chain
    report = prune_channels(copy.deepcopy(masked), 0.9, scope="global", round_to=4)
    assert all(r["kept"] % 4 == 0 and r["kept"] >= 4 for r in report.chains.values())
    with pytest.raises(ValueError, match="scope: expected 'chain'"):
        prune_channels(copy.deepcopy(masked), 0.5, scope="layer")


def test_non_finite_scores_and_bad_calibration_are_refused_before_any_change():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight[0, 1] = float("inf")
    state = _snapshot(model)
    for scope in ("chain", "global"):
        with pytest.raises(ValueError, match="chain '0' has non-finite magnitude scores"):
            prune_channels(model, 0.5, scope=scope)
    assert _same(model, state)
    good = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(TypeError, match="calibration: expected a tensor"):
        prune_channels(good, 0.5, calibration=5)  # checked even where magnitude does not use it
    report = prune_channels(good, 0.5, scope="global")
    assert "scope=global: removed 3 of 6 channels (0.500)" in str(report)
