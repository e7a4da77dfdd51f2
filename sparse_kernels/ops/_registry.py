"""The op registry: every op's schema is defined here, once, in Python.

Each op family member ``NAME`` is defined once per backend that implements it:

=============  ==============================  ============================================
backend        op                              kernel comes from
=============  ==============================  ============================================
reference      ``sparse_kernels::NAME``        sparse_kernels/reference/ (CompositeExplicitAutograd:
                                               every device, the default that always works)
cpp            ``sparse_kernels::NAME_cpp``    csrc/cpu/*.cpp, ``TORCH_LIBRARY_IMPL(..., CPU, m)``
cuda           ``sparse_kernels::NAME_cuda``   csrc/cuda/*, ``TORCH_LIBRARY_IMPL(..., CUDA, m)``
triton         ``sparse_kernels::NAME_triton`` sparse_kernels/triton/ (CUDA key; CPU key too
                                               under ``TRITON_INTERPRET=1``)
cusparselt     ``sparse_kernels::NAME_cusparselt``  PyTorch's cuSPARSELt (only where an op has it)
decompress     ``sparse_kernels::NAME_decompress``  decompress, then a dense op (sparse_linear only)
=============  ==============================  ============================================

All backends of one op share the schema and the fake (meta) kernel, so each is a real
``torch.library`` op that ``opcheck`` and ``torch.compile`` understand.  Which one runs is
chosen in Python (:func:`select`), per call, from the ``backend=`` argument or the
``SPARSE_KERNELS_BACKEND`` environment variable; ``auto`` applies the op's rule.  We do not
rely on dispatch-key overriding for that choice because ``auto`` depends on shape and dtype
(e.g. the dense path wins for large batches on CPU), which dispatch keys cannot express.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import _extension

NAMESPACE = "sparse_kernels"
BACKENDS = ("reference", "cpp", "cuda", "triton", "cusparselt", "decompress")
_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "SPARSE_KERNELS_BACKEND"

LIB = torch.library.Library(NAMESPACE, "DEF")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op here (not built, not installed, wrong device)."""


@dataclass
class OpSpec:
    name: str
    schema: str
    backends: tuple
    # auto rule: (device_type, available_backends, *args) -> backend name
    auto: Callable | None = None
    extra: dict = field(default_factory=dict)


OPS: dict[str, OpSpec] = {}


def op_name(name: str, backend: str) -> str:
    return name if backend == "reference" else f"{name}_{backend}"


def qualname(name: str, backend: str) -> str:
    return f"{NAMESPACE}::{op_name(name, backend)}"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def define(
    name: str,
    schema: str,
    *,
    fake: Callable,
    reference: Callable,
    backends: Sequence[str] = ("reference", "cpp", "cuda", "triton"),
    auto: Callable | None = None,
) -> OpSpec:
    """Define ``name`` (``schema`` is the part after the name) for each backend.

    ``reference`` becomes the CompositeExplicitAutograd kernel of ``sparse_kernels::name``.
    """
    if name in OPS:
        raise RuntimeError(f"op {name} defined twice")
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {name}")
        LIB.define(op_name(name, b) + schema)
        torch.library.register_fake(qualname(name, b), fake, lib=LIB)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    spec = OpSpec(name, schema, tuple(backends), auto)
    OPS[name] = spec
    return spec


def impl_python(name: str, backend: str, fn: Callable, device_types: Sequence[str]) -> None:
    """Register a Python kernel (Triton launchers, cuSPARSELt glue) for ``NAME_backend``."""
    for dt in device_types:
        LIB.impl(op_name(name, backend), fn, dt.upper())


def register_autograd(name: str, backward: Callable, setup_context: Callable, backends=None) -> None:
    """One backward for every backend of ``name`` (they compute the same function)."""
    for b in backends or OPS[name].backends:
        torch.library.register_autograd(qualname(name, b), backward, setup_context=setup_context, lib=LIB)


def get_op(name: str, backend: str):
    return getattr(getattr(torch.ops, NAMESPACE), op_name(name, backend)).default


