"""Convolutions in prune(): the channels-last weight view, the unfolded input rows, every
method on a small CNN, N:M along input channels, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_bitexact, assert_close
from sparse_kernels.lottery import LotteryTicket
from sparse_kernels.pruning import (ActivationNormAccumulator, HessianAccumulator, prune, sparsegpt_prune,
                                    wanda_prune)
from sparse_kernels.pruning.layers import _get_weight, _set_weight, layer_input_rows, prunable_layers
from sparse_kernels.training import MagnitudePruner, OneShot

CONVS = [
    ("3x3 pad 1", lambda: nn.Conv2d(8, 6, 3, padding=1), (2, 8, 7, 9)),
    ("stride, dilation, reflect", lambda: nn.Conv2d(8, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1),
                                                    padding_mode="reflect"), (2, 8, 7, 9)),
    ("same, even kernel, circular", lambda: nn.Conv2d(8, 6, 4, padding="same", padding_mode="circular"), (2, 8, 7, 9)),
    ("valid, no bias, unbatched", lambda: nn.Conv2d(8, 6, 3, padding="valid", bias=False), (8, 7, 9)),
    ("1x1", lambda: nn.Conv2d(8, 6, 1), (3, 8, 5, 5)),
    ("conv1d same dilated", lambda: nn.Conv1d(8, 6, 5, padding="same", dilation=2), (3, 8, 11)),
    ("conv1d stride replicate", lambda: nn.Conv1d(8, 6, 3, stride=2, padding=1, padding_mode="replicate"), (3, 8, 11)),
]


def smooth_images(n, c, h, w, seed=0):
    """Spatially correlated images with channel scales that differ (inputs where the Hessian matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h + 4, w + 4, generator=g)
    x = F.avg_pool2d(x, 5, stride=1)  # neighbouring pixels correlate
    mix = torch.randn(c, c, generator=g) / c ** 0.5 + torch.eye(c)
    x = torch.einsum("dc,nchw->ndhw", mix, x)  # channels correlate
    return x * torch.exp(torch.randn(1, c, 1, 1, generator=g))


@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_rows_times_weight_is_the_convolution(name, make, shape):
    torch.manual_seed(0)
    conv = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    rows, w = layer_input_rows(conv, x), _get_weight(conv)
    assert rows.shape[1] == w.shape[1] == conv.weight[0].numel()
    y = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
    ref = conv._conv_forward(x, conv.weight, None) if conv.padding_mode != "zeros" else y(
        x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    ref = ref if ref.dim() == conv.weight.dim() else ref.unsqueeze(0)
    assert_close(rows @ w.T, ref.movedim(1, -1).reshape(-1, ref.shape[1]), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_weight_view_is_channels_last_and_writes_back(name, make, shape):
    torch.manual_seed(0)
    conv = make()
    w = _get_weight(conv)
    c = conv.in_channels
    # column (position * C + channel): a group of consecutive columns stays inside one kernel position
    k = conv.weight.shape[2:].numel()
    assert_bitexact(w.view(w.shape[0], k, c)[:, :, 3], conv.weight[:, 3].reshape(w.shape[0], k), "channel 3")
    new = torch.randn_like(w)
    _set_weight(conv, new)
    assert_bitexact(_get_weight(conv), new, "written back")


def test_layer_input_rows_rejects_a_wrong_input():
    conv = nn.Conv2d(8, 6, 3)
    with pytest.raises(ValueError, match=r"x: a Conv2d with 8 input channels got an input of shape \(2, 4, 9, 9\)"):
        layer_input_rows(conv, torch.randn(2, 4, 9, 9))
    x = torch.randn(5, 8)
    assert layer_input_rows(nn.Linear(8, 3), x) is x


class ConvBlock(nn.Module):
    def __init__(self, c, groups_conv=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c) if groups_conv else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.dw(x))))


class TinyCNN(nn.Module):
    def __init__(self, c=16, depth=3, groups_conv=False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(c, groups_conv) for _ in range(depth))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyCNN(**kw)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4", "4:8"])
