"""Triton kernels, one module per op family (imported lazily by sparse_kernels.ops: triton is optional)."""
