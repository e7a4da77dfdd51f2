"""Argument checks shared by the public op wrappers.

Every check raises TypeError (wrong kind of thing) or ValueError (right kind, bad value)
naming the argument, what it got and what it needs.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype {str(x.dtype).replace('torch.', '')} is not supported; expected one of {names}")


def same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{k}: is on {v.device} but {k0} is on {v0.device}; all tensors must share one device")


def multiple(name: str, what: str, value: int, m: int, hint: str = "") -> None:
    if value % m != 0:
        raise ValueError(f"{name}: {what} must be a multiple of {m}, got {value}{hint}")


def bias(b, n: int, x: torch.Tensor) -> None:
    """An optional linear bias: 1-D, x's dtype, ``n`` (output features) long, on x's device."""
    if b is None:
        return
    tensor("bias", b, ndim=1, dtypes=(x.dtype,))
    if b.shape[0] != n:
        raise ValueError(f"bias: shape {tuple(b.shape)} does not match the {n} output features; expected ({n},)")
    same_device(x=x, bias=b)
