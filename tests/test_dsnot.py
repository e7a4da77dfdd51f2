"""DSnoT mask refinement: the vectorized dsnot_refine against a plain per-row loop written from the
paper's description, its invariants (sparsity, N:M groups, the error's sign and size), a worked
example by hand, and prune(dsnot=...) end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparse_kernels as sk
from sparse_kernels.pruning import ActivationMomentsAccumulator, dsnot_refine, parse_sparsity
from sparse_kernels.pruning.criteria import wanda_prune, wanda_scores
from sparse_kernels.pruning.dsnot import parse_dsnot


def _loop_dsnot(W, mask, mean, var, imp, spec, max_cycles, threshold, var_power):
    """One row at a time, one swap at a time: the algorithm in the module docstring, no tensors tricks."""
    W, mean, var, imp = W.double().tolist(), mean.double().tolist(), var.double().tolist(), imp.double().tolist()
    mask = mask.clone()
    rows, cols = len(W), len(W[0])
    for i in range(rows):
        keep = [bool(k) for k in mask[i]]
        D = [W[i][j] * mean[j] for j in range(cols)]
        R = [D[j] / max(var[j], 1e-12) ** var_power for j in range(cols)]
        e = sum(D[j] for j in range(cols) if not keep[j])
        s0 = (e > 0) - (e < 0)
        grow_pos = sorted((j for j in range(cols) if not keep[j] and D[j] > 0), key=lambda j: -R[j])
        grow_neg = sorted((j for j in range(cols) if not keep[j] and D[j] < 0), key=lambda j: R[j])
        drop_neg = sorted((j for j in range(cols) if keep[j] and D[j] < 0), key=lambda j: imp[i][j])
        drop_pos = sorted((j for j in range(cols) if keep[j] and D[j] > 0), key=lambda j: imp[i][j])
        locked = [not k for k in keep]  # N:M: initially pruned or already swapped: never dropped
        for _ in range(max_cycles):
            if abs(e) <= threshold:
                break
            grow = grow_pos if e > 0 else grow_neg
            if not grow:
                break
            g = grow.pop(0)
            if spec.is_nm:
                start = g - g % spec.m
                cand = [j for j in range(start, start + spec.m) if keep[j] and not locked[j]]
                if not cand:  # nothing left to drop in that group: pass the grown weight over
                    continue
                p = min(cand, key=lambda j: (imp[i][j], j))
            else:
                drop = drop_neg if e > 0 else drop_pos
                if not drop:
                    break
                p = drop.pop(0)
            after = e - D[g] + D[p]
            if ((after > 0) - (after < 0)) != s0 or (spec.is_nm and abs(after) >= abs(e)):
                break
            keep[g], keep[p] = True, False
            if spec.is_nm:
                locked[g] = locked[p] = True
            e = after
        mask[i] = torch.tensor(keep)
    return mask


def _data(rows=24, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) * (0.5 + torch.rand(cols, generator=g)) + \
        torch.randn(cols, generator=g) * 0.7
    W = torch.randn(rows, cols, generator=g)
    return X, W


@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4", "4:8", "1:4", "1:8"])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_dsnot_matches_the_per_row_loop(sparsity, threshold):
    X, W = _data(seed={0.5: 1, 0.7: 2, "2:4": 3, "4:8": 4, "1:4": 5, "1:8": 6}[sparsity])
    ns = (X.double() ** 2).sum(0)
    spec = parse_sparsity(sparsity)
    _, mask = wanda_prune(W, ns.float(), sparsity)
    imp = wanda_scores(W, ns)
    mean, var = X.double().mean(0), X.double().var(0, unbiased=False)
    before = mask.clone()
    got = dsnot_refine(W, mask, mean, var, imp, spec, max_cycles=30, threshold=threshold, var_power=1.0)
    want = _loop_dsnot(W, mask, mean, var, imp, spec, 30, threshold, 1.0)
    assert torch.equal(got, want), f"{int((got != want).sum())} mask entries differ from the loop"
    assert int((got != mask).sum()) > 0, "no swap at all: the test would not see a wrong choice"
    assert torch.equal(got.sum(1), mask.sum(1)), "a row's number of kept weights changed"
    if spec.is_nm:
        assert bool((got.view(W.shape[0], -1, spec.m).sum(-1) == spec.n).all()), "an N:M group lost its N"
    # every row's expected error moved toward 0 without crossing it
    D = W.double() * mean
    e0 = torch.where(mask, 0.0, D).sum(1)
    e1 = torch.where(got, 0.0, D).sum(1)
    assert bool((e1.abs() <= e0.abs() + 1e-9).all()) and bool((torch.sign(e1) * torch.sign(e0) >= 0).all())
    assert torch.equal(mask, before), "the input mask was modified"
    assert torch.equal(dsnot_refine(W, mask, mean, var, imp, spec, max_cycles=0), mask)


def test_dsnot_worked_example():
    # one row; columns 0 and 3 pruned; mean 1, var 1: e = 1 + 0.5 = 1.5 > 0
    W = torch.tensor([[1.0, -0.2, 3.0, 0.5]])
    mask = torch.tensor([[False, True, True, False]])
    one = torch.ones(4)
    # cycle 1: grow column 0 (largest positive), drop column 1 (the kept negative): e = 1.5 - 1 - 0.2 = 0.3
    # cycle 2: grow column 3, but no kept negative is left to drop: stop
    got = dsnot_refine(W, mask, one, one, W.abs(), None)
    assert got.tolist() == [[True, False, True, False]]
    # with -2 in column 1 the swap would flip the error's sign (1.5 - 1 - 2 < 0): nothing changes
    W2 = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    assert torch.equal(dsnot_refine(W2, mask, one, one, W2.abs(), None), mask)
    # below the threshold nothing changes either
    assert torch.equal(dsnot_refine(W, mask, one, one, W.abs(), None, threshold=2.0), mask)


def test_dsnot_nm_passes_over_an_exhausted_group():
    # 1:4, mean = var = 1; kept: columns 3 and 7; e = 3 + 2 + .01 + 1.5 + .01 + .01 = 6.53
    W = torch.tensor([[3.0, 2.0, 0.01, -0.5, 1.5, 0.01, 0.01, -0.5]])
    mask = torch.tensor([[False, False, False, True, False, False, False, True]])
    one = torch.ones(8)
    got = dsnot_refine(W, mask, one, one, W.abs(), "1:4", threshold=0.0)
    # grow 0 / drop 3 (e 3.03); grow 1: group 0 has nothing left, passed over; grow 4 / drop 7 (e 1.03)
    assert got.tolist() == [[True, False, False, False, True, False, False, False]]


def test_dsnot_large_layer_memory_is_bounded():

    rows, cols = 1024, 4096
    g = torch.Generator().manual_seed(0)
    W, mean, var = torch.randn(rows, cols, generator=g), torch.randn(cols, generator=g), torch.rand(cols, generator=g)
    _, mask = wanda_prune(W, torch.ones(cols), 0.5)
    sizes = []
    real_sort = torch.sort

    def spy(t, *a, **kw):
        sizes.append(t.numel())
        return real_sort(t, *a, **kw)

    torch.sort = spy
    try:
        dsnot_refine(W, mask, mean, var, W.abs(), None, threshold=0.0)
    finally:
        torch.sort = real_sort
    assert sizes and max(sizes) <= 1 << 21, f"a sort over {max(sizes)} elements: rows are not ranked in chunks"


def test_dsnot_inputs_and_options_are_checked():
    W, mask = torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask: expected a bool tensor of shape"):
        dsnot_refine(W, mask.float(), torch.zeros(8), torch.ones(8), W.abs())
    with pytest.raises(ValueError, match="mean: expected a 1-D tensor of 8 entries"):
        dsnot_refine(W, mask, torch.zeros(7), torch.ones(8), W.abs())
    with pytest.raises(ValueError, match="importance: expected shape"):
        dsnot_refine(W, mask, torch.zeros(8), torch.ones(8), W.abs().t())
    z, o = torch.zeros(8), torch.ones(8)
    with pytest.raises(ValueError, match="mean: has NaN or inf"):
        dsnot_refine(W, mask, torch.full((8,), float("nan")), o, W.abs())
    with pytest.raises(ValueError, match="var: has negative entries"):
        dsnot_refine(W, mask, z, -o, W.abs())
    with pytest.raises(ValueError, match="sparsity: '2:4' needs a multiple of 4 columns, W has 6"):
        dsnot_refine(W[:, :6], mask[:, :6], z[:6], o[:6], W[:, :6].abs(), "2:4")
    with pytest.raises(ValueError, match="max_cycles: expected an int >= 0, got 5.0"):
        dsnot_refine(W, mask, z, o, W.abs(), max_cycles=5.0)
    with pytest.raises(ValueError, match="threshold: expected a finite number >= 0, got -1"):
        dsnot_refine(W, mask, z, o, W.abs(), threshold=-1)
    with pytest.raises(ValueError, match="W: has NaN or inf"):
        dsnot_refine(W.masked_fill(mask, float("inf")), mask, z, o, W.abs())
    assert parse_dsnot(True) == {"max_cycles": 50, "threshold": 0.1 / 2048, "var_power": 1.0}
    assert parse_dsnot(False) is None and parse_dsnot({"threshold": 0})["threshold"] == 0
    with pytest.raises(ValueError, match="dsnot: unknown options \\['cycles'\\]"):
        parse_dsnot({"cycles": 3})
    with pytest.raises(ValueError, match="max_cycles must be an int >= 0"):
        parse_dsnot({"max_cycles": -1})
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        parse_dsnot({"threshold": float("nan")})
    with pytest.raises(ValueError, match="not a valid regex"):
        parse_dsnot({"skip": "("})
    with pytest.raises(TypeError, match="dsnot: expected True, False or a dict"):
        parse_dsnot("yes")


def test_moments_accumulator():
    X = torch.randn(3, 50, 16, dtype=torch.float64) * 2 + 1
    acc = ActivationMomentsAccumulator(16)
    for x in X:
        acc.add(x.float())
    flat = X.reshape(-1, 16)
    torch.testing.assert_close(acc.mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.var, flat.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.norm_sq, (flat.float().double() ** 2).sum(0), rtol=1e-6, atol=1e-4)
    perm = torch.randperm(16)
    torch.testing.assert_close(acc.permuted(perm).mean, acc.mean[perm])


# ------------------------------------------------------------------ prune(dsnot=...)
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, sparsity", [("wanda", 0.5), ("ria", "2:4"), ("magnitude", 0.6)])
def test_prune_with_dsnot(method, sparsity):
    base, refined = _tiny_llama(), _tiny_llama()
    r0 = sk.prune(base, method=method, sparsity=sparsity, calibration=CALIB, progress=False)
    r1 = sk.prune(refined, method=method, sparsity=sparsity, calibration=CALIB, progress=False,
                  dsnot={"threshold": 0.0})
    assert "(DSnoT)" in r1.sparsity and all(r.dsnot_swaps is None for r in r0.layers)
    assert sum(r.dsnot_swaps for r in r1.layers) > 0
    spec = parse_sparsity(sparsity)
    for (n, a), (_, b) in zip(base.named_modules(), refined.named_modules()):
        if isinstance(a, nn.Linear) and n != "lm_head":
            ka, kb = a.weight != 0, b.weight != 0
            assert torch.equal(ka.sum(1), kb.sum(1)), n  # same kept count per row
            if spec.is_nm:
                assert bool((kb.view(kb.shape[0], -1, spec.m).sum(-1) <= spec.n).all()), n
            # kept weights keep their dense values (mask-only): compare with an unpruned copy
    dense = _tiny_llama()
    for (n, a), (_, d) in zip(refined.named_modules(), dense.named_modules()):
        if isinstance(a, nn.Linear) and n != "lm_head":
            k = a.weight != 0
            assert torch.equal(a.weight[k], d.weight[k]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prune_dsnot_defaults_swap(dtype):
    """With the default options (threshold 0.1 / 2048) DSnoT does swap, in fp16 too."""
    m = _tiny_llama().to(dtype)
    rep = sk.prune(m, method="wanda", sparsity=0.5, calibration=CALIB, progress=False, dsnot=True)
    assert sum(r.dsnot_swaps for r in rep.layers) > 100
    assert all(abs(r.sparsity - 0.5) < 1e-6 for r in rep.layers)


def test_prune_dsnot_on_gpt2_conv1d():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg).eval()
    dense = {n: p.detach().clone() for n, p in g.named_parameters()}
    rep = sk.prune(g, method="wanda", sparsity="2:4", calibration=CALIB, progress=False, dsnot=True)
    assert sum(r.dsnot_swaps for r in rep.layers) > 0
    for n, p in g.named_parameters():
        if n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
            w = p.detach().t()  # Conv1D stores [in, out]
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), n
            k = p != 0
            assert torch.equal(p[k], dense[n][k]), n


def test_prune_dsnot_skip_permute_and_convert():
    m = _tiny_llama()
    rep = sk.prune(m, method="wanda", sparsity="2:4", calibration=CALIB, progress=False, permute={"rounds": 5},
                   dsnot={"skip": r"^mlp\.", "threshold": 0.0}, convert=True)
    for r in rep.layers:
        assert (r.dsnot_swaps is None) == r.name.startswith("mlp."), r.name
        assert r.name.startswith("mlp.") or r.dsnot_swaps > 0, r.name
    assert isinstance(m.model.layers[0].self_attn.q_proj, sk.SparseLinear)  # 2:4 after the permutation


def test_prune_dsnot_rejects():
    with pytest.raises(ValueError, match="dsnot: refines the masks .* method 'sparsegpt' updates them"):
        sk.prune(_tiny_llama(), method="sparsegpt", sparsity=0.5, calibration=CALIB, dsnot=True, progress=False)
    with pytest.raises(ValueError, match="dsnot: needs calibration data"):
        sk.prune(_tiny_llama(), method="magnitude", sparsity=0.5, dsnot=True, progress=False)
    with pytest.raises(ValueError, match="unknown options"):
        sk.prune(_tiny_llama(), method="wanda", sparsity=0.5, calibration=CALIB, dsnot={"bogus": 1}, progress=False)
    with pytest.raises(ValueError, match="method 'structured' .* takes none of owl, permute, dsnot"):
        sk.prune(_tiny_llama(), method="structured", sparsity=0.25, dsnot=True, criterion="magnitude")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_dsnot_on_cuda_matches_cpu(sparsity):
    X, W = _data(rows=64, cols=128, seed=7)
    ns = (X.double() ** 2).sum(0)
    spec = parse_sparsity(sparsity)
    _, mask = wanda_prune(W, ns.float(), sparsity)
    imp = wanda_scores(W, ns)
    mean, var = X.double().mean(0), X.double().var(0, unbiased=False)
    cpu = dsnot_refine(W, mask, mean, var, imp, spec, threshold=0.0)
    gpu = dsnot_refine(W.cuda(), mask.cuda(), mean.cuda(), var.cuda(), imp.cuda(), spec, threshold=0.0)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
