"""N:M sparse training with dynamic masks: the straight-through estimator and SR-STE.

:class:`NMSparseTraining` puts a parametrization on the weight of every eligible layer: each
forward pass recomputes the N:M mask from the dense weight's magnitudes (N kept of every M along
the input dimension; channels-last for convolutions, as :func:`sparse_kernels.prune` lays out
N:M convolutions) and uses ``W * mask``. The backward pass is straight-through: the dense weight
gets the gradient of the masked one everywhere, so pruned weights keep learning and the mask can
change. With ``decay > 0`` it is SR-STE (Zhou et al., 2021, "Learning N:M fine-grained structured
sparse neural networks from scratch"): the pruned weights' gradient also gets ``decay * W``,
which pulls them towards zero and settles the mask (the paper's ``lambda_W``, 2e-4 with SGD);
``decay=0`` is the plain STE. The decay term is added by a step pre-hook on the optimizer that
holds the weight, once per step, after a ``GradScaler`` has unscaled the gradients (scaled
alike for a fused optimizer, which unscales inside its step); added in the backward pass it
would be scaled away by AMP and counted again for every use of the layer and every accumulated
batch. Like torch's own coupled ``weight_decay``, it comes after any gradient clipping.

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nm = NMSparseTraining(model, "2:4", optimizer=opt, decay=2e-4)
    ...                                               # train as usual
    nm.finalize()                                     # W := W * mask, parametrizations removed

``finalize`` leaves plain layers holding N:M-sparse weights, ready for
:func:`sparse_kernels.sparsify` (2:4 Linear layers to ``SparseLinear``) or for
``mask_zeros_`` + :class:`~sparse_kernels.training.MaskedTraining` fine-tuning with the mask fixed.
The parametrization keeps the parameter object (``parametrizations.weight.original``), so an
optimizer built before or after works. While parametrized, the model's state_dict names the
dense weights ``parametrizations.weight.original`` (and the model cannot be pickled whole, a
``torch.nn.utils.parametrize`` limit): save after ``finalize``.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..pruning.layers import _is_conv1d, _stock_conv, _stock_linear, channels_last_2d, from_channels_last_2d
from ..pruning.patterns import keep_largest_nm, parse_sparsity
from .schedule import pattern_list

__all__ = ["NMSparseTraining", "nm_mask"]


def nm_mask(weight: torch.Tensor, n: int, m: int, transposed: bool = False) -> torch.Tensor:
    """The N:M keep-mask of ``weight`` (bool, the weight's shape): the ``n`` largest ``|w|`` of
    every ``m`` consecutive input weights (ties to the lower index); for a convolution weight
    ``[out, C, *kernel]`` the groups run along ``C`` at each kernel position; ``transposed``: a
    weight stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    if transposed:
        return nm_mask(weight.t(), n, m).t()
    keep = keep_largest_nm(channels_last_2d(weight.detach().abs()), n, m)
    return from_channels_last_2d(keep, weight.shape)


class _MaskedSTE(torch.autograd.Function):
    """``W * mask`` forward; the gradient passes straight through to every entry of ``W``."""

    @staticmethod
    def forward(ctx, w, n, m, transposed):
        return w * nm_mask(w, n, m, transposed).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _NMParametrization(nn.Module):
    def __init__(self, n: int, m: int, transposed: bool):
        super().__init__()
        self.n, self.m, self.transposed = n, m, transposed

    def forward(self, w):
        return _MaskedSTE.apply(w, self.n, self.m, self.transposed)


def _eligible(mod: nn.Module, m: int) -> str | None:
    """None if ``mod`` can take N:M (groups of ``m``) training, else why not."""
    if isinstance(mod, nn.Linear):
        if not _stock_linear(mod):
            return "a Linear subclass with its own forward"
        return None if mod.in_features % m == 0 else f"in_features {mod.in_features} is not a multiple of M={m}"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if not _stock_conv(mod) or mod.groups != 1:
            return "a grouped convolution or a subclass with its own forward"
        return None if mod.in_channels % m == 0 else f"in_channels {mod.in_channels} is not a multiple of M={m}"
    if _is_conv1d(mod):
        rows = mod.weight.shape[0]
        return None if rows % m == 0 else f"{rows} input features is not a multiple of M={m}"
    return "not a Linear or convolution"


def _is_candidate(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_conv1d(mod)


class NMSparseTraining:
    """Train ``model``'s Linear and convolution layers with dynamic N:M masks (STE / SR-STE).

    Args:
        model: any ``nn.Module``.
        pattern: ``"N:M"`` (``"2:4"``, ``"4:8"``, ...).
        optimizer: the optimizer that trains ``model`` (more: :meth:`attach`); SR-STE's decay is
            added to the gradients just before each of its steps. Needed when ``decay > 0``.
        decay: SR-STE's ``lambda_W`` (>= 0): ``decay * W`` added to the pruned weights'
            gradients; 0 is the plain straight-through estimator.
        include / exclude: an fnmatch pattern or a list of them over module names; by default
            every stock ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d`` (groups=1) whose
            input dimension M divides. A layer that ``include`` names but cannot take the pattern
            raises ValueError, and so does an ``include`` pattern that names no layer.

    Layers whose weight is shared with another module (tied embeddings) are skipped: masking a
    tied weight would change the other module too. Attributes: ``layers`` (the names trained
    N:M), ``skipped`` (``(name, reason)``). Methods: :meth:`attach`, :meth:`masks`,
    :meth:`flips` (mask changes since the last call), :meth:`finalize`.
    """

    def __init__(self, model: nn.Module, pattern: str = "2:4", *, optimizer: torch.optim.Optimizer | None = None,
                 decay: float = 2e-4, include=None, exclude=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        spec = parse_sparsity(pattern, "pattern")
        if not spec.is_nm:
            raise ValueError(f"pattern: N:M training needs an 'N:M' pattern such as '2:4', got {pattern!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay: expected a finite number >= 0 (SR-STE's lambda_W, e.g. 2e-4), got {decay!r}")
        if decay > 0 and optimizer is None:
            raise ValueError("optimizer: SR-STE (decay > 0) adds decay * W to the pruned weights' gradients just before "
                             "each optimizer step; pass the optimizer (or decay=0 for the plain STE)")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        include, exclude = pattern_list("include", include), pattern_list("exclude", exclude) or []
        self.model, self.n, self.m, self.decay = model, spec.n, spec.m, float(decay)
        self.layers: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        owners: dict[int, list[str]] = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
        chosen, hit = [], set()
        for name, mod in model.named_modules():
            if not _is_candidate(mod):
                continue
            if include is not None:
                matched = [p for p in include if fnmatch.fnmatchcase(name, p)]
                if not matched:
                    continue
                hit.update(matched)
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            why = _eligible(mod, spec.m)
            if why is None and parametrize.is_parametrized(mod, "weight"):
                why = "its weight is already parametrized"
            if why is None and len(owners.get(id(mod.weight), [])) > 1:
                others = [o for o in owners[id(mod.weight)] if o != f"{name}.weight"]
                why = f"its weight is shared with {', '.join(others[:3])}"
            if why is not None:
                if include is not None:
                    raise ValueError(f"include: {name} cannot be trained {spec}: {why}")
                self.skipped.append((name, why))
                continue
            chosen.append((name, mod))
        missed = [p for p in include or [] if p not in hit]
        if missed:
            raise ValueError(f"include: pattern {missed[0]!r} names no Linear or convolution layer of the model")
        if not chosen:
            raise ValueError(f"model: no layer can be trained {spec} (skipped: "
                             f"{'; '.join(f'{n}: {w}' for n, w in self.skipped[:5]) or 'none found'})")
        for name, mod in chosen:
            parametrize.register_parametrization(mod, "weight", _NMParametrization(spec.n, spec.m, _is_conv1d(mod)))
            self.layers.append(name)
        self._last: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._final = False
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> "NMSparseTraining":
        """Apply the SR-STE decay before every step of ``optimizer`` to the trained weights it
        holds (no-op for ``decay=0``). Several optimizers may be attached, each for its own."""
        self._check_live("attach")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.decay:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._decay(opt)))
        return self

    @torch.no_grad()
    def _decay(self, optimizer) -> None:
        if self._final:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # a fused optimizer under a GradScaler unscales inside step(), after this hook: the
        # gradients are still scaled here, so the term is scaled alike (GradScaler sets grad_scale)
        scale = getattr(optimizer, "grad_scale", None)
        for _, mod in self._modules():
            w = mod.parametrizations.weight.original
            if w.grad is None or id(w) not in held:
                continue
            keep = nm_mask(w, self.n, self.m, _is_conv1d(mod))
            term = w * (~keep).to(w.dtype) * self.decay
            if isinstance(scale, torch.Tensor):
                term = term * scale.to(term.dtype)
            w.grad.add_(term)

    def _modules(self):
        return [(name, self.model.get_submodule(name)) for name in self.layers]

    def _check_live(self, what: str) -> None:
        if self._final:
            raise RuntimeError(f"{what}: finalize() was already called; the layers are plain now (read their weights)")

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The current N:M keep-masks of the dense weights, by layer name."""
        self._check_live("masks")
        return {name: nm_mask(mod.parametrizations.weight.original, self.n, self.m, _is_conv1d(mod))
                for name, mod in self._modules()}

    @torch.no_grad()
    def flips(self) -> float:
        """The fraction of mask entries that changed since the previous call (0.0 on the first):
        SR-STE's "sparse architecture divergence", which ``decay`` is meant to drive down."""
        self._check_live("flips")
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
        """Make every layer's weight ``W * mask`` for good, remove the parametrizations and the
        optimizer hooks (the parameter objects stay the same, so the optimizer still holds them).
        Returns the layers. Calling it again does nothing."""
        for name, mod in self._modules():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._final = True
        return list(self.layers)
