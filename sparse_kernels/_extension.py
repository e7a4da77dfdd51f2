"""Defensive loading of the compiled extension ``sparse_kernels._C``.

Importing ``_C`` runs the kernel registrations of csrc/ (``TORCH_LIBRARY_IMPL``).
If it is missing or broken, the package keeps working on the pure-PyTorch
reference, warns once, and remembers why for ``python -m sparse_kernels.info``.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

STATUS: dict = {
    "loaded": False,
    "reason": None,
    "built_torch": None,
    "with_cuda": False,
    "with_openmp": False,
    "build": None,
}


def _read_build_info() -> dict | None:
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def load() -> dict:
    """Import ``_C`` once; fill and return :data:`STATUS`."""
    if STATUS["loaded"] or STATUS["reason"] is not None:
        return STATUS
    info = _read_build_info()
    STATUS["build"] = info
    running = _torch_release(torch.__version__)
    try:
        mod = importlib.import_module("sparse_kernels._C")
    except ImportError as e:
        if info and info.get("status") == "failed":
            reason = f"the build failed: {info.get('error')}"
        elif info and info.get("torch_version") and _torch_release(info["torch_version"]) != running:
            reason = f"built for torch {info['torch_version']}, running {torch.__version__} ({e})"
        else:
            reason = f"sparse_kernels._C is not built ({e}); run `pip install --no-build-isolation -e .`"
        STATUS["reason"] = reason
        if os.environ.get("SPARSE_KERNELS_QUIET", "0") != "1":
            warnings.warn(
                f"sparse_kernels: compiled kernels unavailable, using the PyTorch reference only: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        return STATUS
    STATUS["loaded"] = True
    STATUS["built_torch"] = mod.torch_version
    STATUS["with_cuda"] = bool(mod.with_cuda)
    STATUS["with_openmp"] = bool(getattr(mod, "with_openmp", False))
    if mod.torch_version != running:
        STATUS["reason"] = f"built for torch {mod.torch_version}, running {torch.__version__}"
        warnings.warn(f"sparse_kernels: {STATUS['reason']}; rebuild if ops misbehave", RuntimeWarning, stacklevel=3)
    return STATUS
