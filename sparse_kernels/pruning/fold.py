"""Fold input permutations into the layers that produce those inputs (zero run-time cost).

A permuted 2:4 :class:`~sparse_kernels.nn.SparseLinear` gathers ``x[..., in_perm]`` on every
call.  Where ``x`` is an elementwise function of other layers' outputs -- the MLP of a
transformer block: ``down(act(gate(h)) * up(h))`` (Llama, Mistral, Qwen2, Gemma),
``c_proj(act(c_fc(h)))`` (GPT-2), ``fc2(act(fc1(h)))`` (OPT), ``dense_4h_to_h(act(dense_h_to_4h(h)))``
(GPT-NeoX) -- permuting those producers' *output rows* by ``in_perm`` yields ``x[..., in_perm]``
directly, and the consumer drops its gather (NVIDIA ASP applies its permutations the same way).
The function is unchanged: the consumer sees the same values in the same order.

Producers that can be permuted: ``nn.Linear`` (weight rows, bias, and a same-shaped
``weight_mask`` buffer if present), Hugging Face ``Conv1D`` (weight columns, bias), and
SparseLinear with the 2:4 or masked pattern (rows of values/meta or weight/mask, bias) and
SparseLinearInt4 (rows of qvalues/meta/scales, bias) -- the exact types, without parametrizations, ``torch.nn.utils.prune`` reparametrization or forward
hooks.  The consumer is a permuted 2:4 SparseLinear or SparseLinearInt4.
A pair is left as it is when a producer is of another kind (e.g. a bitmask
SparseLinear, a subclass), the attribute names do not match one of :data:`MLP_PAIRS`, or the
module holding the consumer has other linear layers besides the pair's (e.g. a second
up-projection under another name).  Attention projections (q/k/v read the
normalized residual stream, o_proj reads per-head outputs) keep their gather.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import _is_conv1d

__all__ = ["MLP_PAIRS", "fold_permutations"]

#: (producers, consumer): attribute paths inside a decoder block
MLP_PAIRS = (
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    (("mlp.c_fc",), "mlp.c_proj"),
    (("fc1",), "fc2"),
    (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
)


def _get(block: nn.Module, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _is_linear_like(mod) -> bool:
    from ..nn import SparseLinear, SparseLinearInt4

    return isinstance(mod, (nn.Linear, SparseLinear, SparseLinearInt4)) or _is_conv1d(mod)


def _can_permute_rows(mod) -> bool:
    """Plain layers only: a weight recomputed on every call (``torch.nn.utils.parametrize``,
    ``torch.nn.utils.prune``'s ``weight_orig`` and pre-hook) or a subclass with state of its own
    would not keep the permuted rows."""
    from ..nn import SparseLinear, SparseLinearInt4

    if getattr(mod, "parametrizations", None) is not None or hasattr(mod, "weight_orig"):
        return False
    if mod._forward_pre_hooks or mod._forward_hooks:
        return False
    if type(mod) is SparseLinearInt4:
        return True
    if type(mod) is SparseLinear:
        return mod.pattern in ("2:4", None)
    return type(mod) is nn.Linear or _is_conv1d(mod)


def _only_these_layers(block: nn.Module, producers, consumer) -> bool:
    """The module holding ``consumer`` has exactly ``producers`` and ``consumer`` as its direct
    linear-like children: an MLP with another projection feeding the consumer (a second
    up-projection under another name) is not the pattern :data:`MLP_PAIRS` describes."""
    parent_path = consumer.rpartition(".")[0]
    parent = block.get_submodule(parent_path) if parent_path else block
    names = {n for n, c in parent.named_children() if _is_linear_like(c)}
    want = {p.rpartition(".")[2] for p in producers} | {consumer.rpartition(".")[2]}
    return names == want


def _out_features(mod) -> int:
    if _is_conv1d(mod):
        return mod.weight.shape[1]
    return mod.out_features


@torch.no_grad()
def _permute_rows(mod, perm: torch.Tensor) -> None:
    """Output ``j`` of ``mod`` becomes its old output ``perm[j]``."""
    from ..nn import SparseLinear, SparseLinearInt4

    def take(t, dim=0):
        t.data = t.data.index_select(dim, perm.to(t.device))

    if isinstance(mod, SparseLinearInt4):  # rows of codes, meta and scales (a row's groups move with it)
        for t in (mod.qvalues, mod.meta, mod.scales):
            take(t)
        if mod.bias is not None:
            take(mod.bias)
        return
    if isinstance(mod, SparseLinear):
        for t in ((mod.values, mod.meta) if mod.pattern == "2:4" else (mod.weight, mod.mask)):
            take(t)
        if mod.bias is not None:
            take(mod.bias)
        mod.refresh_cache()
        return
    if isinstance(mod, nn.Linear):
        take(mod.weight)
        m = getattr(mod, "weight_mask", None)
        if isinstance(m, torch.Tensor) and m.shape == mod.weight.shape:
            take(m)
    else:  # Conv1D: weight [in, out]
        take(mod.weight, 1)
    if getattr(mod, "bias", None) is not None:
        take(mod.bias)


def fold_permutations(blocks) -> list[str]:
    """Fold every foldable input permutation of ``blocks`` (an iterable of decoder blocks, or a
    model: its blocks are found with :func:`sparse_kernels.pruning.find_blocks`) into the
    producing layers, in place.  Returns the names (``"<block index>.<path>"``) of the
    consumers that no longer gather."""
    from ..nn import SparseLinear, SparseLinearInt4
    from .model import find_blocks

    if isinstance(blocks, nn.Module):
        blocks = find_blocks(blocks)
    folded = []
    for bi, block in enumerate(blocks):
        for producers, consumer in MLP_PAIRS:
            cons = _get(block, consumer)
            prods = [_get(block, p) for p in producers]
            if not isinstance(cons, (SparseLinear, SparseLinearInt4)) or cons.in_perm is None:
                continue
            if any(p is None or not _can_permute_rows(p) or _out_features(p) != cons.in_features for p in prods):
                continue
            if not _only_these_layers(block, producers, consumer):
                continue
            perm = cons.in_perm
            for p in prods:
                _permute_rows(p, perm)
            cons.drop_permutation()
            folded.append(f"{bi}.{consumer}")
    return folded
