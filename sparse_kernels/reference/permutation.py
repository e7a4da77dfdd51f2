"""References of the permutation family: the inner step of the N:M channel-permutation search
(:mod:`sparse_kernels.pruning.permutation`), scoring every candidate re-split of pairs of groups,
and the input gather of a permuted layer (:func:`gather_columns`).

``nm_split_scores(scores_t, cols, splits, n) -> [P, S] float64``

* ``scores_t [C, R]`` float32: the importance scores *transposed*, one row per input column
  (column ``c``'s scores over the weight's ``R`` output rows, contiguous);
* ``cols [P, 2m]`` int64: for each of ``P`` pairs of groups, the column ids of group A (first
  ``m``) and group B (last ``m``);
* ``splits [S, 2m]`` int64: each row a permutation of ``0..2m-1``; entries ``[:m]`` pick the new
  group A from ``cols[p]``, entries ``[m:]`` the new group B;
* ``out[p, s] = sum over r of topn(scores_t[cols[p, splits[s, :m]], r])
  + topn(scores_t[cols[p, splits[s, m:]], r])``, where ``topn`` sums the ``n`` largest.
"""

from __future__ import annotations

import torch

# rows per chunk: bounds the [rows, P, S, 2m] gather to 16M elements (64 MiB of fp32)
_CHUNK_ELEMS = 16 * 1024 * 1024


def nm_split_scores(scores_t: torch.Tensor, cols: torch.Tensor, splits: torch.Tensor, n: int) -> torch.Tensor:
    P, two_m = cols.shape
    S = splits.shape[0]
    m = two_m // 2
    R = scores_t.shape[1]
    cand = cols[:, splits].reshape(-1)  # [P * S * 2m] column ids
    out = torch.zeros(P, S, dtype=torch.float64, device=scores_t.device)
    step = max(1, _CHUNK_ELEMS // max(1, cand.numel()))
    for r0 in range(0, R, step):
        chunk = scores_t[:, r0:r0 + step]
        v = chunk.index_select(0, cand).view(P, S, 2, m, chunk.shape[1])
        out += v.topk(n, dim=3).values.sum(3).sum(2).sum(-1, dtype=torch.float64)
    return out


def gather_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = x[..., index[j]]``: the input gather of a permuted 2:4 layer
    (:class:`sparse_kernels.nn.SparseLinear` with ``in_perm``)."""
    return x.index_select(-1, index)
