"""Sparse matmul ops: ``sparse_linear`` (2:4), ``masked_linear`` (any mask), ``pack_mask``/``unpack_mask``.

Math and layouts: :mod:`sparse_kernels.reference.linear`.  Backends:

==================  ======================================================================
op                  backends
==================  ======================================================================
sparse_linear       reference, cpp (csrc/cpu/linear.cpp), cuda (csrc/cuda/linear.cu, mma.sp),
                    triton (sparse_kernels/triton/linear.py), cusparselt (torch._cslt_*),
                    decompress (the decompress kernel, then F.linear)
masked_linear       reference, cpp, triton (forward and backward kernels)
masked_linear_grad  reference, cpp (csrc/cpu/linear_grad.cpp), triton: ``_grad_x`` and ``_grad_w``
sparse_linear_grad  reference, cpp (csrc/cpu/linear_grad.cpp): ``_grad_x`` reads values/meta directly,
                    ``_grad_values`` is grad_y^T x sampled at the kept positions only
pack/unpack_mask    reference, cpp
==================  ======================================================================

Autograd: ``sparse_linear`` gives grads for x, values (pattern fixed: ``grad_values`` is
``grad_y^T x`` gathered at the kept positions) and bias, never for meta; ``masked_linear`` gives
``grad_x = grad_y @ (W*M)``, ``grad_W = (grad_y^T x) * M`` and ``grad_bias``.  The backward runs the
grad ops of the backend that ran the forward where that backend has them, else the reference.
"""

from __future__ import annotations

import importlib
import math

import torch

from ..reference import linear as ref
from . import _registry as R
from . import _validate as V
from .sparse24 import check_packed

_TRITON_DEVICES = ["cuda"] + (["cpu"] if R.triton_interpreted() else [])


# ---------------------------------------------------------------- auto rules
# CPU: the cpp op picks its own path by batch size (csrc/cpu/linear.cpp, gemm_min_m, with its
# measurements).  benchmarks/results/cpu/bench_linear_cpu.json (2-core AMD EPYC Zen 5, torch 2.13,
# OpenMP build, the benchmark alone on the box), speedup of cpp over dense F.linear, medians,
# over the four LLM shapes: fp32 1.71-1.98x at batch 1, 3.20-3.90x at 4, 2.00-2.41x at 16,
# 1.53-2.05x at 64; bf16 1.99-2.46x at 1, 1.87-2.02x at 4, 1.15-1.21x at 16, 0.76-0.81x at 64
# (bf16 GEMM path: expanding the weight costs more than oneDNN's dense bf16 GEMM saves).
# The reference decompresses all of W on every call, then runs F.linear (506 ms vs 16 ms for cpp at
# 4096x4096 fp32 batch 16 in a --quick run); cpp's GEMM path is a dense GEMM plus an in-cache expand
# of 256 rows at a time, never the full decompress, so auto = cpp on CPU whenever it is built.
# The "decompress" backend (decompress all of W, then F.linear) is no better on CPU:
# benchmarks/results/cpu/bench_linear_cpu_decompress.csv (4096x4096, quiet box, 2026-11-29), ms
# dense | cpp | decompress: bf16 M=16 2.73|2.31|18.8, M=64 5.81|7.84|21.6, M=256 18.7|20.9|35.4;
# fp32 M=16 9.45|4.51|39.8, M=64 24.4|14.1|55.8, M=256 85.0|58.2|116.9.
# CUDA: benchmarks/results/gpu/h200_2026-11-28/bench_linear_cuda.csv (H200, torch 2.11, eager
# timing: each call's Python/dispatch overhead included), medians, fp16 and bf16:
# * batch 1-16: the mma.sp kernel (cuda) runs 0.012-0.065 ms against dense F.linear's 0.019-0.043 ms:
#   1.70-1.73x at batch 1-4 on 4096x14336, 14336x4096 and 11008x4096 in fp16 (bf16 0.72-1.75x; the
#   4096x4096 rows are mostly Python overhead), 0.66-1.22x at batch 16; decompress + cuBLAS would
#   cost dense + 0.043 ms (4096x4096) to 0.071 ms (11008x4096) there.  Triton 0.08-0.27 ms, cuSPARSELt via torch 0.53-1.3 ms (a
#   plan per call).
# * batch >= 256: mma.sp reaches only 0.28-0.39x of cuBLAS (e.g. 11008x4096 bf16 batch 2048: 0.756 vs
#   0.284 ms), while decompressing the weight (cuda decompress: 0.043 ms at 4096x4096, 0.070 ms at
#   11008x4096) and running cuBLAS costs dense + that: 0.35 ms there.  At batch 256 the two tie
#   on the large shapes (4096x14336: 0.153 vs ~0.14 ms) and mma.sp wins at 4096x4096 (0.050 vs
#   ~0.068 ms), hence the size split.  So: cuda up to batch 255, "decompress" from 1024 (from 256
#   for weights of >= 2^25 elements).  No shape in the table gets cuda's 1.5x at large batch
#   (issue 3's goal: wgmma.sp would be needed).  torch's cuSPARSELt beat cuBLAS only at batch 8192
#   on the 14336-wide shapes (1.33-1.53x); it needs a second, cuSPARSELt-packed copy of the
#   weight, so auto never takes it: SparseLinear(backend="cusparselt") caches one (nn.py).
# * float32 on CUDA (no sparse tensor cores): not in the GPU table; decompress + cuBLAS by the same
#   arithmetic (Triton ran 0.2x of dense in fp16).
DECOMPRESS_MIN_M = 1024
DECOMPRESS_MIN_M_LARGE = 256
LARGE_WEIGHT = 1 << 25


