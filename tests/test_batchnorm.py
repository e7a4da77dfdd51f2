"""recalibrate_batchnorm: the statistics equal a hand computation, modes and momentum restored,
untouched layers kept, failures roll back."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from sparse_kernels.training import recalibrate_batchnorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.aux_bn = nn.BatchNorm1d(8)  # only used in training mode
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3))
        if self.training:
            h = self.aux_bn(h)
        return self.fc(h)


def test_statistics_are_the_mean_over_batches_and_modes_restored():
    torch.manual_seed(0)
    model = Net().train()
    model.drop.eval()  # a module in its own mode: restored as it was
    aux_mean = model.aux_bn.running_mean.clone()
    x = torch.randn(12, 3, 5, 5) * 3 + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = recalibrate_batchnorm(model, x, batch_size=4)
    assert n == 1 and "1 of 2 BatchNorm layers saw no batch" in str(caught[0].message)
    with torch.no_grad():  # the cumulative average of the three batches' statistics
        y = model.conv(x)
        means = [b.mean((0, 2, 3)) for b in y.split(4)]
        vars_ = [b.var((0, 2, 3), unbiased=True) for b in y.split(4)]
    assert_close(model.bn.running_mean, torch.stack(means).mean(0), atol=1e-5, rtol=1e-5)
    assert_close(model.bn.running_var, torch.stack(vars_).mean(0), atol=1e-5, rtol=1e-5)
    assert int(model.bn.num_batches_tracked) == 3 and model.bn.momentum == 0.3
    assert model.training and not model.drop.training and model.bn.training
    assert torch.equal(model.aux_bn.running_mean, aux_mean)  # no batch reached it: kept


def test_dropout_stays_off_and_weights_do_not_change():
    torch.manual_seed(0)
    model = Net().eval()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    x = torch.randn(8, 3, 5, 5)
    with pytest.warns(UserWarning, match="saw no batch"):
        recalibrate_batchnorm(model, [x[:4], x[4:]])
    for k, v in model.named_parameters():
        assert torch.equal(v, weights[k]), k
    a, b = model(x), model(x)
    assert torch.equal(a, b) and not model.training  # eval mode restored, deterministic


def test_a_failing_forward_restores_every_statistic_and_bad_input():
    torch.manual_seed(0)
    model = Net().eval()
    mean = model.bn.running_mean.clone()
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.randn(2, 3, 5, 5), torch.randn(2, 5, 5, 5)])  # second batch: wrong channels
    assert torch.equal(model.bn.running_mean, mean) and model.bn.momentum == 0.3 and not model.training
    with pytest.raises(ValueError, match="model: Sequential has no BatchNorm layer"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), torch.randn(2, 2))
    with pytest.raises(ValueError, match="calibration: empty"):
        recalibrate_batchnorm(model, [])
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        recalibrate_batchnorm(model, torch.randn(2, 3, 5, 5), batch_size=0)


def test_batches_weigh_by_their_size_a_single_row_is_merged_and_iterables_are_lazy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(9, 3) * 2 + 1
    recalibrate_batchnorm(model, x, batch_size=4)  # chunks 4, 4, 1 -> 4, 5 (one row cannot be normalized)
    with torch.no_grad():
        h = model[0](x)
    assert_close(model[1].running_mean, h.mean(0), atol=1e-5, rtol=1e-5)  # the mean over all rows
    assert int(model[1].num_batches_tracked) == 2
    calls = []

    def gen():
        for chunk in x.split(3):
            calls.append("yield")
            yield {"input": chunk}

    model.register_forward_pre_hook(lambda m, a, kw: calls.append("forward"), with_kwargs=True)
    recalibrate_batchnorm(model, gen())
    assert calls == ["yield", "forward"] * 3  # read one batch at a time
    with pytest.raises(ValueError, match="calibration: empty"):
        recalibrate_batchnorm(model, iter([]))


def test_recalibrate_batchnorm_on_cuda():
    """GPU runs only (skipped without one): CPU calibration moved to the model's device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = Net().cuda().eval()
    x = torch.randn(8, 3, 5, 5)
    with pytest.warns(UserWarning, match="saw no batch"):
        recalibrate_batchnorm(model, [x[:4], {"x": x[4:]}])
    with torch.no_grad():
        h = model.conv(x.cuda())
    assert_close(model.bn.running_mean, h.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_prune_report_points_to_recalibration_when_convolutions_feed_batchnorm():
    from sparse_kernels import prune

    torch.manual_seed(0)
    model = Net().eval()
    report = prune(model, "magnitude", 0.5, blocks=[model], layer_filter=lambda n, m: n == "conv", progress=False)
    assert report.notes and "recalibrate_batchnorm" in str(report)
    other = Net().eval()
    report = prune(other, "magnitude", 0.5, blocks=[other], layer_filter=lambda n, m: n == "fc", progress=False)
    assert report.notes == []  # no convolution pruned: nothing to say
