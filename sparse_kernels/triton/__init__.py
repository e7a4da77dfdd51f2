"""Triton kernels, one module per op family (imported lazily by sparse_kernels.ops: triton is optional)."""
"""Triton kernels, one module per op family (imported lazily by the op launchers)."""
