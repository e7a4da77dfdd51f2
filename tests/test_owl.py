"""OWL (outlier-weighted layerwise sparsity): the outlier ratio and sparsity formulas by hand,
the pre-pass on the dense model, prune(owl=...) end to end, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparse_kernels as sk
from sparse_kernels.pruning import owl as O


def test_outlier_ratio_by_hand():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 25.0]])  # mean 4: 25 > 5 * 4 is the outlier
    b = torch.ones(3, 4)
    assert O.outlier_ratio([a], 5.0) == 1 / 8
    assert O.outlier_ratio([a, b], 5.0) == 1 / 20  # the mean over both is 44 / 20 = 2.2: 25 > 11
    assert O.outlier_ratio([a, b], 12.0) == 0.0  # 25 < 26.4
    assert O.outlier_ratio([a, b], 0.4) == 1.0  # every score > 0.88
    # a callable is called twice (two passes: the mean, then the count)
    calls = []

    def gen():
        calls.append(1)
        yield a

    assert O.outlier_ratio(gen, 5.0) == 1 / 8 and len(calls) == 2
    assert O.outlier_ratio([torch.empty(0)], 5.0) == 0.0


def test_owl_sparsities_by_hand():
    got = O.owl_sparsities([1.0, 2.0, 3.0, 4.0], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.58 - 0.16 / 3, 0.42 + 0.16 / 3, 0.42])
    assert sum(got) / 4 == pytest.approx(0.5)
    assert max(got) - min(got) == pytest.approx(0.16)
    assert O.owl_sparsities([0.3, 0.3, 0.3], 0.7, 0.08) == pytest.approx([0.7] * 3)  # equal ratios: uniform
    assert O.owl_sparsities([0.1, 0.2], 0.6, 0.0) == pytest.approx([0.6, 0.6])
    with pytest.raises(ValueError, match="block 0 would get sparsity 1.0"):
        O.owl_sparsities([0.0, 1.0], 0.95, 0.1)


@pytest.mark.parametrize("owl,err,msg", [
    ({"m": 0}, ValueError, "owl: m must be > 0"),
    ({"lmbda": 0.5}, ValueError, r"owl: lmbda must be in \[0, 0.5\)"),
    ({"lmbda": -0.1}, ValueError, "owl: lmbda"),
    ({"M": 5}, ValueError, r"owl: unknown options \[.M.\]; it takes lmbda, m"),
    ({"m": "5"}, TypeError, "owl: m must be a finite number"),
    ({"m": float("nan")}, TypeError, "finite"),
    ("yes", TypeError, "owl: expected True, False or a dict of options"),
])
def test_parse_owl_errors(owl, err, msg):
    with pytest.raises(err, match=msg):
        O.parse_owl(owl)


def test_parse_owl_defaults():
    assert O.parse_owl(None) is None and O.parse_owl(False) is None
    assert O.parse_owl(True) == {"m": 5.0, "lmbda": 0.08}
    assert O.parse_owl({"lmbda": 0.1}) == {"m": 5.0, "lmbda": 0.1}


def _model(blocks=4, width=64, outlier_block=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                            for _ in range(blocks)])
    with torch.no_grad():
        model[outlier_block][0].weight[:, :3] *= 40.0  # a few huge weights on some inputs: outliers
    return model


def _calib(width=64, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, width, generator=g) for _ in range(n)]


@torch.no_grad()
def _hand_ratios(model, calib, m):
    """OWL's pre-pass written out: dense activations block to block, Wanda scores per block."""
    ratios, xs = [], list(calib)
    for block in model:
        scores, ins = [], {}
        hooks = [lin.register_forward_pre_hook(lambda mod, a, k=i: ins.setdefault(k, []).append(a[0]))
                 for i, lin in ((0, block[0]), (2, block[2]))]
        xs = [block(x) for x in xs]
        for h in hooks:
            h.remove()
        for i in (0, 2):
            norm_sq = sum((x.double() ** 2).sum(0) for x in ins[i])
            scores.append(block[i].weight.double().abs() * norm_sq.sqrt())
        ratios.append(O.outlier_ratio(scores, m))
    return ratios


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_with_owl(method):
    model, calib = _model(), _calib()
    want_ratios = _hand_ratios(_model(), calib, 5.0)
    rep = sk.prune(model, method=method, sparsity=0.6, calibration=calib, blocks=list(model), progress=False,
                   owl=True)
    assert rep.owl["m"] == 5.0 and rep.owl["lmbda"] == 0.08
    assert rep.owl["outlier_ratio"] == pytest.approx(want_ratios, rel=1e-6)
    targets = rep.owl["block_sparsity"]
    assert targets == pytest.approx(O.owl_sparsities(want_ratios, 0.6, 0.08))
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert targets[2] == min(targets) and targets[2] < 0.6  # the block with outliers keeps more weights
    for r in rep.layers:  # each layer pruned at its block's target (per row: round(64 * s) of 64)
        assert r.sparsity == pytest.approx(round(64 * targets[r.block]) / 64, abs=1 / 64 + 1e-9)
    assert "OWL (m=5, lmbda=0.08) block sparsity" in str(rep)
    assert rep.sparsity == "0.6 (OWL)"


def test_owl_lowers_the_error_of_the_outlier_block():
    """Where the outliers are, OWL prunes less, so that block's output error drops."""
    uniform = sk.prune(m := _model(), method="wanda", sparsity=0.7, calibration=_calib(), blocks=list(m),
                       progress=False)
    owl = sk.prune(m := _model(), method="wanda", sparsity=0.7, calibration=_calib(), blocks=list(m),
                   progress=False, owl={"lmbda": 0.1})
    err_u = [r.output_error for r in uniform.layers if r.block == 2]
    err_o = [r.output_error for r in owl.layers if r.block == 2]
    assert all(o < u for o, u in zip(err_o, err_u))


def test_owl_with_convert_stores_masked_layers():
    model = _model()
    rep = sk.prune(model, method="wanda", sparsity=0.5, calibration=_calib(), blocks=list(model), progress=False,
                   owl=True, convert=True)
    x = torch.randn(3, 64)
    from sparse_kernels.nn import SparseLinear

    assert all(isinstance(b[0], SparseLinear) and isinstance(b[2], SparseLinear) for b in model)
    assert torch.isfinite(model(x)).all() and rep.owl is not None


@pytest.mark.parametrize("kwargs,msg", [
    (dict(sparsity="2:4", owl=True), "owl: needs an unstructured sparsity"),
    (dict(sparsity=0.5, owl=True, method="magnitude", calibration=None), "owl: needs calibration data"),
    (dict(sparsity=0.5, owl=True, method="magnitude", scope="global"), "owl: cannot be combined with scope='global'"),
    (dict(sparsity=0.5, owl={"lmbda": 0.7}), "owl: lmbda"),
    (dict(sparsity=0.9, owl={"lmbda": 0.3}), "would get sparsity"),
])
def test_prune_owl_errors(kwargs, msg):
    model = _model()
    args = dict(method="wanda", calibration=_calib(), blocks=list(model), progress=False)
    args.update(kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=msg):
        sk.prune(model, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing pruned
