"""Lottery tickets (Frankle & Carbin, 2019) with late rewinding (Frankle et al., 2020).

The procedure, driven from the user's own training loop::

    ticket = LotteryTicket(model, rate=0.2, rewind_step=0)      # 1. snapshots the initial weights
    for r in range(rounds + 1):
        opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
        ticket.attach(opt)                                       # masks survive every step
        for x, y in data:                                        # 2. train (dense in round 0)
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            ticket.step()                                        # takes the late-rewind snapshot
        evaluate(model)
        ticket.prune()                                           # 3. prune `rate` of what remains
        ticket.rewind()                                          # 4. survivors back to the snapshot
                                                                 # 5. the next round retrains

``rewind_step=k > 0`` rewinds to the weights after the k-th ``step()`` call of round 0 instead of
initialisation ("late rewinding"). :meth:`LotteryTicket.reinit` is the random re-initialisation
control: same masks, freshly sampled weights. Pruning is magnitude-based, layer-wise or global,
with exact counts (see :mod:`sparse_kernels.training.schedule`); ``rates`` gives some layers their
own per-round rate (the paper prunes LeNet's output layer at half the rate).
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from .training.masks import MASK_SUFFIX, apply_masks
from .training.schedule import MagnitudePruner, OneShot, _check_fraction, _check_int


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s parameters and buffers, masks excluded."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`snapshot`) back into ``model`` in place, then re-zero pruned weights.

    The copy is exact: every restored tensor equals the snapshot bit for bit, except the pruned
    positions, which are ``+0.0``.
    """
    own = model.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise KeyError(f"state: {missing[:5]} are not in the model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    apply_masks(model)


class LotteryTicket:
    """Iterative magnitude pruning with rewinding; see the module docstring for the loop.

    Args:
        model: any ``nn.Module``; its ``nn.Linear``, ``nn.Conv1d/2d/3d`` (and unstructured SparseLinear)
            layers are pruned.
        rate: fraction of the *remaining* weights pruned per round, in (0, 1).
        scope: ``"layer"`` or ``"global"`` magnitude ranking.
        rewind_step: 0 = rewind to initialisation; k > 0 = to the weights after k training steps.
        rates: ``{fnmatch pattern: rate}`` overrides for some layers (layer scope only).
        include / exclude: fnmatch patterns over module names, as :class:`MagnitudePruner`.
    """

    def __init__(self, model: nn.Module, *, rate: float = 0.2, scope: str = "layer", rewind_step: int = 0,
                 rates: dict[str, float] | None = None, include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None):
        self.rate = _check_fraction("rate", rate)
        if self.rate == 0.0:
            raise ValueError("rate: sparsity must be in (0, 1), got 0.0")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ValueError(f"rewind_step: expected an int >= 0, got {rewind_step!r}")
        self.model = model
        self.pruner = MagnitudePruner(model, OneShot(0.0), scope=scope, include=include, exclude=exclude)
        self.rates = {}
        for pat, r in (rates or {}).items():
            _check_fraction(f"rates[{pat!r}]", r)
            hit = [n for n, _ in self.pruner.targets if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise ValueError(f"rates: pattern {pat!r} matches no prunable layer")
            for n in hit:
                self.rates.setdefault(n, r)
        if self.rates and scope != "layer":
            raise ValueError("rates: per-layer rates need scope='layer'")
        self.rewind_step = rewind_step
        self.init_state = snapshot(model)
        self.rewind_state = self.init_state if rewind_step == 0 else None
        self.round = 0
        self.steps_done = 0

    # ------------------------------------------------------------------ the loop
    def attach(self, optimizer: torch.optim.Optimizer) -> "LotteryTicket":
        """Keep ``optimizer`` from reviving pruned weights (a new optimizer each round is usual)."""
        self.pruner.attach(optimizer)
        return self

    def step(self) -> None:
        """Count one training step; takes the late-rewind snapshot after step ``rewind_step``."""
        self.steps_done += 1
        if self.rewind_state is None and self.steps_done == self.rewind_step:
            self.rewind_state = snapshot(self.model)

    def sparsity_after(self, rounds: int, rate: float | None = None) -> float:
        return 1.0 - (1.0 - (self.rate if rate is None else rate)) ** rounds

    def prune(self, rounds: int = 1) -> dict:
        """Prune ``rate`` of the remaining weights ``rounds`` times at once (``rounds > 1`` is the
        one-shot baseline reaching the same sparsity in one go; 0 re-applies the current sparsity).
        Returns the pruning event.  Raises TypeError/ValueError unless ``rounds`` is an int >= 0."""
        total = self.round + _check_int("rounds", rounds, 0)
        per_layer = {n: self.sparsity_after(total, r) for n, r in self.rates.items()}
        event = self.pruner.prune(self.sparsity_after(total), per_layer=per_layer)
        self.round = total
        return event

    def rewind(self) -> None:
        """Set every surviving weight (and every other parameter/buffer) to the rewind snapshot."""
        if self.rewind_state is None:
            raise RuntimeError(
                f"rewind: no snapshot yet; step() was called {self.steps_done} times but rewind_step="
                f"{self.rewind_step}")
        restore(self.model, self.rewind_state)

    def reinit(self, seed: int | None = None) -> None:
        """Random re-initialisation control: every module's ``reset_parameters()`` (fresh draw from
        the init distribution, seeded by ``seed``), masks kept and re-applied."""
        if seed is not None:
            torch.manual_seed(seed)
        for m in self.model.modules():
            if hasattr(m, "reset_parameters") and m is not self.model:
                m.reset_parameters()
        apply_masks(self.model)

    def fraction_remaining(self) -> float:
        """Fraction of the prunable weights still alive."""
        return 1.0 - self.pruner.sparsity()
