"""Mixture-of-experts models in prune(): every expert's matrix of transformers' 3-D expert
parameters pruned as a layer, its statistics from exactly the tokens the model multiplies it
with (routed, or every token with calibrate_all_experts), the magnitude fallback for experts no
token reaches, and the refusals."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from conftest import assert_bitexact, assert_close, devices, save_word_model_dir
from sparse_kernels.pruning import ActivationNormAccumulator, HessianAccumulator, prune, sparsegpt_prune, wanda_prune
from sparse_kernels.pruning.sparsegpt import sparsegpt_prune_int4
from sparse_kernels.pruning.criteria import magnitude_prune
from sparse_kernels.pruning.experts import ExpertMatrix, expert_matrices, is_experts_module, route_all_experts
from sparse_kernels.pruning.layers import _get_weight, prunable_layers

transformers = pytest.importorskip("transformers")

FAMILIES = {
    # model type: config keywords (4 experts, top-2); gpt_oss stores [E, in, out] with biases
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}


def tiny(model_type: str = "mixtral", layers: int = 2, seed: int = 0):
    cfg = transformers.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=64,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            vocab_size=96, **FAMILIES[model_type])
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for mod in m.modules():  # expert weights (and gpt-oss's biases) of one scale in every family
        if is_experts_module(mod):
            for name, p in mod.named_parameters(recurse=False):
                torch.nn.init.normal_(p, std=0.1)
    return m


def calib(n=3, seqlen=12, seed=1):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


KEYS = ("gate_up_proj[{e}].gate", "gate_up_proj[{e}].up", "down_proj[{e}]")  # every gated family here


def keys(e):
    return [k.format(e=e) for k in KEYS]


def experts_of(block):
    return next(m for m in block.modules() if is_experts_module(m))


def expert_inputs(model, ids, block=0):
    """Per calibration row (prune's batch_size=1 calls): the hidden states, expert indices and
    weights the first block's experts module was called with, in the dense model."""
    ex = experts_of(model.model.layers[block])
    calls = []
    h = ex.register_forward_pre_hook(lambda mod, args: calls.append(tuple(a.detach().clone() for a in args)))
    try:
        with torch.no_grad():
            for i in range(ids.shape[0]):
                model(ids[i:i + 1])
    finally:
        h.remove()
    return ex, calls


def routed_rows(hidden, index, e):
    """The rows routed to expert e, in the eager loop's order (by top-k slot, then by token)."""
    return torch.cat([hidden[index[:, k] == e] for k in range(index.shape[1])])


def gated(ex, x, e):
    """The input of down_proj[e] for rows x, computed with the module's own gate (dense weights)."""
    w = ex.gate_up_proj[e]
    out = x @ w if ex.is_transposed else x @ w.T
    if ex.has_bias:
        out = out + ex.gate_up_proj_bias[e]
    return ex._apply_gate(out)


# ------------------------------------------------------------------ the stand-in layers
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_matrices_are_views_of_the_parameters(family):
    m = tiny(family)
    ex = experts_of(m.model.layers[0])
    mats = expert_matrices(ex)
    assert len(mats) == 12 and set(mats) == {k for e in range(4) for k in keys(e)}
    assert expert_matrices(ex)["down_proj[2]"] is mats["down_proj[2]"]  # one object per matrix
    for key, mat in mats.items():
        p = getattr(ex, mat.param)
        full = p[mat.index].T if ex.is_transposed else p[mat.index]  # [out, in]
        rows = {None: slice(None), "gate": slice(0, None, 2), "up": slice(1, None, 2)} if family == "gpt_oss" else \
            {None: slice(None), "gate": slice(0, full.shape[0] // 2), "up": slice(full.shape[0] // 2, None)}
        assert_bitexact(_get_weight(mat), full[rows[mat.part]].detach(), key)
    # the gate and up parts together are the whole matrix; writing through a view changes the model
    gate, up = _get_weight(mats["gate_up_proj[1].gate"]), _get_weight(mats["gate_up_proj[1].up"])
    assert gate.shape == up.shape and gate.shape[0] * 2 == ex.gate_up_proj.shape[2 if ex.is_transposed else 1]
    gate.copy_(torch.full_like(gate, 0.25))
    up.copy_(torch.full_like(up, 0.5))
    whole = ex.gate_up_proj[1].T if ex.is_transposed else ex.gate_up_proj[1]
    assert (whole == 0.25).sum() == (whole == 0.5).sum() == whole.numel() // 2
    assert not (ex.gate_up_proj[0] == 0.25).any()
    names = prunable_layers(m.model.layers[0])
    assert "mlp.experts.down_proj[3]" in names and "self_attn.q_proj" in names


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_see_exactly_the_routed_rows(family):
    m = tiny(family)
    ids = calib()
    ex, calls = expert_inputs(m, ids)
    seen = {}
    mats = expert_matrices(ex)
    handles = [mat.register_forward_hook(lambda mod, args, kw, out, k=k: seen.setdefault(k, []).append(
        (args[0].detach().clone(), out.detach().clone())), with_kwargs=True) for k, mat in mats.items()]
    impl = m.config._experts_implementation
    try:
        with torch.no_grad():
            y_hooked = [m(ids[i:i + 1]).logits for i in range(ids.shape[0])]
    finally:
        for h in handles:
            h.remove()
    assert m.config._experts_implementation == impl  # the eager switch is undone
    assert not ex._forward_hooks and not ex._forward_pre_hooks
    with torch.no_grad():
        y_plain = [m(ids[i:i + 1]).logits for i in range(ids.shape[0])]
    for a, b in zip(y_hooked, y_plain):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    for e in range(4):
        want = [routed_rows(h, idx, e) for h, idx, _ in calls]
        want = [w for w in want if w.shape[0]]
        for part in ("gate", "up"):
            got = seen.get(f"gate_up_proj[{e}].{part}", [])
            assert len(got) == len(want)
            for (x, out), w in zip(got, want):
                assert_bitexact(x, w, f"gate_up_proj[{e}].{part} input")
                assert_close(out, x @ _get_weight(mats[f"gate_up_proj[{e}].{part}"]).T, atol=1e-5, rtol=1e-5)
        got = seen.get(f"down_proj[{e}]", [])
        for (x, _), w in zip(got, want):
            assert_close(x, gated(ex, w, e), atol=1e-6, rtol=1e-5)


def test_route_all_experts_keeps_the_output_and_feeds_every_expert():
    m = tiny("mixtral")
    ids = calib(n=1)
    ex = experts_of(m.model.layers[0])
    m.config._experts_implementation = "eager"  # what a hooked call runs (block 1 is not hooked)
    with torch.no_grad():
        y0 = m(ids).logits
    counts = {}
    hs = [mat.register_forward_hook(lambda mod, args, out, k=k: counts.__setitem__(k, counts.get(k, 0)
                                                                                  + args[0].shape[0]))
          for k, mat in expert_matrices(ex).items()]
    try:
        with route_all_experts([ex]), torch.no_grad():
            y1 = m(ids).logits
    finally:
        for h in hs:
            h.remove()
    assert_bitexact(y1, y0)  # the statistics run is a separate call: the routed output is untouched
    assert counts == {k: ids.numel() for k in expert_matrices(ex)}  # every token reached every expert


# ------------------------------------------------------------------ prune
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsegpt-int4"])
def test_prune_first_block_experts_equal_the_layer_ops_on_the_routed_rows(family, method):
    m = tiny(family)
    ids = calib()
    ex, calls = expert_inputs(m, ids)
    dense = {k: _get_weight(mat).clone() for k, mat in expert_matrices(ex).items()}
    expect = {}
    for e in range(4):
        for key in keys(e):
            cols = dense[key].shape[1]
            acc = ActivationNormAccumulator(cols) if method == "wanda" else HessianAccumulator(cols)
            for h, idx, _ in calls:
                x = routed_rows(h, idx, e)
                if x.shape[0]:
                    acc.add(gated(ex, x, e) if key.startswith("down") else x)
            if method == "sparsegpt":
                expect[key] = sparsegpt_prune(dense[key], acc.H, "2:4")[0]
            elif method == "sparsegpt-int4":
                expect[key] = sparsegpt_prune_int4(dense[key], acc.H, "2:4", 16)[0]
            else:
                expect[key] = wanda_prune(dense[key], acc.norm_sq, "2:4")[0]
    rep = prune(m, method=method.split("-")[0], sparsity="2:4", calibration=ids, progress=False,
                calibrate_all_experts=False, int4=16 if method.endswith("int4") else None)
    for key, mat in expert_matrices(ex).items():
        got = _get_weight(mat)
        if method == "wanda":
            assert_bitexact(got, expect[key], key)
        else:  # the accumulators see the same rows; float32 sums may round differently across call splits
            # (int4: the same codes, so the same dequantized values, wherever the masks agree)
            agree = ((got != 0) == (expect[key] != 0)).float().mean().item()
            assert agree >= 0.999, (key, agree)
            assert_close(got, expect[key], atol=1e-4, rtol=1e-3)
        g = got.reshape(got.shape[0], -1, 4)
        assert ((g != 0).sum(-1) <= 2).all(), key
    rows = [r for r in rep.layers if "[" in r.name]
    assert len(rows) == 24 and all(r.calibration_tokens > 0 for r in rows)
    assert any("24 expert matrices pruned in place" in n for n in rep.notes)
    assert all(r.output_error is not None for r in rows)


def test_calibrate_all_experts_uses_every_token():
    m = tiny("mixtral", layers=1)
    ids = calib()
    ex, calls = expert_inputs(m, ids)
    dense = _get_weight(expert_matrices(ex)["gate_up_proj[3].up"]).clone()
    acc = ActivationNormAccumulator(dense.shape[1])
    for h, _, _ in calls:
        acc.add(h)
    rep = prune(m, method="wanda", sparsity=0.5, calibration=ids, progress=False)  # the default: all experts
    assert_bitexact(_get_weight(expert_matrices(ex)["gate_up_proj[3].up"]), wanda_prune(dense, acc.norm_sq, 0.5)[0])
    assert {r.calibration_tokens for r in rep.layers if "[" in r.name} == {ids.numel()}
    assert any("every token sent to every expert" in n for n in rep.notes)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude():
    m = tiny("mixtral", layers=1)
    router = m.model.layers[0].mlp.gate

    def only_0_and_1(mod, args, out):  # the router picks experts 0 and 1 for every token
        logits, scores, index = out
        return logits, scores, torch.tensor([0, 1]).expand_as(index).contiguous()

    router.register_forward_hook(only_0_and_1)
    ex = experts_of(m.model.layers[0])
    dense = {k: _get_weight(mat).clone() for k, mat in expert_matrices(ex).items()}
    rep = prune(m, method="sparsegpt", sparsity=0.5, calibration=calib(), progress=False, calibrate_all_experts=False)
    rows = {r.name: r for r in rep.layers}
    for e in (2, 3):
        for key in keys(e):
            assert rows[f"mlp.experts.{key}"].calibration_tokens == 0
            assert rows[f"mlp.experts.{key}"].loss is None
            want = magnitude_prune(dense[key], 0.5, scope="layer")[0]
            assert_bitexact(_get_weight(expert_matrices(ex)[key]), want, key)
    assert rows["mlp.experts.gate_up_proj[0].gate"].calibration_tokens == 36
    note = next(n for n in rep.notes if "no calibration token" in n)
    assert note.startswith("6 expert matrices") and "0.mlp.experts.down_proj[3]" in note


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method,sparsity", [("sparsegpt", "2:4"), ("wanda", 0.6), ("ria", "4:8"),
                                             ("magnitude", 0.5)])
def test_prune_whole_moe_models(device, method, sparsity):
    for family in FAMILIES:
        m = tiny(family).to(device)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        rep = prune(m, method=method, sparsity=sparsity, calibration=calib().to(device), progress=False)
        experts = [mod for mod in m.modules() if is_experts_module(mod)]
        for mod in experts:
            for k, mat in expert_matrices(mod).items():
                w = _get_weight(mat)
                frac = (w == 0).float().mean().item()
                assert abs(frac - (0.6 if sparsity == 0.6 else 0.5)) < 0.02, (family, k, frac)
                if isinstance(sparsity, str):
                    n, mm = map(int, sparsity.split(":"))
                    assert ((w.reshape(w.shape[0], -1, mm) != 0).sum(-1) <= n).all()
            if mod.has_bias:  # biases are left alone
                assert_bitexact(mod.gate_up_proj_bias.detach(),
                                before[next(n for n, p in m.named_parameters() if p is mod.gate_up_proj_bias)])
        assert len([r for r in rep.layers if "[" in r.name]) == 24, family
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in experts)
        assert all(e is not None and e < 1 for e in rep.block_output_error)


