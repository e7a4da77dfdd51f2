"""The 2:4 format ops: ``mask_2to4``, ``compress_2to4``, ``decompress_2to4``.

Layout and encoding: docs/FORMAT.md and :mod:`sparse_kernels.reference.sparse24`.
Backends: reference (default everywhere), cpp (csrc/cpu/sparse24.cpp), cuda
(csrc/cuda/sparse24.cu), triton (sparse_kernels/triton/sparse24.py); all bit-exact.
"""

from __future__ import annotations

import torch

from ..reference import sparse24 as ref
from . import _registry as R
from . import _validate as V

_PAD_HINT = "; pad the columns with zeros to a multiple of 16 (e.g. torch.nn.functional.pad) first"


# ---------------------------------------------------------------- schemas + fakes
def _mask_fake(w, scores):
    return torch.empty_like(w, dtype=torch.bool)


def _compress_fake(w, prune):
    rows, cols = w.shape
    return w.new_empty(rows, cols // 2), w.new_empty(rows, cols // 16, dtype=torch.int16)


def _decompress_fake(values, meta):
    rows, half = values.shape
    return values.new_empty(rows, half * 2)


R.define("mask_2to4", "(Tensor w, Tensor? scores) -> Tensor", fake=_mask_fake, reference=ref.mask_2to4)
R.define("compress_2to4", "(Tensor w, bool prune) -> (Tensor, Tensor)", fake=_compress_fake,
         reference=ref.compress_2to4)
R.define("decompress_2to4", "(Tensor values, Tensor meta) -> Tensor", fake=_decompress_fake,
         reference=ref.decompress_2to4)
# Not a backend of decompress_2to4: the CUDA kernel without its metadata check (the check reads an
# error flag back to the host, a sync on every call that also rules out CUDA-graph capture).
# Only sparse_linear's "decompress" backend calls it (ops/linear.py); like the other
# GPU sparse_linear kernels it does not validate meta's contents (a corrupt nibble gives wrong
# numbers, never an access outside the group: each index is 2 bits).  Kernel:
# csrc/cuda/sparse24_ops.cpp.
UNCHECKED_DECOMPRESS = "decompress_2to4_unchecked_cuda"
R.LIB.define(UNCHECKED_DECOMPRESS + "(Tensor values, Tensor meta) -> Tensor")
torch.library.register_fake(f"{R.NAMESPACE}::{UNCHECKED_DECOMPRESS}", _decompress_fake, lib=R.LIB)


def _triton(fn_name):
    def launch(*args):
        from ..triton import on_device
        from ..triton import sparse24 as t

        with on_device(args[0]):
            return getattr(t, fn_name)(*args)

    return launch


_TRITON_DEVICES = ["cuda"] + (["cpu"] if R.triton_interpreted() else [])
R.impl_python("mask_2to4", "triton", _triton("mask_2to4"), _TRITON_DEVICES)
R.impl_python("compress_2to4", "triton", _triton("compress_2to4"), _TRITON_DEVICES)
R.impl_python("decompress_2to4", "triton", _triton("decompress_2to4"), _TRITON_DEVICES)


# ---------------------------------------------------------------- public API
def mask_2to4(w: torch.Tensor, scores: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """2:4 mask of ``w``: True for the 2 kept entries of every group of 4 along the last dim.

    Args:
        w: float16/bfloat16/float32 tensor ``[..., cols]``, ``cols % 4 == 0``.
        scores: optional tensor of ``w``'s shape (any float dtype); kept entries are the 2
            largest scores instead of the 2 largest ``|w|``.
        backend: ``auto | reference | cpp | cuda | triton`` (default: ``SPARSE_KERNELS_BACKEND``
            or ``auto``).

    Returns a bool tensor of ``w``'s shape with exactly two True per group.  Ties go to the
    lower index (``[0, 0, .5, .5]`` keeps indices 2 and 3; ``[1, 1, 1, 1]`` keeps 0 and 1).

    Raises ValueError on NaN in the scores, a last dim not divisible by 4, or a shape mismatch.
    """
    check_mask_args(w, scores)
    return R.call("mask_2to4", backend, w.device, w, scores)


def check_mask_args(w: torch.Tensor, scores: torch.Tensor | None) -> None:
    V.tensor("w", w, min_ndim=1, dtypes=V.FLOAT_DTYPES)
    V.multiple("w", "the last dim", w.shape[-1], 4, " (groups of 4 run along the last dim)")
    if scores is not None:
        V.tensor("scores", scores, dtypes=V.FLOAT_DTYPES + (torch.float64,))
        if scores.shape != w.shape:
            raise ValueError(f"scores: shape {tuple(scores.shape)} must equal w's shape {tuple(w.shape)}")
        V.same_device(w=w, scores=scores)


def _check_2d_w(w):
    V.tensor("w", w, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.multiple("w", "the number of columns (w.shape[1])", w.shape[1], 16, _PAD_HINT)


def compress_2to4(w: torch.Tensor, *, prune: bool = False, backend: str | None = None):
    """Pack a 2:4-sparse ``w [rows, cols]`` into ``(values [rows, cols/2], meta [rows, cols/16] int16)``.

    Strict by default: a group of 4 with more than two nonzeros raises ValueError naming its
    row and columns.  ``prune=True`` first applies :func:`mask_2to4` (keep the 2 largest |w|).
    ``cols`` must be a multiple of 16.  dtypes: float16, bfloat16, float32.
    ``decompress_2to4(*compress_2to4(w))`` returns ``w`` bit for bit when ``w`` is 2:4 (see
    docs/FORMAT.md for groups with fewer than two nonzeros and for ``-0.0``).
    """
    _check_2d_w(w)
    if not isinstance(prune, bool):
        raise TypeError(f"prune: expected a bool, got {type(prune).__name__}")
    return R.call("compress_2to4", backend, w.device, w, prune)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Unpack ``values [rows, cols/2]`` and ``meta [rows, cols/16]`` int16 into the dense ``[rows, cols]``.

    Raises ValueError for mismatched shapes, tensors on different devices, or corrupt
    metadata (a nibble with ``i0 >= i1``), naming the first bad row and group.
    """
    check_packed(values, meta)
    return R.call("decompress_2to4", backend, values.device, values, meta)


def check_packed(values: torch.Tensor, meta: torch.Tensor) -> None:
    V.tensor("values", values, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("meta", meta, ndim=2, dtypes=(torch.int16,))
    V.same_device(values=values, meta=meta)
    V.multiple("values", "the number of columns (values.shape[1])", values.shape[1], 8,
               " (it holds cols/2 values for a weight whose cols is a multiple of 16)")
    rows, half = values.shape
    if tuple(meta.shape) != (rows, half // 8):
        raise ValueError(
            f"meta: shape {tuple(meta.shape)} does not match values {tuple(values.shape)}; "
            f"expected ({rows}, {half // 8}) = (rows, cols/16)"
        )
