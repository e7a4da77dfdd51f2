"""Lottery tickets: exact rewinding (init and late), pruning rounds, the re-init control."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_bitexact
from sparse_kernels.lottery import LotteryTicket, restore, snapshot
from sparse_kernels.training import n_pruned


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(21, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3))


def train(model, ticket, steps=12, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    ticket.attach(opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(9, 21, generator=g), torch.randint(0, 3, (9,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ticket.step()


def test_rewind_restores_exact_initial_values():
    model = net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = LotteryTicket(model, rate=0.3)
    for r in range(3):
        train(model, ticket, seed=r)
        assert not torch.equal(model[0].weight.detach()[model[0].weight.detach() != 0],
                               init["0.weight"][model[0].weight.detach() != 0])
        ticket.prune()
        ticket.rewind()
        for name in ("0", "2", "4"):
            keep = getattr(model, name).weight_mask
            w = model.state_dict()[f"{name}.weight"]
            assert_bitexact(w[keep], init[f"{name}.weight"][keep], f"{name} survivors, round {r}")
            assert_bitexact(w[~keep], torch.zeros_like(w[~keep]), f"{name} pruned, round {r}")
            assert_bitexact(model.state_dict()[f"{name}.bias"], init[f"{name}.bias"], f"{name}.bias")
            assert int((~keep).sum()) == n_pruned(ticket.sparsity_after(r + 1), keep.numel())
    assert ticket.fraction_remaining() == pytest.approx(0.7 ** 3, abs=2e-3)


def test_late_rewinding_uses_step_k_snapshot():
    model = net()
    ticket = LotteryTicket(model, rate=0.5, rewind_step=4)
    with pytest.raises(RuntimeError, match="no snapshot yet"):
        ticket.rewind()
    shadow = net()
    shadow.load_state_dict(model.state_dict())
    shadow_ticket = LotteryTicket(shadow, rate=0.5)
    train(shadow, shadow_ticket, steps=4)
    at_k = snapshot(shadow)
    train(model, ticket, steps=12)
    ticket.prune()
    ticket.rewind()
    keep = model[2].weight_mask
    assert_bitexact(model[2].weight.detach()[keep], at_k["2.weight"][keep], "late-rewound survivors")


def test_per_layer_rates_and_global_scope():
    model = net()
    ticket = LotteryTicket(model, rate=0.2, rates={"4": 0.1})
    ticket.prune(rounds=2)
    assert int((~model[0].weight_mask).sum()) == n_pruned(1 - 0.8 ** 2, 630)
    assert int((~model[4].weight_mask).sum()) == n_pruned(1 - 0.9 ** 2, 30)
    g = net(1)
    t = LotteryTicket(g, rate=0.5, scope="global")
    t.prune()
    total = sum(m.weight_mask.numel() for m in g.modules() if isinstance(m, nn.Linear))
    zeros = sum(int((~m.weight_mask).sum()) for m in g.modules() if isinstance(m, nn.Linear))
    assert zeros == n_pruned(0.5, total)


def test_reinit_keeps_masks_changes_weights():
    model = net()
    ticket = LotteryTicket(model, rate=0.5)
    ticket.prune()
    before = model[0].weight.detach().clone()
    ticket.reinit(seed=123)
    keep = model[0].weight_mask
    w = model[0].weight.detach()
    assert (w[~keep] == 0).all()
    assert not torch.equal(w[keep], before[keep])


def test_snapshot_restore_roundtrip_and_errors():
    model = net()
    s = snapshot(model)
    assert not any(k.endswith("_mask") for k in s)
    with torch.no_grad():
        model[0].weight.add_(1)
    restore(model, s)
    assert_bitexact(model[0].weight.detach(), s["0.weight"])
    with pytest.raises(KeyError, match="not in the model"):
        restore(model, {"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\), got 0.0"):
        LotteryTicket(model, rate=0.0)
    with pytest.raises(ValueError, match=r"rate: sparsity must be in \[0, 1\), got 1.0"):
        LotteryTicket(model, rate=1.0)
    with pytest.raises(ValueError, match="rewind_step: expected an int >= 0"):
        LotteryTicket(model, rewind_step=-1)
    with pytest.raises(ValueError, match="matches no prunable layer"):
        LotteryTicket(model, rates={"fc9": 0.1})
