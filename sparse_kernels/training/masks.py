"""Masks that survive training: pruned weights stay exactly zero through any optimizer step.

A *masked layer* is any module whose pruned positions are known:

* a module with a ``weight_mask`` buffer (bool, the weight's shape, True = kept), which is how
  :func:`attach_mask` marks a plain ``nn.Linear`` (or any module with a ``weight``); the mask is
  a buffer, so it is saved in ``state_dict()`` and in checkpoints (load it back with
  :func:`load_masked_state_dict`);
* an unstructured :class:`sparse_kernels.SparseLinear` (weight + bit-packed mask);
* a 2:4 :class:`sparse_kernels.SparseLinear`: it stores only the kept values and a metadata
  tensor that no optimizer touches, so its pattern is fixed by construction and its
  ``values`` train freely.

:class:`MaskedTraining` keeps the masks true during training. It registers, on every masked
weight, a post-accumulate-grad hook that zeroes the gradient at pruned positions, and on the
optimizer a step post-hook that zeroes the pruned weights again (``masked_fill_``, so they are
``+0.0`` bit for bit) and the optimizer state at those positions (SGD ``momentum_buffer``,
Adam/AdamW ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, any per-parameter state tensor of the
weight's shape). Momentum, Adam state and weight decay then cannot resurrect a pruned weight.
"""

from __future__ import annotations

import weakref
from typing import Iterator

import torch
from torch import nn

MASK_SUFFIX = "_mask"


def _sparse_linear_cls(module: nn.Module | None = None):
    if module is not None and type(module).__name__ != "SparseLinear":
        return None
    try:
        from ..nn import SparseLinear
    except ImportError:
        return None
    return SparseLinear


def _is_24_sparse_linear(module: nn.Module) -> bool:
    cls = _sparse_linear_cls(module)
    return cls is not None and isinstance(module, cls) and getattr(module, "pattern", None) == "2:4"


def _is_unstructured_sparse_linear(module: nn.Module) -> bool:
    cls = _sparse_linear_cls(module)
    return cls is not None and isinstance(module, cls) and getattr(module, "pattern", "2:4") is None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool mask (True = kept) of ``module.<name>``, or None when the parameter is not masked.

    Our ``<name>_mask`` buffer first; then an unstructured SparseLinear's bit-packed ``mask``
    buffer, unpacked to bool ``[out, in]``. 2:4 SparseLinear layers return None: their pattern
    lives in ``meta`` and training cannot change it.
    """
    m = getattr(module, name + MASK_SUFFIX, None)
    if isinstance(m, torch.Tensor):
        return m
    if name == "weight" and _is_unstructured_sparse_linear(module):
        from ..ops import linear as L

        return L.unpack_mask(module.mask, module.in_features)
    return None


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> nn.Module:
    """Set the mask of ``module.<name>`` and zero the pruned weights: an unstructured
    SparseLinear's packed ``mask`` is rewritten in place; any other module gets :func:`attach_mask`."""
    if name == "weight" and _is_unstructured_sparse_linear(module) and not hasattr(module, "weight_mask"):
        from ..ops import linear as L

        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"mask: shape {tuple(mask.shape)} must equal weight's shape {tuple(module.weight.shape)}")
        keep = mask.to(device=module.weight.device, dtype=torch.bool)
        with torch.no_grad():
            module.mask.copy_(L.pack_mask(keep))
            module.weight.masked_fill_(~keep, 0)
        return module
    return attach_mask(module, mask, name)


def attach_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> nn.Module:
    """Mark ``module.<name>`` as pruned where ``mask`` is False and zero it there.

    ``mask`` is a bool (or 0/1) tensor of the parameter's shape. It becomes (or replaces) the
    persistent buffer ``<name>_mask``, so it travels in ``state_dict()``. Returns ``module``.

    Raises TypeError when ``module.<name>`` is not a tensor, ValueError on a shape mismatch.
    """
    w = getattr(module, name, None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"module: {type(module).__name__} has no tensor attribute {name!r} to mask")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} must equal {name}'s shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    buf = name + MASK_SUFFIX
    if isinstance(getattr(module, buf, None), torch.Tensor):
        getattr(module, buf).copy_(mask)
    else:
        module.register_buffer(buf, mask.clone(), persistent=True)
    with torch.no_grad():
        w.masked_fill_(~getattr(module, buf), 0)
    return module


