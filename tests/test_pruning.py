"""Pruning criteria (magnitude, Wanda, SparseGPT) per layer, and prune(model) end to end."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch
from torch import nn

import sparse_kernels
from conftest import assert_bitexact, assert_close
from sparse_kernels.pruning import (
    METHODS,
    ActivationNormAccumulator,
    HessianAccumulator,
    PruningMethod,
    find_blocks,
    magnitude_prune,
    magnitude_prune_global,
    parse_sparsity,
    prune,
    register_method,
    sparsegpt_prune,
    wanda_prune,
)
from test_sparsegpt import correlated_inputs

try:
    import transformers  # noqa: F811
except ImportError:
    transformers = None
requires_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


# ---------------------------------------------------------------- specs
def test_parse_sparsity():
    s = parse_sparsity("2:4")
    assert (s.n, s.m, s.ratio, str(s)) == (2, 4, 0.5, "2:4")
    assert parse_sparsity(" 4 : 8 ").m == 8
    assert parse_sparsity(0.25).ratio == 0.25 and not parse_sparsity(0.25).is_nm
    for bad, exc, msg in [
        (1.0, ValueError, r"open interval \(0, 1\)"), (0.0, ValueError, r"\(0, 1\)"), (-0.1, ValueError, r"\(0, 1\)"),
        ("4:4", ValueError, "0 < N < M"), ("5:4", ValueError, "0 < N < M"), ("0:4", ValueError, "0 < N < M"),
        ("2-4", ValueError, "'N:M'"), (True, TypeError, "got bool"), (None, TypeError, "got NoneType"),
    ]:
        with pytest.raises(exc, match=msg):
            parse_sparsity(bad)


# ---------------------------------------------------------------- magnitude / wanda
def test_magnitude_layer_row_nm():
    W = torch.tensor([[1.0, -4.0, 2.0, 3.0], [0.5, 0.1, -6.0, 5.0]])
    Wp, m = magnitude_prune(W, 0.5)
    assert_bitexact(m, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool))
    assert_bitexact(Wp, W * m)
    _, m = magnitude_prune(W, 0.5, scope="row")
    assert_bitexact(m, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool))
    _, m = magnitude_prune(W, 0.25, scope="row")
    assert_bitexact(m.sum(1), torch.tensor([3, 3]))
    _, m = magnitude_prune(torch.ones(2, 8), "2:4")  # ties: the lower index is kept
    assert_bitexact(m, torch.tensor([[1, 1, 0, 0] * 2] * 2, dtype=torch.bool))


def test_magnitude_global_over_several_tensors():
    a = torch.tensor([[10.0, 1.0]])
    b = torch.tensor([[2.0, 3.0], [4.0, 0.5]])
    (ap, am), (bp, bm) = magnitude_prune([a, b], 0.5, scope="global")
    assert_bitexact(am, torch.tensor([[True, False]]))
    assert_bitexact(bm, torch.tensor([[False, True], [True, False]]))
    assert magnitude_prune_global([a, b], 0.5)[1][1].equal(bm)
    # per tensor, the same sparsity gives a different answer
    assert magnitude_prune([a, b], 0.5, scope="layer")[0][1].sum() == 1
    with pytest.raises(TypeError, match="non-empty list"):
        magnitude_prune_global([], 0.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(a, 0.5, scope="block")


def test_wanda_scores_with_activation_norms():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 0.0])  # |w| * sqrt(n) = [10, 2, 3, 0]
    Wp, m = wanda_prune(W, norms, 0.5)
    assert_bitexact(m, torch.tensor([[True, False, True, False]]))
    _, m = wanda_prune(torch.randn(6, 16), torch.rand(16), "4:8")
    assert (m.view(6, 2, 8).sum(-1) == 4).all()
    _, m = wanda_prune(torch.randn(5, 10), torch.rand(10), 0.3)
    assert_bitexact(m.sum(1), torch.full((5,), 7))
    with pytest.raises(ValueError, match="one per column"):
        wanda_prune(W, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        wanda_prune(W, -norms, 0.5)
    with pytest.raises(ValueError, match="multiple of M=4"):
        wanda_prune(torch.randn(2, 6), torch.ones(6), "2:4")


def test_activation_norm_accumulator():
    X = torch.randn(3, 7, 5)
    acc = ActivationNormAccumulator(5)
    lin = nn.Linear(5, 2)
    h = acc.attach(lin)
    lin(X)
    h.remove()
    assert_close(acc.norm_sq, (X.double() ** 2).sum((0, 1)), "norm_sq")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_criteria_keep_dtype(dtype):
    W = torch.randn(4, 8).to(dtype)
    for Wp, m in (magnitude_prune(W, "2:4"), wanda_prune(W, torch.rand(8), 0.5)):
        assert Wp.dtype == dtype and m.dtype == torch.bool
        assert not (Wp[~m] != 0).any()
        assert_bitexact(Wp[m], W[m])


# ---------------------------------------------------------------- quality ordering
@pytest.mark.parametrize("spec", [0.5, "2:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_wanda_beats_magnitude(spec, seed):
    rows, cols, tokens = 128, 256, 4096
    X = correlated_inputs(tokens, cols, rank=16, seed=seed)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 10)) / cols ** 0.5
    acc = HessianAccumulator(cols)
    acc.add(X)
    Y = X @ W.T

    def err(Wp):
        return ((X @ Wp.T - Y).norm() / Y.norm()).item()

    e_sgpt = err(sparsegpt_prune(W, acc.H, spec)[0])
    e_wanda = err(wanda_prune(W, (X * X).sum(0), spec)[0])
    e_mag = err(magnitude_prune(W, spec)[0])
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


# ---------------------------------------------------------------- prune(model): plain module
class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, gate, *, shift=None):
        return x + gate * self.down(torch.relu(self.up(x))) + shift


class ToyModel(nn.Module):
    def __init__(self, d=32, n=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x)
        shift = torch.full_like(h, 0.1)
        for b in self.blocks:
            h = b(h, 0.5, shift=shift)
        return self.head(h)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_plain_module_with_explicit_blocks(method):
    torch.manual_seed(0)
    model = ToyModel()
    calib = correlated_inputs(64, 8).view(8, 8, 8)
    dense = copy.deepcopy(model)
    rep = prune(model, method, 0.5, calibration=calib, blocks=list(model.blocks), batch_size=3, progress=False)
    assert len(rep.layers) == 6 and rep.overall_sparsity == 0.5
    assert all(r.sparsity == 0.5 for r in rep.layers)
    assert len(rep.block_output_error) == 3 and all(0 < e < 1 for e in rep.block_output_error)
    assert (rep.layers[0].loss is not None) == (method == "sparsegpt")
    for b in model.blocks:
        assert (b.up.weight == 0).float().mean() == 0.5
    assert torch.equal(model.embed.weight, dense.embed.weight) and torch.equal(model.head.weight, dense.head.weight)
    # block 0's reported error is exactly what the model sees at its output (kwargs carried)
    x = calib.reshape(-1, 8)
    h0 = dense.embed(x)
    shift = torch.full_like(h0, 0.1)
    d0, p0 = dense.blocks[0](h0, 0.5, shift=shift), model.blocks[0](h0, 0.5, shift=shift)
    assert abs(((p0 - d0).norm() / d0.norm()).item() - rep.block_output_error[0]) < 1e-4
    assert "block output rel. error" in str(rep) and rep.to_dict()["overall_sparsity"] == 0.5


def test_plain_module_needs_blocks_or_finds_modulelist():
    model = ToyModel()
    assert find_blocks(model) == list(model.blocks)
    with pytest.raises(ValueError, match="pass blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_magnitude_without_calibration_and_global_scope():
    model = ToyModel()
    rep = prune(model, "magnitude", 0.6, blocks=model.blocks, scope="global", progress=False)
    assert rep.block_output_error == [None] * 3
    ws = [l.weight for b in model.blocks for l in (b.up, b.down)]
    total = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == round(0.6 * total)


def test_model_bad_arguments():
    model = ToyModel()
    calib = torch.randn(4, 8)
    with pytest.raises(ValueError, match="method: got 'obs'"):
        prune(model, "obs", 0.5, calibration=calib)
    with pytest.raises(ValueError, match="needs calibration"):
        prune(model, "sparsegpt", 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune(model, "wanda", 1.2, calibration=calib)
    with pytest.raises(ValueError, match="0 < N < M"):
        prune(model, "wanda", "4:2", calibration=calib)
    with pytest.raises(ValueError, match=r"blocks\[0\]\.up: .* multiple of M=24"):
        prune(model, "magnitude", "8:24", blocks=model.blocks, progress=False)
    assert not (model.blocks[0].up.weight == 0).any()  # checked before anything was pruned
    with pytest.raises(TypeError, match="calibration: expected a tensor or an iterable"):
        prune(model, "wanda", 0.5, calibration=3)
    with pytest.raises(ValueError, match="empty"):
        prune(model, "wanda", 0.5, calibration=[], progress=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|mat1 and mat2"):
        prune(model, "wanda", 0.5, calibration=torch.randn(4, 5), progress=False)


def test_register_method_hook_and_progress_fallback(monkeypatch, capsys):
    class Halve(PruningMethod):
        needs_calibration = False

        def prune_layer(self, name, layer, weight, stats, spec, options):
            return weight * 0.5, torch.ones_like(weight, dtype=torch.bool), None

    register_method("halve", Halve())
    try:
        real_import = builtins.__import__

        def no_tqdm(name, *a, **k):
            if name.startswith("tqdm"):
                raise ImportError("no tqdm")
            return real_import(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_tqdm)
        model = ToyModel(n=2)
        w0 = model.blocks[1].down.weight.clone()
        prune(model, "halve", 0.5, blocks=model.blocks)
        assert torch.equal(model.blocks[1].down.weight, w0 * 0.5)
        assert "2/2 blocks" in capsys.readouterr().err
    finally:
        METHODS.pop("halve")
    with pytest.raises(TypeError, match="PruningMethod"):
        register_method("x", object())


@pytest.mark.parametrize("sparsity,pattern", [("2:4", "2:4"), (0.5, None)])
def test_convert_swaps_in_sparselinear_with_the_same_function(sparsity, pattern):
    from sparse_kernels.nn import SparseLinear

    torch.manual_seed(0)
    model = ToyModel(d=32, n=2)
    calib = correlated_inputs(64, 8).view(8, 8, 8)
    kept = copy.deepcopy(model)
    prune(kept, "sparsegpt", sparsity, calibration=calib, blocks=list(kept.blocks), progress=False)
    prune(model, "sparsegpt", sparsity, calibration=calib, blocks=list(model.blocks), progress=False,
          convert=True)
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 4 and all(m.pattern == pattern for m in swapped)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), kept(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, "bitmask"), ("2:4", "2:4"), ("4:8", "bitmask")])
def test_convert_bitmask_stores_unstructured_layers_compressed(sparsity, pattern):
    """convert="bitmask": patterns that do not fit 2:4 become compressed bitmask layers (the
    same function as the pruned model, fewer bytes than dense); 2:4 stays packed 2:4."""
    from sparse_kernels.nn import SparseLinear

    torch.manual_seed(0)
    model = ToyModel(d=32, n=2)
    calib = correlated_inputs(64, 8).view(8, 8, 8)
    kept = copy.deepcopy(model)
    prune(kept, "wanda", sparsity, calibration=calib, blocks=list(kept.blocks), progress=False)
    prune(model, "wanda", sparsity, calibration=calib, blocks=list(model.blocks), progress=False, convert="bitmask")
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 4 and all(m.pattern == pattern for m in swapped)
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in swapped)
    assert sum(m.nbytes() for m in swapped) < dense_bytes
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), kept(x), rtol=1e-5, atol=1e-5)


def test_convert_rejects_other_values():
    model = ToyModel(d=32, n=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="convert: got 'masked', expected True, False or 'bitmask'"):
        prune(model, "magnitude", 0.5, blocks=list(model.blocks), progress=False, convert="masked")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- prune(model): Hugging Face
def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@requires_hf
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,spec", [("sparsegpt", 0.5), ("sparsegpt", "2:4"), ("wanda", "2:4"), ("magnitude", 0.5)])
def test_hf_model_end_to_end(arch, method, spec):
    torch.manual_seed(0)
    model = (_llama() if arch == "llama" else _gpt2()).eval()  # GPT-2 has dropout
    ids = torch.randint(0, 96, (4, 24))
    blocks = find_blocks(model)
    assert len(blocks) == 2
    probe = blocks[1].self_attn.q_proj if arch == "llama" else blocks[1].attn.c_attn
    seen = []
    w_of = (lambda m: m.weight.detach()) if arch == "llama" else (lambda m: m.weight.detach().t())  # [out, in]
    w0 = w_of(probe).double().clone()
    h = probe.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    rep = prune(model, method, spec, calibration=ids, batch_size=4, progress=False)
    h.remove()
    assert len(rep.layers) == (14 if arch == "llama" else 8)
    assert all(r.output_error is not None and 0 < r.output_error < 1 for r in rep.layers)
    # the probe's (Linear / GPT-2 Conv1D) output error, by hand from its input in the pruned pass
    x = seen[-1].double().reshape(-1, w0.shape[1])
    want = ((x @ (w0 - w_of(probe).double()).T).norm() / (x @ w0.T).norm()).item()
    probe_name = "self_attn.q_proj" if arch == "llama" else "attn.c_attn"
    got = next(r.output_error for r in rep.layers if r.block == 1 and r.name == probe_name)
    assert abs(got - want) <= 1e-5 * want, (got, want)
    assert all(r.sparsity == 0.5 for r in rep.layers)
    if spec == "2:4":
        w = probe.weight if arch == "llama" else probe.weight.t()
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    # what block 1 saw during pruning is what the pruned model feeds it (masks, positions carried)
    with torch.no_grad():
        out = model(ids, use_cache=False, output_hidden_states=True)
        seen_after = []
        h = probe.register_forward_hook(lambda mod, inp, out: seen_after.append(inp[0].detach().clone()))
        model(ids, use_cache=False)
        h.remove()
    assert torch.isfinite(out.logits).all()
    assert_close(seen[-1], seen_after[0], "block 1 inputs", atol=1e-5, rtol=1e-4)


@requires_hf
def test_hf_families_are_found():
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    specs = [
        (transformers.OPTConfig, transformers.OPTForCausalLM, dict(ffn_dim=64, word_embed_proj_dim=32)),
        (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(intermediate_size=64, num_key_value_heads=2)),
        (transformers.MistralConfig, transformers.MistralForCausalLM, dict(intermediate_size=64, num_key_value_heads=2)),
        (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    ]
    for C, M, extra in specs:
        model = M(C(**kw, **extra))
        assert len(find_blocks(model)) == 3, M.__name__
    model = M(C(**kw, **extra))
    rep = prune(model, "wanda", "4:8", calibration=torch.randint(0, 64, (2, 16)), progress=False)
    assert rep.overall_sparsity == 0.5


@requires_hf
def test_hf_calibration_errors():
    model = _llama()
    with pytest.raises(TypeError, match="LongTensor"):
        prune(model, "sparsegpt", 0.5, calibration=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"shape \[n, seqlen\]"):
        prune(model, "sparsegpt", 0.5, calibration=torch.randint(0, 96, (16,)))
    with pytest.raises(TypeError, match=r"calibration\[1\]: expected a LongTensor \[n, seqlen\] of token ids, "
                                        r"got float32 \(1, 8\)"):
        prune(model, "wanda", 0.5, calibration=[torch.randint(0, 96, (1, 8)), torch.randn(1, 8)], progress=False)


def test_top_level_export():
    assert sparse_kernels.prune is prune


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    torch.manual_seed(1)
    model = ToyModel(d=16, n=2).to(dtype)
    calib = correlated_inputs(32, 8).view(4, 8, 8).to(dtype)
    rep = prune(model, "sparsegpt", "2:4", calibration=calib, blocks=model.blocks, progress=False)
    w = model.blocks[1].down.weight
    assert w.dtype == dtype
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert all(e == e for e in rep.block_output_error)


def test_training_mode_restored():
    model = ToyModel(n=1).train()
    prune(model, "wanda", 0.5, calibration=torch.randn(2, 8), blocks=model.blocks, progress=False)
    assert model.training


# ---------------------------------------------------------------- per-layer output error
class OneLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("method,spec", [("sparsegpt", 0.5), ("sparsegpt", "2:4"), ("wanda", 0.6), ("magnitude", "4:8")])
def test_output_error_of_a_single_linear_block_is_the_hand_computed_one(method, spec):
    torch.manual_seed(3)
    model = Stack([OneLinear(48, 40)])
    fc = model.blocks[0].fc
    fc.bias.data.normal_()  # the measure is bias-free: X W^T, not the layer's output
    W0 = fc.weight.detach().clone().double()
    X = correlated_inputs(70, 48, seed=4)
    batches = [X[:30].view(3, 10, 48), X[30:33], X[33:]]  # several batches, any leading shape
    rep = prune(model, method, spec, calibration=batches, blocks=model.blocks, progress=False)
    W1 = fc.weight.detach().double()
    Xd = X.double()
    want = ((Xd @ W0.T - Xd @ W1.T).norm() / (Xd @ W0.T).norm()).item()
    (r,) = rep.layers
    assert r.name == "fc" and r.output_error is not None and want > 0.01
    assert abs(r.output_error - want) <= 1e-5 * want, (r.output_error, want)
    assert (r.loss is not None) == (method == "sparsegpt")  # SparseGPT's own objective, unchanged


def test_output_error_same_with_convert_and_device():
    torch.manual_seed(5)
    base = Stack([Residual(32) for _ in range(2)])
    calib = correlated_inputs(96, 32, seed=6).view(6, 16, 32)
    errs = []
    for kw in ({}, {"convert": True}, {"device": "cpu"}):
        model = copy.deepcopy(base)
        rep = prune(model, "sparsegpt", "2:4", calibration=calib, blocks=model.blocks, progress=False, **kw)
        errs.append([r.output_error for r in rep.layers])
    assert len(errs[0]) == 4 and all(e is not None and 0 < e < 1 for e in errs[0])
    assert errs[1] == errs[0] and errs[2] == errs[0]


@pytest.mark.parametrize("spec", [0.5, "2:4"])
def test_sparsegpt_output_error_below_magnitude_layer_by_layer(spec):
    torch.manual_seed(7)
    base = Stack([Residual(64) for _ in range(2)])
    calib = correlated_inputs(1024, 64, rank=8, seed=8).view(8, 128, 64)
    reports = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(base)
        reports[method] = prune(model, method, spec, calibration=calib, blocks=model.blocks, progress=False)
    sg, wa, mg = (reports[k].layers for k in ("sparsegpt", "wanda", "magnitude"))
    assert [(r.block, r.name) for r in sg] == [(r.block, r.name) for r in mg] == [(r.block, r.name) for r in wa]
    assert len(sg) == 4
    for a, c in zip(sg, mg):
        assert a.output_error < c.output_error, (a.block, a.name, a.output_error, c.output_error)


def test_report_prints_and_exports_the_output_error():
    torch.manual_seed(9)
    model = Stack([Residual(16) for _ in range(2)])
    calib = correlated_inputs(32, 16).view(2, 16, 16)
    rep = prune(model, "wanda", 0.5, calibration=calib, blocks=model.blocks, progress=False)
    text = str(rep)
    header = text.splitlines()[1]
    assert header.split()[:7] == ["block", "layer", "shape", "sparsity", "loss", "out", "err"], header
    for r in rep.layers:
        row = next(line for line in text.splitlines() if f" {r.name} " in line and line.split()[0] == str(r.block))
        assert row.split()[5] == f"{r.output_error:.4f}"
        assert row.split()[4] == "-"  # wanda: no SparseGPT loss
    d = rep.to_dict()
    assert [r["output_error"] for r in d["layers"]] == [r.output_error for r in rep.layers]
    # without calibration: None, printed as "-"
    rep = prune(Stack([Residual(16)]), "magnitude", 0.5, blocks=None, progress=False)
    assert all(r.output_error is None for r in rep.layers)
    assert all(line.split()[5] == "-" for line in str(rep).splitlines()[2:2 + len(rep.layers)])


def test_output_error_none_when_the_method_replaces_the_layer():
    class Replace(PruningMethod):
        """A method that swaps each layer for a new module: its error does not apply."""

        def prune_block(self, block_index, block, layers, stats, spec, options):
            from sparse_kernels.pruning.model import LayerReport

            reports = []
            for name, layer in layers.items():
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, copy.deepcopy(layer))
                reports.append(LayerReport(block_index, name, tuple(layer.weight.shape), 0.0, None, 0.0))
            return reports

    register_method("replace", Replace())
    try:
        model = Stack([Residual(8)])
        rep = prune(model, "replace", 0.5, calibration=torch.randn(2, 4, 8), blocks=model.blocks, progress=False)
        assert [r.output_error for r in rep.layers] == [None, None]
        assert rep.block_output_error == [0.0]
    finally:
        METHODS.pop("replace")


# ---------------------------------------------------------------- one block's statistics at a time
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_only_one_blocks_statistics_are_alive(method, monkeypatch):
    """Issue 4 section 4: when block i's statistics objects are constructed, none of block
    i-1's are still alive (tracked through a patched constructor and a WeakSet)."""
    import gc
    import weakref

    cls = {"sparsegpt": HessianAccumulator, "wanda": ActivationNormAccumulator}[method]
    per_block = 2  # Residual: up, down
    live = weakref.WeakSet()
    block_of = weakref.WeakKeyDictionary()
    seen = []  # (block, how many stats of earlier blocks were alive when its first one was made)
    real_init = cls.__init__

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        idx = tracked_init.count
        tracked_init.count += 1
        blk = idx // per_block
        if idx % per_block == 0:
            gc.collect()
            seen.append((blk, sum(1 for s in list(live) if block_of[s] < blk)))
        live.add(self)
        block_of[self] = blk

    tracked_init.count = 0
    monkeypatch.setattr(cls, "__init__", tracked_init)
    torch.manual_seed(11)
    model = Stack([Residual(16) for _ in range(4)])
    prune(model, method, 0.5, calibration=torch.randn(3, 8, 16), blocks=model.blocks, progress=False)
    assert [b for b, _ in seen] == [0, 1, 2, 3]
    assert all(n == 0 for _, n in seen), f"stats of earlier blocks alive when each block started: {seen}"


