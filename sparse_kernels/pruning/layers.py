"""The layers :func:`sparse_kernels.prune` prunes: ``nn.Linear`` and Hugging Face's GPT-2
``Conv1D`` (weight stored transposed, ``[in, out]``), read and written as ``[out, in]``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["prunable_layers"]


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a Linear with its weight stored ``[in, out]`` (matched by
    name, ``nf`` and a 2-D weight, so a real 1-D convolution of that name is not taken)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def prunable_layers(block: nn.Module, layer_filter: Callable[[str, nn.Module], bool] | None = None) -> dict:
    """``{name: module}`` of the ``nn.Linear`` / GPT-2 ``Conv1D`` layers inside ``block``."""
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if layer_filter is None or layer_filter(name, mod):
                out[name] = mod
    return out


def _get_weight(layer) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view for Linear, a transpose for Conv1D)."""
    return layer.weight.data.t() if _is_conv1d(layer) else layer.weight.data


def _set_weight(layer, w: torch.Tensor) -> None:
    _get_weight(layer).copy_(w)