def _sparse_linear_auto(device_type, avail, m=1, dtype=torch.float32, nk=0):
    if device_type == "cpu":
        return "cpp" if "cpp" in avail else "reference"
    if device_type == "cuda":
        big_m = m >= (DECOMPRESS_MIN_M_LARGE if nk >= LARGE_WEIGHT else DECOMPRESS_MIN_M)
        if dtype in (torch.float16, torch.bfloat16) and not big_m and "cuda" in avail:
            return "cuda"
        for b in ("decompress", "triton"):
            if b in avail:
                return b
    return "reference"


# masked_linear on CPU: cpp runs 0.40..1.87x of dense F.linear on a stored W*M (fp32: 0.90..1.26x at
# batch 1, 1.23..1.47x at 4, 0.81..1.04x at 16-64; bf16: 0.94..1.87x at 1, 0.65..1.18x at 4, 0.40..0.64x
# from 16; paths: gemm_min_m in csrc/cpu/linear.cpp), and many times faster than forming W*M per call
# ("masked_dense" in benchmarks/bench_linear.py, what the reference does).
# masked_linear on CUDA (same H200 table): the fused Triton kernel ran 0.08-0.21x of dense F.linear
# at every shape and batch, slower than forming W*M and calling cuBLAS ("masked_dense", 0.18-0.91x),
# which is what the reference does (plus unpacking a bit-packed mask: one elementwise pass), so
# auto takes the reference on CUDA; forcing backend="triton" keeps the fused kernel (it never
# writes W*M to global memory: the choice when memory, not time, is short).
_masked_linear_auto = R.cpp_on_cpu


# ---------------------------------------------------------------- schemas + fakes
def _sparse_linear_fake(x, values, meta, bias, meta_dev):
    return x.new_empty(x.shape[0], values.shape[0])


def _masked_linear_fake(x, weight, mask, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _grad_x_fake(grad_y, weight, mask):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1])


def _grad_w_fake(grad_y, x, weight, mask):
    return torch.empty_like(weight)


def _sl_grad_x_fake(grad_y, values, meta):
    return grad_y.new_empty(grad_y.shape[0], 2 * values.shape[1])