def test_moe_options_owl_dsnot_global_and_filters():
    m = tiny("qwen3_moe")
    rep = prune(m, method="wanda", sparsity=0.5, calibration=calib(), progress=False, owl=True, dsnot=True)
    assert any(r.dsnot_swaps for r in rep.layers if "[" in r.name)
    m = tiny("qwen3_moe")
    rep = prune(m, method="magnitude", sparsity=0.7, scope="global", progress=False)
    assert abs(rep.overall_sparsity - 0.7) < 0.01
    m = tiny("qwen3_moe")
    keep = copy.deepcopy(experts_of(m.model.layers[0]).down_proj.detach())
    rep = prune(m, method="wanda", sparsity="2:4", calibration=calib(), progress=False,
                layer_filter=lambda name, mod: not (isinstance(mod, ExpertMatrix) and mod.param == "down_proj"))
    assert_bitexact(experts_of(m.model.layers[0]).down_proj.detach(), keep)
    assert len([r for r in rep.layers if "[" in r.name]) == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_convert_makes_sparse_experts_equal_to_the_pruned_model(family):
    from sparse_kernels.nn import SparseExperts, SparseLinear

    m = tiny(family)
    ids = calib()
    ref = copy.deepcopy(m)
    rep = prune(m, method="sparsegpt", sparsity="2:4", calibration=ids, progress=False, convert=True)
    prune(ref, method="sparsegpt", sparsity="2:4", calibration=ids, progress=False)
    assert isinstance(m.model.layers[0].self_attn.q_proj, SparseLinear)
    for blk, rblk in zip(m.model.layers, ref.model.layers):
        se, ex = blk.mlp.experts, experts_of(rblk)
        assert isinstance(se, SparseExperts) and se.params == ["gate_up_proj", "down_proj"]
        for name in se.params:  # the stored 2:4 experts decompress to the pruned weights, layout included
            assert_bitexact(se.dense_param(name), getattr(ex, name).detach() + 0.0, name)
        assert se.gate_up_proj_values.shape[-1] * 2 == se.gate_up_proj_meta.shape[-1] * 16
    assert any("2 experts modules became SparseExperts" in n for n in rep.notes)
    with torch.no_grad():
        assert_close(m(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any(is_experts_module(mod) for mod in m.modules())


@pytest.mark.parametrize("device", devices())
def test_sparse_experts_forward_matches_the_experts_module_and_trains(device):
    from sparse_kernels.nn import SparseExperts

    for family in FAMILIES:
        for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if device == "cuda" else ()):
            m = tiny(family).to(device, dtype)
            prune(m, method="magnitude", sparsity="2:4", progress=False)
            ex = experts_of(m.model.layers[0])
            se = SparseExperts.from_experts(ex)
            g = torch.Generator().manual_seed(3)
            x = torch.randn(9, 64, generator=g).to(device, dtype)
            index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)]).to(device)
            if family != "gpt_oss":  # its eager loop takes no expert-parallel sentinel
                index[0, 1] = 4  # a sentinel: skipped by both
            weights = torch.softmax(torch.randn(9, 2, generator=g), -1).to(device, dtype)
            impl = ex.config._experts_implementation
            ex.config._experts_implementation = "eager"
            try:
                with torch.no_grad():
                    want = ex(x, index, weights)
            finally:
                ex.config._experts_implementation = impl
            with torch.no_grad():
                out = se(x, index, weights)
            tol = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
            assert_close(out, want, f"{family} {dtype}", **tol)
    # values train, the pattern stays
    se.float()
    x = x.float().requires_grad_()
    se(x, index, weights.float()).pow(2).sum().backward()
    assert se.gate_up_proj_values.grad is not None and se.down_proj_values.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sparse_experts_refusals():
    from sparse_kernels.nn import SparseExperts

    m = tiny("mixtral", layers=1)
    ex = experts_of(m.model.layers[0])
    with pytest.raises(ValueError, match=r"experts: gate_up_proj is not 2:4 along its input features"):
        SparseExperts.from_experts(ex)
    with pytest.raises(TypeError, match="experts: expected a transformers experts module"):
        SparseExperts.from_experts(m.model.layers[0].self_attn.q_proj)
    se = SparseExperts.from_experts(ex, prune=True)  # keeps the 2 largest |w| of every 4
    w = se.dense_param("down_proj")
    assert ((w.reshape(-1, 4) != 0).sum(-1) == 2).all()