def test_prune_a_cnn(method, sparsity):
    model = _model()
    stem, head = model.stem.weight.clone(), model.head.weight.clone()
    calib = smooth_images(16, 3, 10, 10)
    report = prune(model, method, sparsity, calibration=calib, progress=False)
    assert [r.name for r in report.layers] == ["conv1", "conv2"] * 3
    for block in model.blocks:
        for conv in (block.conv1, block.conv2):
            w = _get_weight(conv)
            if isinstance(sparsity, str):
                n, m = map(int, sparsity.split(":"))
                groups = w.reshape(-1, m)  # channels-last: groups of M along input channels
                assert int((groups != 0).sum(1).max()) <= n
                assert (w == 0).sum().item() == w.numel() * (m - n) // m
            elif method == "magnitude":  # one threshold per layer
                assert (w == 0).sum().item() == round(w.numel() * sparsity)
            else:  # wanda / ria round per output row, sparsegpt per block of columns
                assert abs((w == 0).sum().item() - w.numel() * sparsity) <= w.shape[0]
    assert_bitexact(model.stem.weight, stem, "the stem, outside the blocks")
    assert_bitexact(model.head.weight, head, "the head, outside the blocks")
    assert all(e is not None and 0 < e < 1 for e in report.block_output_error)


class _Wrap(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.blocks = nn.ModuleList([conv])

    def forward(self, x):
        return self.blocks[0](x)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_prune_conv_equals_the_layer_ops_on_unfolded_inputs(sparsity):
    x = smooth_images(6, 16, 9, 9, seed=1)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    w0 = _get_weight(conv).clone()
    rows = layer_input_rows(conv, x)
    acc, norms = HessianAccumulator(rows.shape[1]), ActivationNormAccumulator(rows.shape[1])
    acc.add(rows)
    norms.add(rows)
    for method in ("sparsegpt", "wanda"):
        c = copy.deepcopy(conv)
        report = prune(_Wrap(c), method, sparsity, calibration=x, batch_size=6, progress=False)
        if method == "sparsegpt":
            want, mask, loss = sparsegpt_prune(w0, acc.H, sparsity)
            assert report.layers[0].loss == pytest.approx(loss, rel=1e-6)
        else:
            want, mask = wanda_prune(w0, norms.norm_sq, sparsity)
        assert_bitexact(_get_weight(c), want, f"{method}: the conv's pruned weight")


def test_output_error_of_a_conv_is_the_convolution_error():
    x = smooth_images(4, 16, 8, 8, seed=2)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    dense = copy.deepcopy(conv)
    report = prune(_Wrap(conv), "magnitude", 0.6, calibration=x, batch_size=4, progress=False)
    y0 = F.conv2d(x, dense.weight, None, padding=1).double()
    y1 = F.conv2d(x, conv.weight, None, padding=1).double()
    want = ((y0 - y1).norm() / y0.norm()).item()
    assert report.layers[0].output_error == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_convolutions(sparsity):
    # the first layer of the first block sees the same inputs whatever the method
    x = smooth_images(32, 3, 12, 12, seed=3)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _model(seed=4)
        with torch.no_grad():  # heavy-tailed input channels for the blocks, as in trained CNNs
            model.stem.weight.mul_(torch.exp(torch.randn(16, 1, 1, 1, generator=torch.Generator().manual_seed(5))))
        report = prune(model, method, sparsity, calibration=x, batch_size=8, progress=False)
        errors[method] = report.layers[0].output_error
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_owl_dsnot_and_global_scope_on_a_cnn():
    calib = smooth_images(8, 3, 10, 10)
    model = _model()
    report = prune(model, "wanda", 0.6, calibration=calib, owl=True, progress=False)
    ws = [_get_weight(c) for b in model.blocks for c in (b.conv1, b.conv2)]
    assert sum(int((w == 0).sum()) for w in ws) == pytest.approx(0.6 * sum(w.numel() for w in ws), rel=0.02)
    assert len(report.owl["block_sparsity"]) == 3
    model = _model()
    report = prune(model, "wanda", 0.5, calibration=calib, dsnot=True, progress=False)
    for r, (b, c) in zip(report.layers, [(b, c) for b in model.blocks for c in ("conv1", "conv2")]):
        w = _get_weight(getattr(b, c))
        assert (w == 0).sum().item() == w.numel() // 2
        assert r.dsnot_swaps is not None
    model = _model()
    prune(model, "magnitude", 0.5, scope="global", progress=False)
    ws = [_get_weight(c) for b in model.blocks for c in (b.conv1, b.conv2)]
    assert sum(int((w == 0).sum()) for w in ws) == round(0.5 * sum(w.numel() for w in ws))


def test_grouped_convolutions_are_left_alone():
    model = _model(groups_conv=True)
    dw = [b.dw.weight.clone() for b in model.blocks]
    assert sorted(prunable_layers(model.blocks[0])) == ["conv1", "conv2"]
    prune(model, "wanda", 0.5, calibration=smooth_images(4, 3, 8, 8), progress=False)
    for b, w in zip(model.blocks, dw):
        assert_bitexact(b.dw.weight, w, "depthwise conv")


def test_conv_refusals_name_the_layer():
    model = _model()
    stem_block = nn.ModuleList([model.stem])
    with pytest.raises(ValueError, match=r"blocks\[0\]: a Conv2d with 3 input channels cannot take '2:4'"):
        prune(model, "magnitude", "2:4", blocks=stem_block, progress=False)
    calib = smooth_images(4, 3, 8, 8)
    for kw, what in ((dict(permute=True), "permute"), (dict(convert=True), "convert"), (dict(int4=16), "int4")):
        with pytest.raises(ValueError, match=rf"{what}: blocks\[0\]\.conv1 is a Conv2d; {what} applies to Linear"):
            prune(_model(), "sparsegpt", "2:4", calibration=calib, progress=False, **kw)
    # nothing was pruned by a refused call
    m = _model()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError):
        prune(m, "sparsegpt", "2:4", calibration=calib, convert=True, progress=False)
    for k, v in m.state_dict().items():
        assert_bitexact(v, before[k], k)


