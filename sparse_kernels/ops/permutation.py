"""The permutation family's ops (math: :mod:`sparse_kernels.reference.permutation`).

* ``nm_split_scores``: the inner step of the N:M channel-permutation search.  Backends: reference
  (a chunked gather + ``topk``; runs on any device) and cpp (csrc/cpu/permutation.cpp: streams
  each pair's ``2m`` contiguous score columns once per candidate split, no gather).  Not
  differentiable (a search step).
* ``gather_columns``: ``x[..., index]``, the input gather of a permuted 2:4 layer.  Backends:
  reference (``index_select``) and cpp (a row-parallel gather by element size; torch's CPU
  ``index_select`` along the last dim is slow for 16-bit types, see ``_GATHER_NOTE``).
  Autograd: ``grad_x = zeros.index_add(-1, index, grad_out)``.

``auto``: cpp on CPU, the reference elsewhere.
"""

from __future__ import annotations

import os

import torch

from ..reference import permutation as ref
from . import _registry as R
from . import _validate as V


def _values_readable(t: torch.Tensor) -> bool:
    """Whether a wrapper may read ``t``'s values for its checks (not on meta, not while tracing)."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def _fake(scores_t, cols, splits, n):
    return scores_t.new_empty(cols.shape[0], splits.shape[0], dtype=torch.float64)


R.define("nm_split_scores", "(Tensor scores_t, Tensor cols, Tensor splits, int n) -> Tensor",
         fake=_fake, reference=ref.nm_split_scores, backends=("reference", "cpp"), auto=R.cpp_on_cpu)


def nm_split_scores(scores_t: torch.Tensor, cols: torch.Tensor, splits: torch.Tensor, n: int, *,
                    backend: str | None = None) -> torch.Tensor:
    """``[P, S]`` float64 kept importance of every candidate split of every pair of groups (see
    :mod:`sparse_kernels.reference.permutation`).  Raises ValueError/TypeError for wrong shapes,
    dtypes or devices, column ids outside ``[0, C)`` and splits that are not permutations."""
    V.tensor("scores_t", scores_t, ndim=2, dtypes=(torch.float32,))
    V.tensor("cols", cols, ndim=2, dtypes=(torch.int64,))
    V.tensor("splits", splits, ndim=2, dtypes=(torch.int64,))
    V.same_device(scores_t=scores_t, cols=cols, splits=splits)
    two_m = cols.shape[1]
    if two_m % 2 or not 4 <= two_m <= 32:
        raise ValueError(f"cols: shape {tuple(cols.shape)}; expected [pairs, 2m] with 2 <= m <= 16")
    if splits.shape[1] != two_m or splits.shape[0] == 0:
        raise ValueError(f"splits: shape {tuple(splits.shape)}; expected [S >= 1, {two_m}] (2m = cols' width)")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < two_m // 2:
        raise ValueError(f"n: got {n!r}, expected an int with 0 < n < m = {two_m // 2}")
    if _values_readable(cols):
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= scores_t.shape[0]):
            raise ValueError(f"cols: column ids must lie in [0, {scores_t.shape[0]}) (the rows of scores_t)")
        ident = torch.arange(two_m, device=splits.device)
        if not bool((splits.sort(dim=1).values == ident).all()):
            raise ValueError(f"splits: every row must be a permutation of 0..{two_m - 1}")
    return R.call("nm_split_scores", backend, scores_t.device, scores_t.contiguous(), cols.contiguous(),
                  splits.contiguous(), n)


# The cpp gather exists because torch's CPU index_select along the last dim is slow for 16-bit
# types; for 32-bit ones and small inputs index_select wins (the custom op's dispatch costs
# ~4 us).  index_select / cpp on the 2-core EPYC, torch 2.13, 2026-11-29:
#   bf16 [1, 576] 2.1 / 5.2 us, [1, 4096] 8.2 / 7.3 us, [16, 4096] 100 / 24 us, [64, 4096] 396 / 80 us;
#   fp32 [1, 4096] 3.2 / 7.2 us, [64, 4096] 77 / 88 us, [256, 1536] 116 / 127 us.
# So auto takes cpp for 16-bit x of at least 4096 elements on CPU, the reference otherwise.
_CPP_MIN_NUMEL = 4096


def _gather_auto(device_type, avail, big_16bit=False):
    return "cpp" if device_type == "cpu" and "cpp" in avail and big_16bit else "reference"


def _gather_fake(x, index):
    return x.new_empty(*x.shape[:-1], index.shape[0])


R.define("gather_columns", "(Tensor x, Tensor index) -> Tensor", fake=_gather_fake, reference=ref.gather_columns,
         backends=("reference", "cpp"), auto=_gather_auto)


def _big_16bit(x: torch.Tensor) -> bool:
    return x.element_size() == 2 and x.numel() >= _CPP_MIN_NUMEL


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _gather_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    gx = grad_out.new_zeros(ctx.x_shape)
    return gx.index_add(-1, index, grad_out), None


R.register_autograd("gather_columns", _gather_backward, _gather_setup)


def gather_columns(x: torch.Tensor, index: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``out[..., j] = x[..., index[j]]`` for ``x [..., K]`` (any dtype) and ``index [N]`` int64 in
    ``[0, K)`` on x's device.  Raises ValueError/TypeError for other shapes, dtypes, devices or
    indices out of range (this wrapper reads the index's range: a host sync on CUDA;
    SparseLinear calls the op directly with its validated ``in_perm``)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a tensor with at least 1 dim, got {type(x).__name__}")
    V.tensor("index", index, ndim=1, dtypes=(torch.int64,))
    V.same_device(x=x, index=index)
    k = x.shape[-1]
    if _values_readable(index) and index.numel() and (int(index.min()) < 0 or int(index.max()) >= k):
        raise ValueError(f"index: entries must lie in [0, {k}) (x's last dim), got [{int(index.min())}, "
                         f"{int(index.max())}]")
    return R.call("gather_columns", backend, x.device, x, index, auto_args=(_big_16bit(x),))


_chosen: dict = {}  # (device type, 16-bit and big, SPARSE_KERNELS_BACKEND) -> backend


def gather_validated(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`gather_columns` without the wrapper's checks, for an ``index`` already validated
    (a SparseLinear's ``in_perm``): no host sync on CUDA.  The backend choice is cached, and the
    reference is ``index_select`` called directly (the op's dispatch would cost more than the
    gather of a decode step's x)."""
    big = _big_16bit(x)
    if torch.compiler.is_compiling():
        return R.call("gather_columns", None, x.device, x, index, auto_args=(big,))
    key = (x.device.type, big, os.environ.get(R.ENV_VAR))
    b = _chosen.get(key)
    if b is None:
        b = _chosen[key] = R.select("gather_columns", None, x.device, big)
    if b == "reference":
        return x.index_select(-1, index)
    return R.get_op("gather_columns", b)(x, index)
