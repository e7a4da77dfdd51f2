"""DSnoT: training-free refinement of a pruning mask (Zhang et al., ICLR 2024, "Dynamic Sparse No
Training: Training-Free Fine-tuning for Sparse LLMs").

After a mask-only criterion (magnitude, Wanda, RIA) has chosen which weights to drop, DSnoT swaps
pruned and kept weights, one pair per output row per cycle, to shrink each row's *expected*
reconstruction error

    e_i = sum over pruned j of  W_ij * mean(x_j)

(how far the pruned row's output sits, on average over the calibration tokens, from the dense
one), keeping the sparsity exactly.  Each cycle, in every row still improving:

* grow: if ``e_i > 0`` the pruned weight with the largest ``W_ij mean(x_j) / var(x_j)^p``
  (positive: reviving it lowers ``e_i``), else the most negative one;
* drop: unstructured, the least important kept weight (by Wanda's score) whose
  ``W_ij mean(x_j)`` has the sign opposite to ``e_i``'s (dropping it adds that term, moving
  ``e_i`` toward 0 too); N:M, the least important kept weight (by the criterion's score) in the
  grown weight's group of M, so every group keeps N;
* the pair is applied while ``|e_i|`` exceeds ``threshold`` and ``e_i`` keeps its initial sign
  after the swap (N:M: and ``|e_i|`` shrinks; the paper's N:M loop lacks this check and can grow
  the error, since the dropped weight's term may have either sign); the first time any fails,
  the row stops.

There is no weight update: the kept weights keep their values.  At most ``max_cycles`` swaps a
row.  Here the drop candidates of an unstructured row are its kept weights with a negative and
with a positive ``W mean(x)``, each list in ascending importance (the paper walks one list of
both from either end); a row stops when the list it needs is used up.  The variance is the
pooled variance of all calibration tokens (the paper averages per-batch variances).
"""

from __future__ import annotations

import torch

from ..ops import _validate as V
from .criteria import ActivationNormAccumulator
from .patterns import Sparsity, option_dict

__all__ = ["dsnot_refine", "ActivationMomentsAccumulator", "parse_dsnot", "DSNOT_DEFAULTS"]

DSNOT_DEFAULTS = {"max_cycles": 50, "threshold": 0.1, "var_power": 1.0}


def parse_dsnot(dsnot) -> dict | None:
    """``prune(dsnot=...)``: False/None -> None; True -> the paper's defaults; a dict overrides
    ``max_cycles`` (int >= 0), ``threshold`` (float >= 0), ``var_power`` (float >= 0) and may set
    ``skip`` (a regex of layer names inside a block left as the criterion chose them)."""
    out = option_dict(dsnot, "dsnot", DSNOT_DEFAULTS, extra=("skip",))
    if out is None:
        return None
    mc = out["max_cycles"]
    if isinstance(mc, bool) or not isinstance(mc, int) or mc < 0:
        raise ValueError(f"dsnot: max_cycles must be an int >= 0, got {mc!r}")
    for k in ("threshold", "var_power"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"dsnot: {k} must be a finite number >= 0, got {v!r}")
    if out.get("skip") is not None:
        import re

        if not isinstance(out["skip"], str):
            raise TypeError(f"dsnot: skip must be a regex string, got {type(out['skip']).__name__}")
        try:
            re.compile(out["skip"])
        except re.error as e:
            raise ValueError(f"dsnot: skip {out['skip']!r} is not a valid regex ({e})") from None
    return out


class ActivationMomentsAccumulator(ActivationNormAccumulator):
    """Per input column: ``norm_sq = sum x_j^2`` (Wanda's statistic), and ``mean`` and ``var``
    (population variance) of ``x_j`` over all tokens; float64 sums, inputs of any leading shape."""

    def __init__(self, columns: int, device=None):
        super().__init__(columns, device)
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        self.sum += super().add(x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.nsamples, 1)

    @property
    def var(self) -> torch.Tensor:
        m = self.mean
        return (self.norm_sq / max(self.nsamples, 1) - m * m).clamp_min(0)

    def permuted(self, perm: torch.Tensor) -> "ActivationMomentsAccumulator":
        out = ActivationMomentsAccumulator(self.columns, device=self.norm_sq.device)
        p = perm.to(self.norm_sq.device)
        out.norm_sq, out.sum, out.nsamples = self.norm_sq[p], self.sum[p], self.nsamples
        return out