def test_moe_refusals():
    m = tiny("mixtral")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=r"permute: blocks\[0\]\.mlp\.experts\.gate_up_proj\[0\]\.gate is an expert"):
        prune(m, method="wanda", sparsity="2:4", calibration=calib(), permute=True, progress=False)
    with pytest.raises(TypeError, match="calibrate_all_experts: expected a bool, got str"):
        prune(m, method="wanda", sparsity="2:4", calibration=calib(), calibrate_all_experts="yes", progress=False)
    for n, p in m.named_parameters():
        assert_bitexact(p.detach(), before[n], n)  # nothing was pruned before the errors
    # permute works once the experts are left out
    rep = prune(m, method="wanda", sparsity="2:4", calibration=calib(), permute=True, progress=False,
                layer_filter=lambda name, mod: not isinstance(mod, ExpertMatrix))
    assert rep.layers and not any("[" in r.name for r in rep.layers)


def test_tap_refuses_an_orientation_the_module_does_not_declare():
    m = tiny("mixtral", layers=1)
    ex = experts_of(m.model.layers[0])
    ex.is_transposed = True  # a lie: its forward multiplies F.linear(x, W[e])
    dup = copy.deepcopy(ex)
    mats = expert_matrices(dup)
    h = next(iter(mats.values())).register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="is_transposed=True but its forward multiplied expert"):
            dup(torch.randn(5, 64), torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5))
    finally:
        h.remove()


# ------------------------------------------------------------------ after pruning: training, checkpoints
def test_mask_zeros_keeps_pruned_experts_sparse_through_training():
    from sparse_kernels.training import MaskedTraining, mask_zeros_

    m = tiny("qwen3_moe")
    ids = calib()
    prune(m, method="wanda", sparsity="2:4", calibration=ids, progress=False)
    zeros = {n: (p == 0) for n, p in m.named_parameters() if "experts" in n}
    names = mask_zeros_(m)
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")} <= set(names)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    MaskedTraining(m, opt)
    for _ in range(3):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in zeros:
            assert (p[zeros[n]] == 0).all(), n
            assert (p[~zeros[n]] != 0).float().mean() > 0.99, n  # the kept weights trained


