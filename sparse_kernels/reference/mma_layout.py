"""Reference of the sparse-tensor-core metadata layout (``reorder_meta_mma`` and its inverse).

The CUDA 2:4 GEMM (csrc/cuda/linear.cu) feeds ``mma.sp.sync.aligned.m16n8k32`` with W as the
sparse operand A: 16 output features x 32 inputs per MMA.  Its metadata is read in a DEVICE
LAYOUT, made once per weight from the canonical ``meta [rows, cols/16]`` int16
(docs/FORMAT.md; group g's nibble ``i0 | i1 << 2`` at bits ``4*(g%4)`` of ``meta[r, g//4]``):

``meta_dev [ceil(rows/16), ceil(cols/64), 32]`` int32, one 32-bit word per lane of a warp per
(16-row block ``b``, 64-column span ``s``).  Lane ``4*g + t`` (``g`` in 0..7, ``t`` in 0..3) holds::

    bits 4j .. 4j+3       = nibble t of meta[16b + g,     4s + j]    (j = 0..3)
    bits 16+4j .. 16+4j+3 = nibble t of meta[16b + g + 8, 4s + j]

i.e. the span's groups ``t, t+4, t+8, t+12`` of rows ``g`` (low half) and ``g + 8`` (high half).
Rows past ``rows`` and columns past ``cols`` are padding with nibble ``0x4`` (indices 0, 1).

Why this form (docs/CUDA.md has the diagram): with sparsity selector ``m`` the lanes ``t = 2m`` and
``2m + 1`` of each quad supply the metadata of one m16n8k32 MMA; the decode kernel runs the two
MMAs of a span over a permutation of K in which lane ``t``'s word above is exactly its operand,
so a warp fetches its metadata with one coalesced 128-byte load.  The large-batch kernel
transposes the word back inside each quad (:func:`natural_words`).

Both functions are pure bit permutations of the payload (plus padding): bit-exact, any int16
content (the nibbles are not validated here).
"""

from __future__ import annotations

import torch

PAD_WORD = 0x4444  # four nibbles 0x4: indices (0, 1), a valid ordered pair


def meta_dev_shape(rows: int, cols: int) -> tuple[int, int, int]:
    """Shape of ``meta_dev`` for a ``rows x cols`` weight (``cols`` = dense columns, % 16 == 0)."""
    return ((rows + 15) // 16, (cols // 16 + 3) // 4, 32)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def reorder_meta_mma(meta: torch.Tensor) -> torch.Tensor:
    """Canonical ``meta [rows, cols/16]`` int16 -> ``meta_dev [ceil(rows/16), ceil(cols/64), 32]`` int32."""
    rows, c16 = meta.shape
    nb, ns = (rows + 15) // 16, (c16 + 3) // 4
    dev = meta.device
    padded = torch.full((nb * 16, ns * 4), PAD_WORD, dtype=torch.int64, device=dev)
    padded[:rows, :c16] = meta.to(torch.int64) & 0xFFFF
    w = padded.view(nb, 2, 8, ns, 4)  # [b, h, g, s, j]
    t = torch.arange(4, device=dev)
    nib = (w.unsqueeze(-1) >> (4 * t)) & 0xF  # [b, h, g, s, j, t]
    shift = 16 * torch.arange(2, device=dev).view(1, 2, 1, 1, 1, 1) + 4 * torch.arange(4, device=dev).view(1, 1, 1, 1, 4, 1)
    word = (nib << shift).sum(dim=(1, 4))  # disjoint bit fields: sum == or; [b, g, s, t]
    word = word.permute(0, 2, 1, 3).reshape(nb, ns, 32)  # lane = 4g + t
    return _to_int32(word)


def unreorder_meta_mma(meta_dev: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`reorder_meta_mma`: ``meta_dev`` -> ``meta [rows, cols/16]`` int16 (padding dropped)."""
    c16 = cols // 16
    nb, ns, _ = meta_dev.shape
    dev = meta_dev.device
    w = (meta_dev.to(torch.int64) & 0xFFFFFFFF).view(nb, ns, 8, 4)  # [b, s, g, t]
    shift = 16 * torch.arange(2, device=dev).view(2, 1) + 4 * torch.arange(4, device=dev).view(1, 4)  # [h, j]
    nib = (w[..., None, None] >> shift) & 0xF  # [b, s, g, t, h, j]
    t = torch.arange(4, device=dev).view(1, 1, 1, 4, 1, 1)
    word = (nib << (4 * t)).sum(dim=3)  # [b, s, g, h, j]
    word = word.permute(0, 3, 2, 1, 4).reshape(nb * 16, ns * 4)[:rows, :c16]
    return torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)


def natural_words(meta_dev: torch.Tensor) -> torch.Tensor:
    """Per-lane metadata in canonical K order, what the large-batch kernel computes in registers.

    Returns int64 ``[nb, ns, 32]``: lane ``4g + t`` holds ``meta[16b+g, 4s+t] | meta[16b+g+8, 4s+t] << 16``
    (chunk ``t`` of rows ``g`` and ``g + 8``); it equals a 4 x 4 nibble transpose of ``meta_dev``
    inside each quad of lanes.
    """
    nb, ns, _ = meta_dev.shape
    dev = meta_dev.device
    w = (meta_dev.to(torch.int64) & 0xFFFFFFFF).view(nb, ns, 8, 4)  # [b, s, g, j(lane in quad)]
    out = torch.zeros(nb, ns, 8, 4, dtype=torch.int64, device=dev)  # [b, s, g, t]
    for t in range(4):
        for j in range(4):
            for h in range(2):
                out[..., t] |= ((w[..., j] >> (16 * h + 4 * t)) & 0xF) << (16 * h + 4 * j)
    return out.view(nb, ns, 32)
