"""Structured pruning: remove whole units and return a smaller *dense* model with a matching config.

Units, per decoder layer of a Hugging Face causal LM:

* **FFN channels**: intermediate channel j of Llama-style MLPs (``gate_proj``/``up_proj`` row j,
  ``down_proj`` column j; Llama, Mistral, Qwen2/3, Gemma) or GPT-2's ``mlp.c_fc``/``mlp.c_proj``
  (``Conv1D``, weight ``[in, out]``). ``config.intermediate_size`` (GPT-2: ``n_inner``) shrinks.
* **Attention heads**, by whole key/value groups so grouped-query attention stays consistent:
  removing KV head k removes its ``g = num_attention_heads / num_key_value_heads`` query heads
  ``k*g .. k*g+g-1`` (``q_proj`` rows, ``k_proj``/``v_proj`` rows, ``o_proj`` columns).
  ``num_attention_heads``/``num_key_value_heads`` shrink and ``head_dim`` is written into the
  config. GPT-2 (``c_attn`` = [q | k | v] columns) has g = 1; its config cannot express a
  ``head_dim`` other than ``n_embd / n_head``, so a head-pruned GPT-2 works in memory but
  ``from_pretrained`` cannot rebuild it from the saved config.
* **Decoder layers**: removed from the layer list; ``num_hidden_layers`` (``n_layer``),
  ``layer_types`` and every attention's ``layer_idx`` (KV-cache slot) are renumbered.

The same count of channels/heads is removed in every layer, so the config stays uniform.

Importance (lowest goes first; ties go to the lower index), ``criterion=``:

* ``"magnitude"``: sum of squared weights tied to the unit (channel: gate/up row + down column;
  head group: its q/k/v rows + o columns; layer: mean squared weight of all its parameters);
* ``"activation"``: on calibration data, the squared L2 norm over tokens of the unit's output
  before the output projection (channel: input of ``down_proj``; head: its slice of the input
  of ``o_proj``); layers by block influence (ShortGPT): ``1 - mean cos(h_in, h_out)``;
* ``"taylor"``: first-order Taylor, ``|sum over the unit's weights of w * dL/dw|`` with L the
  causal-LM loss summed over calibration batches.

The pruned model computes exactly what the original computes with the same units masked out
(``down_proj`` columns, ``o_proj`` head columns zeroed, removed layers skipped), up to float
summation order. Structured pruning needs dense ``nn.Linear``/``Conv1D`` layers: run it before
any 2:4 conversion.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from .training.schedule import bottom_k_mask

CRITERIA = ("magnitude", "activation", "taylor")


# ----------------------------------------------------------------------------- model families
class _Arch:
    """Where the units of one model family live."""

    def __init__(self, model):
        self.model = model
        self.config = getattr(model, "config", None)
        if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            self.kind, self.parent, self.attr = "gpt2", model.transformer, "h"
        else:
            base = getattr(model, "model", model)
            if not hasattr(base, "layers"):
                raise TypeError(
                    f"model: {type(model).__name__} is not supported; structured pruning knows Llama-style "
                    "models (model.model.layers[i].mlp.gate_proj/up_proj/down_proj, self_attn.q/k/v/o_proj) "
                    "and GPT-2 (transformer.h[i].mlp.c_fc/c_proj, attn.c_attn/c_proj)")
            self.kind, self.parent, self.attr = "llama", base, "layers"
        layer0 = self.layers[0]
        need = ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj") if self.kind == "gpt2" else (
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj")
        mods = dict(layer0.named_modules())
        missing = [n for n in need if n not in mods]
        if missing or self.config is None:
            raise TypeError(f"model: {type(model).__name__} lacks {missing or 'a config'}; see structured_prune's docs")
        for n in need:
            w = getattr(mods[n], "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 2:
                raise TypeError(f"model: {n} is a {type(mods[n]).__name__} without a dense 2-D weight; "
                                "structured pruning needs dense layers (run it before 2:4 conversion)")

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    # -- counts
    def heads(self) -> tuple[int, int, int]:
        c = self.config
        if self.kind == "gpt2":
            a = self.layers[0].attn
            return a.num_heads, a.num_heads, a.head_dim
        h = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or h
        d = getattr(c, "head_dim", None) or c.hidden_size // h
        return h, kv, d

    def ffn_modules(self, layer):
        if self.kind == "gpt2":
            return [(layer.mlp.c_fc, "conv_out")], (layer.mlp.c_proj, "conv_in")
        m = layer.mlp
        return [(m.gate_proj, "out"), (m.up_proj, "out")], (m.down_proj, "in")

    def intermediate(self, layer) -> int:
        return layer.mlp.c_fc.nf if self.kind == "gpt2" else layer.mlp.gate_proj.out_features

    def attn_out(self, layer):
        return layer.attn.c_proj if self.kind == "gpt2" else layer.self_attn.o_proj


# ----------------------------------------------------------------------------- slicing in place
def _keep_rows(mod: nn.Module, idx: torch.Tensor, kind: str) -> None:
    """Keep output units ``idx`` (kind 'out' for Linear, 'conv_out' for Conv1D) or input units
    (kind 'in' / 'conv_in'). The module is edited in place; bias follows the output units."""
    w = mod.weight.data
    idx = idx.to(w.device)
    if kind == "out":
        mod.weight = nn.Parameter(w.index_select(0, idx).clone(), requires_grad=mod.weight.requires_grad)
        if mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias.data.index_select(0, idx).clone(), requires_grad=mod.bias.requires_grad)
        mod.out_features = len(idx)
    elif kind == "in":
        mod.weight = nn.Parameter(w.index_select(1, idx).clone(), requires_grad=mod.weight.requires_grad)
        mod.in_features = len(idx)
    elif kind == "conv_out":
        mod.weight = nn.Parameter(w.index_select(1, idx).clone(), requires_grad=mod.weight.requires_grad)
        mod.bias = nn.Parameter(mod.bias.data.index_select(0, idx).clone(), requires_grad=mod.bias.requires_grad)
        mod.nf = len(idx)
    elif kind == "conv_in":
        mod.weight = nn.Parameter(w.index_select(0, idx).clone(), requires_grad=mod.weight.requires_grad)
        if hasattr(mod, "nx"):
            mod.nx = len(idx)
    else:  # pragma: no cover
        raise AssertionError(kind)


def _sq(t: torch.Tensor, dim) -> torch.Tensor:
    return t.detach().float().pow(2).sum(dim)


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
    idx = sorted(set(int(i) for i in layers))
    if any(i < 0 or i >= n_layers for i in idx) or len(idx) >= n_layers:
        raise ValueError(f"layers: indices {idx} must be distinct, in [0, {n_layers}) and leave at least one layer")
    return idx


# ----------------------------------------------------------------------------- calibration
def _calib_batches(calibration, batch_size: int) -> list:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError(f"calibration: expected a LongTensor [n, seqlen], got {calibration.dtype} "
                             f"with shape {tuple(calibration.shape)}")
        return list(calibration.split(batch_size))
    out = list(calibration)
    if not out:
        raise ValueError("calibration: empty")
    return out


def _run(model, batch, device, labels: bool):
    b = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else {"input_ids": batch.to(device)}
    if labels:
        b.setdefault("labels", b["input_ids"])
    return model(**b, use_cache=False)


def _activation_stats(arch: _Arch, batches, device):
    """Per layer: squared norms of FFN hidden channels and of attention-output columns, and block influence."""
    n = len(arch.layers)
    ffn = [None] * n
    att = [None] * n
    bi_sum = [0.0] * n
    tok = [0] * n
    handles = []

    def add(store, i, x):
        s = _sq(x.reshape(-1, x.shape[-1]), 0)
        store[i] = s if store[i] is None else store[i] + s

    for i, layer in enumerate(arch.layers):
        down = arch.ffn_modules(layer)[1][0]
        handles.append(down.register_forward_pre_hook(lambda m, a, i=i: add(ffn, i, a[0])))
        handles.append(arch.attn_out(layer).register_forward_pre_hook(lambda m, a, i=i: add(att, i, a[0])))

        def pre(m, args, kwargs, i=i):
            m._sk_in = args[0] if args else kwargs["hidden_states"]

        def post(m, args, kwargs, out, i=i):
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            h_in = m._sk_in
            del m._sk_in
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            bi_sum[i] += float((1 - cos).sum())
            tok[i] += cos.numel()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                _run(arch.model, b, device, labels=False)
    finally:
        for h in handles:
            h.remove()
    return ffn, att, [bi_sum[i] / max(1, tok[i]) for i in range(n)]


def _taylor_grads(arch: _Arch, batches, device):
    model = arch.model
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            for b in batches:
                out = _run(model, b, device, labels=True)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise TypeError("model: returned no .loss for labels=input_ids; taylor needs a causal LM")
                loss.backward()
        return {p: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in model.parameters()}
    finally:
        for p, rg in saved.items():
            p.grad = None
            p.requires_grad_(rg)


def _wg(mod, grads, idx_dim: int | None):
    """(w * dL/dw) of ``mod.weight`` summed over every dim except ``idx_dim`` (None: everything)."""
    wg = (mod.weight.detach().float() * grads[mod.weight].float())
    return wg.sum() if idx_dim is None else wg.sum(1 - idx_dim)


# ----------------------------------------------------------------------------- scores
def _ffn_scores(arch, i, layer, criterion, act, grads) -> torch.Tensor:
    ins, (out_mod, out_kind) = arch.ffn_modules(layer)
    dim_of = {"out": 0, "in": 1, "conv_out": 1, "conv_in": 0}
    if criterion == "activation":
        return act[i]
    if criterion == "magnitude":
        s = _sq(out_mod.weight, 1 - dim_of[out_kind])
        for m, k in ins:
            s = s + _sq(m.weight, 1 - dim_of[k])
        return s
    t = _wg(out_mod, grads, dim_of[out_kind])
    for m, k in ins:
        t = t + _wg(m, grads, dim_of[k])
        if m.bias is not None:
            t = t + (m.bias.detach().float() * grads[m.bias].float())
    return t.abs()


def _head_rows(arch, q_heads, kv_heads, d):
    """Column/row indices (in q space and kv space) of the given heads."""
    ar = torch.arange(d)
    q = torch.cat([h * d + ar for h in q_heads]) if q_heads else torch.zeros(0, dtype=torch.long)
    k = torch.cat([h * d + ar for h in kv_heads]) if kv_heads else torch.zeros(0, dtype=torch.long)
    return q, k


def _head_scores(arch, i, layer, criterion, att, grads, h, kv, d) -> torch.Tensor:
    g = h // kv
    scores = torch.zeros(kv, dtype=torch.float64)
    for k in range(kv):
        qh = list(range(k * g, (k + 1) * g))
        qi, ki = _head_rows(arch, qh, [k], d)
        if criterion == "activation":
            scores[k] = float(att[i][qi.to(att[i].device)].sum())
            continue
        if arch.kind == "gpt2":
            a = layer.attn
            E = a.split_size
            parts = [(a.c_attn.weight, 1, torch.cat([qi, E + qi, 2 * E + qi])), (a.c_proj.weight, 0, qi)]
        else:
            a = layer.self_attn
            parts = [(a.q_proj.weight, 0, qi), (a.k_proj.weight, 0, ki), (a.v_proj.weight, 0, ki),
                     (a.o_proj.weight, 1, qi)]
        if criterion == "magnitude":
            scores[k] = sum(float(_sq(w.index_select(dim, ix.to(w.device)), None)) for w, dim, ix in parts)
        else:
            scores[k] = abs(sum(float((w.detach().float() * grads[w].float()).index_select(dim, ix.to(w.device)).sum())
                                for w, dim, ix in parts))
    return scores


def _layer_scores(arch, criterion, bi, grads) -> torch.Tensor:
    s = []
    for i, layer in enumerate(arch.layers):
        if criterion == "activation":
            s.append(bi[i])
        elif criterion == "magnitude":
            ps = [p for p in layer.parameters() if p.dim() == 2]
            s.append(sum(float(_sq(p, None)) for p in ps) / sum(p.numel() for p in ps))
        else:
            s.append(abs(sum(float((p.detach().float() * grads[p].float()).sum()) for p in layer.parameters())))
    return torch.tensor(s, dtype=torch.float64)


# ----------------------------------------------------------------------------- surgery
def _prune_ffn(arch, layer, keep_idx) -> None:
    ins, (out_mod, out_kind) = arch.ffn_modules(layer)
    for m, k in ins:
        _keep_rows(m, keep_idx, k)
    _keep_rows(out_mod, keep_idx, out_kind)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(keep_idx)


def _prune_heads(arch, layer, keep_groups: list[int], h, kv, d) -> None:
    g = h // kv
    q_heads = [k * g + j for k in keep_groups for j in range(g)]
    qi, ki = _head_rows(arch, q_heads, keep_groups, d)
    if arch.kind == "gpt2":
        a = layer.attn
        E = a.split_size
        _keep_rows(a.c_attn, torch.cat([qi, E + qi, 2 * E + qi]), "conv_out")
        _keep_rows(a.c_proj, qi, "conv_in")
        a.split_size = len(qi)
        a.num_heads = len(q_heads)
        a.embed_dim = len(qi)
        return
    a = layer.self_attn
    _keep_rows(a.q_proj, qi, "out")
    _keep_rows(a.k_proj, ki, "out")
    _keep_rows(a.v_proj, ki, "out")
    _keep_rows(a.o_proj, qi, "in")
    for name, val in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep_groups))):
        if hasattr(a, name):
            setattr(a, name, val)


def _drop_layers(arch, drop: list[int]) -> None:
    kept = [l for i, l in enumerate(arch.layers) if i not in set(drop)]
    setattr(arch.parent, arch.attr, nn.ModuleList(kept))
    for new_i, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    c = arch.config
    c.num_hidden_layers = len(kept)  # GPT-2's attribute map sends this to n_layer
    lt = getattr(c, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) == len(kept) + len(drop):
        c.layer_types = [t for i, t in enumerate(lt) if i not in set(drop)]


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
            batches; required by ``criterion="activation"`` and ``"taylor"``.
        criterion: ``"magnitude" | "activation" | "taylor"`` (see the module docstring).
        heads: per layer, a fraction of the query heads (float) or a count of query heads (int)
            to remove; it must be whole KV groups (a multiple of num_attention_heads/num_key_value_heads).
        layers: how many whole decoder layers to remove (int, the least important) or which (list).

    Returns ``(model, report)``, a :class:`StructuredReport`: ``removed`` (original layer index ->
    ``{"ffn": [channels], "kv_groups": [...], "q_heads": [...]}``, and ``"layers": [...]``), parameter
    counts before/after, the new config values and the seconds taken.

    Raises ValueError for out-of-range sparsity/heads/layers, heads that do not divide into whole
    KV groups, an unknown criterion, or a missing calibration; TypeError for unsupported models.
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
    batches = _calib_batches(calibration, batch_size)
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
