"""sparse_kernels: prune networks, store them compressed, run them on sparse kernels.

Public API (see README.md):

* 2:4 format: :func:`mask_2to4`, :func:`compress_2to4`, :func:`decompress_2to4`,
  :func:`to_torch_cutlass`, :func:`from_torch_cutlass`.
* Backends: every op takes ``backend=`` (``auto | reference | cpp | cuda | triton``);
  ``SPARSE_KERNELS_BACKEND`` sets the default; ``python -m sparse_kernels.info`` lists them.
"""

from . import _extension
from .ops import _registry
from .ops._registry import BackendUnavailableError
from .ops.sparse24 import compress_2to4, decompress_2to4, mask_2to4
from .ops.linear import masked_linear, pack_mask, sparse_linear, unpack_mask
from .ops.bitmask import bitmask_linear, compress_bitmask, decompress_bitmask
from .ops.int4 import compress_2to4_int4, decompress_2to4_int4, sparse_linear_int4
from .nn import SparseExperts, SparseExpertsInt4, SparseLinear, SparseLinearInt4, quantize_int4, sparsify
from .interop import (from_compressed_tensors_24, from_torch_cutlass, to_compressed_tensors_24, to_semi_structured,
                      to_torch_cutlass)
from .pruning import prune  # noqa: F401  (sparse_kernels.pruning has the per-layer functions)
from .storage import load_sparse, save_sparse
from . import lottery, structured, training  # noqa: F401  (training-time and structured pruning)

__version__ = "0.1.0"

_extension.load()

__all__ = [
    "BackendUnavailableError",
    "compress_2to4",
    "decompress_2to4",
    "from_compressed_tensors_24",
    "from_torch_cutlass",
    "mask_2to4",
    "to_semi_structured",
    "to_compressed_tensors_24",
    "to_torch_cutlass",
    "masked_linear",
    "pack_mask",
    "sparse_linear",
    "unpack_mask",
    "bitmask_linear",
    "compress_bitmask",
    "decompress_bitmask",
    "save_sparse",
    "load_sparse",
    "compress_2to4_int4",
    "decompress_2to4_int4",
    "sparse_linear_int4",
    "SparseLinear",
    "SparseLinearInt4",
    "SparseExperts",
    "SparseExpertsInt4",
    "quantize_int4",
    "sparsify",
    "prune",
]
