"""Triton kernels, one module per op family (imported lazily by the op launchers)."""
