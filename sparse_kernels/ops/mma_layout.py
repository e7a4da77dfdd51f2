"""Metadata device layout of the sparse-tensor-core GEMM: ``reorder_meta_mma`` and its inverse.

``reorder_meta_mma(meta)`` turns canonical 2:4 metadata (``[rows, cols/16]`` int16, docs/FORMAT.md)
into the layout ``mma.sp.m16n8k32`` reads in csrc/cuda/linear.cu: ``meta_dev
[ceil(rows/16), ceil(cols/64), 32]`` int32 (see :mod:`sparse_kernels.reference.mma_layout` and
docs/CUDA.md).  Build it once per weight (``SparseLinear`` caches it) and pass it to
``sparse_linear``'s CUDA backend; ``unreorder_meta_mma`` gives the canonical metadata back.

Backends: reference (pure PyTorch permutation, every device) and cuda (csrc/cuda/linear.cu);
bit-exact with each other.
"""

from __future__ import annotations

import torch

from ..reference import mma_layout as ref
from . import _registry as R
from . import _validate as V

meta_dev_shape = ref.meta_dev_shape


def _reorder_fake(meta):
    rows, c16 = meta.shape
    return meta.new_empty(((rows + 15) // 16, (c16 + 3) // 4, 32), dtype=torch.int32)


def _unreorder_fake(meta_dev, rows, cols):
    return meta_dev.new_empty((rows, cols // 16), dtype=torch.int16)


R.define("reorder_meta_mma", "(Tensor meta) -> Tensor", fake=_reorder_fake, reference=ref.reorder_meta_mma,
         backends=("reference", "cuda"))
R.define("unreorder_meta_mma", "(Tensor meta_dev, int rows, int cols) -> Tensor", fake=_unreorder_fake,
         reference=ref.unreorder_meta_mma, backends=("reference", "cuda"))


def reorder_meta_mma(meta: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Canonical ``meta [rows, cols/16]`` int16 -> ``meta_dev [ceil(rows/16), ceil(cols/64), 32]`` int32.

    Padding rows/columns get nibble 0x4.  Raises TypeError/ValueError for a non-tensor, a dtype
    other than int16 or a tensor that is not 2-D.
    """
    V.tensor("meta", meta, ndim=2, dtypes=(torch.int16,))
    return R.call("reorder_meta_mma", backend, meta.device, meta)


def unreorder_meta_mma(meta_dev: torch.Tensor, rows: int, cols: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`reorder_meta_mma` for a ``rows x cols`` weight (``cols`` dense, % 16 == 0)."""
    V.tensor("meta_dev", meta_dev, ndim=3, dtypes=(torch.int32,))
    for name, v in (("rows", rows), ("cols", cols)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise TypeError(f"{name}: expected a non-negative int, got {v!r}")
    V.multiple("cols", "the dense column count", cols, 16)
    want = meta_dev_shape(rows, cols)
    if tuple(meta_dev.shape) != want:
        raise ValueError(
            f"meta_dev: shape {tuple(meta_dev.shape)} does not match a {rows} x {cols} weight; expected {want} "
            f"= (ceil(rows/16), ceil(cols/64), 32), as made by reorder_meta_mma"
        )
    return R.call("unreorder_meta_mma", backend, meta_dev.device, meta_dev, rows, cols)
