"""Structured pruning: the shrunken dense model equals the original with the same units masked out."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_close

transformers = pytest.importorskip("transformers")

from sparse_kernels.structured import structured_prune  # noqa: E402


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def calib(seed=0, n=6, seq=12):
    return torch.randint(0, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def masked_reference(model, report):
    """The original model with the removed units zeroed at their output projections (independent of the
    surgery code): FFN channels -> down_proj columns (GPT-2: c_proj rows); heads -> o_proj columns
    (GPT-2: c_proj rows); layers -> their attention and MLP output projections (the block is then identity)."""
    ref = copy.deepcopy(model)
    gpt2 = hasattr(ref, "transformer")
    layers = ref.transformer.h if gpt2 else ref.model.layers
    cfg = ref.config
    d = cfg.n_embd // cfg.n_head if gpt2 else cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(layers):
            info = report.removed.get(i, {})
            for j in info.get("ffn", []):
                if gpt2:
                    layer.mlp.c_proj.weight[j, :] = 0
                else:
                    layer.mlp.down_proj.weight[:, j] = 0
            for h in info.get("q_heads", []):
                if gpt2:
                    layer.attn.c_proj.weight[h * d:(h + 1) * d, :] = 0
                else:
                    layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            if i in report.removed["layers"]:
                outs = [layer.attn.c_proj, layer.mlp.c_proj] if gpt2 else [layer.self_attn.o_proj, layer.mlp.down_proj]
                for m in outs:
                    m.weight.zero_()
                    if m.bias is not None:
                        m.bias.zero_()
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [
    dict(sparsity=0.5),
    dict(sparsity=0.25, heads=4),
    dict(sparsity=0.0, heads=0.5),
    dict(sparsity=0.3, layers=1),
    dict(sparsity=0.4, heads=4, layers=[0, 2]),
]


LLAMA_RUNS = [("magnitude", kw) for kw in CASES] + [(c, CASES[i]) for c in ("activation", "taylor") for i in (3, 4)]


@pytest.mark.parametrize("criterion,kw", LLAMA_RUNS,
                         ids=[f"{c}-" + ",".join(f"{a}={b}" for a, b in k.items()) for c, k in LLAMA_RUNS])
def test_llama_same_function_as_masked(criterion, kw):
    model = tiny_llama()
    orig = copy.deepcopy(model)
    pruned, rep = structured_prune(model, calibration=calib(), criterion=criterion, **kw)
    ref = masked_reference(orig, rep)
    ids = calib(seed=1, n=3, seq=10)
    assert_close(logits(pruned, ids), logits(ref, ids), "pruned vs masked logits", atol=2e-5, rtol=1e-4)
    c = pruned.config
    n_layers = 4 - (len(kw["layers"]) if isinstance(kw.get("layers"), list) else kw.get("layers", 0))
    assert c.num_hidden_layers == len(pruned.model.layers) == n_layers
    assert [l.self_attn.layer_idx for l in pruned.model.layers] == list(range(n_layers))
    inter = 88 - round(kw["sparsity"] * 88)
    assert c.intermediate_size == inter
    assert all(l.mlp.down_proj.weight.shape == (64, inter) for l in pruned.model.layers)
    nq = 8 - (4 if kw.get("heads") in (4, 0.5) else 0)
    assert c.num_attention_heads == nq and c.num_key_value_heads == nq // 4 and c.head_dim == 8
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (nq * 8, 64)
    assert rep.params_after < rep.params_before
    # the pruned model rebuilds from its own config and generates with a KV cache
    rebuilt = transformers.LlamaForCausalLM(c).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    assert_close(logits(rebuilt, ids), logits(pruned, ids), "rebuilt from config", atol=0, rtol=0)
    g1 = pruned.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    g2 = ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


GPT2_RUNS = [("magnitude", dict(sparsity=0.5))] + [
    (c, dict(sparsity=0.25, heads=1, layers=1)) for c in ("magnitude", "activation", "taylor")]


@pytest.mark.parametrize("criterion,kw", GPT2_RUNS, ids=["magnitude-ffn", "magnitude-all", "activation-all", "taylor-all"])
def test_gpt2_same_function_as_masked(criterion, kw):
    model = tiny_gpt2()
    orig = copy.deepcopy(model)
    pruned, rep = structured_prune(model, calibration=calib(), criterion=criterion, **kw)
    ref = masked_reference(orig, rep)
    ids = calib(seed=2, n=3, seq=10)
    assert_close(logits(pruned, ids), logits(ref, ids), "pruned vs masked logits", atol=2e-5, rtol=1e-4)
    assert pruned.config.n_inner == 192 - round(kw["sparsity"] * 192)
    assert pruned.config.n_layer == len(pruned.transformer.h) == 3 - kw.get("layers", 0)
    assert pruned.transformer.h[0].mlp.c_fc.weight.shape == (48, pruned.config.n_inner)
    if kw.get("heads"):
        assert pruned.config.n_head == 3 and pruned.transformer.h[0].attn.c_attn.weight.shape == (48, 3 * 36)
    g1 = pruned.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_criteria_pick_expected_units():
    model = tiny_llama()
    with torch.no_grad():  # make channel 5 of layer 0 huge and channel 7 tiny
        m = model.model.layers[0].mlp
        m.down_proj.weight[:, 5] *= 100
        m.gate_proj.weight[7] *= 1e-3
        m.up_proj.weight[7] *= 1e-3
        m.down_proj.weight[:, 7] *= 1e-3
    _, rep = structured_prune(copy.deepcopy(model), 0.1, criterion="magnitude")
    assert 7 in rep.removed[0]["ffn"] and 5 not in rep.removed[0]["ffn"]
    _, rep = structured_prune(copy.deepcopy(model), 0.1, calib(), criterion="activation")
    assert 7 in rep.removed[0]["ffn"]
    with torch.no_grad():  # layer 2 becomes (nearly) an identity: the cheapest layer by block influence
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    _, rep = structured_prune(copy.deepcopy(model), 0.0, calib(), criterion="activation", layers=1)
    assert rep.removed["layers"] == [2]
    _, rep = structured_prune(copy.deepcopy(model), 0.0, calib(), criterion="taylor", layers=1)
    assert rep.removed["layers"] == [2]


def test_round_to_and_report():
    _, rep = structured_prune(tiny_llama(), 0.3, round_to=16, heads=4)
    assert rep.config["intermediate_size"] == 64 and rep.config["num_attention_heads"] == 4
    d = rep.to_dict()
    assert d["removed"]["0"]["kv_groups"] == rep.removed[0]["kv_groups"] and len(d["removed"]["0"]["ffn"]) == 24
    assert "removed 96 FFN channels, 16 query heads" in str(rep)


def test_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"sparsity: must be in \[0, 1\)"):
        structured_prune(model, 1.0)
    with pytest.raises(ValueError, match=r"sparsity: must be in \[0, 1\)"):
        structured_prune(model, -0.1)
    with pytest.raises(ValueError, match="criterion: unknown 'fisher'; expected one of magnitude, activation, taylor"):
        structured_prune(model, 0.5, criterion="fisher")
    with pytest.raises(ValueError, match="removing 3 query heads per layer does not divide into whole KV groups of 4"):
        structured_prune(model, 0.0, heads=3)
    with pytest.raises(ValueError, match="removing 2 query heads per layer does not divide"):
        structured_prune(model, 0.0, heads=0.25)
    with pytest.raises(ValueError, match="is not a whole number of heads"):
        structured_prune(model, 0.0, heads=0.3)
    with pytest.raises(ValueError, match="would leave none"):
        structured_prune(model, 0.0, heads=8)
    with pytest.raises(ValueError, match="layers: can remove 0..3 of the 4 decoder layers, got 4"):
        structured_prune(model, 0.0, layers=4)
    with pytest.raises(ValueError, match="calibration: criterion='activation' needs calibration"):
        structured_prune(model, 0.5, criterion="activation")
    with pytest.raises(TypeError, match=r"calibration: expected a LongTensor \[n, seqlen\]"):
        structured_prune(model, 0.5, torch.zeros(2, 4), criterion="taylor")
    with pytest.raises(TypeError, match="is not supported"):
        structured_prune(torch.nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="leaves 0 channels"):
        structured_prune(tiny_llama(intermediate_size=4), 0.9)
    # nothing was modified by the failed calls
    assert model.config.intermediate_size == 88 and len(model.model.layers) == 4


def test_prune_registry_structured():
    pruning = pytest.importorskip("sparse_kernels.pruning")
    if "structured" not in pruning.METHODS:
        pytest.skip("the 'structured' method is not registered in sparse_kernels.pruning.METHODS")
    import sparse_kernels

    model = tiny_llama()
    orig = copy.deepcopy(model)
    rep = sparse_kernels.prune(model, method="structured", sparsity=0.25, calibration=calib(),
                               criterion="activation", heads=4, progress=False)
    assert model.config.intermediate_size == 66 and model.config.num_attention_heads == 4
    ids = calib(seed=3, n=2, seq=8)
    assert_close(logits(model, ids), logits(masked_reference(orig, rep), ids), "prune(structured)", atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="criterion: unknown"):
        sparse_kernels.prune(tiny_llama(), method="structured", sparsity=0.25, criterion="nope")
