"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023, "Outlier Weighed Layerwise
Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Uniform sparsity prunes every decoder block equally.  OWL gives blocks with more activation
outliers a lower sparsity and the others a higher one, keeping the average:

1. Per block, score every prunable weight as Wanda does, ``|W_ij| * ||X_j||_2``, over all its
   layers together; the block's outlier ratio ``D`` is the fraction of scores above ``m``
   times their mean (``m = 5`` in the paper).
2. The ratios are rescaled linearly to ``[0, 2 * lmbda]`` (``lmbda = 0.08`` in the paper),
   centred on their mean, and added to the kept fraction: block ``i`` keeps
   ``(1 - s) + 2 * lmbda * (D_i - min D) / (max D - min D) - mean(...)``, i.e. its sparsity is
   ``s`` minus that offset.  Equal ratios give every block ``s``.

The scores are taken on the dense model (the calibration passed through unpruned blocks), as
the authors' code does.  Unstructured sparsity only: N:M patterns fix the sparsity of every
group.  :func:`sparse_kernels.prune` runs it with ``owl=True`` (or ``owl={"m": ..., "lmbda": ...}``).
llm-compressor exposes the same two knobs (``owl_m``, ``owl_lmbda``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["OWL_DEFAULTS", "parse_owl", "outlier_ratio", "owl_sparsities"]

OWL_DEFAULTS = {"m": 5.0, "lmbda": 0.08}


def parse_owl(owl) -> dict | None:
    """``None``/``False`` -> None (uniform sparsity); ``True`` -> the paper's defaults; a dict
    with ``m`` (> 0) and/or ``lmbda`` (>= 0, < 0.5) overrides them.  Raises TypeError/ValueError."""
    from .patterns import option_dict

    out = option_dict(owl, "owl", OWL_DEFAULTS)
    if out is None:
        return None
    for key in ("m", "lmbda"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"owl: {key} must be a finite number, got {v!r}")
        out[key] = float(v)
    if out["m"] <= 0:
        raise ValueError(f"owl: m must be > 0 (outliers are scores above m x their mean), got {out['m']}")
    if not 0 <= out["lmbda"] < 0.5:
        raise ValueError(f"owl: lmbda must be in [0, 0.5) (the sparsity spread is 2 x lmbda), got {out['lmbda']}")
    return out


def outlier_ratio(scores, m: float) -> float:
    """Fraction of the entries of all ``scores`` (one block's Wanda scores, any shapes) that
    exceed ``m`` times the mean over all of them.

    ``scores``: a sequence of tensors, or a callable returning a fresh iterable of them (it is
    called twice, so the scores of a large block never need to be alive all at once).
    """
    get = scores if callable(scores) else (lambda: scores)
    total, acc = 0, 0.0
    for s in get():
        total += s.numel()
        acc += float(s.sum(dtype=torch.float64))
    if total == 0:
        return 0.0
    threshold = m * acc / total
    return sum(int((s > threshold).sum()) for s in get()) / total


def owl_sparsities(ratios: Sequence[float], sparsity: float, lmbda: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (see the module docstring).

    Their mean is ``sparsity``, their spread ``2 * lmbda`` (0 when all ratios are equal).
    Raises ValueError when a block would leave (0, 1).
    """
    r = [float(v) for v in ratios]
    if not r:
        return []
    lo, hi = min(r), max(r)
    if hi > lo:
        offs = [(v - lo) / (hi - lo) * 2.0 * lmbda for v in r]
    else:
        offs = [0.0] * len(r)
    mean = sum(offs) / len(offs)
    out = [sparsity - (o - mean) for o in offs]
    for i, s in enumerate(out):
        if not 0.0 < s < 1.0:
            raise ValueError(f"owl: block {i} would get sparsity {s:.4f} (target {sparsity}, lmbda {lmbda}); "
                             f"every block needs a sparsity in (0, 1): use a smaller lmbda")
    return out