def remove_mask(module: nn.Module, name: str = "weight") -> None:
    """Drop the ``<name>_mask`` buffer (the weight keeps its zeros but may now train them)."""
    buf = name + MASK_SUFFIX
    if buf in module._buffers:
        del module._buffers[buf]


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(qualified module name, module, parameter name)`` for every masked parameter."""
    for qname, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if get_mask(mod, pname) is not None:
                yield qname, mod, pname


def apply_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero every pruned weight of ``model`` (``+0.0``), its gradient and, if given, its optimizer state."""
    with torch.no_grad():
        for _, mod, pname in masked_parameters(model):
            p = getattr(mod, pname)
            keep = get_mask(mod, pname)
            _zero_param(p, keep, optimizer)


def _zero_param(p: torch.Tensor, keep: torch.Tensor, optimizer) -> None:
    pruned = ~keep
    p.masked_fill_(pruned, 0)
    if p.grad is not None:
        p.grad.masked_fill_(pruned, 0)
    if optimizer is not None:
        state = optimizer.state.get(p)
        if state:
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.masked_fill_(pruned, 0)


def load_masked_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """``model.load_state_dict(state_dict)`` after creating the ``*_mask`` buffers it holds.

    A fresh ``nn.Linear`` has no ``weight_mask`` buffer, so a plain ``load_state_dict`` of a
    masked checkpoint fails with unexpected keys; this registers each ``<module>.<name>_mask``
    found in ``state_dict`` on the matching module first. Returns what ``load_state_dict`` returns.
    """
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        mod_name, _, leaf = key.rpartition(".")
        if not leaf.endswith(MASK_SUFFIX) or mod_name not in modules:
            continue
        mod = modules[mod_name]
        pname = leaf[: -len(MASK_SUFFIX)]
        if isinstance(getattr(mod, pname, None), torch.Tensor) and leaf not in mod._buffers:
            mod.register_buffer(leaf, torch.ones_like(getattr(mod, pname), dtype=torch.bool), persistent=True)
    return model.load_state_dict(state_dict, strict=strict)


class MaskedTraining:
    """Keep ``model``'s masks exact while a user's own loop trains it.

    Usage::

        mt = MaskedTraining(model, optimizer)     # hooks the optimizer's step
        for x, y in data:
            loss_fn(model(x), y).backward()
            optimizer.step()                      # pruned weights and their state re-zeroed here
            optimizer.zero_grad()

    Hooks installed:

    * on every masked parameter, ``register_post_accumulate_grad_hook``: the gradient is zeroed at
      pruned positions (so gradient clipping and norms see the masked gradient);
    * on each attached optimizer, ``register_step_post_hook``: :meth:`apply` after every step.

    Masks are read from the modules at every call, so a schedule may change them between steps
    (call :meth:`refresh` after adding new masked layers). :meth:`remove` uninstalls everything.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, mask_grads: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.mask_grads = mask_grads
        self._optimizers: list[weakref.ref] = []
        self._handles: list = []
        self._param_hooks: dict[int, object] = {}
        self.refresh()
        if optimizer is not None:
            self.attach(optimizer)

    def refresh(self) -> None:
        """Install grad hooks on masked parameters found since the last call."""
        if not self.mask_grads:
            return
        for _, mod, pname in masked_parameters(self.model):
            p = getattr(mod, pname)
            if id(p) in self._param_hooks or not p.requires_grad:
                continue
            self._param_hooks[id(p)] = p.register_post_accumulate_grad_hook(self._grad_hook(mod, pname))

    @staticmethod
    def _grad_hook(mod, pname):
        mod_ref = weakref.ref(mod)

        def hook(p):
            m = mod_ref()
            keep = get_mask(m, pname) if m is not None else None
            if keep is not None and p.grad is not None:
                p.grad.masked_fill_(~keep, 0)

        return hook

    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskedTraining":
        """Re-apply masks (weights and optimizer state) after every ``optimizer.step()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        ref = weakref.ref(optimizer)
        self._optimizers.append(ref)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply(opt)))
        return self

    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights and gradients, and the state of ``optimizer`` (default: all attached)."""
        opts = [optimizer] if optimizer is not None else [r() for r in self._optimizers if r() is not None]
        with torch.no_grad():
            for _, mod, pname in masked_parameters(self.model):
                keep = get_mask(mod, pname)
                p = getattr(mod, pname)
                for opt in opts or [None]:
                    _zero_param(p, keep, opt)

    def remove(self) -> None:
        """Uninstall every hook (masks stay on the modules)."""
        for h in self._handles + list(self._param_hooks.values()):
            h.remove()
        self._handles.clear()
        self._param_hooks.clear()
        self._optimizers.clear()
