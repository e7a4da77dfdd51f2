"""Structured pruning, model side: where one model family keeps its prunable units, and the
in-place surgery that removes them (FFN channels, KV head groups, decoder layers).

Layouts: ``nn.Linear`` weight is ``[out, in]``; GPT-2's ``Conv1D`` weight is ``[in, out]``.
Head ``h`` of head dim ``d`` owns rows/columns ``h*d .. h*d+d-1``; GPT-2's ``c_attn`` holds
[q | k | v] along its output columns (each ``split_size`` wide).
"""

from __future__ import annotations

import torch
from torch import nn


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


def _head_rows(arch, q_heads, kv_heads, d):
    """Column/row indices (in q space and kv space) of the given heads."""
    ar = torch.arange(d)
    q = torch.cat([h * d + ar for h in q_heads]) if q_heads else torch.zeros(0, dtype=torch.long)
    k = torch.cat([h * d + ar for h in kv_heads]) if kv_heads else torch.zeros(0, dtype=torch.long)
    return q, k


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
