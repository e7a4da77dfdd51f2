"""Pruning schedules driven from the user's own training loop.

Three schedules, each a small object answering "which sparsity at step t?":

* :class:`OneShot` ``(sparsity, at_step=0)``;
* :class:`Iterative` ``(rate, rounds, every, start=0)``: round r (r = 1..rounds, at step
  ``start + (r-1)*every``) prunes ``rate`` of the weights that remain, so the sparsity after
  round r is ``1 - (1 - rate)**r``;
* :class:`Cubic` ``(final, initial=0, begin=0, end, frequency)``, after Zhu & Gupta (2017):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - begin)/(end - begin))**3`` at ``t = begin, begin+frequency,
  ...`` and always at ``t = end``, where it reaches ``s_f``.

:class:`MagnitudePruner` applies a schedule to a model's layers with **layer-wise** or **global**
magnitude scoring and keeps the masks through training (it owns a :class:`MaskedTraining`)::

    pruner = MagnitudePruner(model, Cubic(0.9, begin=100, end=1000, frequency=50), optimizer=opt)
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()          # the optimizer hook re-zeroes pruned weights and their Adam/momentum state
        opt.zero_grad()
        pruner.step()       # prunes when the schedule says so

Exact counts: a layer of n weights at sparsity s has exactly ``round(s * n)`` zeros in its mask
(global scope: ``round(s * N)`` over all N prunable weights). Weights are ranked by score with a
stable sort, so ties are broken by position (the lower flat index, in module registration order
for global scope, is pruned first) and the result is deterministic. Masks only grow: weights
already pruned rank below every live weight, and a target below the current sparsity prunes
nothing new (it never regrows).

Hooks: ``register_hook(fn)`` calls ``fn(pruner, event)`` after each pruning event, where
``event = {"step", "sparsity", "layers": {name: (zeros, numel)}}``.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..pruning.layers import _is_conv1d, _stock_conv
from .masks import MaskedTraining, get_mask, set_mask


def _check_fraction(name: str, v, *, closed_high: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    ok = 0.0 <= v <= 1.0 if closed_high else 0.0 <= v < 1.0
    if not ok or math.isnan(v):
        rng = "[0, 1]" if closed_high else "[0, 1)"
        raise ValueError(f"{name}: sparsity must be in {rng}, got {v}")
    return float(v)


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")
    return v


class Schedule:
    """Base class: ``target(step)`` is the sparsity to prune to at ``step``, or None (no event)."""

    final: float

    def target(self, step: int) -> float | None:  # pragma: no cover - interface
        raise NotImplementedError

    def events(self) -> list[tuple[int, float]]:
        """Every ``(step, sparsity)`` pruning event, in order."""
        raise NotImplementedError


class OneShot(Schedule):
    def __init__(self, sparsity: float, at_step: int = 0):
        self.final = _check_fraction("sparsity", sparsity)
        self.at_step = _check_int("at_step", at_step, 0)

    def target(self, step):
        return self.final if step == self.at_step else None

    def events(self):
        return [(self.at_step, self.final)]


class Iterative(Schedule):
    def __init__(self, rate: float, rounds: int, every: int, start: int = 0):
        self.rate = _check_fraction("rate", rate)
        self.rounds = _check_int("rounds", rounds, 1)
        self.every = _check_int("every", every, 1)
        self.start = _check_int("start", start, 0)
        self.final = self.sparsity_after(self.rounds)

    def sparsity_after(self, r: int) -> float:
        return 1.0 - (1.0 - self.rate) ** r

    def target(self, step):
        d = step - self.start
        if d < 0 or d % self.every or d // self.every >= self.rounds:
            return None
        return self.sparsity_after(d // self.every + 1)

    def events(self):
        return [(self.start + r * self.every, self.sparsity_after(r + 1)) for r in range(self.rounds)]


class Cubic(Schedule):
    def __init__(self, final: float, *, end: int, begin: int = 0, frequency: int = 1, initial: float = 0.0):
        self.final = _check_fraction("final", final)
        self.initial = _check_fraction("initial", initial)
        if self.initial > self.final:
            raise ValueError(f"initial: sparsity {initial} must not exceed final sparsity {final}")
        self.begin = _check_int("begin", begin, 0)
        self.end = _check_int("end", end, 0)
        if self.end <= self.begin:
            raise ValueError(f"end: must be > begin ({begin}), got {end}")
        self.frequency = _check_int("frequency", frequency, 1)

    def sparsity_at(self, step: int) -> float:
        t = min(max(step, self.begin), self.end)
        frac = (t - self.begin) / (self.end - self.begin)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def target(self, step):
        if step < self.begin or step > self.end:
            return None
        if step == self.end or (step - self.begin) % self.frequency == 0:
            return self.sparsity_at(step)
        return None

    def events(self):
        steps = list(range(self.begin, self.end, self.frequency)) + [self.end]
        return [(t, self.sparsity_at(t)) for t in steps]


def n_pruned(sparsity: float, numel: int) -> int:
    """The exact number of zeros a mask of ``numel`` weights has at ``sparsity``: ``round(s * n)``."""
    return min(numel, int(round(sparsity * numel)))


def bottom_k_mask(scores: torch.Tensor, k: int, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (True = kept) with exactly ``k`` False entries: the ``k`` lowest ``scores``.

    Entries already ``pruned`` (bool, True = pruned) rank first. Ties go to the lower flat
    index (stable sort), so the result is deterministic. ``scores`` may be any float tensor.
    """
    flat = scores.detach().flatten().to(torch.float64)
    if pruned is not None:
        flat = torch.where(pruned.flatten(), torch.full_like(flat, -math.inf), flat)
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:k]] = False
    return keep.view(scores.shape)


