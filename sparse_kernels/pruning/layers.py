"""The layers :func:`sparse_kernels.prune` prunes, each read and written as a 2-D weight
``[out, in]`` with a matching input ``[tokens, in]``:

* ``nn.Linear``;
* Hugging Face's GPT-2 ``Conv1D`` (weight stored transposed, ``[in, out]``);
* ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` (vision and audio models). The weight
  ``[out, C, kh, kw]`` is flattened channels-last, ``[out, kh*kw*C]`` (column
  ``(r*kw + s)*C + c``), the order an implicit-GEMM convolution reduces over in NHWC, so N:M
  groups run along input channels (as NVIDIA's ASP and TensorRT lay out 2:4 convolutions; it
  needs ``C % M == 0``). The input is unfolded into the matching patches (im2col, padding mode
  honoured), one row per output position, so ``rows @ W2d.T`` is the convolution's output.
  Grouped and depthwise convolutions, transposed ones, ``Conv3d`` and subclasses whose
  ``forward`` is not the stock one (weight standardization, padding of their own) are not pruned;
* each expert's matrix of a transformers mixture-of-experts module (3-D ``gate_up_proj`` /
  ``down_proj`` parameters): an :class:`~sparse_kernels.pruning.experts.ExpertMatrix` stand-in
  named ``"<module>.<param>[<expert>]"`` (a gated ``gate_up_proj`` as two,
  ``"...gate_up_proj[<expert>].gate"`` and ``".up"``), whose hooks see the rows routed to that
  expert (:mod:`sparse_kernels.pruning.experts`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["prunable_layers", "layer_input_rows", "hook_input"]


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a Linear with its weight stored ``[in, out]`` (matched by
    name, ``nf`` and a 2-D weight, so a real 1-D convolution of that name is not taken)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def _stock_conv(m: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` (or subclass) that computes the stock convolution of its own
    ``weight``: subclasses that transform the weight (weight standardization) or the input (their
    own padding) in ``forward`` are not, and pruning their raw weight would not do what it says."""
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(m, cls):
            t = type(m)
            return t.forward is cls.forward and t._conv_forward is cls._conv_forward
    return False


def _stock_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) whose ``forward`` is the stock one."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def channels_last_2d(w: torch.Tensor) -> torch.Tensor:
    """A weight as a 2-D matrix: ``[out, in]`` as it is; a convolution's ``[out, C, *kernel]``
    flattened channels-last, ``[out, prod(kernel) * C]`` (column ``(position) * C + c``), so that
    groups of consecutive columns run along input channels at one kernel position."""
    return w if w.dim() == 2 else w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1)


def from_channels_last_2d(v: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`channels_last_2d` for a weight of ``shape`` (a view where it can be)."""
    if len(shape) == 2:
        return v.reshape(shape)
    nd = len(shape)
    return v.reshape(shape[0], *shape[2:], shape[1]).permute(0, nd - 1, *range(1, nd - 1))


def _is_conv(m: nn.Module) -> bool:
    """A convolution :func:`prune` can take: a stock ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1 and _stock_conv(m)


def hook_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a layer's call, as a forward hook with ``with_kwargs=True`` sees it:
    the first positional argument, else ``input=``."""
    if args:
        return args[0]
    x = kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{type(module).__name__}: called without its input as the first positional argument or "
                         f"input=, got keywords {sorted(kwargs)}; its inputs cannot be recorded for pruning")
    return x


def prunable_layers(block: nn.Module, layer_filter: Callable[[str, nn.Module], bool] | None = None) -> dict:
    """``{name: module}`` of the ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv1d`` / ``nn.Conv2d``
    (``groups=1``) layers inside ``block``, and ``{"<module>.<param>[<e>]": ExpertMatrix}`` (a
    gated ``gate_up_proj``: ``[<e>].gate`` and ``[<e>].up``) for the experts of its
    mixture-of-experts modules (``layer_filter`` sees those too); an MoE block's
    routing Linear layers are left out (:func:`~sparse_kernels.pruning.experts.router_layers`)."""
    from .experts import expert_matrices, router_layers

    out = {}
    routers = router_layers(block)  # MoE routing layers stay dense
    for name, mod in block.named_modules():
        if (isinstance(mod, nn.Linear) or _is_conv1d(mod) or _is_conv(mod)) and name not in routers:
            if layer_filter is None or layer_filter(name, mod):
                out[name] = mod
        for key, mat in expert_matrices(mod).items():
            full = f"{name}.{key}" if name else key
            if layer_filter is None or layer_filter(full, mat):
                out[full] = mat
    return out


def _get_weight(layer) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``: a view for Linear, a transposed view for
    Conv1D, the channels-last flattening ``[out, kh*kw*C]`` for a convolution (a copy, or a view
    of a channels_last weight: never modify it in place, write it back with :func:`_set_weight`)."""
    if _is_conv1d(layer):
        return layer.weight.data.t()
    if _is_conv(layer):
        return channels_last_2d(layer.weight.data)
    if not isinstance(layer, nn.Module):  # an ExpertMatrix: its property is a view into the 3-D parameter
        return layer.weight
    return layer.weight.data


def _set_weight(layer, w: torch.Tensor) -> None:
    if _is_conv(layer):
        layer.weight.data.copy_(from_channels_last_2d(w, layer.weight.shape))
        return
    _get_weight(layer).copy_(w)


def conv_channels(layer) -> int | None:
    """A convolution's input channels (the span an N:M group must stay within); None otherwise."""
    return layer.in_channels if _is_conv(layer) else None


def layer_input_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input ``x`` as rows matching :func:`_get_weight`'s columns: ``x`` itself for a
    Linear / ``Conv1D`` (any leading shape, ``[..., in]``); for a convolution the unfolded
    patches ``[batch * positions, kh*kw*C]``, so that ``rows @ _get_weight(layer).T`` is the
    convolution without its bias."""
    if not _is_conv(layer):
        return x
    one_d = isinstance(layer, nn.Conv1d)
    if x.dim() == layer.weight.dim() - 1:  # unbatched input
        x = x.unsqueeze(0)
    if x.dim() != layer.weight.dim() or x.shape[1] != layer.in_channels:
        raise ValueError(f"x: a {type(layer).__name__} with {layer.in_channels} input channels got an input of "
                         f"shape {tuple(x.shape)}")
    kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    pad = _padding(layer)  # F.pad order: last dim first, (left, right) each
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    if one_d:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, kernel[0]), (1, dilation[0]), (1, stride[0])
    c, k = layer.in_channels, kernel[0] * kernel[1]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [n, C*k, L], C outermost
    n, _, positions = cols.shape
    return cols.view(n, c, k, positions).permute(0, 3, 2, 1).reshape(n * positions, k * c)


def _padding(layer) -> list[int]:
    """The convolution's padding as ``F.pad`` takes it (last spatial dim first, left then right);
    ``padding='same'`` puts the odd pixel on the right, as PyTorch does."""
    pad = []
    for i in reversed(range(len(layer.kernel_size))):
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                left = right = 0
            else:  # "same"
                total = layer.dilation[i] * (layer.kernel_size[i] - 1)
                left, right = total // 2, total - total // 2
        else:
            left = right = layer.padding[i]
        pad += [left, right]
    return pad