def _sl_grad_values_fake(grad_y, x, meta):
    return x.new_empty(meta.shape[0], x.shape[1] // 2)


def _pack_fake(mask):
    return mask.new_empty(*mask.shape[:-1], (mask.shape[-1] + 7) // 8, dtype=torch.uint8)


def _unpack_fake(packed, cols):
    return packed.new_empty(*packed.shape[:-1], cols, dtype=torch.bool)


SL_SCHEMA = "(Tensor x, Tensor values, Tensor meta, Tensor? bias, Tensor? meta_dev) -> Tensor"
R.define("sparse_linear", SL_SCHEMA, fake=_sparse_linear_fake, reference=ref.sparse_linear,
         backends=("reference", "cpp", "cuda", "triton", "cusparselt", "decompress"), auto=_sparse_linear_auto)
R.define("masked_linear", "(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor",
         fake=_masked_linear_fake, reference=ref.masked_linear,
         backends=("reference", "cpp", "triton"), auto=_masked_linear_auto)
R.define("masked_linear_grad_x", "(Tensor grad_y, Tensor weight, Tensor mask) -> Tensor", fake=_grad_x_fake,
         reference=lambda gy, w, m: ref.masked_linear_backward(gy, None, w, m, True, False)[0],
         backends=("reference", "cpp", "triton"), auto=_masked_linear_auto)
R.define("masked_linear_grad_w", "(Tensor grad_y, Tensor x, Tensor weight, Tensor mask) -> Tensor",
         fake=_grad_w_fake,
         reference=lambda gy, x, w, m: ref.masked_linear_backward(gy, x, w, m, False, True)[1],
         backends=("reference", "cpp", "triton"), auto=_masked_linear_auto)
R.define("sparse_linear_grad_x", "(Tensor grad_y, Tensor values, Tensor meta) -> Tensor", fake=_sl_grad_x_fake,
         reference=ref.sparse_linear_grad_x, backends=("reference", "cpp"))
R.define("sparse_linear_grad_values", "(Tensor grad_y, Tensor x, Tensor meta) -> Tensor",
         fake=_sl_grad_values_fake, reference=ref.sparse_linear_grad_values, backends=("reference", "cpp"))
R.define("pack_mask", "(Tensor mask) -> Tensor", fake=_pack_fake, reference=ref.pack_mask,
         backends=("reference", "cpp"))
R.define("unpack_mask", "(Tensor packed, int cols) -> Tensor", fake=_unpack_fake, reference=ref.unpack_mask,
         backends=("reference", "cpp"))


def _triton(fn_name):
    def launch(*args):
        from ..triton import linear as t
        from ..triton import on_device

        with on_device(args[0]):
            return getattr(t, fn_name)(*args)

    return launch


for _op in ("sparse_linear", "masked_linear", "masked_linear_grad_x", "masked_linear_grad_w"):
    R.impl_python(_op, "triton", _triton(_op), _TRITON_DEVICES)


def _sparse_linear_cusparselt(x, values, meta, bias, meta_dev):
    """Op-level cuSPARSELt path: compresses the weight on every call (correct, slow).

    :class:`sparse_kernels.nn.SparseLinear` caches :func:`cslt_pack` instead (see its docstring).
    """
    return cslt_matmul(x, cslt_pack(values, meta, x.dtype), bias, values.shape[0])


CSLT_ROWS = 16  # cuSPARSELt (through torch) takes f16/bf16 sparse operands with rows % 16 == 0


def cslt_pack(values, meta, dtype):
    """``torch._cslt_compress`` of the dense weight, rows zero-padded to a multiple of 16.

    Weights with other row counts failed there with "operation not supported" (the first GPU run,
    2026-11-28); torch's SparseSemiStructuredTensor states the same (16, 16) minimum for
    cuSPARSELt f16/bf16.  Columns are a multiple of 16 already (the packed format needs it)."""
    w = torch.ops.sparse_kernels.decompress_2to4(values, meta).to(dtype)
    pad = (-w.shape[0]) % CSLT_ROWS
    if pad:
        w = torch.nn.functional.pad(w, (0, 0, 0, pad))
    return torch._cslt_compress(w)


def cslt_matmul(x, packed, bias, n):
    """``x [M, K] @ W^T + bias`` with ``packed = cslt_pack(...)`` of a weight with ``n`` rows.

    M is padded to 16.  The product is taken as ``W @ x^T`` (``transpose_result=False``) and
    transposed back, the call torch 2.11's SparseSemiStructuredTensor made: it ran in 0.53-1.3 ms
    on the H200 (2026-11-28) where ``transpose_result=True`` took 200-370 ms in fp16."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, n)
    pad = (-m) % 16
    # _cslt_sparse_mm reads its dense operand as contiguous or contiguous-transposed (strides
    # are not passed on), so a row-strided view of x must be copied first.
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    y = torch._cslt_sparse_mm(packed, xp.t(), transpose_result=False).t()  # [M + pad, N + row pad]
    y = y[:m, :n].contiguous()
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y


def _sparse_linear_decompress(x, values, meta, bias, meta_dev):
    """Decompress the weight, then ``F.linear``: on CUDA with the decompress kernel minus its
    metadata check (no host sync, CUDA-graph capturable; ops/sparse24.py), elsewhere with the
    fastest ``decompress_2to4`` backend.

    The large-batch path (see ``_sparse_linear_auto``): at batch >= 256-1024 cuBLAS on the dense
    weight beats the mma.sp kernel by more than the decompress costs.  The dense weight is a
    temporary of one call."""
    from .sparse24 import UNCHECKED_DECOMPRESS, decompress_2to4

    if values.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{R.NAMESPACE}::{UNCHECKED_DECOMPRESS}", "CUDA"):
        w = getattr(torch.ops.sparse_kernels, UNCHECKED_DECOMPRESS)(values, meta)  # no host sync
    else:
        w = decompress_2to4(values, meta)
    return torch.nn.functional.linear(x, w, bias)


R.impl_python("sparse_linear", "cusparselt", _sparse_linear_cusparselt, ["cuda"])
R.impl_python("sparse_linear", "decompress", _sparse_linear_decompress, ["cpu", "cuda"])

# The cuda backend with its kernel named (csrc/cuda/linear.h): what ``backend="cuda"`` runs is
# "auto" there (the GEMV up to batch 16, the GEMM above: the kernels the first GPU run measured);
# benchmarks and tests reach the others through this op.  CUDA only, no autograd.
CUDA_KERNELS = ("auto", "gemv", "gemm", "splitk", "wgmma")
CUDA_KERNEL_OP = "sparse_linear_cuda_kernel"
R.LIB.define(CUDA_KERNEL_OP + "(Tensor x, Tensor values, Tensor meta, Tensor? bias, Tensor? meta_dev, str kernel)"
             " -> Tensor")
torch.library.register_fake(f"{R.NAMESPACE}::{CUDA_KERNEL_OP}",
                            lambda x, values, meta, bias, meta_dev, kernel: _sparse_linear_fake(
                                x, values, meta, bias, meta_dev), lib=R.LIB)


# ---------------------------------------------------------------- autograd
def _sl_setup(ctx, inputs, output):
    x, values, meta, bias, _ = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad_backend(op, backend, device):
    """``backend`` if op ``op`` has it and it can run on ``device``, else ``reference``."""
    if backend in R.OPS[op].backends and R.why_unavailable(op, backend, device.type) is None:
        return backend
    return "reference"


def _sl_backward_for(backend):
    def backward(ctx, grad):
        x, values, meta = ctx.saved_tensors
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = R.get_op("sparse_linear_grad_x", _grad_backend("sparse_linear_grad_x", backend, grad.device))(
                grad, values, meta)
        if ctx.needs_input_grad[1]:
            gv = R.get_op("sparse_linear_grad_values", _grad_backend("sparse_linear_grad_values", backend,
                                                                     grad.device))(grad, x, meta)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gv, None, gb, None

    return backward


for _b in R.OPS["sparse_linear"].backends:
    R.register_autograd("sparse_linear", _sl_backward_for(_b), _sl_setup, backends=[_b])


def _ml_setup(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ml_backward_for(backend):
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        gx = gw = gb = None
        grad_backend = _grad_backend("masked_linear_grad_x", backend, grad.device)
        if ctx.needs_input_grad[0]:
            gx = R.get_op("masked_linear_grad_x", grad_backend)(grad, weight, mask)
        if ctx.needs_input_grad[1]:
            gw = R.get_op("masked_linear_grad_w", grad_backend)(grad, x, weight, mask)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gw, None, gb

    return backward


for _b in R.OPS["masked_linear"].backends:
    R.register_autograd("masked_linear", _ml_backward_for(_b), _ml_setup, backends=[_b])


# ---------------------------------------------------------------- public API
def _call(name, backend, x2, *args):
    """``R.call`` with the batch size and dtype as the ``auto`` rule's inputs.

    Under torch.compile the batch size is rounded up to a power of two (guards ``m <= 2**i``), so a
    symbolic batch size still gets the ``auto`` rule (whose thresholds are powers of two).
    """
    m = x2.shape[0]
    nk = 2 * args[0].shape[0] * args[0].shape[1] if name == "sparse_linear" else 0  # the weight's size
    if torch.compiler.is_compiling():
        # floor(m) to a power of two, as SparseLinear's cache does: the same choice as the exact
        # batch, since every threshold of the auto rules is a power of two (guards: 2^i <= m)
        bucket = 1
        while bucket < (1 << 30) and 2 * bucket <= m:
            bucket *= 2
        m = bucket if x2.shape[0] > 0 else 0
        nk = LARGE_WEIGHT if nk >= LARGE_WEIGHT else 0  # only the comparison matters
    auto_args = (m, x2.dtype, nk) if name == "sparse_linear" else (m, x2.dtype)
    return R.call(name, backend, x2.device, x2, *args, auto_args=auto_args)


def _flatten(x):
    # not reshape(-1, K): that cannot infer -1 when K == 0
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), x.shape[:-1]


def _check_x(x, k, what):
    V.tensor("x", x, min_ndim=1, dtypes=V.FLOAT_DTYPES)
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim is {x.shape[-1]} but {what} has {k} input features (columns); they must match")


def _check_sparse_linear_args(x, values, meta, bias, meta_dev):
    """What :func:`sparse_linear` and :func:`sparse_linear_cuda_kernel` accept (ValueError /
    TypeError naming the argument)."""
    check_packed(values, meta)
    _check_x(x, 2 * values.shape[1], "the 2:4 weight (2 * values.shape[1])")
    if values.dtype != x.dtype:
        raise TypeError(f"values: dtype {values.dtype} does not match x's dtype {x.dtype}; cast one of them")
    V.same_device(x=x, values=values, meta=meta)
    V.bias(bias, values.shape[0], x)
    if meta_dev is not None:
        V.same_device(x=x, meta_dev=meta_dev)


def sparse_linear(x, values, meta, bias=None, *, backend=None, meta_dev=None):
    """``y = x @ decompress_2to4(values, meta).T + bias`` without forming the dense weight.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32 (any leading dims, flattened and restored).
        values: ``[N, K/2]``, x's dtype; meta: ``[N, K/16]`` int16 (canonical 2:4 format).
        bias: ``[N]``, x's dtype, or None.
        backend: ``auto | reference | cpp | cuda | triton | cusparselt | decompress``.
        meta_dev: optional device-layout metadata for the cuda backend (cached by SparseLinear);
            other backends ignore it.

    Returns ``[..., N]`` in x's dtype, accumulated in fp32.  Raises ValueError/TypeError for
    mismatched shapes, dtypes or devices (naming the argument).
    """
    _check_sparse_linear_args(x, values, meta, bias, meta_dev)
    x2, lead = _flatten(x)
    y = _call("sparse_linear", backend, x2, values, meta, bias, meta_dev)
    return y.reshape(*lead, values.shape[0])


def sparse_linear_cuda_kernel(x, values, meta, bias=None, *, kernel="auto", meta_dev=None):
    """:func:`sparse_linear` on the cuda backend with its kernel named (benchmarks, tests, tuning).

    ``kernel``: ``auto`` (what ``backend="cuda"`` runs), ``gemv`` (the decode kernel, at most 16
    rows of x after flattening), ``gemm`` (the cp.async mma.sp GEMM), ``splitk`` (the GEMM with
    32/64/128-row batch tiles and K split across CTAs, for mid-size batches; compiled, not yet run
    on a GPU), ``wgmma`` (Hopper's warpgroup sparse MMA, 256 x 128 tiles, for large batches;
    sm_90 GPUs with an sm_90a build only; compiled, not yet run on a GPU).  Same arguments and
    result as :func:`sparse_linear` otherwise; no autograd.
    Raises ValueError for an unknown kernel or one that cannot take this batch, and
    ``BackendUnavailableError`` where the cuda backend is not built or x is not on a GPU.
    """
    if not isinstance(kernel, str) or kernel not in CUDA_KERNELS:
        raise ValueError(f"kernel: got {kernel!r}, expected one of {', '.join(CUDA_KERNELS)}")
    _check_sparse_linear_args(x, values, meta, bias, meta_dev)
    why = R.why_unavailable("sparse_linear", "cuda", x.device.type)
    if why is not None:
        raise R.BackendUnavailableError(f"sparse_linear_cuda_kernel cannot run on {x.device.type}: {why}")
    x2, lead = _flatten(x)
    y = getattr(torch.ops.sparse_kernels, CUDA_KERNEL_OP)(x2, values, meta, bias, meta_dev, kernel)
    return y.reshape(*lead, values.shape[0])


def _check_mask(mask, weight):
    n, k = weight.shape
    V.tensor("mask", mask, ndim=2, dtypes=(torch.bool, torch.uint8))
    want = (n, k) if mask.dtype == torch.bool else (n, (k + 7) // 8)
    if tuple(mask.shape) != want:
        kind = "a bool mask" if mask.dtype == torch.bool else "a bit-packed uint8 mask (see pack_mask)"
        raise ValueError(f"mask: shape {tuple(mask.shape)} is wrong for {kind} of weight {tuple(weight.shape)}; "
                         f"expected {want}")
    V.same_device(weight=weight, mask=mask)


def masked_linear(x, weight, mask, bias=None, *, backend=None):
    """``y = x @ (weight * mask).T + bias`` for any sparsity pattern.

    The cpp and triton backends are fused (W*M is never stored).  On CUDA ``auto`` takes the
    reference, which forms W*M for one call and runs cuBLAS: it was faster than the fused Triton
    kernel at every measured shape (H200, see the comment above ``_masked_linear_auto``); pass
    ``backend="triton"`` when memory, not time, is short.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32; weight: ``[N, K]``, x's dtype.
        mask: bool ``[N, K]``, or uint8 ``[N, ceil(K/8)]`` packed by :func:`pack_mask`.
        bias: ``[N]`` or None.  backend: ``auto | reference | cpp | triton``.

    Differentiable in x, weight (grad masked) and bias.
    """
    V.tensor("weight", weight, ndim=2, dtypes=V.FLOAT_DTYPES)
    _check_x(x, weight.shape[1], "weight")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match x's dtype {x.dtype}; cast one of them")
    _check_mask(mask, weight)
    V.same_device(x=x, weight=weight)
    V.bias(bias, weight.shape[0], x)
    x2, lead = _flatten(x)
    y = _call("masked_linear", backend, x2, weight, mask, bias)
    return y.reshape(*lead, weight.shape[0])


def pack_mask(mask, *, backend=None):
    """bool ``[..., cols]`` -> uint8 ``[..., ceil(cols/8)]``; ``mask[..., c]`` is bit ``c % 8`` of byte ``c // 8``."""
    V.tensor("mask", mask, min_ndim=1, dtypes=(torch.bool,))
    return R.call("pack_mask", backend, mask.device, mask)


def unpack_mask(packed, cols, *, backend=None):
    """Inverse of :func:`pack_mask`: uint8 ``[..., ceil(cols/8)]`` -> bool ``[..., cols]``."""
    V.tensor("packed", packed, min_ndim=1, dtypes=(torch.uint8,))
    if not isinstance(cols, int) or isinstance(cols, bool):
        raise TypeError(f"cols: expected an int, got {type(cols).__name__}")
    if packed.shape[-1] != (cols + 7) // 8:
        raise ValueError(f"packed: last dim {packed.shape[-1]} does not hold {cols} bits; expected {(cols + 7) // 8}")
    return R.call("unpack_mask", backend, packed.device, packed, cols)


def reorder_meta_mma_fn():
    """The CUDA helper's ``reorder_meta_mma`` (sparse_kernels/ops/mma_layout.py) or None if absent."""
    try:
        mod = importlib.import_module("sparse_kernels.ops.mma_layout")
    except ImportError:
        return None
    return getattr(mod, "reorder_meta_mma", None)
