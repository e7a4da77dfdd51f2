"""Interop with PyTorch's semi-structured sparsity (CUTLASS layout) and with compressed-tensors.

Our ``(values, meta)`` for 16-bit dtypes are exactly what
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
computes *before* it reorders the metadata.  CUTLASS's sparse GEMM wants ``meta`` in its
``ColumnMajorInterleaved<2>`` layout with rows permuted inside blocks of 32 and 2x2 blocks
swizzled; :func:`to_torch_cutlass` applies that permutation and :func:`from_torch_cutlass`
undoes it.  Only float16/bfloat16 (PyTorch stores float32 as 1:2 pairs, a different format),
and ``rows`` must be a multiple of 32 (CUTLASS's tile).

compressed-tensors (llm-compressor's checkpoint format) stores a 2:4 weight ``[rows, cols]``
(``sparse-24-bitmask``) as ``compressed [rows, cols/2]``, the kept values in row-major order, and
``bitmask [rows, ceil(cols/8)]`` uint8, bit ``c % 8`` of byte ``c / 8`` set where column ``c`` is
kept (numpy's little-endian ``packbits``), exactly two bits in every group of four.  Its kept values
are in our ``values`` order already, so :func:`from_compressed_tensors_24` and
:func:`to_compressed_tensors_24` only translate the bitmask to and from ``meta`` (each 4-bit group
of the bitmask is one 2:4 pattern: a table lookup), never the dense weight.
"""

from __future__ import annotations

import torch

from .ops import _validate as V
from .ops.sparse24 import check_packed
from .reference.sparse24 import meta_nibbles, pack_nibbles


def _cutlass_meta_offsets(rows: int, meta_cols: int, device, marlin: bool = False) -> torch.Tensor:
    """Flat destination offset, in the reordered meta, of each element of the row-major meta.

    ``marlin=True``: the row order Marlin 2:4 (nm-vllm, compressed-tensors' ``marlin-24``) uses
    instead: inside each block of 64 rows, row bits (b5 b4 b3 b2 b1 b0) go to
    (b1 b5 b4 b3 b0 b2); rows a multiple of 64, meta columns even."""
    r = torch.arange(rows, device=device).view(-1, 1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).view(1, -1).expand(rows, meta_cols)
    if marlin:
        r2 = r // 64 * 64 + (r % 2) * 2 + (r % 8) // 4 + (r % 4) // 2 * 32 + (r % 64) // 8 * 4
    else:  # inside each block of 32 rows, row 8a + b goes to 4b + a (int16 metadata: 4 interleaved)
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


# compressed-tensors 2:4 bitmask <-> meta.  A group's 4 bitmask bits b (bit i = column i kept)
# and its meta nibble i0 | i1 << 2 (i0 < i1) name the same pattern; other bit counts are invalid.
_PATTERN_TO_NIBBLE = torch.full((16,), -1, dtype=torch.int64)
_NIBBLE_TO_PATTERN = torch.zeros(16, dtype=torch.int64)
for _i1 in range(4):
    for _i0 in range(_i1):
        _PATTERN_TO_NIBBLE[1 << _i0 | 1 << _i1] = _i0 | _i1 << 2
        _NIBBLE_TO_PATTERN[_i0 | _i1 << 2] = 1 << _i0 | 1 << _i1
_PAD_NIBBLE = 0 | 1 << 2  # the all-zero group's (0, 1), as compress_2to4 stores it


def bitmask_groups(bitmask: torch.Tensor) -> torch.Tensor:
    """A compressed-tensors bitmask ``[rows, ceil(cols/8)]`` uint8 -> int64 ``[rows, 2 * ceil(cols/8)]``:
    entry ``g`` holds the 4 bits of columns ``4g..4g+3`` (bit ``i`` = column ``4g + i`` kept)."""
    b = bitmask.to(torch.int64)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], 2 * b.shape[1])


def _check_ct_cols(cols, fn: str) -> int:
    if isinstance(cols, bool) or not isinstance(cols, int):
        raise TypeError(f"{fn}: cols must be an int, got {type(cols).__name__}")
    if cols <= 0 or cols % 4:
        raise ValueError(f"{fn}: cols must be a positive multiple of 4 (2:4 groups run along the columns), got {cols}")
    return cols


