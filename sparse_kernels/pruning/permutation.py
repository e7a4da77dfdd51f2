"""Input-channel permutations for N:M pruning (2:4 channel permutation).

N:M pruning keeps the ``n`` most important of every ``m`` *consecutive* input columns of a
weight ``[out_features, in_features]``.  Which columns share a group is an accident of the
layer's column order: two important columns in one group of 4 cost one of them in every row.
Permuting the input channels first (Pool & Yu, "Channel Permutations for N:M Sparsity",
NeurIPS 2021; the RIA paper, Zhang et al. 2024, uses the same idea) lets more of the important
weights survive.  A permuted layer computes ``y = x[..., perm] @ S^T``, where ``S`` is the N:M
weight in permuted order (:class:`sparse_kernels.nn.SparseLinear` with ``in_perm``); the dense
weight in the original order is ``W`` with ``W[:, perm] = S``.

:func:`find_permutation` maximizes the N:M-kept importance

    f(perm) = sum over rows r and groups g of the n largest scores[r, perm[g*m:(g+1)*m]]

by the search of Pool & Yu, made deterministic and vectorized:

1. start from the better of the identity and a *balanced allocation*: columns sorted by total
   importance and dealt round-robin to the groups, so the most important columns start in
   different groups (RIA's heuristic channel allocation);
2. local search over pairs of groups: each round pairs the groups at random (a seeded
   generator) and, for every pair, evaluates every way to re-split its ``2m`` columns into two
   groups (all 35 splits for m = 4, which include the 16 single swaps; single swaps only for
   m > 4), then applies each pair's best split if it raises ``f``.  The pairs of a round are
   disjoint, so all their moves apply at once.  It stops after ``rounds`` rounds, after
   ``patience`` rounds in a row that raised ``f`` by less than a relative ``1e-6``, or when
   ``max_seconds`` have passed.

``f`` never decreases, so the result is never worse than the identity (tested).  The score is
the caller's: ``|W|`` for magnitude, ``|W| * ||X_j||`` for Wanda and SparseGPT, RIA's score for
RIA (:mod:`sparse_kernels.pruning.model`).  Runs on the scores' device.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from ..ops import _validate as V
from ..ops import _registry as R
from ..ops.permutation import nm_split_scores

__all__ = ["find_permutation", "find_permutation_with_gain", "nm_kept_score", "invert_permutation", "parse_permute",
           "search_options"]

def _check_nm(n, m) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not 0 < n < m:
        raise ValueError(f"n, m: N:M keeps n of every m columns and needs 0 < n < m, got {n}:{m}")


_MAX_M = 16  # nm_split_scores handles groups of up to 16 columns


def check_search_m(m: int, name: str = "m") -> None:
    """The search handles groups of ``M <= 16`` (ValueError otherwise)."""
    if m > _MAX_M:
        raise ValueError(f"{name}: the permutation search handles groups of M <= {_MAX_M} columns, got M={m}")


def _check_scores(scores, m) -> None:
    V.tensor("scores", scores, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    cols = scores.shape[1]
    if cols % m != 0:
        raise ValueError(f"scores: has {cols} columns, expected a multiple of m={m} (groups of {m} along dim 1)")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: must be finite (no NaN or inf)")


def nm_kept_score(scores: torch.Tensor, n: int = 2, m: int = 4, perm: torch.Tensor | None = None) -> float:
    """``f(perm)``: the sum over rows and groups of ``m`` consecutive columns (after ``perm``, if
    given) of the ``n`` largest scores, accumulated in float64."""
    _check_nm(n, m)
    _check_scores(scores, m)
    return _kept(scores, n, m, perm)


def _kept(scores, n, m, perm=None) -> float:
    """:func:`nm_kept_score` without the input checks (for inputs already checked)."""
    s = scores if perm is None else scores.index_select(1, perm.to(scores.device))
    g = s.reshape(s.shape[0], -1, m).double()
    return float(g.topk(n, dim=-1).values.sum())


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[j]] = j`` (so ``x[..., perm][..., inv] == x``)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def _splits(m: int) -> torch.Tensor:
    """Candidate re-splits of ``2m`` columns (``0..m-1`` from group A, ``m..2m-1`` from B) into
    two groups of ``m``: ``[count, 2m]``, the first ``m`` entries the new A, row 0 the identity.
    Every split for m <= 4 (35 for m = 4), the single swaps otherwise."""
    ident = list(range(2 * m))
    rows = [ident]
    if math.comb(2 * m, m) // 2 <= 70:
        for a in itertools.combinations(range(2 * m), m):
            if 0 not in a or list(a) == ident[:m]:
                continue  # each split once: the new A holds column 0
            rest = [c for c in ident if c not in a]
            rows.append(list(a) + rest)
    else:
        for i in range(m):
            for j in range(m, 2 * m):
                r = ident.copy()
                r[i], r[j] = r[j], r[i]
                rows.append(r)
    return torch.tensor(rows, dtype=torch.long)


def _balanced_allocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Columns sorted by total score (descending, stable) and dealt to the groups in turn."""
    cols = scores.shape[1]
    groups = cols // m
    order = torch.sort(scores.double().sum(0), descending=True, stable=True).indices
    # rank k goes to group k % groups, slot k // groups
    return order.view(m, groups).t().reshape(-1)


