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
  the row stops.  N:M: a grown weight whose group has no untouched kept weight left (possible
  when M - N > N, e.g. 1:4) is passed over and the row goes on with the next one.

Defaults: the paper's ``max_cycles=50``, ``var_power=1`` and ``update_threshold=0.1``, the last
converted to our units: the paper's statistic sums ``x`` over each 2048-token calibration
sequence, so its error is 2048 times ours (a mean over tokens), and 0.1 there is ``0.1 / 2048``
here.  Unlike the paper's scripts (``--skip_layer mlp``), every layer is refined by default: on
SmolLM2 that measured better (docs/PRUNING.md); ``skip`` restores theirs.

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

# threshold: the paper's update_threshold 0.1 is in its own units, where the calibration statistic
# sums x over each 2048-token sequence (so its error is 2048 x ours, a mean over tokens): 0.1 / 2048
DSNOT_DEFAULTS = {"max_cycles": 50, "threshold": 0.1 / 2048, "var_power": 1.0}


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


_CHUNK_ELEMS = 1 << 21  # rows are ranked in chunks of about this many weights (bounded memory)


def _first_k(values: torch.Tensor, valid: torch.Tensor, descending: bool, k: int):
    """Per row, the first ``k`` column indices where ``valid``, ordered by ``values`` (stable: ties
    by column), and how many are valid."""
    big = torch.finfo(values.dtype).max
    key = torch.where(valid, -values if descending else values, torch.full_like(values, big))
    return torch.sort(key, dim=1, stable=True).indices[:, :k].contiguous(), valid.sum(1)