def test_training_pruners_take_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv1d(4, 4, 3), nn.Conv3d(2, 2, 1),
                          nn.Linear(8, 4))
    pruner = MagnitudePruner(model, OneShot(0.5))
    assert [n for n, _ in pruner.targets] == ["0", "1", "2", "3", "4"]
    pruner.prune(0.5)
    for m in model:
        assert (m.weight == 0).sum().item() == round(0.5 * m.weight.numel())
    ticket = LotteryTicket(_model(), rate=0.2)
    assert {n for n, _ in ticket.pruner.targets} >= {"stem", "blocks.0.conv1", "blocks.2.conv2", "head"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prune_a_half_precision_channels_last_cnn(dtype):
    model = _model().to(dtype).to(memory_format=torch.channels_last)
    calib = smooth_images(8, 3, 8, 8).to(dtype).to(memory_format=torch.channels_last)
    report = prune(model, "sparsegpt", "2:4", calibration=calib, progress=False)
    for b in model.blocks:
        assert b.conv1.weight.dtype == dtype
        assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        groups = _get_weight(b.conv1).reshape(-1, 4)
        assert int((groups != 0).sum(1).max()) <= 2
    assert all(0 < e < 0.5 for e in report.block_output_error)


try:
    import transformers
except ImportError:
    transformers = None


@pytest.mark.skipif(transformers is None, reason="transformers is not installed")
def test_hugging_face_vision_models_built_from_a_config():
    torch.manual_seed(0)
    images = smooth_images(8, 3, 32, 32)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=10)
    vit = transformers.ViTForImageClassification(cfg).eval()
    report = prune(vit, "sparsegpt", "2:4", calibration=images, progress=False)  # blocks found: encoder.layer
    assert len(report.layers) == 12 and all(r.sparsity == 0.5 for r in report.layers)
    assert vit.vit.embeddings.patch_embeddings.projection.weight.ne(0).all()  # outside the blocks
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                                    num_labels=10)
    resnet = transformers.ResNetForImageClassification(cfg).eval()
    blocks = [layer for stage in resnet.resnet.encoder.stages for layer in stage.layers]
    report = prune(resnet, "wanda", "2:4", calibration=images, blocks=blocks, progress=False)
    convs = [m for b in blocks for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert len(report.layers) == len(convs) == 7  # three per bottleneck, one projection shortcut
    for conv in convs:
        assert int((_get_weight(conv).reshape(-1, 4) != 0).sum(1).max()) <= 2
    with torch.no_grad():
        assert torch.isfinite(resnet(images).logits).all()


class _StandardizedConv(nn.Conv2d):  # BiT-style: the forward standardizes the weight
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(input=x)  # the layer's input as a keyword


class _KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_KeywordBlock()])

    def forward(self, x):
        return self.blocks[0](x)