def _ordered(values: torch.Tensor, valid: torch.Tensor, descending: bool):
    """Per row, the column indices where ``valid``, ordered by ``values`` (stable), and how many."""
    big = torch.finfo(values.dtype).max
    key = torch.where(valid, -values if descending else values, torch.full_like(values, big))
    return torch.sort(key, dim=1, stable=True).indices, valid.sum(1)


@torch.no_grad()
def dsnot_refine(W: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 importance: torch.Tensor, sparsity: Sparsity | None = None, *, max_cycles: int = 50,
                 threshold: float = 0.1, var_power: float = 1.0) -> torch.Tensor:
    """DSnoT's swaps on ``mask`` (bool ``[rows, cols]``, True = kept) of the dense ``W``; returns
    the refined mask (a new tensor; same number of kept weights in every row, and with an N:M
    ``sparsity`` in every group).

    ``mean``/``var``: ``[cols]`` statistics of the layer's input over the calibration tokens;
    ``importance``: ``[rows, cols]``, the criterion's score (the least important kept weight is
    dropped first).  See the module docstring for the algorithm.
    """
    V.tensor("W", W, ndim=2, dtypes=V.FLOAT_DTYPES)
    rows, cols = W.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (rows, cols):
        raise ValueError(f"mask: expected a bool tensor of shape {(rows, cols)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != cols:
            raise ValueError(f"{name}: expected a 1-D tensor of {cols} entries (one per column of W), got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (rows, cols):
        raise ValueError(f"importance: expected shape {(rows, cols)}, got {tuple(getattr(importance, 'shape', ()))}")
    nm = sparsity is not None and sparsity.is_nm
    dev = W.device
    mask = mask.clone().to(dev)
    D = W.detach().double() * mean.to(dev, torch.float64)                   # each weight's share of the mean output
    Rg = D / var.to(dev, torch.float64).clamp_min(1e-12).pow(var_power)     # grow score
    imp = importance.to(dev, torch.float64)
    e = torch.where(mask, 0.0, D).sum(1)                                    # expected error per row
    sign0 = torch.sign(e)
    r = torch.arange(rows, device=dev)
    pruned = ~mask
    grow_pos, n_gp = _ordered(Rg, pruned & (D > 0), descending=True)
    grow_neg, n_gn = _ordered(Rg, pruned & (D < 0), descending=False)
    ptr = torch.zeros(rows, 2, dtype=torch.long, device=dev)                # into grow_pos, grow_neg
    if nm:
        imp_kept = torch.where(mask, imp, torch.inf)                        # pruned: never dropped
        m = sparsity.m
    else:
        drop_neg, n_dn = _ordered(imp, mask & (D < 0), descending=False)
        drop_pos, n_dp = _ordered(imp, mask & (D > 0), descending=False)
        dptr = torch.zeros(rows, 2, dtype=torch.long, device=dev)           # into drop_neg, drop_pos
    active = torch.abs(e) > threshold
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        up = e > 0
        side = (~up).long()                                                 # 0: grow positive, 1: negative
        gp = ptr[r, side]
        have = gp < torch.where(up, n_gp, n_gn)
        g = torch.where(up, grow_pos[r, gp.clamp_max(cols - 1)], grow_neg[r, gp.clamp_max(cols - 1)])
        if nm:
            start = g - g % m
            grp = start.unsqueeze(1) + torch.arange(m, device=dev)
            p = start + imp_kept.gather(1, grp).argmin(1)
            have &= torch.isfinite(imp_kept[r, p])
        else:
            dp = dptr[r, side]
            have &= dp < torch.where(up, n_dn, n_dp)
            p = torch.where(up, drop_neg[r, dp.clamp_max(cols - 1)], drop_pos[r, dp.clamp_max(cols - 1)])
        e_after = e - D[r, g] + D[r, p]
        upd = active & have & (torch.abs(e) > threshold) & (torch.sign(e_after) == sign0)
        if nm:  # the dropped weight is only the group's least important: its term may point either way
            upd &= torch.abs(e_after) < torch.abs(e)
        rows_u = r[upd]
        mask[rows_u, g[upd]] = True
        mask[rows_u, p[upd]] = False
        if nm:
            imp_kept[rows_u, p[upd]] = torch.inf                            # dropped now
            imp_kept[rows_u, g[upd]] = torch.inf                            # grown: kept for good
        else:
            dptr[r, side] += 1
        ptr[r, side] += 1
        e = torch.where(upd, e_after, e)
        active = upd
    return mask
