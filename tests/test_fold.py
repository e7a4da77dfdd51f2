"""Folding a permuted 2:4 layer's input permutation into the layers that produce its input:
the model computes the same thing (bit for bit on CPU), the consumer no longer gathers, every
producer kind is handled, and what cannot be folded is left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_bitexact
from sparse_kernels.nn import SparseLinear
from sparse_kernels.pruning.fold import fold_permutations

transformers = pytest.importorskip("transformers")

import sparse_kernels as sk  # noqa: E402
from sparse_kernels.llm.checkpoint import as_linear  # noqa: E402
from test_llm import _tiny_gpt2, _tiny_llama  # noqa: E402


_llama, _gpt2 = _tiny_llama, _tiny_gpt2  # test_llm's tiny local models (vocab 96, hidden 64, 2 blocks)


def _ids(seed=0):
    return torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(seed))


def _logits(m):
    with torch.no_grad():
        return m(input_ids=_ids(), use_cache=False).logits


def test_prune_with_permute_and_convert_folds_the_mlp():
    calib = [_ids(s) for s in range(3)]
    folded, gathered = _llama(), _llama()
    rep = sk.prune(folded, method="wanda", sparsity="2:4", calibration=calib, progress=False, permute={"rounds": 5},
                   convert=True)
    sk.prune(gathered, method="wanda", sparsity="2:4", calibration=calib, progress=False,
             permute={"rounds": 5, "fold": False}, convert=True)
    assert rep.folded_permutations == ["0.mlp.down_proj", "1.mlp.down_proj"]
    for layer in folded.model.layers:
        assert layer.mlp.down_proj.in_perm is None  # no gather left
        assert layer.mlp.gate_proj.in_perm is not None and layer.self_attn.q_proj.in_perm is not None
    for layer in gathered.model.layers:
        assert layer.mlp.down_proj.in_perm is not None
    assert_bitexact(_logits(folded), _logits(gathered), "folded vs gathered logits")


def _permute_consumer(parent, name, seed):
    lin = as_linear(getattr(parent, name))
    perm = torch.randperm(lin.in_features, generator=torch.Generator().manual_seed(seed))
    setattr(parent, name, SparseLinear.from_dense(lin, pattern="2:4", in_perm=perm))


def test_fold_with_dense_and_conv1d_producers():
    m = _gpt2()
    for i, blk in enumerate(m.transformer.h):
        with torch.no_grad():
            blk.mlp.c_fc.bias.normal_()  # Hugging Face initializes biases to zero
        _permute_consumer(blk.mlp, "c_proj", i)  # c_fc stays a Hugging Face Conv1D
    before = _logits(m)
    assert fold_permutations(m) == ["0.mlp.c_proj", "1.mlp.c_proj"]
    assert all(blk.mlp.c_proj.in_perm is None for blk in m.transformer.h)
    torch.testing.assert_close(_logits(m), before, rtol=1e-5, atol=1e-5)
    assert fold_permutations(m) == []  # nothing left to fold

    ll = _llama()
    mlp = ll.model.layers[0].mlp
    mlp.up_proj.register_buffer("weight_mask", (torch.rand_like(mlp.up_proj.weight) > 0.5).float())
    mask_rows = mlp.up_proj.weight_mask.clone()
    _permute_consumer(mlp, "down_proj", 7)
    perm = mlp.down_proj.in_perm.clone()
    before = _logits(ll)
    assert fold_permutations(ll) == ["0.mlp.down_proj"]
    torch.testing.assert_close(_logits(ll), before, rtol=1e-5, atol=1e-5)
    assert_bitexact(mlp.up_proj.weight_mask, mask_rows[perm], "the mask moved with its rows")


@pytest.mark.parametrize("kind", ["2:4", None, "bitmask"])
def test_fold_with_sparse_producers(kind):
    ll = _llama()
    mlp = ll.model.layers[1].mlp
    for name in ("gate_proj", "up_proj"):
        w = getattr(mlp, name)
        mask = None if kind == "2:4" else torch.rand_like(w.weight) > 0.3
        setattr(mlp, name, SparseLinear.from_dense(w, pattern=kind, mask=mask))
    _permute_consumer(mlp, "down_proj", 3)
    before = _logits(ll)
    got = fold_permutations(ll)
    if kind == "bitmask":  # its rows are not a fixed stride: left alone, still gathering
        assert got == [] and mlp.down_proj.in_perm is not None
    else:
        assert got == ["1.mlp.down_proj"] and mlp.down_proj.in_perm is None
    torch.testing.assert_close(_logits(ll), before, rtol=1e-5, atol=1e-5)


def test_fold_int4_layers():
    """SparseLinearInt4 producers (rows of codes, meta and scales) and consumer: bit-equal
    logits, and prune(int4=..., permute=...) folds its down projections."""
    ll = _llama()
    mlp = ll.model.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, sk.SparseLinearInt4.from_dense(getattr(mlp, name), 16))
    lin = mlp.down_proj
    perm = torch.randperm(lin.in_features, generator=torch.Generator().manual_seed(5))
    mlp.down_proj = sk.SparseLinearInt4.from_dense(lin, 16, in_perm=perm)
    before = _logits(ll)
    assert fold_permutations(ll) == ["0.mlp.down_proj"] and mlp.down_proj.in_perm is None
    assert_bitexact(_logits(ll), before, "folded int4 MLP")
    with pytest.raises(ValueError, match="drop_permutation: this layer has no input permutation"):
        mlp.down_proj.drop_permutation()

    calib = [_ids(s) for s in range(3)]
    folded, gathered = _llama(), _llama()
    rep = sk.prune(folded, method="sparsegpt", sparsity="2:4", calibration=calib, progress=False,
                   permute={"rounds": 3}, convert=True, int4=16)
    sk.prune(gathered, method="sparsegpt", sparsity="2:4", calibration=calib, progress=False,
             permute={"rounds": 3, "fold": False}, convert=True, int4=16)
    assert rep.folded_permutations == ["0.mlp.down_proj", "1.mlp.down_proj"]
    assert all(isinstance(layer.mlp.down_proj, sk.SparseLinearInt4) and layer.mlp.down_proj.in_perm is None
               for layer in folded.model.layers)
    assert_bitexact(_logits(folded), _logits(gathered), "folded vs gathered int4 logits")


def test_drop_permutation_needs_one():
    lin = nn.Linear(16, 8)
    sl = SparseLinear.from_dense(lin, pattern="2:4")
    with pytest.raises(ValueError, match="drop_permutation: this layer has no input permutation"):
        sl.drop_permutation()
    p = torch.randperm(16)
    sl = SparseLinear.from_dense(lin, pattern="2:4", in_perm=p)
    x = torch.randn(3, 16)
    y = sl(x)
    sl.drop_permutation()
    assert sl.in_perm is None and "in_perm" not in sl.state_dict()
    assert_bitexact(sl(x[:, p]), y, "same output once the input comes permuted")


def test_fold_option_errors():
    with pytest.raises(ValueError, match="fold must be True or False"):
        sk.prune(_llama(), method="magnitude", sparsity="2:4", progress=False, permute={"fold": 1})


class _OptBlock(nn.Module):  # OPT's layout: fc1 -> activation -> fc2 on the block itself
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 48), nn.Linear(48, 32)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(h)))


def test_fold_with_biased_linear_producers_on_given_blocks():
    torch.manual_seed(2)
    blocks = [_OptBlock(), _OptBlock()]
    for i, b in enumerate(blocks):
        _permute_consumer(b, "fc2", i)
    x = torch.randn(5, 32)
    before = blocks[1](blocks[0](x))
    assert fold_permutations(blocks) == ["0.fc2", "1.fc2"]
    torch.testing.assert_close(blocks[1](blocks[0](x)), before, rtol=1e-5, atol=1e-5)


def test_fold_leaves_layers_it_cannot_permute_safely():
    import torch.nn.utils.parametrize as P
    import torch.nn.utils.prune as tprune

    class _Scale(nn.Module):
        def forward(self, w):
            return w * 1.5

    class _MyLinear(nn.Linear):
        pass

    def setups():
        yield "parametrized", lambda mlp: P.register_parametrization(mlp.up_proj, "weight", _Scale())
        yield "torch prune", lambda mlp: tprune.l1_unstructured(mlp.up_proj, "weight", amount=0.3)
        yield "hook", lambda mlp: mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)

        def subclass(mlp):
            old = mlp.up_proj
            new = _MyLinear(old.in_features, old.out_features, bias=False)
            new.load_state_dict(old.state_dict())
            mlp.up_proj = new
        yield "subclass", subclass

        def extra(mlp):  # a second up-projection under another name (Jais-like)
            mlp.up2_proj = nn.Linear(64, 128, bias=False)
        yield "extra producer", extra

    for what, setup in setups():
        ll = _llama()
        mlp = ll.model.layers[0].mlp
        setup(mlp)
        _permute_consumer(mlp, "down_proj", 4)
        before = _logits(ll)
        assert fold_permutations(ll) == [], what
        assert mlp.down_proj.in_perm is not None, what
        assert_bitexact(_logits(ll), before, what)


def test_loading_an_int32_permutation_keeps_int64():
    lin = nn.Linear(32, 8)
    sl = SparseLinear.from_dense(lin, pattern="2:4", in_perm=torch.randperm(32))
    sd = {k: (v.int() if k == "in_perm" else v) for k, v in sl.state_dict().items()}
    other = SparseLinear(32, 8, permuted=True)
    other.load_state_dict(sd, assign=True)
    assert other.in_perm.dtype == torch.int64
    x = torch.randn(2, 32)
    assert_bitexact(other(x), sl(x), "same layer")
