"""Pure-PyTorch references: the default kernel of every op, and the ground truth of every test.

One module per op family, named like its C++ (csrc/cpu/), CUDA (csrc/cuda/) and Triton
(sparse_kernels/triton/) twins.
"""
from . import sparse24  # noqa: F401
from . import mma_layout  # noqa: F401
from . import linear  # noqa: F401
from . import sparsegpt  # noqa: F401
from . import int4  # noqa: F401
