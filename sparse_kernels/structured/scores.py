"""Structured pruning, importance side: calibration runs, activation and Taylor statistics, and
the per-unit scores (lowest is removed first) for FFN channels, KV head groups and decoder layers.

Criteria are described in :mod:`sparse_kernels.structured`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..pruning.calibration import check_batch, check_iterable, check_token_ids
from .arch import _Arch, _head_rows


def _sq(t: torch.Tensor, dim) -> torch.Tensor:
    return t.detach().float().pow(2).sum(dim)


# ----------------------------------------------------------------------------- calibration
def _calib_batches(calibration, batch_size: int, vocab_size: int | None) -> list:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        check_token_ids(calibration, vocab_size)
        return list(calibration.split(batch_size))
    check_iterable(calibration)
    out = list(calibration)
    if not out:
        raise ValueError("calibration: empty")
    for i, b in enumerate(out):
        check_batch(b, vocab_size, f"calibration[{i}]", positional=False)
    return out


def _run(model, batch, device, labels: bool):
    b = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else {"input_ids": batch.to(device)}
    if labels:
        b.setdefault("labels", b["input_ids"].long())  # int32 ids: the loss needs int64
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
