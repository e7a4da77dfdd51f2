"""Op definitions (schemas, fakes, autograd) and their public wrappers, one module per family."""
from . import _registry  # noqa: F401
from .sparse24 import compress_2to4, decompress_2to4, mask_2to4  # noqa: F401
from .mma_layout import reorder_meta_mma, unreorder_meta_mma  # noqa: F401
from .linear import masked_linear, pack_mask, sparse_linear, unpack_mask  # noqa: F401
from .sparsegpt import sparsegpt_block_update  # noqa: F401
from .bitmask import bitmask_linear, compress_bitmask, decompress_bitmask  # noqa: F401
from .permutation import gather_columns, nm_split_scores  # noqa: F401
from .int4 import compress_2to4_int4, decompress_2to4_int4, sparse_linear_int4  # noqa: F401