def test_checkpoint_stores_pruned_experts_compressed(tmp_path):
    from sparse_kernels.llm import checkpoint

    m = tiny("mixtral")
    ids = calib()
    prune(m, method="sparsegpt", sparsity=0.5, calibration=ids, progress=False)  # (2:4: next test)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = checkpoint.save(m, str(tmp_path / "ck"))
    with torch.no_grad():
        y0 = m(ids).logits
    assert cfg["format_version"] == 5
    keys = {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert set(cfg["experts"]) == keys and all(cfg["bitmask"][k]["tensor_shape"] for k in keys)
    assert cfg["sizes"]["experts_ratio"] == 17 / 32  # fp32 at 50%: half the values + 1 bit per weight
    m2, _ = checkpoint.load(str(tmp_path / "ck"))
    sd = m2.state_dict()
    for k in keys:  # bit for bit, but -0.0 comes back +0.0
        assert_bitexact(sd[k], before[k] + 0.0, k)
    with torch.no_grad():
        assert_bitexact(m2(ids).logits, y0)


def test_checkpoint_refuses_a_bad_expert_shape(tmp_path):
    import json

    from sparse_kernels.llm import checkpoint

    m = tiny("mixtral", layers=1)
    prune(m, method="magnitude", sparsity=0.5, progress=False)
    path = tmp_path / "ck"
    checkpoint.save(m, str(path))
    cfg_path = path / checkpoint.CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    key = "model.layers.0.mlp.experts.down_proj"
    for shape, msg in [([4, 64, 32], r"tensor_shape \[4, 64, 32\] does not match the stored"),
                       ([4, 64, "64"], "does not match the stored"), ([2, 128, 64], "do not fit the model")]:
        bad = json.loads(json.dumps(good))
        bad["bitmask"][key]["tensor_shape"] = shape
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(checkpoint.CheckpointError, match=msg):
            checkpoint.load(str(path))
    # a tensor_shape in a checkpoint of an older version (its metadata would be refused first, so
    # the decoder is called as the reader calls it)
    tensors = checkpoint._read_tensors(str(path), good, verify_hash=False)
    assert tensors[key].shape == (4, 64, 64)
    from safetensors.torch import load_file

    raw = load_file(str(path / checkpoint.TENSORS_NAME))
    with pytest.raises(checkpoint.CheckpointError, match="a tensor_shape needs format_version 5; the checkpoint says 4"):
        checkpoint._decode_bitmasks("f", {key: good["bitmask"][key]}, raw, 4)


def test_cli_prunes_an_moe_model_directory(tmp_path, capsys):
    """`sparse-kernels prune` on a local Mixtral directory: the experts are pruned, fine-tuned with
    their zeros kept, stored compressed, and the checkpoint evaluates."""
    import json

    pytest.importorskip("tokenizers")
    from sparse_kernels import cli
    from sparse_kernels.llm import checkpoint

    d = tmp_path / "moe"
    text = save_word_model_dir(d, tiny("mixtral"))
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4",
                     "--seqlen", "32", "--calibration-source", str(text), "--finetune-steps", "2",
                     "--finetune-seqlen", "32", "--eval-tokens", "0", "-o", str(out), "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "pruned and saved to" in o and "expert parameters: 4 of 4 stored bitmask-compressed" in o
    assert "note: 24 expert matrices pruned in place" in o
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["format_version"] == 5 and len(cfg["experts"]) == 4 and len(cfg["layers"]) == 8
    assert {v["pattern"] for v in cfg["experts"].values()} == {"2:4"}  # still 2:4 after fine-tuning
    m, _ = checkpoint.load(str(out))  # (load rebuilds them as SparseExperts, which requires 2:4)
    assert [type(blk.mlp.experts).__name__ for blk in m.model.layers] == ["SparseExperts"] * 2
    assert cli.main(["eval", "--model", str(out), "--eval-source", str(text), "--tokens", "200", "--window", "64",
                     "--stride", "32", "--no-progress"]) == 0
    assert "ppl" in capsys.readouterr().out
    for sparse in ([], ["--sparse", str(out)]):  # speed-only 2:4 copy (experts -> SparseExperts), the checkpoint
        assert cli.main(["bench", "--model", str(d), *sparse, "--new-tokens", "3", "--repeats", "1",
                         "--prompt", "and the lord"]) == 0
        assert "tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_checkpoint_round_trips_sparse_experts(tmp_path, family):
    from sparse_kernels.llm import checkpoint
    from sparse_kernels.nn import SparseExperts

    ids = calib()
    for convert in (True, False):  # SparseExperts, or 2:4 experts left in their 3-D parameters
        m = tiny(family)
        prune(m, method="wanda", sparsity="2:4", calibration=ids, progress=False, convert=convert)
        path = str(tmp_path / f"ck{convert}")
        cfg = checkpoint.save(m, path)
        assert cfg["format_version"] == 5
        assert {v.get("pattern") for v in cfg["experts"].values()} == {"2:4"}
        with torch.no_grad():
            want = m(ids).logits
        m2, _ = checkpoint.load(path)
        assert all(isinstance(blk.mlp.experts, SparseExperts) for blk in m2.model.layers)
        for blk, blk2 in zip(m.model.layers, m2.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                src = blk.mlp.experts
                dense = src.dense_param(name) if isinstance(src, SparseExperts) else getattr(src, name).detach()
                assert_bitexact(blk2.mlp.experts.dense_param(name), dense + 0.0, name)
        with torch.no_grad():
            assert_close(m2(ids).logits, want, atol=1e-4, rtol=1e-4)
    # unstructured experts come back as the transformers module, dense-shaped
    m = tiny(family)
    prune(m, method="wanda", sparsity=0.5, calibration=ids, progress=False)
    cfg = checkpoint.save(m, str(tmp_path / "unstructured"))
    assert all("pattern" not in v for v in cfg["experts"].values())
    m2, _ = checkpoint.load(str(tmp_path / "unstructured"))
    assert is_experts_module(m2.model.layers[0].mlp.experts)


def test_sparsify_swaps_experts_modules():
    import sparse_kernels as sk
    from sparse_kernels.nn import SparseExperts

    m = tiny("qwen3_moe")
    dense = {i: {n: getattr(experts_of(b), n).detach().clone() for n in ("gate_up_proj", "down_proj")}
             for i, b in enumerate(m.model.layers)}
    rep = sk.sparsify(m, "2:4", exclude="model.layers.1.*")
    assert "model.layers.0.mlp.experts" in rep.layers and "model.layers.1.mlp.experts" not in rep.layers
    se = m.model.layers[0].mlp.experts
    assert isinstance(se, SparseExperts) and is_experts_module(m.model.layers[1].mlp.experts)
    for n in ("gate_up_proj", "down_proj"):  # the 2 largest |w| of every 4, as mask_2to4 keeps them
        w = dense[0][n]
        keep = sk.mask_2to4(w.reshape(-1, w.shape[-1])).reshape(w.shape)
        assert_bitexact(se.dense_param(n), torch.where(keep, w, 0.0))
    assert rep.bytes_after < 0.6 * rep.bytes_before
    masked = tiny("qwen3_moe")  # the same model with its experts masked in place computes the same
    with torch.no_grad():
        for n in ("gate_up_proj", "down_proj"):
            p = getattr(experts_of(masked.model.layers[0]), n)
            p.copy_(torch.where(sk.mask_2to4(p.reshape(-1, p.shape[-1])).reshape(p.shape), p, 0.0))
        for name, lin in [(n, mod) for n, mod in masked.named_modules() if isinstance(mod, torch.nn.Linear)
                          and not n.startswith("model.layers.1.")]:
            # (a new parameter: lm_head may share its weight with the embedding, which sparsify leaves dense)
            lin.weight = torch.nn.Parameter(torch.where(sk.mask_2to4(lin.weight), lin.weight, 0.0))
        ids = calib()
        assert_close(m(ids).logits, masked(ids).logits, atol=1e-4, rtol=1e-4)
    rep = sk.sparsify(tiny("qwen3_moe"), None)
    assert any("an experts module" in why for _, why in rep.skipped)



# ------------------------------------------------------------------ robustness
def test_expert_matrices_do_not_keep_their_module_alive():
    import gc
    import weakref

    m = tiny("mixtral", layers=1)
    prune(m, method="wanda", sparsity="2:4", calibration=calib(), progress=False)
    ref = weakref.ref(experts_of(m.model.layers[0]))
    m2 = tiny("mixtral", layers=1)
    gone = weakref.ref(experts_of(m2.model.layers[0]))
    prune(m2, method="wanda", sparsity="2:4", calibration=calib(), progress=False, convert=True)  # replaced
    del m
    gc.collect()
    assert ref() is None and gone() is None


def test_an_interrupt_inside_a_hook_leaves_nothing_installed():
    from torch.overrides import _get_current_function_mode_stack

    m = tiny("mixtral", layers=1)
    ex = experts_of(m.model.layers[0])
    impl = m.config._experts_implementation
    mat = expert_matrices(ex)["down_proj[0]"]

    def interrupt(*a):
        raise KeyboardInterrupt

    h = mat.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            m(calib(n=1))
    finally:
        h.remove()  # the last hook: unwinds the call the interrupt left open
    assert not _get_current_function_mode_stack() and m.config._experts_implementation == impl
    rep = prune(m, method="wanda", sparsity=0.5, calibration=calib(n=1), progress=False)
    assert {r.calibration_tokens for r in rep.layers if "[" in r.name} == {12}  # counted once


def test_experts_multiplied_by_a_copy_raise_instead_of_falling_back():
    m = tiny("mixtral", layers=1)
    ex = experts_of(m.model.layers[0])
    forward = type(ex).forward

    def by_copy(self, hidden_states, top_k_index, top_k_weights):  # multiplies P[e].clone(): not recognizable
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, pos = torch.where(top_k_index == e)
            gate, up = torch.nn.functional.linear(hidden_states[tok], self.gate_up_proj[e].clone()).chunk(2, -1)
            y = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e].clone())
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
        return out

    try:
        type(ex).forward = by_copy
        with pytest.raises(ValueError, match="multiplied none of them by a recognizable expert matrix"):
            prune(m, method="sparsegpt", sparsity=0.5, calibration=calib(), progress=False)
    finally:
        type(ex).forward = forward
    assert not ex._forward_hooks and not ex._forward_pre_hooks