def _check_refine_args(W, mask, mean, var, importance, sparsity, max_cycles, threshold, var_power):
    from .patterns import parse_sparsity

    V.tensor("W", W, ndim=2, dtypes=V.FLOAT_DTYPES)
    rows, cols = W.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (rows, cols):
        raise ValueError(f"mask: expected a bool tensor of shape {(rows, cols)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != cols:
            raise ValueError(f"{name}: expected a 1-D tensor of {cols} entries (one per column of W), got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: has NaN or inf entries; the input statistics must be finite")
    if bool((var < 0).any()):
        raise ValueError("var: has negative entries (it is a variance)")
    if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (rows, cols):
        raise ValueError(f"importance: expected shape {(rows, cols)}, got {tuple(getattr(importance, 'shape', ()))}")
    if bool(torch.isnan(importance).any()):
        raise ValueError("importance: has NaN entries")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W: has NaN or inf entries")
    spec = None if sparsity is None else (sparsity if isinstance(sparsity, Sparsity) else parse_sparsity(sparsity))
    if spec is not None and spec.is_nm and cols % spec.m:
        raise ValueError(f"sparsity: '{spec}' needs a multiple of {spec.m} columns, W has {cols}")
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 0:
        raise ValueError(f"max_cycles: expected an int >= 0, got {max_cycles!r}")
    for name, v in (("threshold", threshold), ("var_power", var_power)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return spec


@torch.no_grad()
def dsnot_refine(W: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 importance: torch.Tensor, sparsity=None, *, max_cycles: int = DSNOT_DEFAULTS["max_cycles"],
                 threshold: float = DSNOT_DEFAULTS["threshold"],
                 var_power: float = DSNOT_DEFAULTS["var_power"]) -> torch.Tensor:
    """DSnoT's swaps on ``mask`` (bool ``[rows, cols]``, True = kept) of the dense ``W``; returns
    the refined mask (a new tensor; same number of kept weights in every row, and with an N:M
    ``sparsity`` (a :class:`Sparsity` or a string such as ``"2:4"``) in every group).

    ``mean``/``var``: ``[cols]`` statistics of the layer's input over the calibration tokens;
    ``importance``: ``[rows, cols]``, the criterion's score (the least important kept weight is
    dropped first).  See the module docstring for the algorithm.  Memory: the mask, a bool
    ``[rows, cols]`` and ``4 x [rows, max_cycles]`` indices, plus temporaries for about 2M
    weights at a time.  Raises ValueError/TypeError naming the argument for bad inputs.
    """
    spec = _check_refine_args(W, mask, mean, var, importance, sparsity, max_cycles, threshold, var_power)
    nm = spec is not None and spec.is_nm
    rows, cols = W.shape
    dev = W.device
    mask = mask.clone().to(dev)
    mean64 = mean.to(dev, torch.float64)
    scale = var.to(dev, torch.float64).clamp_min(1e-12).pow(var_power)
    imp = importance.to(dev)
    k = max(min(max_cycles, cols), 1)
    e = torch.empty(rows, dtype=torch.float64, device=dev)                 # expected error per row
    lists = {n: torch.zeros(rows, k, dtype=torch.long, device=dev) for n in ("gp", "gn", "dn", "dp")}
    counts = {n: torch.zeros(rows, dtype=torch.long, device=dev) for n in lists}
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for a in range(0, rows, step):                                          # rank a chunk of rows at a time
        b = min(rows, a + step)
        D = W[a:b].double() * mean64                                        # each weight's share of the mean output
        kept = mask[a:b]
        e[a:b] = torch.where(kept, 0.0, D).sum(1)
        grow = D / scale
        lists["gp"][a:b], counts["gp"][a:b] = _first_k(grow, ~kept & (D > 0), True, k)
        lists["gn"][a:b], counts["gn"][a:b] = _first_k(grow, ~kept & (D < 0), False, k)
        if not nm:
            lists["dn"][a:b], counts["dn"][a:b] = _first_k(imp[a:b], kept & (D < 0), False, k)
            lists["dp"][a:b], counts["dp"][a:b] = _first_k(imp[a:b], kept & (D > 0), False, k)
        del D, grow
    sign0 = torch.sign(e)
    r = torch.arange(rows, device=dev)
    ptr = torch.zeros(rows, 2, dtype=torch.long, device=dev)                # grow pointers: positive, negative
    dptr = torch.zeros(rows, 2, dtype=torch.long, device=dev)               # drop pointers: negative, positive
    locked = ~mask if nm else None                                          # N:M: never dropped
    arange_m = torch.arange(spec.m, device=dev) if nm else None
    active = torch.abs(e) > threshold
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        up = e > 0
        side = (~up).long()                                                 # 0: grow positive (e > 0), 1: negative
        gp = ptr[r, side]
        has_g = gp < torch.where(up, counts["gp"], counts["gn"]).clamp_max(k)
        gi = gp.clamp_max(k - 1)
        g = torch.where(up, lists["gp"][r, gi], lists["gn"][r, gi])
        if nm:
            start = g - g % spec.m
            grp = start.unsqueeze(1) + arange_m
            ok = mask.gather(1, grp) & ~locked.gather(1, grp)
            has_p = ok.any(1)
            p = start + torch.where(ok, imp.gather(1, grp), torch.inf).argmin(1)
        else:
            dp = dptr[r, side]
            has_p = dp < torch.where(up, counts["dn"], counts["dp"]).clamp_max(k)
            di = dp.clamp_max(k - 1)
            p = torch.where(up, lists["dn"][r, di], lists["dp"][r, di])
            dptr[r, side] += 1
        ptr[r, side] += 1
        e_after = e - W[r, g].double() * mean64[g] + W[r, p].double() * mean64[p]
        good = (torch.abs(e) > threshold) & (torch.sign(e_after) == sign0)
        if nm:  # the dropped weight is only the group's least important: its term may point either way
            good &= torch.abs(e_after) < torch.abs(e)
        upd = active & has_g & has_p & good
        rows_u = r[upd]
        mask[rows_u, g[upd]] = True
        mask[rows_u, p[upd]] = False
        if nm:
            locked[rows_u, g[upd]] = True
            locked[rows_u, p[upd]] = True
        e = torch.where(upd, e_after, e)
        # N:M: a grown weight whose group has nothing left to drop is passed over (the row goes on)
        active = upd | (active & has_g & ~has_p) if nm else upd
    return mask
