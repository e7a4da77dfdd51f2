"""RIA (relative importance and activations): the score by hand, the selection rules, the
model-level method and its option, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparse_kernels as sk
from conftest import assert_bitexact
from sparse_kernels.pruning import magnitude_prune, ria_prune, wanda_prune
from test_sparsegpt import correlated_inputs


def _hand_score(W, norm_sq, alpha):
    a = W.double().abs()
    return (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * norm_sq.double().sqrt() ** alpha


def test_score_and_mask_by_hand():
    W = torch.tensor([[4.0, -1.0, 2.0, 0.5],
                      [0.1, 3.0, -0.2, 1.0]])
    norm_sq = torch.tensor([1.0, 16.0, 4.0, 9.0])
    score = _hand_score(W, norm_sq, 0.5)
    # row 0: 4/7.5 + 4/4.1 = 1.5089 (x 1) ; -1: 1/7.5 + 1/4 = 0.3833 (x 2) = 0.7667 ;
    #        2: 2/7.5 + 2/2.2 = 1.1758 (x sqrt 2) = 1.6628 ; 0.5: 0.5/7.5 + 0.5/1.5 = 0.4 (x sqrt 3) = 0.6928
    assert score[0].tolist() == pytest.approx([1.50894, 0.76667, 1.66283, 0.69282], rel=1e-4)
    w, mask = ria_prune(W, norm_sq, 0.5)  # 2 of 4 per row
    want = score.argsort(dim=1, descending=True)[:, :2]
    expect = torch.zeros_like(mask)
    expect.scatter_(1, want, True)
    assert_bitexact(mask, expect, "RIA mask")
    assert_bitexact(w, W * mask, "RIA weights")
    # alpha = 0: activations ignored; relative importance alone
    _, m0 = ria_prune(W, norm_sq, 0.5, alpha=0)
    s0 = _hand_score(W, norm_sq, 0)
    assert_bitexact(m0, torch.zeros_like(m0).scatter_(1, s0.argsort(1, descending=True)[:, :2], True), "alpha 0")


@pytest.mark.parametrize("spec", [0.5, 0.7, "2:4", "4:8"])
def test_exact_sparsity_per_row_and_group(spec):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 64, generator=g)
    norm_sq = torch.rand(64, generator=g) * 10
    w, mask = ria_prune(W, norm_sq, spec)
    if isinstance(spec, str):
        n, m = map(int, spec.split(":"))
        assert (mask.reshape(24, -1, m).sum(-1) == n).all()
    else:
        assert (mask.sum(1) == 64 - round(64 * spec)).all()
    assert torch.equal(w, W * mask)


def test_zero_rows_and_columns_do_not_make_nan():
    W = torch.randn(8, 16)
    W[2] = 0.0
    W[:, 5] = 0.0
    w, mask = ria_prune(W, torch.ones(16), 0.5)
    assert torch.isfinite(w).all() and (mask.sum(1) == 8).all()


def test_ria_beats_magnitude_on_correlated_inputs():
    X = correlated_inputs(2048, 128, rank=16, seed=4)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) / 128 ** 0.5
    Y = X @ W.T
    norm_sq = (X * X).sum(0)

    def err(Wp):
        return ((X @ Wp.T - Y).norm() / Y.norm()).item()

    for spec in (0.5, "2:4"):
        e_ria, e_mag = err(ria_prune(W, norm_sq, spec)[0]), err(magnitude_prune(W, spec)[0])
        e_wanda = err(wanda_prune(W, norm_sq, spec)[0])
        assert e_ria < e_mag, (spec, e_ria, e_mag)
        assert e_ria < 1.5 * e_wanda  # in Wanda's league (the paper: slightly better on LLMs)


@pytest.mark.parametrize("args,err,msg", [
    (dict(alpha=-1), ValueError, "alpha: expected a finite number >= 0"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=True), ValueError, "alpha"),
    (dict(act_norm_sq=torch.ones(3)), ValueError, "act_norm_sq: has 3 entries"),
    (dict(act_norm_sq=-torch.ones(16)), ValueError, "must be >= 0"),
    (dict(sparsity="2:3"), ValueError, "multiple of M=3"),
])
def test_bad_inputs(args, err, msg):
    kw = dict(W=torch.randn(4, 16), act_norm_sq=torch.ones(16), sparsity=0.5)
    kw.update(args)
    with pytest.raises(err, match=msg):
        ria_prune(kw.pop("W"), kw.pop("act_norm_sq"), **kw)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(2)])


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 32, generator=g) for _ in range(3)]


def test_prune_model_with_ria_and_alpha():
    model = _model()
    rep = sk.prune(model, method="ria", sparsity="2:4", calibration=_calib(), blocks=list(model), progress=False,
                   alpha=0.25)
    assert rep.method == "ria" and rep.overall_sparsity == pytest.approx(0.5)
    assert all(r.output_error is not None and 0 < r.output_error < 1 for r in rep.layers)
    # the first layer saw the calibration itself: its mask is ria_prune's on those norms with alpha 0.25
    ref = _model()
    norm_sq = sum((x.double() ** 2).sum(0) for x in _calib())
    _, want = ria_prune(ref[0][0].weight.detach(), norm_sq, "2:4", alpha=0.25)
    assert_bitexact(model[0][0].weight != 0, want, "first layer's mask")


def test_prune_model_option_errors():
    model = _model()
    with pytest.raises(TypeError, match=r"method 'wanda' takes no options \['alpha'\]"):
        sk.prune(model, method="wanda", sparsity=0.5, calibration=_calib(), blocks=list(model), alpha=0.5)
    with pytest.raises(ValueError, match="alpha: expected a finite number >= 0"):
        sk.prune(model, method="ria", sparsity=0.5, calibration=_calib(), blocks=list(model), alpha=-2)
    with pytest.raises(TypeError, match=r"takes no options \['beta'\] \(it takes alpha\)"):
        sk.prune(model, method="ria", sparsity=0.5, calibration=_calib(), blocks=list(model), beta=1)
    assert all((p != 0).all() for p in model.parameters() if p.dim() == 2)  # nothing pruned