def test_routers_stay_dense():
    cfg = transformers.AutoConfig.for_model("qwen2_moe", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    gate = m.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    rep = prune(m, method="wanda", sparsity=0.5, calibration=calib(), progress=False)
    assert_bitexact(m.model.layers[0].mlp.shared_expert_gate.weight.detach(), gate)
    names = {r.name for r in rep.layers}
    assert "mlp.shared_expert.down_proj" in names and "mlp.shared_expert_gate" not in names
    assert any(n.startswith("1 MoE routing layers left dense: 0.mlp.shared_expert_gate") for n in rep.notes)


def test_overflowing_unrouted_experts_stay_out_of_the_statistics():
    m = tiny("mixtral", layers=1).half()
    ex = experts_of(m.model.layers[0])
    with torch.no_grad():
        ex.gate_up_proj[3].mul_(3e3)  # expert 3 overflows float16 on most tokens ...
    m.model.layers[0].mlp.gate.register_forward_hook(  # ... and the router never picks it
        lambda mod, args, out: (out[0], out[1], torch.tensor([0, 1]).expand_as(out[2]).contiguous()))
    rep = prune(m, method="wanda", sparsity=0.5, calibration=calib(), progress=False)
    rows = {r.name: r for r in rep.layers}
    assert rows["mlp.experts.down_proj[3]"].calibration_tokens < 36 == rows["mlp.experts.down_proj[0]"].calibration_tokens
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n
    assert all(e is not None and math.isfinite(e) for e in rep.block_output_error)


def test_finetune_still_unmasks_a_model_that_is_itself_a_linear():
    from sparse_kernels.training import finetune

    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[:, ::2] = 0

    def loss(model, batch):
        return model(batch).pow(2).mean()

    finetune(lin, [torch.randn(2, 16), torch.randn(2, 16)], steps=2, loss_fn=loss)
    assert not hasattr(lin, "weight_mask")


# ------------------------------------------------------------------ SparseExperts across families
EXPERTS_CLASSES = [  # model type, experts class: gated, gate-less, post-norm, custom gates, function act_fn
    ("mixtral", "MixtralExperts"), ("qwen2_moe", "Qwen2MoeExperts"), ("deepseek_v3", "DeepseekV3Experts"),
    ("gpt_oss", "GptOssExperts"), ("lfm2_moe", "Lfm2MoeExperts"), ("nemotron_h", "NemotronHExperts"),
    ("muse_spark", "MuseSparkExperts"), ("openai_privacy_filter", "OpenAIPrivacyFilterExperts"),
]


def experts_module(model_type, cls_name, hidden=48, inter=40, experts=4):
    """A standalone transformers experts module with random weights (sizes that are not multiples of 16)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), cls_name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    cfg = transformers.AutoConfig.for_model(model_type)
    cfg = getattr(cfg, "text_config", None) or cfg
    for k, v in dict(hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=inter, num_local_experts=experts,
                     num_experts=experts, n_routed_experts=experts, moe_latent_size=None).items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    mod = cls(cfg)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mod, cfg


def equals_transformers(mod, ex, cfg, model_type):
    """``mod`` (SparseExperts or SparseExpertsInt4) on 11 tokens routed to 2 of 4 experts, checked
    against the transformers module ``ex`` holding ``mod``'s weights, in its eager and batched_mm
    implementations; returns ``mod``'s output and the inputs."""
    with torch.no_grad():
        for name in mod.params:
            getattr(ex, name).copy_(mod.dense_param(name))
    hidden = mod.in_features["gate_up_proj" if "gate_up_proj" in mod.params else "up_proj"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, hidden, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(11)])
    weights = torch.softmax(torch.randn(11, 2, generator=g), -1)
    with torch.no_grad():
        got = mod(x, index, weights)
        for impl in ("eager", "batched_mm"):
            cfg._experts_implementation = impl
            assert_close(got, ex(x, index, weights), f"{model_type} vs {impl}", atol=2e-5, rtol=1e-5)
    return got, (x, index, weights)


@pytest.mark.parametrize("model_type,cls_name", EXPERTS_CLASSES, ids=[c[0] for c in EXPERTS_CLASSES])
def test_sparse_experts_equal_transformers_implementations_in_every_family(model_type, cls_name):
    from sparse_kernels.nn import SparseExperts

    ex, cfg = experts_module(model_type, cls_name)
    se = SparseExperts.from_experts(ex, prune=True)
    got, (x, index, weights) = equals_transformers(se, ex, cfg, model_type)
    # a state_dict round trip into another SparseExperts of the same module, and a copy that shares nothing
    other = SparseExperts.from_experts(ex)
    other.load_state_dict({k: v * 1 for k, v in se.state_dict().items()})
    dup = copy.deepcopy(se).half()
    assert next(ex.parameters()).dtype == torch.float32 and se.down_proj_values.dtype == torch.float32
    with torch.no_grad():
        assert_bitexact(other(x, index, weights), got)
        assert torch.isfinite(dup(x.half(), index, weights.half())).all()


