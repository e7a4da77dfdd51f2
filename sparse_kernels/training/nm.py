"""N:M sparse training with dynamic masks: the straight-through estimator and SR-STE.

:class:`NMSparseTraining` puts a parametrization on the weight of every eligible layer: each
forward pass recomputes the N:M mask from the dense weight's magnitudes (N kept of every M along
the input dimension; channels-last for convolutions, as :func:`sparse_kernels.prune` lays out
N:M convolutions) and uses ``W * mask``. The backward pass is straight-through: the dense weight
gets the gradient of the masked one everywhere, so pruned weights keep learning and the mask can
change. With ``decay > 0`` it is SR-STE (Zhou et al., 2021, "Learning N:M fine-grained structured
sparse neural networks from scratch"): the pruned weights' gradient also gets ``decay * W``,
which pulls them towards zero and settles the mask (the paper's ``lambda_W``, 2e-4); ``decay=0``
is the plain STE.

    nm = NMSparseTraining(model, "2:4", decay=2e-4)   # before or after building the optimizer
    ...                                               # train as usual
    nm.finalize()                                     # W := W * mask, parametrizations removed

``finalize`` leaves plain layers holding N:M-sparse weights, ready for
:func:`sparse_kernels.sparsify` (2:4 Linear layers to ``SparseLinear``) or for
``mask_zeros_`` + :class:`~sparse_kernels.training.MaskedTraining` fine-tuning with the mask fixed.
The parametrization keeps the parameter object (``parametrizations.weight.original``), so an
optimizer built before or after works.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..pruning.layers import _stock_conv
from ..pruning.patterns import keep_largest_nm, parse_sparsity

__all__ = ["NMSparseTraining", "nm_mask"]


def _channels_last(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 2 else w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M keep-mask of ``weight`` (bool, the weight's shape): the ``n`` largest ``|w|`` of
    every ``m`` consecutive input weights (ties to the lower index); for a convolution weight
    ``[out, C, *kernel]`` the groups run along ``C`` at each kernel position."""
    score = _channels_last(weight.detach().abs())
    keep = keep_largest_nm(score, n, m)
    if weight.dim() == 2:
        return keep
    shape = weight.shape
    return keep.reshape(shape[0], *shape[2:], shape[1]).permute(0, weight.dim() - 1, *range(1, weight.dim() - 1))


class _MaskedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, n, m, decay):
        keep = nm_mask(w, n, m)
        ctx.save_for_backward(w, keep)
        ctx.decay = decay
        return w * keep.to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, keep = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * w * (~keep).to(w.dtype)  # SR-STE: pull pruned weights to zero
        return grad, None, None, None


class _NMParametrization(nn.Module):
    def __init__(self, n: int, m: int, decay: float):
        super().__init__()
        self.n, self.m, self.decay = n, m, decay

    def forward(self, w):
        return _MaskedSTE.apply(w, self.n, self.m, self.decay)


def _eligible(mod: nn.Module, m: int) -> str | None:
    """None if ``mod`` can take N:M (groups of ``m``) training, else why not."""
    if isinstance(mod, nn.Linear):
        if type(mod).forward is not nn.Linear.forward:
            return "a Linear subclass with its own forward"
        return None if mod.in_features % m == 0 else f"in_features {mod.in_features} is not a multiple of M={m}"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if not _stock_conv(mod) or mod.groups != 1:
            return "a grouped convolution or a subclass with its own forward"
        return None if mod.in_channels % m == 0 else f"in_channels {mod.in_channels} is not a multiple of M={m}"
    return "not a Linear or convolution"


class NMSparseTraining:
    """Train ``model``'s Linear and convolution layers with dynamic N:M masks (STE / SR-STE).

    Args:
        model: any ``nn.Module``.
        pattern: ``"N:M"`` (``"2:4"``, ``"4:8"``, ...).
        decay: SR-STE's ``lambda_W`` (>= 0): added gradient ``decay * W`` on the pruned weights;
            0 is the plain straight-through estimator.
        include / exclude: fnmatch patterns over module names; by default every stock
            ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (groups=1) whose input dimension M divides.
            A layer that ``include`` names but cannot take the pattern raises ValueError.

    Attributes: ``layers`` (the names trained N:M), ``skipped`` (``(name, reason)``).
    Methods: :meth:`masks`, :meth:`flips` (mask changes since the last call), :meth:`finalize`.
    """

    def __init__(self, model: nn.Module, pattern: str = "2:4", *, decay: float = 2e-4,
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        spec = parse_sparsity(pattern, "pattern")
        if not spec.is_nm:
            raise ValueError(f"pattern: N:M training needs an 'N:M' pattern such as '2:4', got {pattern!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay: expected a finite number >= 0 (SR-STE's lambda_W, e.g. 2e-4), got {decay!r}")
        include = None if include is None else list(include)
        exclude = list(exclude or [])
        self.model, self.n, self.m, self.decay = model, spec.n, spec.m, float(decay)
        self.layers: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        chosen = []
        for name, mod in model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            why = _eligible(mod, spec.m)
            if why is None and parametrize.is_parametrized(mod, "weight"):
                why = "its weight is already parametrized"
            if why is not None:
                if include is not None:
                    raise ValueError(f"include: {name} cannot be trained {spec}: {why}")
                self.skipped.append((name, why))
                continue
            chosen.append((name, mod))
        if not chosen:
            raise ValueError(f"model: no layer can be trained {spec} (skipped: "
                             f"{'; '.join(f'{n}: {w}' for n, w in self.skipped[:5]) or 'none found'})")
        for name, mod in chosen:
            parametrize.register_parametrization(mod, "weight", _NMParametrization(spec.n, spec.m, self.decay))
            self.layers.append(name)
        self._last: dict[str, torch.Tensor] = {}

    def _modules(self):
        return [(name, self.model.get_submodule(name)) for name in self.layers]

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The current N:M keep-masks of the dense weights, by layer name."""
        return {name: nm_mask(mod.parametrizations.weight.original, self.n, self.m) for name, mod in self._modules()}

    @torch.no_grad()
    def flips(self) -> float:
        """The fraction of mask entries that changed since the previous call (0.0 on the first):
        SR-STE's "sparse architecture divergence", which ``decay`` drives down as training settles."""
        now = self.masks()
        changed = total = 0
        for name, keep in now.items():
            if name in self._last:
                changed += int((keep != self._last[name]).sum())
                total += keep.numel()
        self._last = now
        return changed / total if total else 0.0

    @torch.no_grad()
    def finalize(self) -> list[str]:
        """Make every layer's weight ``W * mask`` for good and remove the parametrizations (the
        parameter objects stay the same, so the optimizer still holds them). Returns the layers."""
        for name, mod in self._modules():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        return list(self.layers)