def _pair_gains(st: torch.Tensor, groups: torch.Tensor, a: torch.Tensor, b: torch.Tensor, splits: torch.Tensor,
                n: int, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair (a[k], b[k]) of groups: the best split's index into ``splits`` and its gain
    over the current split (float64).  ``st`` is the transposed scores ``[cols, rows]``."""
    cols = torch.cat([groups[a], groups[b]], dim=1)  # [pairs, 2m]: valid ids by construction
    # the op itself, past the wrapper's checks (they read the tensors back: host syncs on a GPU)
    total = R.call("nm_split_scores", backend, st.device, st, cols, splits, n)
    gain = total - total[:, :1]
    best = gain.argmax(dim=1)
    return best, gain.gather(1, best[:, None])[:, 0]


def find_permutation(scores: torch.Tensor, n: int = 2, m: int = 4, *, rounds: int = 100, patience: int = 5,
                     seed: int = 0, max_seconds: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """A column permutation that raises the N:M-kept importance of ``scores`` (see the module
    docstring for the search).

    Args:
        scores: ``[rows, cols]`` float importance (larger = more important), finite; ``cols`` a
            multiple of ``m``.  Usually ``|W|`` or a Wanda-style ``|W| * ||X_j||``.
        n, m: keep ``n`` of every ``m`` consecutive columns (2:4 by default).
        rounds: most rounds of pairwise group re-splitting (0: only the initial allocation).
        patience: stop after this many rounds in a row without a relative gain of 1e-6.
        seed: seeds the pairing of groups; the result is a deterministic function of the
            inputs on a given device.
        max_seconds: wall-clock cap on the local search (None: none).
        backend: of the ``nm_split_scores`` op that scores the candidate splits (default auto:
            the C++ kernel on CPU, the reference elsewhere).

    Returns an int64 permutation ``perm`` of ``range(cols)`` on the scores' device such that
    ``nm_kept_score(scores, n, m, perm) >= nm_kept_score(scores, n, m)``; applying N:M pruning
    to ``scores[:, perm]`` keeps that much importance.

    Raises TypeError/ValueError for a non-2-D or non-float ``scores``, NaN/inf, ``cols % m != 0``,
    bad ``n``/``m`` (``m <= 16``), a negative ``rounds``/``patience``, a bad ``max_seconds``,
    scores on the meta device.
    """
    return find_permutation_with_gain(scores, n, m, rounds=rounds, patience=patience, seed=seed,
                                      max_seconds=max_seconds, backend=backend)[0]


def find_permutation_with_gain(scores: torch.Tensor, n: int = 2, m: int = 4, *, rounds: int = 100,
                               patience: int = 5, seed: int = 0, max_seconds: float | None = None,
                               backend: str | None = None) -> tuple[torch.Tensor, float]:
    """:func:`find_permutation` and the relative rise of N:M-kept importance it buys,
    ``nm_kept_score(scores, n, m, perm) / nm_kept_score(scores, n, m) - 1`` (0.0 when nothing is
    kept), from the float64 scores the search computes anyway."""
    _check_nm(n, m)
    check_search_m(m)
    if isinstance(scores, torch.Tensor) and scores.device.type == "meta":
        raise ValueError("scores: on the meta device there are no values to search; load the weights first")
    _check_scores(scores, m)
    for name, v in (("rounds", rounds), ("patience", patience)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise ValueError(f"max_seconds: expected a number > 0 or None, got {max_seconds!r}")
    dev = scores.device
    cols = scores.shape[1]
    ident = torch.arange(cols, device=dev)
    if scores.shape[0] == 0 or cols == m or cols == 0:
        return ident, 0.0  # nothing to rearrange
    s = scores.float().contiguous()
    st = s.t().contiguous()
    alloc = _balanced_allocation(s, m)
    base, current = _kept(s, n, m), _kept(s, n, m, alloc)
    perm = alloc
    if current <= base:
        perm, current = ident, base
    groups = perm.view(-1, m).clone()
    G = groups.shape[0]
    splits = _splits(m).to(dev)
    nm_split_scores(st, groups[:2].reshape(1, -1), splits, n, backend=backend)  # checks the inputs once
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    quiet = 0
    for _ in range(rounds):
        order = torch.randperm(G, generator=gen).to(dev)
        half = G // 2
        a, b = order[:half], order[half:2 * half]
        best, gain = _pair_gains(st, groups, a, b, splits, n, backend)
        move = gain > 1e-9 * max(abs(current), 1e-30) / max(half, 1)
        if bool(move.any()):
            a, b, best = a[move], b[move], best[move]
            cols8 = torch.cat([groups[a], groups[b]], dim=1)
            new = cols8.gather(1, splits[best])
            groups[a], groups[b] = new[:, :m], new[:, m:]
        total_gain = float(gain[move].sum()) if bool(move.any()) else 0.0
        current += total_gain
        quiet = quiet + 1 if total_gain <= 1e-6 * max(abs(current), 1e-30) else 0
        if quiet >= patience or (max_seconds is not None and time.perf_counter() - t0 > max_seconds):
            break
    perm = groups.reshape(-1)
    kept = _kept(s, n, m, perm)
    # float32 sums could in principle accept a move that loses in float64: keep the better one
    if kept < base:
        return ident, 0.0
    return perm, (kept / base - 1.0 if base > 0 else 0.0)


_SEARCH_OPTIONS = ("rounds", "patience", "seed", "max_seconds", "backend")
_OPTIONS = _SEARCH_OPTIONS + ("fold",)


def search_options(opts: dict) -> dict:
    """The :func:`find_permutation` keywords of a parsed ``permute`` dict."""
    return {k: v for k, v in opts.items() if k in _SEARCH_OPTIONS}


def parse_permute(permute) -> dict | None:
    """``prune(permute=...)``: False/None -> None, True -> ``{}`` (the defaults), a dict of
    :func:`find_permutation` options plus ``fold`` (bool) -> that dict (checked).
    ValueError/TypeError otherwise."""
    from .patterns import option_dict

    permute = option_dict(permute, "permute", {}, extra=tuple(_OPTIONS))
    if permute is None:
        return None
    if not isinstance(permute.get("fold", True), bool):
        raise ValueError(f"permute: fold must be True or False, got {permute['fold']!r}")
    for k in ("rounds", "patience", "seed"):
        v = permute.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"permute: {k} must be an int >= 0, got {v!r}")
    ms = permute.get("max_seconds")
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0):
        raise ValueError(f"permute: max_seconds must be a number > 0 or None, got {ms!r}")
    return dict(permute)
