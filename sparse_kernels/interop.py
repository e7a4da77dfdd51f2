"""Interop with PyTorch's semi-structured sparsity (CUTLASS layout).

Our ``(values, meta)`` for 16-bit dtypes are exactly what
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
computes *before* it reorders the metadata.  CUTLASS's sparse GEMM wants ``meta`` in its
``ColumnMajorInterleaved<2>`` layout with rows permuted inside blocks of 32 and 2x2 blocks
swizzled; :func:`to_torch_cutlass` applies that permutation and :func:`from_torch_cutlass`
undoes it.  Only float16/bfloat16 (PyTorch stores float32 as 1:2 pairs, a different format),
and ``rows`` must be a multiple of 32 (CUTLASS's tile).
"""

from __future__ import annotations

import torch

from .ops import _validate as V
from .ops.sparse24 import check_packed


def _cutlass_meta_offsets(rows: int, meta_cols: int, device) -> torch.Tensor:
    """Flat destination offset, in the reordered meta, of each element of the row-major meta."""
    r = torch.arange(rows, device=device).view(-1, 1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).view(1, -1).expand(rows, meta_cols)
    # Inside each block of 32 rows, row 8a + b goes to 4b + a (int16 metadata: 4 interleaved).
    r2 = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
    # Swap the off-diagonal entries of every 2x2 block.
    swap = ((r2 % 2 == 0) & (c % 2 == 1)).long() - ((r2 % 2 == 1) & (c % 2 == 0)).long()
    r3, c3 = r2 + swap, c - swap
    # ColumnMajorInterleaved<2>: pairs of columns stored column-major, interleaved by row.
    return ((c3 // 2) * rows * 2 + r3 * 2 + c3 % 2).reshape(-1)


def _check_cutlass(values: torch.Tensor, meta: torch.Tensor, fn: str) -> None:
    check_packed(values, meta)
    if values.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: values dtype {values.dtype} is not supported; CUTLASS 2:4 takes float16 or bfloat16")
    V.multiple("values", "the number of rows", values.shape[0], 32, " for the CUTLASS layout (pad rows to 32)")


def to_torch_cutlass(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` -> ``(packed, meta_reordered)`` as PyTorch's CUTLASS converter returns them."""
    _check_cutlass(values, meta, "to_torch_cutlass")
    rows, meta_cols = meta.shape
    out = torch.empty(rows * meta_cols, dtype=meta.dtype, device=meta.device)
    out.scatter_(0, _cutlass_meta_offsets(rows, meta_cols, meta.device), meta.reshape(-1))
    return values.contiguous(), out.view(rows, meta_cols)


def from_torch_cutlass(packed: torch.Tensor, meta_reordered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_torch_cutlass`: CUTLASS-ordered metadata back to our row-major ``meta``."""
    _check_cutlass(packed, meta_reordered, "from_torch_cutlass")
    rows, meta_cols = meta_reordered.shape
    offs = _cutlass_meta_offsets(rows, meta_cols, meta_reordered.device)
    meta = meta_reordered.reshape(-1).gather(0, offs).view(rows, meta_cols)
    return packed.contiguous(), meta


SEMI_STRUCTURED_BACKENDS = ("auto", "cutlass", "cusparselt")


def to_semi_structured(values: torch.Tensor, meta: torch.Tensor, backend: str = "auto"):
    """Wrap ``(values, meta)`` as a ``torch.sparse.SparseSemiStructuredTensor`` (CUDA only).

    The result multiplies with PyTorch's own 2:4 kernels (``torch.mm``, ``F.linear``).

    Args:
        backend: ``"cutlass"``: ``SparseSemiStructuredTensorCUTLASS`` from our values and the
            reordered meta, no copy of the weight through dense (PyTorch ships those kernels
            for sm_8x: on the H200, 2026-11-28, its matmul was unavailable); ``"cusparselt"``:
            ``SparseSemiStructuredTensorCUSPARSELT`` (the weight is decompressed once and packed
            by cuSPARSELt; rows a multiple of 16); ``"auto"``: cuSPARSELt on compute capability
            9.0 and later when this torch has it, else CUTLASS.
    """
    if backend not in SEMI_STRUCTURED_BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(SEMI_STRUCTURED_BACKENDS)}")
    if values.device.type != "cuda":
        raise ValueError(f"values: SparseSemiStructuredTensor needs CUDA tensors, got {values.device}")
    if backend == "auto":
        has_cslt = getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available()
        major = torch.cuda.get_device_capability(values.device)[0]
        backend = "cusparselt" if has_cslt and major >= 9 else "cutlass"
    if backend == "cusparselt":
        _check_cutlass(values, meta, "to_semi_structured")  # same dtypes; rows % 32 covers cuSPARSELt's 16
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

        from .ops.sparse24 import decompress_2to4

        return SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress_2to4(values, meta))
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    packed, meta_r = to_torch_cutlass(values, meta)
    shape = torch.Size((values.shape[0], values.shape[1] * 2))
    return SparseSemiStructuredTensorCUTLASS(shape, packed, meta_r, None, None, None, False)