def test_convolution_subclasses_with_their_own_forward_are_left_alone():
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _StandardizedConv(8, 8, 3, padding=1))
    assert list(prunable_layers(block)) == ["0"]
    pruner = MagnitudePruner(nn.Sequential(_StandardizedConv(8, 8, 3), nn.Linear(4, 4)), OneShot(0.5))
    assert [n for n, _ in pruner.targets] == ["1"]


def test_find_blocks_prefers_blocks_with_linear_layers():
    from sparse_kernels.pruning import find_blocks

    class Audio(nn.Module):  # a conv feature extractor (7 conv layers) and 3 transformer-ish layers
        def __init__(self):
            super().__init__()
            self.features = nn.ModuleList(nn.Conv1d(8, 8, 3) for _ in range(7))
            self.layers_ = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

    model = Audio()
    assert find_blocks(model) == list(model.layers_)
    cnn = _model()
    assert find_blocks(cnn) == list(cnn.blocks)


def test_a_layer_called_with_input_keyword():
    x = torch.randn(4, 16)
    for method in ("wanda", "sparsegpt", "magnitude"):
        torch.manual_seed(0)
        model = _KeywordCall()
        report = prune(model, method, 0.5, calibration=x, batch_size=4, progress=False)
        assert report.layers[0].output_error is not None and 0 < report.layers[0].output_error < 1


@pytest.mark.parametrize("device", ["cuda"])
def test_prune_a_cnn_on_cuda_equals_the_cpu(device):
    """GPU runs only (skipped without one): the same pruning on CUDA as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    calib = smooth_images(16, 3, 10, 10)
    for method, sparsity in (("wanda", "2:4"), ("sparsegpt", 0.5), ("magnitude", 0.7)):
        cpu, gpu = _model(), _model().to(device)
        prune(cpu, method, sparsity, calibration=calib, progress=False)
        prune(gpu, method, sparsity, calibration=calib.to(device), progress=False)
        for b_cpu, b_gpu in zip(cpu.blocks, gpu.blocks):
            for name in ("conv1", "conv2"):
                a, b = getattr(b_cpu, name).weight, getattr(b_gpu, name).weight.cpu()
                agree = ((a == 0) == (b == 0)).float().mean().item()
                assert agree >= 0.99, (method, name, agree)


def test_prune_then_fine_tune_a_cnn_with_the_zeros_kept():
    from sparse_kernels.training import MaskedTraining, mask_zeros_

    model = _model()
    x, y = smooth_images(16, 3, 8, 8), torch.randint(0, 10, (16,))
    prune(model, "sparsegpt", "2:4", calibration=x, progress=False)
    names = mask_zeros_(model)
    assert names == [f"blocks.{i}.{c}" for i in range(3) for c in ("conv1", "conv2")]  # not the dense stem / head
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    MaskedTraining(model, opt)
    model.train()
    before = model.blocks[0].conv1.weight.detach().clone()
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    w = model.blocks[0].conv1.weight
    assert not torch.equal(w, before)  # it trained
    for b in model.blocks:
        for conv in (b.conv1, b.conv2):
            groups = _get_weight(conv).reshape(-1, 4)
            assert int((groups != 0).sum(1).max()) <= 2  # still 2:4 along input channels


def test_training_pruner_include_takes_one_pattern_as_a_string():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 4))
    assert [n for n, _ in MagnitudePruner(model, OneShot(0.5), include="0").targets] == ["0"]
    assert [n for n, _ in MagnitudePruner(model, OneShot(0.5), exclude="0").targets] == ["1"]