def test_experts_whose_sizes_are_not_multiples_of_16_convert_padded():
    from sparse_kernels.nn import SparseExperts

    cfg = transformers.AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = calib()
    ref = copy.deepcopy(m)
    rep = prune(m, method="wanda", sparsity="2:4", calibration=ids, progress=False, convert=True)
    prune(ref, method="wanda", sparsity="2:4", calibration=ids, progress=False)
    se = m.model.layers[1].mlp.experts
    assert isinstance(se, SparseExperts) and se.down_proj_values.shape == (4, 64, 24)  # 40 -> 48 columns
    assert se.in_features["down_proj"] == 40 and se.dense_param("down_proj").shape == (4, 64, 40)
    assert any("2 experts modules became SparseExperts" in n for n in rep.notes)
    with torch.no_grad():
        assert_close(m(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_compressed_tensors_save_writes_sparse_experts_as_their_dense_parameters(tmp_path):
    from sparse_kernels.llm import compressed_tensors as ct

    m = tiny("mixtral")
    ids = calib()
    prune(m, method="wanda", sparsity="2:4", calibration=ids, progress=False, convert=True)
    with torch.no_grad():
        want = m(ids).logits
    ct.save(m, str(tmp_path / "ct"))
    m2, _ = ct.load(str(tmp_path / "ct"))
    for blk, blk2 in zip(m.model.layers, m2.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            assert_bitexact(getattr(blk2.mlp.experts, name).detach(), blk.mlp.experts.dense_param(name))
    with torch.no_grad():
        assert_close(m2(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_checkpoint_refuses_bad_experts_entries(tmp_path):
    import json

    from sparse_kernels.llm import checkpoint

    m = tiny("mixtral", layers=1)
    prune(m, method="magnitude", sparsity="2:4", progress=False)
    path = tmp_path / "ck"
    checkpoint.save(m, str(path))
    cfg_path = path / checkpoint.CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    key = "model.layers.0.mlp.experts.down_proj"
    cases = [({key: {"sparsity": 0.5, "pattern": "1:4"}}, r"unknown pattern \{'model.layers.0.mlp.experts.down_proj'"),
             ({key: 3}, "not a mapping of objects"),
             ({"model.layers.0.mlp.gate.weight": {"pattern": "2:4"}}, "2:4 experts 'model.layers.0.mlp.gate' cannot"),
             ({"model.layers.0.mlp.nowhere.down_proj": {"pattern": "2:4"}}, "is not a module of")]
    for experts, msg in cases:
        bad = dict(good, experts={**good["experts"], **experts})
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(checkpoint.CheckpointError, match=msg):
            checkpoint.load(str(path))
    cfg_path.write_text(json.dumps(good))
    m2, _ = checkpoint.load(str(path), dtype=torch.bfloat16)  # a dtype cast keeps the experts sparse
    assert type(m2.model.layers[0].mlp.experts).__name__ == "SparseExperts"
    assert m2.model.layers[0].mlp.experts.gate_up_proj_values.dtype == torch.bfloat16


def test_sparsegpt_on_concatenated_gate_and_up_equals_pruning_them_apart():
    """An expert's gate_up_proj is one [2I, H] matrix. With an N:M pattern SparseGPT is
    row-independent given H, so pruning [gate; up] gives the weights of pruning gate and up
    separately, bit for bit; unstructured, it ranks each column block over all rows, so there the
    concatenation changes the mask (as magnitude's layer scope does)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    acc = HessianAccumulator(64)
    acc.add(x)
    gate, up = torch.randn(48, 64, generator=g), torch.randn(48, 64, generator=g)
    for sparsity in ("2:4", "4:8", 0.5):
        cat = sparsegpt_prune(torch.cat([gate, up]), acc.H, sparsity, blocksize=32)[0]
        apart = torch.cat([sparsegpt_prune(w, acc.H, sparsity, blocksize=32)[0] for w in (gate, up)])
        if sparsity == 0.5:
            assert not torch.equal(cat, apart)
        else:
            assert_bitexact(cat, apart, sparsity)


# ------------------------------------------------------------------ 2:4 int4 experts
@pytest.mark.parametrize("model_type,cls_name", EXPERTS_CLASSES, ids=[c[0] for c in EXPERTS_CLASSES])
def test_int4_experts_equal_transformers_with_their_dequantized_weights(model_type, cls_name):
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    from sparse_kernels.pruning.experts import out_in

    ex, cfg = experts_module(model_type, cls_name)
    se = SparseExperts.from_experts(ex, prune=True)
    q = SparseExpertsInt4.from_sparse(se, 16)  # in_features 48 / 40 -> padded 48: groups of 16 divide both
    for name in q.params:  # the codes round the 16-bit values: at most half a step of the group's scale away
        err = (q.dense_param(name) - se.dense_param(name)).abs()
        step = getattr(q, name + "_scales").repeat_interleave(16, -1)[..., :q.in_features[name]]
        assert (out_in(q, err) <= step / 2 + 1e-6).all(), name
    got, (x, index, weights) = equals_transformers(q, ex, cfg, model_type)
    with torch.no_grad():
        back = q.to_sparse()  # the 16-bit experts of the dequantized values
        assert type(back) is SparseExperts and back.training == q.training
        assert_close(back(x, index, weights), got, atol=2e-5, rtol=1e-5)
    # the stored bytes: per weight 1/4 byte of codes (2 per kept value of 2) + 1/8 of meta, a scale per 16
    want = sum(e * o * (math.ceil(i / 16) * 16) * (0.25 + 0.125 + 4 / 16)
               for e, o, i in ((4, getattr(q, n + "_meta").shape[1], q.in_features[n]) for n in q.params))
    want += sum(b.numel() * 4 for n in q.params if (b := getattr(q, n + "_bias")) is not None)
    assert q.nbytes() == want
    assert not any(p.requires_grad for n, p in q.named_parameters(recurse=False) if not n.endswith("_bias"))
    other = SparseExpertsInt4.from_sparse(SparseExperts.from_experts(ex), 16)  # a state_dict round trip
    other.load_state_dict({k: v.clone() for k, v in q.state_dict().items()})
    with torch.no_grad():
        assert_bitexact(other(x, index, weights), got)
    assert "2:4 int4, group_size=16" in repr(q)


def test_int4_experts_refuse_bad_input():
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    ex, _ = experts_module("mixtral", "MixtralExperts", hidden=64, inter=32)
    se = SparseExperts.from_experts(ex, prune=True)
    with pytest.raises(ValueError, match=r"group_size: got 64; .* down_proj \(32\)"):
        SparseExpertsInt4.from_sparse(se, 64)
    with pytest.raises(TypeError, match="expected a 16-bit SparseExperts, got MixtralExperts"):
        SparseExpertsInt4.from_sparse(ex)
    q = SparseExpertsInt4.from_sparse(se, 16)
    with pytest.raises(TypeError, match="expected a 16-bit SparseExperts, got SparseExpertsInt4"):
        SparseExpertsInt4.from_sparse(q)
    codes = {"gate_up_proj": torch.zeros(4, 64, 64, dtype=torch.int8), "down_proj": torch.zeros(4, 64, 32,
                                                                                                 dtype=torch.int8)}
    scales = {"gate_up_proj": torch.ones(4, 64, 4), "down_proj": torch.ones(4, 64, 2)}
    assert SparseExpertsInt4.from_codes(ex, codes, scales).group_size == 16
    with pytest.raises(ValueError, match=r"codes, scales: expected dicts with the keys \['down_proj', 'gate_up_proj'\]"):
        SparseExpertsInt4.from_codes(ex, {"down_proj": codes["down_proj"]}, scales)
    bad = dict(codes, down_proj=codes["down_proj"].clone())
    bad["down_proj"][1, 2, 3] = 9
    with pytest.raises(ValueError, match="down_proj: codes: int4 codes must lie in -8..7"):
        SparseExpertsInt4.from_codes(ex, bad, scales)
    bad["down_proj"][1, 2, :4] = torch.tensor([1, 1, 1, 0])
    bad["down_proj"][1, 2, 3] = 0
    with pytest.raises(ValueError, match="down_proj: codes: not 2:4"):
        SparseExpertsInt4.from_codes(ex, bad, scales)
    with pytest.raises(ValueError, match="one group size for every expert parameter, got \\[16, 32\\]"):
        SparseExpertsInt4.from_codes(ex, codes, dict(scales, down_proj=torch.ones(4, 64, 1)))
    with pytest.raises(ValueError, match=r"scales\['gate_up_proj'\]: expected 3-D tensors"):
        SparseExpertsInt4.from_codes(ex, codes, dict(scales, gate_up_proj=torch.ones(64, 4)))


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_int4_convert_stores_sparsegpts_codes_in_int4_experts(family):
    """prune(int4=G, convert=True): each experts module becomes SparseExpertsInt4 holding the codes
    and scales of SparseGPT's joint quantization, gate and up rows put back where they were (halves,
    or gpt-oss's interleaved rows): its weights equal, bit for bit, what the same prune leaves in the
    3-D parameters without convert."""
    from sparse_kernels.nn import SparseExpertsInt4

    ids = calib()
    m, ref = tiny(family), tiny(family)
    rep = prune(m, method="sparsegpt", sparsity="2:4", int4=16, calibration=ids, progress=False, convert=True)
    prune(ref, method="sparsegpt", sparsity="2:4", int4=16, calibration=ids, progress=False)
    assert any("2 experts modules became SparseExpertsInt4" in n and "groups of 16" in n for n in rep.notes)
    for blk, rblk in zip(m.model.layers, ref.model.layers):
        q, ex = blk.mlp.experts, experts_of(rblk)
        assert isinstance(q, SparseExpertsInt4) and q.group_size == 16
        for name in q.params:
            assert_bitexact(q.dense_param(name), getattr(ex, name).detach(), name)
    with torch.no_grad():
        assert_close(m(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_int4_experts_forward_matches_the_dequantized_experts_on_every_device(device):
    """SparseExpertsInt4 on the device's sparse_linear_int4 backend (CPU kernels; Triton on CUDA)
    against the SparseExperts of its dequantized values, in every dtype the device runs."""
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    for family in FAMILIES:
        m = tiny(family)
        prune(m, method="magnitude", sparsity="2:4", progress=False)
        q = SparseExpertsInt4.from_sparse(SparseExperts.from_experts(experts_of(m.model.layers[0])), 32)
        for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if device == "cuda" else ()):
            qd = copy.deepcopy(q).to(device)  # (scales stay float32: the kernels take x in any float dtype)
            ref = qd.to_sparse().to(dtype)
            g = torch.Generator().manual_seed(3)
            x = torch.randn(9, 64, generator=g).to(device, dtype)
            index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)]).to(device)
            weights = torch.softmax(torch.randn(9, 2, generator=g), -1).to(device, dtype)
            with torch.no_grad():
                out = qd(x, index, weights)
                want = ref(x, index, weights)
            assert out.dtype == dtype and out.device.type == device
            tol = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
            assert_close(out, want, f"{family} {dtype}", **tol)


def test_prune_int4_convert_leaves_an_experts_module_with_a_starved_expert_dense():
    from sparse_kernels.nn import SparseExpertsInt4

    m = tiny("mixtral")

    def only_0_and_1(mod, args, out):  # the router picks experts 0 and 1 for every token
        logits, scores, index = out
        return logits, scores, torch.tensor([0, 1]).expand_as(index).contiguous()

    m.model.layers[0].mlp.gate.register_forward_hook(only_0_and_1)
    rep = prune(m, method="sparsegpt", sparsity="2:4", int4=16, calibration=calib(), progress=False, convert=True,
                calibrate_all_experts=False)
    assert is_experts_module(m.model.layers[0].mlp.experts)  # experts 2 and 3: magnitude, no codes
    assert isinstance(m.model.layers[1].mlp.experts, SparseExpertsInt4)
    assert any("1 experts modules stay dense-shaped" in n and "0.mlp.experts" in n for n in rep.notes), rep.notes
    assert any("convert: 1 experts modules became SparseExpertsInt4" in n for n in rep.notes), rep.notes


def test_quantize_int4_rounds_sparse_experts():
    from sparse_kernels import quantize_int4, sparsify
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    m = tiny("qwen3_moe")  # moe_intermediate_size 32: down_proj's 32 inputs
    ids = calib()
    prune(m, method="wanda", sparsity="2:4", calibration=ids, progress=False, convert=True)
    assert all(isinstance(blk.mlp.experts, SparseExperts) for blk in m.model.layers)
    rep = quantize_int4(m, 64)  # 64 divides the attention layers' and gate_up's inputs, not down_proj's 32
    assert [n for n, _ in rep.skipped] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert "does not divide its 64/32 (padded) input features" in rep.skipped[0][1]
    before = [copy.deepcopy(blk.mlp.experts) for blk in m.model.layers]
    rep = quantize_int4(m, 32)
    assert "model.layers.0.mlp.experts" in rep.layers and rep.bytes_after < rep.bytes_before / 2
    qs = [blk.mlp.experts for blk in m.model.layers]
    assert all(isinstance(q, SparseExpertsInt4) and q.group_size == 32 for q in qs)
    for q, se in zip(qs, before):  # round to nearest: within half a step of the 16-bit values
        for n in q.params:
            step = getattr(q, n + "_scales").repeat_interleave(32, -1)
            assert ((q.dense_param(n) - se.dense_param(n)).abs() <= step / 2 + 1e-7).all(), n
    assert not quantize_int4(m, 32).layers  # nothing left to round
    assert sparsify(m, "2:4").layers == ["lm_head"]  # an int4 experts module is no experts module to convert
    with torch.no_grad():
        got = m(ids).logits
        for blk in m.model.layers:  # the same model on the 16-bit experts of the dequantized values
            blk.mlp.experts = blk.mlp.experts.to_sparse()
        assert_close(got, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trips_int4_experts(tmp_path):
    import json

    from sparse_kernels.llm import checkpoint
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    ids = calib()
    m = tiny("gpt_oss")  # [E, in, out] layout, biases
    prune(m, method="sparsegpt", sparsity="2:4", int4=16, calibration=ids, progress=False, convert=True)
    path = tmp_path / "ck"
    cfg = checkpoint.save(m, str(path))
    assert cfg["format_version"] == 6
    key = "model.layers.0.mlp.experts.down_proj"
    assert cfg["experts"][key] == {"sparsity": 0.5, "pattern": "2:4-int4", "num_experts": 4, "out_features": 64,
                                   "in_features": 64, "group_size": 16}
    assert cfg["sizes"]["experts_ratio"] == 0.625 / 4  # fp32: codes 1/4 + meta 1/8 + fp32 scale per 16 = 1/4 byte
    with torch.no_grad():
        want = m(ids).logits
    m2, _ = checkpoint.load(str(path))
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(isinstance(blk.mlp.experts, SparseExpertsInt4) for blk in m2.model.layers)
    with torch.no_grad():
        assert_bitexact(m2(ids).logits, want)
    m3, _ = checkpoint.load(str(path), dtype=torch.bfloat16)  # scales as stored, the rest cast
    q3 = m3.model.layers[0].mlp.experts
    assert q3.down_proj_scales.dtype == torch.float32 and q3.down_proj_bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m3(ids).logits).all()
    m4, _ = checkpoint.load(str(path), int4="dequantize")
    q4 = m4.model.layers[0].mlp.experts
    assert type(q4) is SparseExperts
    assert_bitexact(q4.dense_param("down_proj"), m.model.layers[0].mlp.experts.dense_param("down_proj"))
    # tampered manifests
    cfg_path = path / checkpoint.CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    cases = [(lambda c: c["experts"][key].update(group_size=32), r"group_size must be one positive int .* \["),
             (lambda c: c["experts"][key].update(in_features=48), r"down_proj is recorded as \[experts, out, in\] = "
                                                                  r"\[4, 64, 48\], the model's is \[4, 64, 64\]"),
             (lambda c: c["experts"].pop(key), r"records \['gate_up_proj'\], the model's GptOssExperts there has "
                                               r"expert parameters \['down_proj', 'gate_up_proj'\]"),
             (lambda c: c["experts"].update({"model.layers.0.mlp.router.down_proj": dict(c["experts"][key])}),
              "2:4-int4 experts 'model.layers.0.mlp.router': records")]
    for edit, msg in cases:
        bad = json.loads(json.dumps(good))
        edit(bad)
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(checkpoint.CheckpointError, match=msg):
            checkpoint.load(str(path))
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(checkpoint.CheckpointError, match="2:4-int4 experts need format_version 6; the checkpoint says 5"):
        checkpoint._int4_experts(m, good["experts"], {}, "f", 5)  # (the file's metadata would refuse it first)
    # a stored meta with an invalid nibble (the file rewritten with a matching hash)
    from safetensors.torch import load_file, save_file

    tpath = path / checkpoint.TENSORS_NAME
    raw = load_file(str(tpath))
    raw[key + "_meta"][2, 5, 1] = 0
    save_file(raw, str(tpath), metadata={"format": checkpoint.FORMAT_NAME, "format_version": "6"})
    with pytest.raises(checkpoint.CheckpointError, match=r"2:4-int4 layer 'model.layers.0.mlp.experts.down_proj'"):
        checkpoint.load(str(path), verify_hash=False)


def test_cli_prunes_an_moe_model_to_int4_experts(tmp_path, capsys):
    import json

    pytest.importorskip("tokenizers")
    from sparse_kernels import cli
    from sparse_kernels.llm import checkpoint
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    d = tmp_path / "moe"
    text = save_word_model_dir(d, tiny("mixtral"))
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--int4", "16",
                     "--nsamples", "4", "--seqlen", "32", "--calibration-source", str(text), "--eval-tokens", "0",
                     "-o", str(out), "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "convert: 2 experts modules became SparseExpertsInt4" in o
    assert "expert parameters: 0 of 4 stored bitmask-compressed, 4 as 2:4 int4 codes" in o
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["format_version"] == 6 and {v["pattern"] for v in cfg["experts"].values()} == {"2:4-int4"}
    m, _ = checkpoint.load(str(out))
    assert all(isinstance(blk.mlp.experts, SparseExpertsInt4) for blk in m.model.layers)
    m, _ = checkpoint.load(str(out), int4="dequantize")
    assert all(type(blk.mlp.experts) is SparseExperts for blk in m.model.layers)
    for keep in ([], ["--keep-int4"]):
        assert cli.main(["eval", "--model", str(out), *keep, "--eval-source", str(text), "--tokens", "200",
                         "--window", "64", "--stride", "32", "--no-progress"]) == 0
        assert "ppl" in capsys.readouterr().out
    assert cli.main(["bench", "--model", str(d), "--sparse", str(out), "--keep-int4", "--new-tokens", "3",
                     "--repeats", "1", "--prompt", "and the lord"]) == 0
    assert "tok/s" in capsys.readouterr().out
    assert cli.main(["bench", "--model", str(d), "--int4", "16", "--new-tokens", "3", "--repeats", "1",
                     "--prompt", "and the lord"]) == 0
    o = capsys.readouterr().out
    assert "int4: 8 2:4 layers and 2 experts modules rounded to int4 in groups of 16" in o
    assert "int4 g16" in o and "experts 16-bit" not in o


def test_int4_experts_sizes_backend_and_compressed_tensors_dtype(tmp_path):
    """Regressions from a review: the checkpoint's dense size counts int4 experts at their dense
    size; a SparseExperts on a backend sparse_linear_int4 lacks converts with auto; compressed-
    tensors writes dequantized int4 experts in the model's dtype after load(dtype=)."""
    from sparse_kernels.llm import checkpoint
    from sparse_kernels.llm import compressed_tensors as ct
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    ids = calib()
    sizes = {}
    for int4 in (None, 16):
        m = tiny("mixtral", layers=1)
        prune(m, method="sparsegpt", sparsity="2:4", int4=int4, calibration=ids, progress=False, convert=True)
        sizes[int4] = checkpoint.save(m, str(tmp_path / f"ck{int4}"))["sizes"]
    assert sizes[16]["dense_tensor_bytes"] == sizes[None]["dense_tensor_bytes"]
    assert sizes[16]["file_bytes"] < sizes[None]["file_bytes"]
    ex, _ = experts_module("mixtral", "MixtralExperts", hidden=64, inter=32)
    se = SparseExperts.from_experts(ex, prune=True, backend="decompress")
    assert SparseExpertsInt4.from_sparse(se, 16).backend is None
    m, _ = checkpoint.load(str(tmp_path / "ck16"), dtype=torch.bfloat16)  # int4 scales stay float32
    ct.save(m, str(tmp_path / "ct"))
    m2, _ = ct.load(str(tmp_path / "ct"))
    assert m2.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert_bitexact(m2.model.layers[0].mlp.experts.down_proj.detach(),
                    m.model.layers[0].mlp.experts.dense_param("down_proj", torch.bfloat16))
    with torch.no_grad():
        assert torch.isfinite(m2(ids).logits).all()


def test_checkpoint_refuses_an_integer_tensor_where_the_model_holds_floats(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from sparse_kernels.llm import checkpoint

    m = tiny("gpt_oss", layers=1)
    prune(m, method="sparsegpt", sparsity="2:4", int4=16, calibration=calib(), progress=False, convert=True)
    checkpoint.save(m, str(tmp_path))
    cfg = json.loads((tmp_path / checkpoint.CONFIG_NAME).read_text())
    raw = load_file(str(tmp_path / checkpoint.TENSORS_NAME))
    key = "model.layers.0.mlp.experts.down_proj_bias"
    raw[key] = raw[key].to(torch.int32)
    tpath = tmp_path / checkpoint.TENSORS_NAME
    save_file(raw, str(tpath), metadata={"format": checkpoint.FORMAT_NAME, "format_version": "6"})
    cfg["tensors"][key]["dtype"] = "int32"
    cfg["tensors_bytes"], cfg["tensors_sha256"] = tpath.stat().st_size, checkpoint.sha256_file(str(tpath))
    (tmp_path / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=f"{key}: stored as int32, but the model holds a float32 "
                                                         f"parameter there"):
        checkpoint.load(str(tmp_path))
