"""Masks through optimizer steps, schedules reaching exact targets, recovery fine-tuning."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from conftest import assert_bitexact
from sparse_kernels.training import (Cubic, Iterative, MagnitudePruner, MaskedTraining, OneShot, attach_mask,
                                     bottom_k_mask, finetune, get_mask, load_masked_state_dict, n_pruned)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(23, 37), nn.ReLU(), nn.Linear(37, 19), nn.ReLU(), nn.Linear(19, 5))


def random_masks(model, sparsity=0.6, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            attach_mask(m, torch.rand(m.weight.shape, generator=g) >= sparsity)


def train_steps(model, opt, n=15, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(11, 23, generator=g)
        y = torch.randint(0, 5, (11,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masks_survive_optimizer_steps(name):
    model = mlp()
    random_masks(model)
    opt = OPTIMIZERS[name](model.parameters())
    MaskedTraining(model, opt)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    train_steps(model, opt)
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        keep = m.weight_mask
        pruned_vals = m.weight.detach()[~keep]
        assert_bitexact(pruned_vals, torch.zeros_like(pruned_vals), f"{n} pruned weights")
        assert not torch.equal(m.weight.detach()[keep], before[n][keep]), f"{n}: kept weights did not train"
        for v in opt.state[m.weight].values():
            if isinstance(v, torch.Tensor) and v.shape == keep.shape:
                assert v[~keep].abs().max() == 0, f"{n}: optimizer state alive at pruned positions"


def test_without_hooks_weight_decay_would_resurrect():
    # The control: the same loop without MaskedTraining does revive pruned weights (test can fail).
    model = mlp()
    random_masks(model)
    opt = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    train_steps(model, opt, n=3)
    assert (model[0].weight.detach()[~model[0].weight_mask] != 0).any()


def test_gradients_masked_before_step():
    model = mlp()
    random_masks(model)
    MaskedTraining(model)
    model(torch.randn(4, 23)).sum().backward()
    g = model[0].weight.grad
    assert_bitexact(g[~model[0].weight_mask], torch.zeros_like(g[~model[0].weight_mask]), "grad")


def test_2to4_mask_buffer_keeps_pattern():
    from sparse_kernels import mask_2to4

    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    attach_mask(lin, mask_2to4(lin.weight.detach()))
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
    MaskedTraining(lin, opt)
    for _ in range(5):
        lin(torch.randn(7, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    nz = (lin.weight.detach() != 0).view(24, 8, 4).sum(-1)
    assert nz.max() <= 2
    assert torch.equal(lin.weight.detach() != 0, lin.weight_mask)


def test_sparse_linear_2to4_values_train_pattern_fixed():
    nn_mod = pytest.importorskip("sparse_kernels.nn")
    torch.manual_seed(0)
    sl = nn_mod.SparseLinear.from_dense(nn.Linear(40, 16), pattern="2:4")  # 40 -> padded to 48
    meta0, values0 = sl.meta.clone(), sl.values.detach().clone()
    opt = torch.optim.AdamW(sl.parameters(), lr=1e-2, weight_decay=0.1)
    MaskedTraining(sl, opt)
    for _ in range(3):
        sl(torch.randn(5, 40)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert_bitexact(sl.meta, meta0, "meta (the 2:4 pattern)")
    assert not torch.equal(sl.values.detach(), values0)
    dense = sl.dense_weight()
    assert (dense != 0).view(16, 10, 4).sum(-1).max() <= 2


def test_sparse_linear_unstructured_mask_survives_and_prunes():
    nn_mod = pytest.importorskip("sparse_kernels.nn")
    torch.manual_seed(0)
    keep0 = torch.rand(12, 29) > 0.5
    sl = nn_mod.SparseLinear.from_dense(nn.Linear(29, 12), pattern=None, mask=keep0)
    assert torch.equal(get_mask(sl), keep0)
    opt = torch.optim.SGD(sl.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    pruner = MagnitudePruner(sl, Iterative(0.5, rounds=2, every=3), optimizer=opt)
    for _ in range(6):
        sl(torch.randn(7, 29)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    keep = get_mask(sl)
    assert not hasattr(sl, "weight_mask"), "the SparseLinear's own packed mask must be used"
    assert int((~keep).sum()) == n_pruned(0.75, keep.numel())
    assert not (keep & ~keep0).any()
    w = sl.weight.detach()
    assert_bitexact(w[~keep], torch.zeros_like(w[~keep]), "pruned weights")
    assert torch.equal(sl.dense_weight() != 0, keep)


def test_masks_travel_in_state_dict_and_checkpoint():
    model = mlp()
    random_masks(model)
    sd = model.state_dict()
    assert "0.weight_mask" in sd and sd["0.weight_mask"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = mlp(seed=5)
    with pytest.raises(RuntimeError, match="weight_mask"):
        fresh.load_state_dict(torch.load(buf))
    buf.seek(0)
    fresh = mlp(seed=5)
    load_masked_state_dict(fresh, torch.load(buf))
    for (n, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(a, nn.Linear):
            assert_bitexact(b.weight_mask, a.weight_mask, n)
            assert_bitexact(b.weight, a.weight, n)


def test_attach_mask_errors():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"mask: shape \(3, 5\) must equal weight's shape \(3, 4\)"):
        attach_mask(lin, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="no tensor attribute 'kernel'"):
        attach_mask(lin, torch.ones(3, 4, dtype=torch.bool), name="kernel")


# ------------------------------------------------------------------------- schedules
def test_bottom_k_ties_deterministic():
    scores = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5, 1.0])
    keep = bottom_k_mask(scores, 3)
    assert keep.tolist() == [False, False, True, False, True, True]
    pruned = torch.tensor([False, False, False, False, False, True])
    keep = bottom_k_mask(scores, 2, pruned)
    assert keep.tolist() == [True, False, True, True, True, False]


def test_schedule_values():
    assert Iterative(0.2, 3, every=10, start=5).events() == [(5, pytest.approx(0.2)), (15, pytest.approx(0.36)),
                                                           (25, pytest.approx(0.488))]
    c = Cubic(0.9, begin=10, end=110, frequency=20, initial=0.1)
    ev = c.events()
    assert [t for t, _ in ev] == [10, 30, 50, 70, 90, 110]
    assert ev[0][1] == pytest.approx(0.1) and ev[-1][1] == 0.9
    assert ev[2][1] == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 0.4) ** 3)
    assert c.target(11) is None and c.target(111) is None


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ["oneshot", "iterative", "cubic"])
def test_schedules_reach_targets_exactly(scope, kind):
    model = mlp()
    sched = {
        "oneshot": OneShot(0.73, at_step=4),
        "iterative": Iterative(0.3, rounds=4, every=5),
        "cubic": Cubic(0.85, begin=2, end=23, frequency=4),
    }[kind]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pruner = MagnitudePruner(model, sched, scope=scope, optimizer=opt)
    seen = []
    pruner.register_hook(lambda p, ev: seen.append(ev))
    g = torch.Generator().manual_seed(0)
    prev_keep = None
    for _ in range(30):
        x, y = torch.randn(8, 23, generator=g), torch.randint(0, 5, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ev = pruner.step()
        if ev is None:
            continue
        lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if scope == "layer":
            for m in lin:
                zeros = int((m.weight.detach() == 0).sum())
                assert zeros == n_pruned(ev["sparsity"], m.weight.numel())
        else:
            total = sum(m.weight.numel() for m in lin)
            zeros = sum(int((m.weight.detach() == 0).sum()) for m in lin)
            assert zeros == n_pruned(ev["sparsity"], total)
        keep = torch.cat([m.weight_mask.flatten() for m in lin])
        if prev_keep is not None:
            assert not (keep & ~prev_keep).any(), "a pruned weight grew back"
        prev_keep = keep
    assert [e["step"] for e in seen] == [t for t, _ in sched.events()]
    assert pruner.sparsity() == pytest.approx(sched.final, abs=1e-2)
    assert seen[-1]["sparsity"] == sched.final


def test_pruner_include_exclude_and_errors():
    model = mlp()
    p = MagnitudePruner(model, OneShot(0.5), exclude=["4"])
    assert [n for n, _ in p.targets] == ["0", "2"]
    p.prune()
    assert get_mask(model[4]) is None
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        OneShot(1.5)
    with pytest.raises(ValueError, match=r"final: sparsity must be in \[0, 1\), got -0.1"):
        Cubic(-0.1, end=10)
    with pytest.raises(ValueError, match="end: must be > begin"):
        Cubic(0.5, begin=10, end=10)
    with pytest.raises(ValueError, match="scope: expected 'layer' or 'global'"):
        MagnitudePruner(model, OneShot(0.5), scope="row")
    with pytest.raises(ValueError, match="no prunable layers"):
        MagnitudePruner(model, OneShot(0.5), include=["nothing*"])
    with pytest.raises(TypeError, match="schedule: expected"):
        MagnitudePruner(model, 0.5)


# ------------------------------------------------------------------------- finetune
def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_finetune_after_2to4_lowers_loss_and_keeps_masks():
    from sparse_kernels import mask_2to4
    from sparse_kernels.training import lm_loss

    model = tiny_llama()
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.mul_(mask_2to4(m.weight))
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (4, 16), generator=g)
    data = base.repeat(4, 1)  # a learnable, repeating corpus
    before = lm_loss(model, data)
    keys = set(model.state_dict())
    zero0 = {n: m.weight.detach() == 0 for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    rep = finetune(model, data, steps=40, lr=3e-3, batch_size=4)
    after = lm_loss(model, data)
    assert after < before - 0.2, (before, after)
    assert rep["masked_layers"] == 14 and len(rep["losses"]) == 40
    assert set(model.state_dict()) == keys, "the masks finetune attached itself are removed again"
    for n, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            assert (w != 0).view(w.shape[0], -1, 4).sum(-1).max() <= 2
            assert (w[zero0[n]] == 0).all(), f"{n}: a pruned weight came back"
    model2 = tiny_llama()
    finetune(model2, data, steps=1, keep_masks=True, mask_zeros=0.5)
    assert not any(k.endswith("_mask") for k in model2.state_dict())  # dense: nothing to mask


def test_finetune_errors():
    model = mlp()
    with pytest.raises(ValueError, match="steps: must be >= 1, got 0"):
        finetune(model, torch.zeros(2, 3, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match=r"token_batches: expected a LongTensor \[n, seqlen\]"):
        finetune(model, torch.zeros(2, 3), steps=1)


def test_finetune_after_prune_convert_keeps_24_pattern():
    pruning = pytest.importorskip("sparse_kernels.pruning")
    nn_mod = pytest.importorskip("sparse_kernels.nn")
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 64, (2, 16), generator=g).repeat(4, 1)
    pruning.prune(model, method="wanda", sparsity="2:4", calibration=data[:4], convert=True, progress=False)
    sls = [m for m in model.modules() if isinstance(m, nn_mod.SparseLinear)]
    assert len(sls) == 14
    metas = [m.meta.clone() for m in sls]
    values = [m.values.detach().clone() for m in sls]
    rep = finetune(model, data, steps=10, lr=3e-3, batch_size=4)
    assert rep["loss_last"] < rep["loss_first"]
    for m, meta, v in zip(sls, metas, values):
        assert_bitexact(m.meta, meta, "meta")
        assert not torch.equal(m.values.detach(), v)


def test_mask_zeros_keeps_a_pruned_gpt2_conv1d_sparse_through_training():
    transformers = pytest.importorskip("transformers")
    from sparse_kernels import prune
    from sparse_kernels.training import MaskedTraining, mask_zeros_

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                 n_positions=16))
    ids = torch.randint(0, 64, (2, 8))
    prune(model, "magnitude", 0.5, progress=False)
    names = mask_zeros_(model)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                     "transformer.h.0.mlp.c_proj"]  # GPT-2's Conv1D layers (before: none, and training revived them)
    zeros = {n: model.get_submodule(n).weight == 0 for n in names}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    MaskedTraining(model, opt)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, z in zeros.items():
        assert bool((model.get_submodule(n).weight[z] == 0).all()), n
