"""N:M input-channel permutation: the ``nm_split_scores`` op (cpp against the reference), the
search (a permutation, never worse than the identity, optimal where brute force can tell,
deterministic), and ``prune(permute=...)`` for every method (same function in the original
order, N:M after the permutation, more kept importance than without)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import sparse_kernels as sk
from conftest import assert_bitexact, load_benchmark, requires_cuda, skip_unless_backend
from sparse_kernels.ops.permutation import nm_split_scores
from sparse_kernels.pruning import sparsegpt_prune, wanda_prune
from sparse_kernels.pruning.permutation import (_splits, find_permutation, invert_permutation, nm_kept_score,
                                                parse_permute)
from sparse_kernels.reference.permutation import nm_split_scores as ref_split_scores
from test_sparsegpt import correlated_inputs


def _pairs(C, m, P, g):
    return torch.randperm(C, generator=g)[: P * 2 * m].view(P, 2 * m)


# ------------------------------------------------------------------ the op
@pytest.mark.parametrize("isa", ["best", "scalar"])
@pytest.mark.parametrize("n,m,R", [(2, 4, 37), (2, 4, 700), (1, 4, 19), (3, 4, 5), (4, 8, 23), (4, 8, 300), (2, 8, 3),
                                   (5, 16, 41)])
def test_split_scores_cpp_matches_reference(n, m, R, isa, monkeypatch):
    skip_unless_backend("nm_split_scores", "cpp", "cpu")
    if isa != "best":
        monkeypatch.setenv("SPARSE_KERNELS_CPU_ISA", isa)  # the portable build of the same kernels
    g = torch.Generator().manual_seed(n * 100 + m * 10 + R)
    C, P = 16 * m, 6
    st = torch.rand(C, R, generator=g) * 3
    st[5, : R // 2] = 0.0  # zeros and ties
    st[6] = st[7]
    cols, splits = _pairs(C, m, P, g), _splits(m)
    want = ref_split_scores(st, cols, splits, n)
    got = nm_split_scores(st, cols, splits, n, backend="cpp")
    assert got.dtype == torch.float64 and got.shape == (P, splits.shape[0])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    # integer scores: every partial sum is exact in float32, so the two agree bit for bit
    sti = torch.randint(0, 50, (C, R), generator=g).float()
    assert_bitexact(nm_split_scores(sti, cols, splits, n, backend="cpp"), ref_split_scores(sti, cols, splits, n),
                    "integer scores")


def test_split_scores_by_hand():
    # one pair: group A = columns 0..3, group B = 4..7 of a single row
    st = torch.tensor([[9.0], [8.0], [1.0], [0.0], [7.0], [6.0], [2.0], [3.0]])
    cols = torch.arange(8).view(1, 8)
    splits = _splits(4)
    assert splits.shape == (35, 8) and torch.equal(splits[0], torch.arange(8))
    assert all(sorted(r) == list(range(8)) for r in splits.tolist())
    assert len({frozenset(r[:4]) for r in splits.tolist()}) == 35  # every split once
    got = nm_split_scores(st, cols, splits, 2)
    assert got[0, 0].item() == 9 + 8 + 7 + 6  # identity: {9,8,1,0} + {7,6,2,3}
    assert got.max().item() == 9 + 7 + 8 + 6  # the best split pairs one large value with another
    assert_bitexact(got, ref_split_scores(st, cols, splits, 2), "hand case vs reference")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_split_scores_bad_inputs(backend):
    skip_unless_backend("nm_split_scores", backend, "cpu")
    st = torch.rand(16, 5)
    cols = torch.arange(16).view(2, 8)
    sp = _splits(4)
    cases = [
        ((st.double(), cols, sp, 2), TypeError, "scores_t"),
        ((st, cols.int(), sp, 2), TypeError, "cols"),
        ((st, cols + 1, sp, 2), ValueError, r"column ids must lie in \[0, 16\)"),
        ((st, cols - 1, sp, 2), ValueError, "column ids"),
        ((st, cols, sp[:, :6], 2), ValueError, "splits: shape"),
        ((st, cols, torch.zeros(2, 8, dtype=torch.long), 2), ValueError, "permutation"),
        ((st, cols, sp, 4), ValueError, "n: got 4"),
        ((st, cols, sp, 0), ValueError, "n: got 0"),
        ((st, cols.view(4, 4)[:, :3], sp, 1), ValueError, "cols: shape"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            nm_split_scores(*args, backend=backend)


def test_split_scores_cpp_validates_before_reading():
    skip_unless_backend("nm_split_scores", "cpp", "cpu")
    op = torch.ops.sparse_kernels.nm_split_scores_cpp
    st = torch.rand(16, 5)
    with pytest.raises(ValueError, match="column id 99"):
        op(st, torch.full((1, 8), 99, dtype=torch.long), _splits(4), 2)
    with pytest.raises(ValueError, match="not a permutation"):
        op(st, torch.arange(8).view(1, 8), torch.full((1, 8), 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="n: expected"):
        op(st, torch.arange(8).view(1, 8), _splits(4), 7)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_split_scores_opcheck(backend):
    skip_unless_backend("nm_split_scores", backend, "cpu")
    from sparse_kernels.ops import _registry as R

    op = R.get_op("nm_split_scores", backend)
    st = torch.rand(16, 9)
    torch.library.opcheck(op, (st, torch.arange(16).view(2, 8), _splits(4), 2),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ the search
def test_permutation_basics():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(24, 64, generator=g)
    perm = find_permutation(s, rounds=20)
    assert perm.dtype == torch.int64
    assert_bitexact(perm.sort().values, torch.arange(64), "a permutation")
    assert nm_kept_score(s, perm=perm) > nm_kept_score(s)  # random scores: some gain
    inv = invert_permutation(perm)
    assert_bitexact(s[:, perm][:, inv], s, "inverse")
    assert_bitexact(find_permutation(s, rounds=20), perm, "deterministic")
    assert not torch.equal(find_permutation(s, rounds=20, seed=1), perm)


def test_permutation_finds_the_obvious_fix():
    # the four important columns share group 0: the identity keeps two of them per row
    s = torch.full((16, 16), 0.1)
    s[:, :4] = 5.0
    perm = find_permutation(s, rounds=3)
    assert nm_kept_score(s, perm=perm) == pytest.approx(16 * 4 * 5.0 + 16 * 4 * 0.1)
    positions = invert_permutation(perm)[:4]  # where columns 0..3 went
    assert sorted(int(p) // 4 for p in positions) == [0, 1, 2, 3]  # one per group


def _brute_force_best(s, n, m):
    cols = s.shape[1]
    best = -1.0
    for rest in itertools.combinations(range(1, cols), m - 1):  # group holding column 0
        first = (0,) + rest
        others = [c for c in range(cols) if c not in first]
        if len(others) == m:
            best = max(best, nm_kept_score(s, n, m, torch.tensor(first + tuple(others))))
        else:
            for rest2 in itertools.combinations(others[1:], m - 1):
                second = (others[0],) + rest2
                third = tuple(c for c in others if c not in second)
                best = max(best, nm_kept_score(s, n, m, torch.tensor(first + second + third)))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_permutation_is_optimal_on_two_groups_and_close_on_three(seed):
    g = torch.Generator().manual_seed(seed)
    s8 = torch.rand(5, 8, generator=g)
    # two groups: one pair, every split evaluated: the optimum exactly
    assert nm_kept_score(s8, perm=find_permutation(s8, rounds=2)) == pytest.approx(_brute_force_best(s8, 2, 4))
    s12 = torch.rand(5, 12, generator=g)
    best = _brute_force_best(s12, 2, 4)
    got = nm_kept_score(s12, perm=find_permutation(s12, rounds=50))
    assert nm_kept_score(s12) <= got <= best + 1e-9
    assert got >= best - 0.02 * best


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_permutation_never_worse_and_backends_agree(n, m):
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 20, (12, 8 * m), generator=g).float()  # exact sums: decisions identical
    perm = find_permutation(s, n, m, rounds=10, backend="reference")
    assert nm_kept_score(s, n, m, perm) >= nm_kept_score(s, n, m)
    if "cpp" in sk.ops._registry.available("nm_split_scores", "cpu"):
        assert_bitexact(find_permutation(s, n, m, rounds=10, backend="cpp"), perm, "cpp vs reference search")


def test_permutation_of_one_group_and_of_constant_scores():
    assert_bitexact(find_permutation(torch.rand(3, 4)), torch.arange(4), "one group")
    s = torch.ones(4, 16)
    assert nm_kept_score(s, perm=find_permutation(s)) == nm_kept_score(s)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(scores=torch.rand(4, 10)), ValueError, "multiple of m=4"),
    (dict(scores=torch.rand(4, 8, 2)), ValueError, "scores"),
    (dict(scores=torch.tensor([[float("nan")] * 4])), ValueError, "finite"),
    (dict(scores=torch.ones(2, 8, dtype=torch.int64)), TypeError, "scores"),
    (dict(n=4), ValueError, "0 < n < m"),
    (dict(n=2.0), TypeError, "n: expected an int"),
    (dict(rounds=-1), ValueError, "rounds"),
])
def test_permutation_bad_inputs(kw, err, msg):
    args = dict(scores=torch.rand(4, 8), n=2, m=4)
    args.update(kw)
    with pytest.raises(err, match=msg):
        find_permutation(args.pop("scores"), args.pop("n"), args.pop("m"), **args)


def test_parse_permute():
    assert parse_permute(False) is None and parse_permute(None) is None and parse_permute(True) == {}
    assert parse_permute({"rounds": 5, "seed": 2}) == {"rounds": 5, "seed": 2}
    with pytest.raises(TypeError, match="permute: expected True, False or a dict"):
        parse_permute("yes")
    with pytest.raises(ValueError, match=r"unknown options \['iters'\]"):
        parse_permute({"iters": 3})
    with pytest.raises(ValueError, match="rounds must be an int >= 0"):
        parse_permute({"rounds": -2})
    with pytest.raises(ValueError, match="max_seconds"):
        parse_permute({"max_seconds": 0})


# ------------------------------------------------------------------ prune(permute=...)
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(2)])


def _calib():
    x = correlated_inputs(96, 32, rank=6, seed=2)
    x[:, 3] *= 8.0  # an outlier feature, as in LLM activations
    x[:, 5] *= 6.0
    return list(x.view(4, 24, 32))


def _kept_importance(score, w):
    return float((score.double() * (w != 0).double()).sum())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
def test_prune_with_permutation_every_method(method):
    calib = None if method == "magnitude" else _calib()
    plain, perm_model = _model(), _model()
    dense = _model()
    rep0 = sk.prune(plain, method=method, sparsity="2:4", calibration=calib, blocks=list(plain), progress=False)
    rep = sk.prune(perm_model, method=method, sparsity="2:4", calibration=calib, blocks=list(perm_model),
                   progress=False, permute={"rounds": 20})
    assert rep.sparsity == "2:4 (permuted)" and rep.overall_sparsity == pytest.approx(0.5)
    assert all(r.permutation_gain is not None and r.permutation_gain >= 0 for r in rep.layers)
    assert any(r.permutation_gain > 0.005 for r in rep.layers)
    assert all(r.permutation_gain is None for r in rep0.layers)
    assert "channel permutation: kept importance +" in str(rep)
    # every row keeps half its weights, but (in general) not 2 of every 4 in the original order
    w = perm_model[0][0].weight
    assert ((w != 0).sum(1) == 16).all()
    assert not ((w != 0).view(64, 8, 4).sum(-1) == 2).all()
    if method in ("magnitude", "wanda"):
        # the first layer saw the calibration itself: the permuted selection keeps more importance
        w0 = dense[0][0].weight.detach()
        if method == "magnitude":
            score = w0.abs()
        else:
            score = w0.abs() * sum((x.double() ** 2).sum(0) for x in calib).sqrt().float()
        assert _kept_importance(score, perm_model[0][0].weight) > _kept_importance(score, plain[0][0].weight)


def test_prune_with_permutation_sparsegpt_is_sparsegpt_on_the_permuted_layer():
    from sparse_kernels.pruning import HessianAccumulator
    from sparse_kernels.pruning.criteria import wanda_scores

    model = _model()
    calib = _calib()
    sk.prune(model, method="sparsegpt", sparsity="2:4", calibration=calib, blocks=list(model), progress=False,
             permute={"rounds": 15})
    # the first layer, by hand: its Hessian, the permutation of its Wanda-style score, SparseGPT
    w0 = _model()[0][0].weight.detach()
    acc = HessianAccumulator(32)
    for x in calib:
        acc.add(x)
    perm = find_permutation(wanda_scores(w0, torch.diagonal(acc.H)), 2, 4, rounds=15)
    wp, mask, _ = sparsegpt_prune(w0[:, perm], acc.permuted(perm).H, "2:4")
    assert (mask.view(64, 8, 4).sum(-1) == 2).all()
    torch.testing.assert_close(model[0][0].weight.detach(), wp[:, invert_permutation(perm)], rtol=0, atol=0)


def test_prune_with_permutation_reduces_wanda_output_error():
    X = correlated_inputs(1024, 128, rank=16, seed=4)
    X[:, ::17] *= 10.0  # outlier features
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(5)) / 128 ** 0.5
    norm_sq = (X.double() ** 2).sum(0)
    Y = X @ W.T
    perm = find_permutation(W.abs() * norm_sq.sqrt().float(), rounds=40)
    w_perm = wanda_prune(W[:, perm], norm_sq[perm], "2:4")[0][:, invert_permutation(perm)]
    w_plain = wanda_prune(W, norm_sq, "2:4")[0]

    def err(w):
        return float((X @ w.T - Y).norm() / Y.norm())

    assert err(w_perm) < err(w_plain)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(sparsity=0.5, permute=True), ValueError, "permute: needs an 'N:M' sparsity"),
    (dict(sparsity="2:4", permute="yes"), TypeError, "permute: expected True, False or a dict"),
    (dict(sparsity="2:4", permute={"bogus": 1}), ValueError, "unknown options"),
    (dict(sparsity="2:4", permute=True, method="magnitude", scope="global"), ValueError, "scope='global'"),
])
def test_prune_permute_errors(kw, err, msg):
    model = _model()
    args = dict(method="wanda", calibration=_calib(), blocks=list(model), progress=False)
    args.update(kw)
    with pytest.raises(err, match=msg):
        sk.prune(model, **args)
    assert all((p != 0).all() for p in model.parameters() if p.dim() == 2)  # nothing pruned


def test_prune_with_permutation_and_convert_stores_the_permutation():
    from sparse_kernels.nn import SparseLinear

    calib = _calib()
    plain = _model()
    sk.prune(plain, method="wanda", sparsity="2:4", calibration=calib, blocks=list(plain), progress=False,
             permute={"rounds": 10})
    conv = _model()
    rep = sk.prune(conv, method="wanda", sparsity="2:4", calibration=calib, blocks=list(conv), progress=False,
                   permute={"rounds": 10}, convert=True)
    assert all(r.mask is None for r in rep.layers)  # the masks are dropped after the conversion
    for blk_p, blk_c in zip(plain, conv):
        for i in (0, 2):
            lin, sl = blk_p[i], blk_c[i]
            assert isinstance(sl, SparseLinear) and sl.in_perm is not None
            r = next(r for r in rep.layers if r.block == list(conv).index(blk_c) and r.name == f"{i}")
            assert torch.equal(r.perm, sl.in_perm)  # the report keeps the permutation
            w = lin.weight.detach()
            # the same pruned weight in the original order (pruned entries: -0.0 in W * mask, 0.0 here)
            assert torch.equal(sl.dense_weight(), w)
            s = w[:, sl.in_perm]
            assert ((s != 0).view(s.shape[0], -1, 4).sum(-1) <= 2).all()  # 2:4 after the permutation
    x = torch.randn(5, 32)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)


def test_sparsify_with_permutation():
    from sparse_kernels.nn import SparseLinear, sparsify

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 6))
    ref = nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    rep = sparsify(model, pattern="2:4", permute={"rounds": 10})
    assert rep.layers == ["0", "2", "4"]
    for i in (0, 2, 4):
        sl, w0 = model[i], ref[i].weight.detach()
        assert isinstance(sl, SparseLinear) and sl.in_perm is not None
        w = sl.dense_weight()
        # more |w| kept than the plain 2:4 selection, which keeps the top 2 of each original group
        plain = SparseLinear.from_dense(ref[i], pattern="2:4").dense_weight()
        assert float(w.abs().sum()) >= float(plain.abs().sum())
        assert ((w != 0) <= (w0 != 0)).all() and torch.equal(w[w != 0], w0[w != 0])
    assert float(model[0].dense_weight().abs().sum()) > float(
        SparseLinear.from_dense(ref[0], pattern="2:4").dense_weight().abs().sum())
    with pytest.raises(ValueError, match="permute: only a 2:4 pattern"):
        sparsify(ref, pattern=None, permute=True)


def test_bench_permuted_linear_runs_and_checks(tmp_path):
    import json

    mod = load_benchmark("bench_permuted_linear")
    out = tmp_path / "b.json"
    assert mod.main(["--device", "cpu", "--shapes", "32x64", "--batches", "1,3", "--min-run-time", "0.01",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["layer"] for r in rows} == {"dense", "2:4", "2:4 permuted"} and len(rows) == 6
    assert all(r["median_ms"] > 0 and r["time_vs_plain_2to4"] > 0 for r in rows)


@requires_cuda
def test_permutation_search_on_cuda_matches_the_cpu():
    # integer scores: every sum is exact, so the GPU (reference op) and the CPU take the same moves
    g = torch.Generator().manual_seed(11)
    s = torch.randint(0, 30, (40, 64), generator=g).float()
    cpu = find_permutation(s, rounds=15)
    gpu = find_permutation(s.cuda(), rounds=15)
    assert gpu.device.type == "cuda"
    assert_bitexact(gpu.cpu(), cpu, "GPU vs CPU search")
    st, cols, sp = torch.rand(64, 33, generator=g), _pairs(64, 4, 5, g), _splits(4)
    torch.testing.assert_close(nm_split_scores(st.cuda(), cols.cuda(), sp.cuda(), 2).cpu(),
                               ref_split_scores(st, cols, sp, 2), rtol=2e-6, atol=1e-6)


# ------------------------------------------------------------------ gather_columns (a permuted layer's input)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 37), (3, 64), (2, 5, 48), (9, 16), (0, 8)])
def test_gather_columns_cpp_is_bitexact(dtype, shape):
    from sparse_kernels.ops.permutation import gather_columns

    skip_unless_backend("gather_columns", "cpp", "cpu")
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    k = shape[-1]
    for index in (torch.randperm(k, generator=g), torch.randint(0, k, (k + 5,), generator=g)):
        want = x.index_select(-1, index)
        assert_bitexact(gather_columns(x, index, backend="cpp"), want, f"{dtype} {shape}")
    xt = torch.randn(k, 6, generator=g).to(dtype).t()  # non-contiguous
    p = torch.randperm(k, generator=g)
    assert_bitexact(gather_columns(xt, p, backend="cpp"), xt.index_select(-1, p), "non-contiguous")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gather_columns_grad_and_opcheck(backend):
    from sparse_kernels.ops import _registry as R
    from sparse_kernels.ops.permutation import gather_columns

    skip_unless_backend("gather_columns", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([3, 0, 11, 3, 7])  # repeats: the backward must add
    torch.autograd.gradcheck(lambda t: gather_columns(t, index, backend=backend), (x,))
    torch.library.opcheck(R.get_op("gather_columns", backend), (x.detach().float(), torch.randperm(12)))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gather_columns_bad_inputs(backend):
    from sparse_kernels.ops.permutation import gather_columns

    skip_unless_backend("gather_columns", backend, "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"index: entries must lie in \[0, 8\)"):
        gather_columns(x, torch.tensor([0, 8]), backend=backend)
    with pytest.raises(TypeError, match="index"):
        gather_columns(x, torch.tensor([0, 1], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="index"):
        gather_columns(x, torch.zeros(2, 2, dtype=torch.long), backend=backend)
    if backend == "cpp":  # the kernel checks too, before reading
        with pytest.raises(ValueError, match="entry -1 at position 1"):
            torch.ops.sparse_kernels.gather_columns_cpp(x, torch.tensor([0, -1]))


def test_gather_auto_rule_and_the_cached_path(monkeypatch):
    from sparse_kernels.ops import _registry as R
    from sparse_kernels.ops import permutation as P

    skip_unless_backend("gather_columns", "cpp", "cpu")
    dev = torch.device("cpu")
    small, big = torch.randn(1, 64).bfloat16(), torch.randn(2, 4096).bfloat16()
    assert R.select("gather_columns", None, dev, P._big_16bit(big)) == "cpp"
    assert R.select("gather_columns", None, dev, P._big_16bit(small)) == "reference"
    assert R.select("gather_columns", None, dev, P._big_16bit(big.float())) == "reference"  # 32-bit: index_select
    calls = []
    real = R.get_op

    def spy(name, b):
        calls.append((name, b))
        return real(name, b)

    monkeypatch.setattr(R, "get_op", spy)
    for x in (small, big, big.float()):
        p = torch.randperm(x.shape[-1])
        assert_bitexact(P.gather_validated(x, p), x.index_select(-1, p), f"{x.dtype} {tuple(x.shape)}")
    assert calls == [("gather_columns", "cpp")]  # only the big 16-bit input went to the kernel
    monkeypatch.setenv("SPARSE_KERNELS_BACKEND", "cpp")  # forcing it applies to every size
    p = torch.randperm(64)
    assert_bitexact(P.gather_validated(small, p), small.index_select(-1, p), "forced cpp")
    assert calls[-1] == ("gather_columns", "cpp")


def test_bench_permutation_search_runs(tmp_path):
    import json

    mod = load_benchmark("bench_permutation_search")
    out = tmp_path / "s.json"
    assert mod.main(["--device", "cpu", "--shapes", "16x64,8x32", "--rounds", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["16x64", "8x32"] and all(r["kept_importance_gain"] > 0 for r in rows)


# ------------------------------------------------------------------ review fixes: edges and misuse
def test_prune_without_convert_keeps_the_permutation_to_build_the_layers_later():
    from sparse_kernels.nn import SparseLinear

    model = _model()
    rep = sk.prune(model, method="wanda", sparsity="2:4", calibration=_calib(), blocks=list(model), progress=False,
                   permute={"rounds": 5})
    assert all(r.perm is not None and r.perm.dtype == torch.int64 for r in rep.layers)
    assert "perm" not in rep.to_dict()["layers"][0]
    for r in rep.layers:
        lin = model[r.block].get_submodule(r.name)
        sl = SparseLinear.from_dense(lin, pattern="2:4", mask=lin.weight != 0, in_perm=r.perm)
        assert torch.equal(sl.dense_weight(), lin.weight.detach())


def test_sparsify_rejects_fold_and_search_edges():
    from sparse_kernels.nn import sparsify

    with pytest.raises(ValueError, match="'fold' is an option of prune"):
        sparsify(nn.Sequential(nn.Linear(32, 16)), permute={"fold": False})
    rep = sparsify(nn.Sequential(nn.Linear(32, 16)), permute={"rounds": 3, "seed": 1})
    assert rep.layers == ["0"]
    with pytest.raises(ValueError, match="M <= 16"):
        find_permutation(torch.rand(4, 64), 8, 32)
    model = _model()
    with pytest.raises(ValueError, match="permute: the permutation search handles groups of M <= 16"):
        sk.prune(model, method="wanda", sparsity="8:32", calibration=_calib(), blocks=list(model), progress=False,
                 permute=True)
    assert all((p != 0).all() for p in model.parameters() if p.dim() == 2)
    with pytest.raises(ValueError, match="max_seconds"):
        find_permutation(torch.rand(4, 8), max_seconds="1")
    with pytest.raises(ValueError, match="meta device"):
        find_permutation(torch.rand(4, 8, device="meta"))
    assert_bitexact(find_permutation(torch.rand(0, 8)), torch.arange(8), "no rows: identity")
    assert find_permutation(torch.rand(3, 0)).numel() == 0


def test_gather_columns_edges():
    from sparse_kernels.ops.permutation import gather_columns

    skip_unless_backend("gather_columns", "cpp", "cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5000, generator=g).bfloat16()  # few rows, many columns: the column-chunked path
    p = torch.randperm(5000, generator=g)
    assert_bitexact(gather_columns(x, p, backend="cpp"), x.index_select(-1, p), "column chunks")
    xi = torch.randint(0, 255, (3, 40), generator=g, dtype=torch.uint8)  # 1-byte elements
    pi = torch.randperm(40, generator=g)
    assert_bitexact(gather_columns(xi, pi, backend="cpp"), xi.index_select(-1, pi), "uint8")
    for shape in ((3, 0), (0, 7)):
        e = torch.empty(shape)
        idx = torch.arange(shape[1])
        out = gather_columns(e, idx, backend="cpp")
        assert out.shape == e.index_select(-1, idx).shape
    m = gather_columns(torch.empty(3, 8, device="meta"), torch.arange(8, device="meta"))
    assert m.shape == (3, 8) and m.device.type == "meta"