def from_compressed_tensors_24(compressed: torch.Tensor, bitmask: torch.Tensor, cols: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors ``sparse-24-bitmask`` ``(compressed, bitmask)`` of a ``[rows, cols]``
    weight -> our ``(values, meta)`` of it, columns padded with zeros to a multiple of 16 (the
    padding groups keep indices (0, 1), as :func:`compress_2to4` stores an all-zero group).

    Bit-exact: ``decompress_2to4(values, meta)[:, :cols]`` is the weight compressed-tensors
    decompresses.  Raises ValueError naming the row and columns of the first group whose bitmask
    does not mark exactly two columns, for bits set past ``cols``, and for shapes that do not fit
    ``cols``; TypeError for dtypes (bitmask uint8, compressed float16/bfloat16/float32).
    """
    fn = "from_compressed_tensors_24"
    cols = _check_ct_cols(cols, fn)
    V.tensor("compressed", compressed, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("bitmask", bitmask, ndim=2, dtypes=(torch.uint8,))
    V.same_device(compressed=compressed, bitmask=bitmask)
    rows = bitmask.shape[0]
    if tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"{fn}: bitmask has shape {tuple(bitmask.shape)}; a [{rows}, {cols}] weight needs "
                         f"({rows}, {(cols + 7) // 8})")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise ValueError(f"{fn}: compressed has shape {tuple(compressed.shape)}; a 2:4 [{rows}, {cols}] weight "
                         f"keeps ({rows}, {cols // 2})")
    groups = bitmask_groups(bitmask)
    if cols % 8 and rows and bool((groups[:, -1] != 0).any()):
        r = int((groups[:, -1] != 0).nonzero()[0])
        raise ValueError(f"{fn}: bitmask row {r} has bits set past column {cols} (padding must be zero)")
    groups = groups[:, : cols // 4]
    nib = _PATTERN_TO_NIBBLE.to(groups.device)[groups]
    if bool((nib < 0).any()):
        r, g = (int(x) for x in (nib < 0).nonzero()[0])
        n = bin(int(groups[r, g])).count("1")
        raise ValueError(f"{fn}: bitmask is not 2:4: row {r}, columns {4 * g}..{4 * g + 3} mark {n} kept "
                         f"columns (exactly 2 needed)")
    padded = (cols + 15) // 16 * 16
    meta = pack_nibbles(torch.nn.functional.pad(nib, (0, (padded - cols) // 4), value=_PAD_NIBBLE))
    values = torch.nn.functional.pad(compressed, (0, (padded - cols) // 2)) if padded != cols else compressed
    return values.contiguous(), meta


def to_compressed_tensors_24(values: torch.Tensor, meta: torch.Tensor, cols: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`from_compressed_tensors_24`: our ``(values, meta)`` -> compressed-tensors'
    ``(compressed [rows, cols/2], bitmask [rows, ceil(cols/8)] uint8)`` of the first ``cols``
    columns (default: all of them).  The columns past ``cols`` must hold zeros (padding)."""
    fn = "to_compressed_tensors_24"
    check_packed(values, meta)
    rows, padded = values.shape[0], values.shape[1] * 2
    cols = padded if cols is None else _check_ct_cols(cols, fn)
    if not padded - 16 < cols <= padded:
        raise ValueError(f"{fn}: cols={cols} does not fit values of {padded} columns (padding is under 16)")
    nib = meta_nibbles(meta)
    if bool(((nib & 3) >= (nib >> 2)).any()):
        from .reference.sparse24 import check_meta

        check_meta(meta)  # raises, naming the first corrupt group
    if padded != cols and bool((values[:, cols // 2:] != 0).any()):
        raise ValueError(f"{fn}: values hold nonzeros past column {cols}; they cannot be dropped")
    groups = _NIBBLE_TO_PATTERN.to(meta.device)[nib[:, : cols // 4]]
    if (cols // 4) % 2:
        groups = torch.nn.functional.pad(groups, (0, 1))
    pairs = groups.reshape(rows, -1, 2)
    bitmask = (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)
    return values[:, : cols // 2].contiguous(), bitmask
