"""Sparsity specifications and the mask helpers every criterion shares.

A sparsity is either

* a float ``s`` in the open interval (0, 1): unstructured, the fraction of weights set to
  zero (``round(count * s)`` of them in each selection set: a block, a row, a layer), or
* a string ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``): in every group of ``M`` consecutive weights
  along the input dimension (the columns of a Linear weight ``[out_features, in_features]``)
  ``N`` are KEPT and ``M - N`` are zeroed, so ``"2:4"`` and ``"4:8"`` are 50% sparse.  This
  is the reading of NVIDIA's sparse tensor cores and PyTorch's semi-structured sparsity.
  (The SparseGPT and Wanda scripts call the number of *pruned* weights ``prunen``; for 2:4
  and 4:8 the two readings coincide.)  ``0 < N < M``; ``M`` must divide the columns.

Masks are bool tensors of the weight's shape, True where a weight is kept.
Ties in a score are broken deterministically: the lower index is kept (row-major order for
a whole-block or whole-layer selection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..reference.sparsegpt import keep_top_n, keep_top_n_flat

__all__ = ["Sparsity", "parse_sparsity", "keep_largest", "keep_largest_nm"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """A parsed sparsity: ``ratio`` for unstructured, or ``n`` kept of every ``m``."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    def check_columns(self, name: str, cols: int) -> None:
        if self.is_nm and cols % self.m != 0:
            raise ValueError(
                f"{name}: the number of columns (input features) must be a multiple of M={self.m} "
                f"for '{self}' pruning (groups of {self.m} run along the input dimension), got {cols}"
            )

    def n_pruned(self, count: int) -> int:
        """How many of ``count`` weights an unstructured selection zeroes."""
        return int(round(count * self.ratio))


def parse_sparsity(sparsity, name: str = "sparsity") -> Sparsity:
    """Parse ``0.5`` or ``"2:4"``-style specs; raise ValueError/TypeError naming ``name``."""
    if isinstance(sparsity, Sparsity):
        return sparsity
    if isinstance(sparsity, str):
        mt = _NM.match(sparsity)
        if mt is None:
            raise ValueError(f"{name}: got {sparsity!r}; a pattern string must look like 'N:M', e.g. '2:4' or '4:8'")
        n, m = int(mt.group(1)), int(mt.group(2))
        if not 0 < n < m:
            raise ValueError(
                f"{name}: got {sparsity!r}; 'N:M' keeps N of every M weights and needs 0 < N < M"
            )
        return Sparsity(ratio=1.0 - n / m, n=n, m=m)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name}: expected a float in (0, 1) or an 'N:M' string, got {type(sparsity).__name__}")
    s = float(sparsity)
    if not 0.0 < s < 1.0:
        raise ValueError(f"{name}: got {sparsity!r}, expected a fraction of zeroed weights in the open interval (0, 1)")
    return Sparsity(ratio=s)


def keep_largest(scores: torch.Tensor, n_pruned: int, dim: int | None = None) -> torch.Tensor:
    """Keep mask zeroing the ``n_pruned`` lowest scores, over everything (``dim=None``) or per
    slice along ``dim=-1`` (then ``n_pruned`` is per row).  Ties: the lower index is kept."""
    if dim is None:
        flat = scores.reshape(-1)
        return keep_top_n_flat(flat, flat.numel() - n_pruned).view(scores.shape)
    return keep_top_n(scores, scores.shape[-1] - n_pruned)


def keep_largest_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the ``n`` largest of every ``m`` consecutive scores along the last dim."""
    shape = scores.shape
    g = scores.reshape(*shape[:-1], shape[-1] // m, m)
    return keep_top_n(g, n).reshape(shape)


def option_dict(value, what: str, defaults: dict, extra: tuple = ()) -> dict | None:
    """The common shape of ``prune``'s feature switches (``owl=``, ``permute=``, ``dsnot=``):
    None/False -> None (off); True -> a copy of ``defaults``; a dict of keys from ``defaults`` and
    ``extra`` -> the defaults updated by it.  Raises TypeError for another type and ValueError for
    unknown keys; the caller checks the values."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    keys = sorted(set(defaults) | set(extra))
    if not isinstance(value, dict):
        raise TypeError(f"{what}: expected True, False or a dict of options ({', '.join(keys)}), got "
                        f"{type(value).__name__}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ValueError(f"{what}: unknown options {unknown}; it takes {', '.join(keys)}")
    return dict(defaults, **value)