def test_wanda_and_ria_comparison_group():
    torch.manual_seed(0)
    W = torch.randn(6, 16)
    norms = torch.rand(16) * 4
    score = W.abs() * norms.sqrt()
    for fn, s in ((wanda_prune, score), (lambda *a, **k: sparse_kernels.pruning.ria_prune(*a, **k), None)):
        _, row = fn(W, norms, 0.5)
        assert (row.sum(1) == 8).all()  # the paper's: per output row
        _, layer = fn(W, norms, 0.5, scope="layer")
        assert int(layer.sum()) == 48 and not (layer.sum(1) == 8).all()
        if s is not None:  # the 48 largest scores of the layer
            assert torch.equal(layer, s >= s.flatten().sort().values[48])
        _, nm = fn(W, norms, "2:4", scope="layer")
        assert torch.equal(nm, fn(W, norms, "2:4")[1])  # N:M: per group whatever the scope
        with pytest.raises(ValueError, match="scope: got 'global', expected 'row'"):
            fn(W, norms, 0.5, scope="global")


def test_register_method_checks_scopes():
    class Bad(PruningMethod):
        scopes = "row"

    with pytest.raises(TypeError, match="Bad.scopes must be a tuple of str"):
        register_method("bad", Bad())


def test_prune_scope_per_method():
    torch.manual_seed(0)
    model, ids = ToyModel(), correlated_inputs(64, 8).view(8, 8, 8)
    m = copy.deepcopy(model)
    prune(m, "wanda", 0.5, calibration=ids, scope="layer", progress=False)
    w = m.blocks[0].up.weight
    assert int((w == 0).sum()) == w.numel() // 2 and not ((w == 0).sum(1) == w.shape[1] // 2).all()
    for method, scope, msg in (("sparsegpt", "layer", r"takes no scope \(it chooses its mask per block of columns\)"), ("wanda", "global", "takes 'row', 'layer'"),
                               ("magnitude", "block", "takes 'layer', 'row', 'global'")):
        with pytest.raises(ValueError, match=f"scope: method '{method}' {msg}, got '{scope}'"):
            prune(copy.deepcopy(model), method, 0.5, calibration=ids, scope=scope, progress=False)
