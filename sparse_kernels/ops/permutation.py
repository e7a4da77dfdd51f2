"""The ``nm_split_scores`` op: the inner step of the N:M channel-permutation search.

Math and layouts: :mod:`sparse_kernels.reference.permutation`.  Backends: reference (a chunked
gather + ``topk``; runs on any device) and cpp (csrc/cpu/permutation.cpp: streams each pair's
``2m`` contiguous score columns once per candidate split, no gather).  ``auto``: cpp on CPU.
Not differentiable (a search step).
"""

from __future__ import annotations

import torch

from ..reference import permutation as ref
from . import _registry as R
from . import _validate as V


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
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= scores_t.shape[0]):
        raise ValueError(f"cols: column ids must lie in [0, {scores_t.shape[0]}) (the rows of scores_t)")
    ident = torch.arange(two_m, device=splits.device)
    if not bool((splits.sort(dim=1).values == ident).all()):
        raise ValueError(f"splits: every row must be a permutation of 0..{two_m - 1}")
    return R.call("nm_split_scores", backend, scores_t.device, scores_t.contiguous(), cols.contiguous(),
                  splits.contiguous(), n)
