"""One-shot criteria without weight updates: magnitude, Wanda (Sun et al., 2023) and RIA
(Zhang et al., 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for LLMs").

Both return ``(W_pruned, mask)``: ``W_pruned`` in ``W``'s dtype with zeros where ``mask``
(bool, True = kept) is False.  Sparsity specs: :mod:`sparse_kernels.pruning.patterns`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..ops import _validate as V
from .layers import hook_input, layer_input_rows
from .patterns import keep_largest, keep_largest_nm, parse_sparsity

__all__ = ["wanda_prune", "ria_prune", "wanda_scores", "ria_scores", "magnitude_prune", "magnitude_prune_global", "ActivationNormAccumulator"]

_SCOPES = ("layer", "row", "global")


def _apply(W, keep):
    return W * keep.to(W.dtype), keep


def _check_weight_and_norms(W, act_norm_sq) -> int:
    """Wanda's and RIA's inputs: ``W [rows, cols]`` and one ``act_norm_sq`` entry per column,
    finite and >= 0, on W's device; returns ``cols``."""
    V.tensor("W", W, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("act_norm_sq", act_norm_sq, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    cols = W.shape[1]
    if act_norm_sq.shape[0] != cols:
        raise ValueError(f"act_norm_sq: has {act_norm_sq.shape[0]} entries, expected one per column of W ({cols})")
    V.same_device(W=W, act_norm_sq=act_norm_sq)
    if torch.isnan(act_norm_sq).any() or (act_norm_sq < 0).any():
        raise ValueError("act_norm_sq: must be >= 0 and not NaN (it is a sum of squares)")
    return cols


def _keep_per_row(score, spec, scope: str = "row"):
    """Keep mask: the largest scores of every row (unstructured, ``scope="row"``), of the whole
    layer (``scope="layer"``) or of every N:M group (any scope)."""
    if scope not in ("row", "layer"):
        raise ValueError(f"scope: got {scope!r}, expected 'row' (one threshold per output row, the paper's "
                         f"comparison group) or 'layer' (one threshold for the layer)")
    if spec.is_nm:
        return keep_largest_nm(score, spec.n, spec.m)
    if scope == "layer":
        return keep_largest(score, spec.n_pruned(score.numel()))
    return keep_largest(score, spec.n_pruned(score.shape[1]), dim=-1)


def check_alpha(alpha) -> None:
    """RIA's ``alpha``: a finite number >= 0 (ValueError otherwise)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or alpha == float("inf"):
        raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")


def wanda_prune(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity=0.5, scope: str = "row"):
    """Wanda: score ``|W_ij| * ||X_j||_2``, pruned per output row (or per N:M group).

    Args:
        W: ``[rows, cols]`` float16/bfloat16/float32.
        act_norm_sq: ``[cols]``, ``sum over calibration tokens of x_j^2`` per input column
            (:class:`ActivationNormAccumulator`); any positive scale gives the same mask.
        sparsity: float in (0, 1) (``round(cols * s)`` zeroed in every row) or ``"N:M"``.
        scope: the comparison group of an unstructured sparsity: ``"row"`` (the paper's, per
            output row) or ``"layer"`` (``round(rows * cols * s)`` lowest scores of the layer).
    Raises TypeError/ValueError for bad dtypes/shapes/specs/scopes, negative or NaN norms.
    """
    cols = _check_weight_and_norms(W, act_norm_sq)
    spec = parse_sparsity(sparsity)
    spec.check_columns("W", cols)
    return _apply(W, _keep_per_row(wanda_scores(W, act_norm_sq), spec, scope))


def ria_prune(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity=0.5, alpha: float = 0.5, scope: str = "row"):
    """RIA: relative importance times activations, pruned per output row (or per N:M group).

    ``score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** alpha``: a
    weight counts by its share of its row *and* of its column (so no input channel is wiped out
    just because its weights are small everywhere), scaled by the input's norm as in Wanda but
    softened by ``alpha`` (0.5 in the paper; 0 drops the activations).  A row or column whose
    weights are all zero contributes 0 for that term.

    Args: as :func:`wanda_prune` (``scope`` included), plus ``alpha`` (a finite number >= 0).
    Raises TypeError/ValueError for bad dtypes/shapes/specs, negative or NaN norms, a bad alpha.
    """
    cols = _check_weight_and_norms(W, act_norm_sq)
    check_alpha(alpha)
    spec = parse_sparsity(sparsity)
    spec.check_columns("W", cols)
    return _apply(W, _keep_per_row(ria_scores(W, act_norm_sq, alpha), spec, scope))


def wanda_scores(W: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| * ||X_j||_2`` (float32 ``[rows, cols]``); inputs unchecked."""
    return W.detach().float().abs() * act_norm_sq.float().sqrt().view(1, -1)


def ria_scores(W: torch.Tensor, act_norm_sq: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA's score (float32 ``[rows, cols]``, see :func:`ria_prune`); inputs unchecked."""
    a = W.detach().float().abs()
    row_sum = a.sum(dim=1, keepdim=True)
    col_sum = a.sum(dim=0, keepdim=True)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    rel = torch.where(row_sum > 0, a / row_sum, zero) + torch.where(col_sum > 0, a / col_sum, zero)
    return rel * act_norm_sq.float().sqrt().pow(float(alpha)).view(1, -1)


def magnitude_prune(W, sparsity=0.5, scope: str = "layer"):
    """Magnitude pruning: zero the smallest ``|W|``.

    ``scope``: ``"layer"`` (one threshold for the tensor), ``"row"`` (per output row) or
    ``"global"`` (one threshold over several tensors: pass a list/tuple of tensors as ``W``,
    get a list of ``(W_pruned, mask)`` back; see :func:`magnitude_prune_global`).  With an
    ``"N:M"`` sparsity the selection is per group and ``scope`` does not matter.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope: got {scope!r}, expected one of {', '.join(_SCOPES)}")
    if isinstance(W, (list, tuple)):
        if scope != "global":
            return [magnitude_prune(w, sparsity, scope) for w in W]
        return magnitude_prune_global(W, sparsity)
    V.tensor("W", W, ndim=2, dtypes=V.FLOAT_DTYPES)
    spec = parse_sparsity(sparsity)
    spec.check_columns("W", W.shape[1])
    score = W.detach().float().abs()
    if spec.is_nm:
        keep = keep_largest_nm(score, spec.n, spec.m)
    elif scope == "row":
        keep = keep_largest(score, spec.n_pruned(W.shape[1]), dim=-1)
    else:
        keep = keep_largest(score, spec.n_pruned(W.numel()))
    return _apply(W, keep)


def magnitude_prune_global(weights: Sequence[torch.Tensor], sparsity=0.5):
    """Global magnitude pruning: ``round(total * s)`` smallest ``|w|`` over all ``weights``.

    Returns a list of ``(W_pruned, mask)`` in the order given.  Memory: one float32 copy of
    all the weights (they are ranked together).  Ties: the earlier tensor, then the lower
    index, is kept.  N:M specs are per group and reduce to per-tensor N:M.
    """
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights: expected a non-empty list or tuple of 2-D weight tensors")
    for i, w in enumerate(weights):
        V.tensor(f"weights[{i}]", w, ndim=2, dtypes=V.FLOAT_DTYPES)
    spec = parse_sparsity(sparsity)
    if spec.is_nm:
        return [magnitude_prune(w, spec) for w in weights]
    dev = weights[0].device
    flat = torch.cat([w.detach().float().abs().reshape(-1).to(dev) for w in weights])
    keep = keep_largest(flat, spec.n_pruned(flat.numel()))
    out, start = [], 0
    for w in weights:
        k = keep[start:start + w.numel()].view(w.shape).to(w.device)
        start += w.numel()
        out.append(_apply(w, k))
    return out


class ActivationNormAccumulator:
    """``norm_sq[j] = sum over tokens of x_j^2`` (float64) for Wanda; inputs of any leading shape."""

    def __init__(self, columns: int, device=None):
        self.columns = columns
        self.norm_sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Accumulate ``x [..., columns]``; returns it as float64 ``[tokens, columns]`` (for subclasses)."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"x: last dim {x.shape[-1]} != the accumulator's columns {self.columns}")
        x = x.detach().reshape(-1, self.columns).to(self.norm_sq.device, torch.float64)
        self.nsamples += x.shape[0]
        self.norm_sq += (x * x).sum(0)
        return x

    def permuted(self, perm: torch.Tensor) -> "ActivationNormAccumulator":
        """A copy whose columns are in ``perm`` order (``norm_sq[perm]``)."""
        out = ActivationNormAccumulator(self.columns, device=self.norm_sq.device)
        out.norm_sq, out.nsamples = self.norm_sq[perm.to(self.norm_sq.device)], self.nsamples
        return out

    def hook(self, module, args, kwargs, output) -> None:  # registered with_kwargs=True; returns None
        self.add(layer_input_rows(module, hook_input(module, args, kwargs)))

    def attach(self, module: torch.nn.Module):
        return module.register_forward_hook(self.hook, with_kwargs=True)