def _dispatch_key(device_type: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type, device_type.upper())


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def why_unavailable(name: str, backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run ``name`` on ``device_type``; otherwise the reason."""
    spec = OPS[name]
    if backend not in spec.backends:
        return f"op {name} has no {backend} backend"
    if backend == "reference":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        st = _extension.load()
        if not st["loaded"]:
            return f"sparse_kernels._C not loaded: {st['reason']}"
    if device_type == "cuda" and backend != "cpp" and not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        st = _extension.load()
        if not st["loaded"]:
            return f"sparse_kernels._C not loaded: {st['reason']}"
        if not st["with_cuda"]:
            return "sparse_kernels._C was built without CUDA kernels (torch without CUDA, or nvcc not found)"
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device_type == "cpu" and not triton_interpreted():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"triton does not run on {device_type}"
    if backend == "cusparselt":
        if device_type != "cuda":
            return "cusparselt runs on CUDA tensors only"
        if not getattr(torch.backends, "cusparselt", None) or not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name, backend), _dispatch_key(device_type)):
        return f"no {backend} kernel registered for {device_type}"
    return None


_AVAILABLE: dict = {}


def available(name: str, device_type: str) -> list[str]:
    """The backends that can run ``name`` on ``device_type``, in the op's order.

    Cached: what it depends on (the build, triton, the visible GPU, the registered kernels) is
    fixed once the package is imported, and ``auto`` asks on every call (uncached, this was
    about 5-12 us of a ~40 us CPU call).  TRITON_INTERPRET is part of the key."""
    key = (name, device_type, triton_interpreted())
    got = _AVAILABLE.get(key)
    if got is None:
        got = _AVAILABLE[key] = [b for b in OPS[name].backends if why_unavailable(name, b, device_type) is None]
    return list(got)


def cpp_on_cpu(device_type: str, avail: list[str], *args) -> str:
    """An ``auto`` rule: the cpp kernel on CPU when it is built, the reference everywhere else."""
    return "cpp" if device_type == "cpu" and "cpp" in avail else "reference"


def _default_auto(device_type: str, avail: list[str], *args) -> str:
    order = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpp", "reference")
    for b in order:
        if b in avail:
            return b
    return "reference"


def requested_backend(backend: str | None) -> str:
    req = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(req, str) or req not in _CHOICES:
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}: got {req!r}, expected one of {', '.join(_CHOICES)}")
    return req


def select(name: str, backend: str | None, device: torch.device, *args) -> str:
    """Resolve which backend runs op ``name`` for tensors on ``device``.

    ``backend`` (argument) beats ``SPARSE_KERNELS_BACKEND``; the environment variable is
    ignored by ops that do not define the backend it names (e.g. ``cusparselt`` for
    ``compress_2to4``), while an argument naming such a backend is an error.
    """
    spec = OPS[name]
    req = requested_backend(backend)
    if backend is None and req not in spec.backends:
        req = "auto"
    dev = device.type
    if req == "auto":
        if dev == "meta":
            return "reference"
        avail = available(name, dev)
        return (spec.auto or _default_auto)(dev, avail, *args)
    if dev == "meta":
        return req
    reason = why_unavailable(name, req, dev)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend={req!r} cannot run {name} on {dev}: {reason}. "
            f"Available here: {', '.join(available(name, dev))}"
        )
    return req


def _select_for_trace(name, backend, device, *auto_args):
    return select(name, backend, device, *auto_args)


# Under torch.compile the backend choice is a trace-time constant (it reads the environment,
# the dispatcher and the build, none of which dynamo can trace); changing
# SPARSE_KERNELS_BACKEND after compiling therefore needs a recompile.
_select_traced = torch._dynamo.assume_constant_result(_select_for_trace)


def choose(name: str, backend: str | None, device: torch.device, *auto_args) -> str:
    """:func:`select`, also under torch.compile (there a trace-time constant: ``auto_args`` must
    be static or bucketed by the caller)."""
    if torch.compiler.is_compiling():
        return _select_traced(name, backend, device, *auto_args)
    return select(name, backend, device, *auto_args)


def call(name: str, backend: str | None, device: torch.device, *args, auto_args=()):
    """Run op ``name`` on the selected backend.  ``auto_args`` (hashable: ints, dtypes) feed
    the op's ``auto`` rule; under torch.compile they must be static or bucketed by the caller."""
    return get_op(name, choose(name, backend, device, *auto_args))(*args)
