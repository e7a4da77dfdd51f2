"""Structured pruning, driver: :func:`structured_prune` (checks the request, scores every unit,
plans, then shrinks the model and its config) and :class:`StructuredReport`.

Units, criteria and the equivalence with masking are described in :mod:`sparse_kernels.structured`.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Iterable

from torch import nn

from ..training.schedule import bottom_k_mask
from .arch import _Arch, _drop_layers, _prune_ffn, _prune_heads
from .channels import _check_int
from .scores import _activation_stats, _calib_batches, _ffn_scores, _head_scores, _layer_scores, _taylor_grads

CRITERIA = ("magnitude", "activation", "taylor")


# ----------------------------------------------------------------------------- argument checks
def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a float, got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: must be in [0, 1) (the fraction of FFN channels to remove), got {sparsity}")
    return float(sparsity)


def _groups_to_remove(heads, h: int, kv: int) -> int:
    """Number of KV groups (each with h/kv query heads) to remove per layer."""
    g = h // kv
    if isinstance(heads, bool) or not isinstance(heads, (int, float)):
        raise TypeError(f"heads: expected a fraction (float) or a count of query heads (int), got {type(heads).__name__}")
    if isinstance(heads, float):
        if not 0.0 <= heads < 1.0:
            raise ValueError(f"heads: a fraction must be in [0, 1), got {heads}")
        n = heads * h
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"heads: {heads} x num_attention_heads={h} = {n:g} is not a whole number of heads")
        n = int(round(n))
    else:
        n = heads
        if n < 0:
            raise ValueError(f"heads: must be >= 0, got {n}")
    if n % g:
        raise ValueError(
            f"heads: removing {n} query heads per layer does not divide into whole KV groups of {g} query heads "
            f"(num_attention_heads={h}, num_key_value_heads={kv}); use a multiple of {g} to keep GQA consistent")
    if n >= h:
        raise ValueError(f"heads: removing {n} of {h} query heads per layer would leave none")
    return n // g


def _layers_to_remove(layers, n_layers: int) -> list[int] | int:
    if isinstance(layers, bool):
        raise TypeError("layers: expected an int count or a list of layer indices, got bool")
    if isinstance(layers, int):
        if not 0 <= layers < n_layers:
            raise ValueError(f"layers: can remove 0..{n_layers - 1} of the {n_layers} decoder layers, got {layers}")
        return layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected an int count or a list of layer indices, got {type(layers).__name__}")
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"layers: expected int layer indices, got {bad[0]!r}")
    idx = sorted(set(int(i) for i in layers))
    if any(i < 0 or i >= n_layers for i in idx) or len(idx) >= n_layers:
        raise ValueError(f"layers: indices {idx} must be distinct, in [0, {n_layers}) and leave at least one layer")
    return idx


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def structured_prune(model: nn.Module, sparsity: float = 0.0, calibration=None, *, criterion: str = "magnitude",
                     heads: float | int = 0.0, layers: int | Iterable[int] = 0, round_to: int = 1,
                     batch_size: int = 4) -> tuple[nn.Module, "StructuredReport"]:
    """Remove units of a Hugging Face causal LM and return ``(model, report)`` (same object, shrunk).

    Args:
        sparsity: fraction of each FFN's intermediate channels to remove, in [0, 1); the count is
            ``round(sparsity * I)``, adjusted so the kept count is a multiple of ``round_to``.
        calibration: LongTensor ``[n, seqlen]`` (split into ``batch_size`` rows) or an iterable of
            batches (token ids ``[batch, seqlen]`` or dicts of keyword arguments with ``input_ids``),
            every id in ``[0, config.vocab_size)``; required by ``criterion="activation"`` and
            ``"taylor"``.
        criterion: ``"magnitude" | "activation" | "taylor"`` (see :mod:`sparse_kernels.structured`).
        heads: per layer, a fraction of the query heads (float) or a count of query heads (int)
            to remove; it must be whole KV groups (a multiple of num_attention_heads/num_key_value_heads).
        layers: how many whole decoder layers to remove (int, the least important) or which (list).

    Returns ``(model, report)``, a :class:`StructuredReport`: ``removed`` (original layer index ->
    ``{"ffn": [channels], "kv_groups": [...], "q_heads": [...]}``, and ``"layers": [...]``), parameter
    counts before/after, the new config values and the seconds taken.

    Raises ValueError for out-of-range sparsity/heads/layers/batch_size, heads that do not divide
    into whole KV groups, an unknown criterion, or a missing, empty or out-of-vocabulary
    calibration; TypeError for unsupported models and arguments of the wrong type.
    """
    t0 = time.perf_counter()
    s = _check_sparsity(sparsity)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: expected an int >= 1, got {round_to!r}")
    arch = _Arch(model)
    h, kv, d = arch.heads()
    n_groups = _groups_to_remove(heads, h, kv)
    drop_spec = _layers_to_remove(layers, len(arch.layers))
    _check_int("batch_size", batch_size, 1)
    batches = _calib_batches(calibration, batch_size, getattr(arch.config, "vocab_size", None))
    if criterion != "magnitude" and not batches:
        raise ValueError(f"calibration: criterion={criterion!r} needs calibration token batches")
    device = next(model.parameters()).device
    params_before = _n_params(model)
    was_training = model.training
    model.eval()

    act_ffn = act_att = bi = grads = None
    if criterion == "activation":
        act_ffn, act_att, bi = _activation_stats(arch, batches, device)
    elif criterion == "taylor":
        grads = _taylor_grads(arch, batches, device)

    removed: dict = {"layers": []}
    if isinstance(drop_spec, list):
        drop = drop_spec
    elif drop_spec:
        keep = bottom_k_mask(_layer_scores(arch, criterion, bi, grads), drop_spec)
        drop = (~keep).nonzero().flatten().tolist()
    else:
        drop = []
    removed["layers"] = drop

    # plan everything first, so a bad request leaves the model untouched
    plan, new_inter = {}, None
    for i, layer in enumerate(arch.layers):
        if i in drop:
            continue
        info, ffn_keep, grp_keep = {}, None, None
        if s > 0:
            inter = arch.intermediate(layer)
            n_keep = inter - int(round(s * inter))
            if round_to > 1:
                n_keep = int(math.floor(n_keep / round_to + 0.5)) * round_to
            if n_keep <= 0 or n_keep > inter:
                raise ValueError(f"sparsity: {s} of {inter} channels (round_to={round_to}) leaves {n_keep} channels")
            keep = bottom_k_mask(_ffn_scores(arch, i, layer, criterion, act_ffn, grads), inter - n_keep)
            info["ffn"] = (~keep).nonzero().flatten().tolist()
            ffn_keep, new_inter = keep.nonzero().flatten(), n_keep
        if n_groups:
            keep = bottom_k_mask(_head_scores(arch, i, layer, criterion, act_att, grads, h, kv, d), n_groups)
            gone = (~keep).nonzero().flatten().tolist()
            g = h // kv
            info["kv_groups"] = gone
            info["q_heads"] = [k * g + j for k in gone for j in range(g)]
            grp_keep = keep.nonzero().flatten().tolist()
        removed[i] = info
        plan[i] = (ffn_keep, grp_keep)
    for i, (ffn_keep, grp_keep) in plan.items():
        layer = arch.layers[i]
        if ffn_keep is not None:
            _prune_ffn(arch, layer, ffn_keep)
        if grp_keep is not None:
            _prune_heads(arch, layer, grp_keep, h, kv, d)
    if drop:
        _drop_layers(arch, drop)

    c = arch.config
    if new_inter is not None:
        if arch.kind == "gpt2":
            c.n_inner = new_inter
        else:
            c.intermediate_size = new_inter
    if n_groups:
        g = h // kv
        if arch.kind == "gpt2":
            c.n_head = h - n_groups
        else:
            c.head_dim = d
            c.num_attention_heads = h - n_groups * g
            c.num_key_value_heads = kv - n_groups
    model.train(was_training)
    cfg = {k: getattr(c, k) for k in ("num_hidden_layers", "intermediate_size", "n_inner", "num_attention_heads",
                                      "num_key_value_heads", "head_dim") if getattr(c, k, None) is not None}
    report = StructuredReport(criterion=criterion, sparsity=s, heads=heads, removed=removed,
                              params_before=params_before, params_after=_n_params(model), config=cfg,
                              seconds=time.perf_counter() - t0)
    return model, report


@dataclass
class StructuredReport:
    """What :func:`structured_prune` removed. ``removed`` maps an *original* layer index to
    ``{"ffn": [channels], "kv_groups": [...], "q_heads": [...]}`` and ``"layers"`` to the removed
    layer indices; ``config`` holds the new config values."""

    criterion: str
    sparsity: float
    heads: float | int
    removed: dict
    params_before: int
    params_after: int
    config: dict
    seconds: float
    method: str = "structured"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed"] = {str(k): v for k, v in self.removed.items()}
        return d

    def __str__(self) -> str:
        layer_keys = [k for k in self.removed if k != "layers"]
        n_ffn = sum(len(self.removed[k].get("ffn", [])) for k in layer_keys)
        n_q = sum(len(self.removed[k].get("q_heads", [])) for k in layer_keys)
        ratio = self.params_after / self.params_before
        return (f"prune: method=structured criterion={self.criterion} ffn sparsity={self.sparsity} "
                f"heads={self.heads}: removed {n_ffn} FFN channels, {n_q} query heads, "
                f"layers {self.removed['layers']}; params {self.params_before} -> {self.params_after} "
                f"({ratio:.3f}x); config {self.config}; {self.seconds:.2f}s")
