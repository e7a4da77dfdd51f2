"""Triton kernels, one module per op family (imported lazily by sparse_kernels.ops: triton is optional)."""

from __future__ import annotations

import contextlib


def on_device(t):
    """Context for a Triton launch on ``t``'s device.

    Triton launches on the *current* CUDA device and its current stream, not on the device of
    the tensors it is given: a tensor on ``cuda:1`` while ``cuda:0`` is current would be read
    from the wrong GPU (an illegal address, or silently another GPU's memory through peer
    access).  The C++ wrappers take a ``CUDAGuard`` for the same reason.  CPU tensors (the
    interpreter) need nothing.
    """
    if t.device.type == "cuda":
        import torch

        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