def pattern_list(name: str, value) -> list[str] | None:
    """``include``/``exclude`` arguments: None, one fnmatch pattern (a str) or an iterable of them."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        out = list(value)
    except TypeError:
        raise TypeError(f"{name}: expected an fnmatch pattern or a list of them, got {type(value).__name__}") from None
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name}: expected fnmatch patterns (str), got {type(bad[0]).__name__} {bad[0]!r}")
    return out


def _default_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .masks import _is_24_sparse_linear, _sparse_linear_cls

    cls = _sparse_linear_cls()
    kinds = (nn.Linear,) + ((cls,) if cls is not None else ())
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, kinds) or _is_conv1d(m) or _stock_conv(m)) and not _is_24_sparse_linear(m)]


class MagnitudePruner:
    """Prune ``model``'s weights on a :class:`Schedule`, from a user-written training loop.

    Args:
        model: any ``nn.Module``.
        schedule: :class:`OneShot`, :class:`Iterative`, :class:`Cubic` or a custom :class:`Schedule`.
        scope: ``"layer"`` (each layer reaches the sparsity) or ``"global"`` (one ranking across
            all targeted layers; per-layer sparsities differ, the total is exact).
        include / exclude: fnmatch patterns over module names (default: every ``nn.Linear``, GPT-2
            ``Conv1D``, ``nn.Conv1d``/``Conv2d``/``Conv3d`` (any groups, the mask has the weight's
            shape; not subclasses that transform their weight in ``forward``) and unstructured SparseLinear; 2:4 SparseLinear layers are never targets).
        score: ``fn(module) -> tensor of weight's shape`` (higher = keep); default ``|weight|``.
        optimizer: attached to the internal :class:`MaskedTraining` so momentum/Adam state and
            weight decay cannot revive pruned weights (more via :meth:`attach`).

    Methods: :meth:`step` (advance one training step, prune on schedule events),
    :meth:`prune` (prune now to a sparsity), :meth:`apply` (re-zero pruned weights/state),
    :meth:`sparsity`, :meth:`register_hook`.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, *, scope: str = "layer",
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 score: Callable[[nn.Module], torch.Tensor] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected OneShot, Iterative, Cubic or a Schedule, got {type(schedule).__name__}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
        self.model, self.schedule, self.scope = model, schedule, scope
        self.score = score or (lambda m: m.weight.detach().abs())
        targets = _default_targets(model)
        include, exclude = pattern_list("include", include), pattern_list("exclude", exclude)
        if include is not None:
            targets = [(n, m) for n, m in targets if any(fnmatch.fnmatchcase(n, p) for p in include)]
        if exclude is not None:
            targets = [(n, m) for n, m in targets if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
        if not targets:
            raise ValueError("model: no prunable layers (nn.Linear, nn.Conv1d/2d/3d, unstructured SparseLinear) matched "
                             "include/exclude")
        self.targets = targets
        self.steps_done = 0
        self._hooks: list[Callable] = []
        self.masked = MaskedTraining(model, optimizer)

    # ------------------------------------------------------------------ user-facing
    def attach(self, optimizer: torch.optim.Optimizer) -> "MagnitudePruner":
        """Keep ``optimizer``'s steps from reviving pruned weights (see :class:`MaskedTraining`)."""
        self.masked.attach(optimizer)
        return self

    def register_hook(self, fn: Callable[["MagnitudePruner", dict], None]) -> Callable[[], None]:
        """Call ``fn(pruner, event)`` after every pruning event; returns a function that removes it."""
        self._hooks.append(fn)
        return lambda: self._hooks.remove(fn)

    def step(self) -> dict | None:
        """Advance the schedule by one training step; prune if step ``t`` (0-based count of
        previous ``step()`` calls) is a schedule event. Returns the event dict or None."""
        t = self.steps_done
        self.steps_done += 1
        target = self.schedule.target(t)
        return None if target is None else self.prune(target, step=t)

    def apply(self) -> None:
        """Re-zero every pruned weight, its gradient and the attached optimizers' state."""
        self.masked.apply()

    def prune(self, sparsity: float | None = None, *, step: int | None = None,
              per_layer: dict[str, float] | None = None) -> dict:
        """Prune now to ``sparsity`` (default: the schedule's final sparsity).

        ``per_layer`` (layer scope only) maps target names to their own sparsity.
        """
        s = self.schedule.final if sparsity is None else _check_fraction("sparsity", sparsity)
        per_layer = dict(per_layer or {})
        unknown = set(per_layer) - {n for n, _ in self.targets}
        if unknown:
            raise ValueError(f"per_layer: {sorted(unknown)} are not target layers of this pruner")
        if per_layer and self.scope != "layer":
            raise ValueError("per_layer: only supported with scope='layer'")
        if self.scope == "layer":
            for name, m in self.targets:
                pruned = self._pruned(m)
                s_l = _check_fraction(f"per_layer[{name!r}]", per_layer[name]) if name in per_layer else s
                k = max(n_pruned(s_l, m.weight.numel()), int(pruned.sum()))
                self._set_mask(m, bottom_k_mask(self._scores(m), k, pruned))
        else:
            scores = torch.cat([self._scores(m).flatten().to(torch.float64).cpu() for _, m in self.targets])
            pruned = torch.cat([self._pruned(m).flatten().cpu() for _, m in self.targets])
            keep = bottom_k_mask(scores, max(n_pruned(s, scores.numel()), int(pruned.sum())), pruned)
            offset = 0
            for _, m in self.targets:
                n = m.weight.numel()
                self._set_mask(m, keep[offset:offset + n].view(m.weight.shape))
                offset += n
        self.masked.refresh()
        self.masked.apply()
        event = {"step": step, "sparsity": s, "layers": self.layer_sparsity()}
        for fn in list(self._hooks):
            fn(self, event)
        return event

    def layer_sparsity(self) -> dict[str, tuple[int, int]]:
        """``{name: (pruned count, numel)}`` of every target layer, from its mask."""
        return {n: (int((~self._mask(m)).sum()), m.weight.numel()) for n, m in self.targets}

    def sparsity(self) -> float:
        """Overall fraction of pruned weights over the target layers."""
        d = self.layer_sparsity().values()
        return sum(z for z, _ in d) / sum(n for _, n in d)

    # ------------------------------------------------------------------ internals
    def _scores(self, m: nn.Module) -> torch.Tensor:
        s = self.score(m)
        if tuple(s.shape) != tuple(m.weight.shape):
            raise ValueError(f"score: returned shape {tuple(s.shape)}, expected the weight's {tuple(m.weight.shape)}")
        return s

    def _mask(self, m: nn.Module) -> torch.Tensor:
        keep = get_mask(m, "weight")
        return torch.ones_like(m.weight, dtype=torch.bool) if keep is None else keep

    def _pruned(self, m: nn.Module) -> torch.Tensor:
        return ~self._mask(m)

    @staticmethod
    def _set_mask(m: nn.Module, keep: torch.Tensor) -> None:
        set_mask(m, keep)
