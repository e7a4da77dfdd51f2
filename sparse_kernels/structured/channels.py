"""Structured pruning of any model's inner channels: CNN filters, MLP hidden units.

A *channel chain* is a producer layer whose output channels reach exactly one consumer layer
through per-channel operations only::

    producer (Conv1d/2d/3d with groups=1, or Linear)
      -> any of: BatchNorm, a depthwise convolution (groups = channels), an elementwise
         activation (ReLU, GELU, SiLU, ...), Dropout, Identity, spatial F.pad (convolutions)
      -> consumer (Conv1d/2d/3d with groups=1, or Linear)

Every member is a plain stock module (no parametrization, pruning reparametrization or forward
hook; called once; its weight not read elsewhere; registered under one name).

Channel j is then removed by deleting producer output j (weight row and bias), entry j of each
BatchNorm (weight, bias, running mean and variance) and of each depthwise convolution, and
consumer input j (weight column; an ``attach_mask`` mask follows its weight). Nothing else in
the model sees those channels, so in eval mode the smaller model computes exactly what the
original computes with the consumer's input column j zeroed, up to float summation order
(``tests/test_structured_channels.py`` checks this on ResNet-, MobileNet- and MLP-style blocks
and on Hugging Face ResNet, ViT and MobileNetV2 models; in train mode Dropout draws other random
masks). A residual add, concatenation, pooling to a head, flatten, LayerNorm, or a second
consumer ends a chain: such channels are shared, and removing them needs surgery on every layer
that touches them (not done here).

:func:`find_channel_chains` finds the chains with ``torch.fx`` (symbolic tracing of the model in
eval and in train mode, or of its children, recursively, where the model does not trace).
:func:`prune_channels` scores the channels of every chain, removes the same fraction from each
(or, ``scope="global"``, the lowest over all chains after normalizing each chain's scores by
their mean) and returns a :class:`ChannelReport`. Criteria (the lowest score goes first; ties go to the
lower index; float64):

* ``"magnitude"``: ``||consumer[:, j]||^2``, the squared weights that read channel j (the
  producer's row is left out: a BatchNorm after it would undo its scale);
* ``"activation"``: the squared L2 norm, over calibration inputs and positions, of the
  consumer's input channel j;
* ``"wanda"``: the two combined, ``||x_j||_2 * ||consumer[:, j]||_2``, an estimate of how much
  of the consumer's output channel j carries.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.calibration import iter_batches, run_batches
from ..pruning.layers import _stock_conv, _stock_linear

__all__ = ["ChannelChain", "ChannelReport", "find_channel_chains", "prune_channels", "CHANNEL_CRITERIA"]

CHANNEL_CRITERIA = ("magnitude", "activation", "wanda")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.relu, torch.sigmoid,
    torch.tanh, F.sigmoid, F.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}


@dataclass(frozen=True)
class ChannelChain:
    """Module names (relative to the model :func:`prune_channels` gets): the layer whose output
    channels are removed, the per-channel modules in between (BatchNorm, depthwise convolutions),
    and the layer whose inputs they are."""

    producer: str
    consumer: str
    through: tuple = ()


def _plain(m: nn.Module) -> bool:
    """No parametrization, no ``torch.nn.utils.prune`` / old ``weight_norm`` reparametrization and
    no forward hooks: the module computes from its own ``weight`` as its class says."""
    from torch.nn.utils import parametrize

    return (not parametrize.is_parametrized(m) and not hasattr(m, "weight_orig") and not hasattr(m, "weight_g")
            and not m._forward_hooks and not m._forward_pre_hooks)


def _is_layer(m: nn.Module) -> bool:
    """A stock Linear, or a stock convolution with groups=1 (a subclass that transforms its weight
    or input in ``forward`` would not compute the masked original after the surgery)."""
    if not _plain(m):
        return False
    if isinstance(m, nn.Linear):
        return _stock_linear(m)
    return isinstance(m, _CONVS) and m.groups == 1 and _stock_conv(m)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _is_depthwise(m: nn.Module, c: int) -> bool:
    return (isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels == c and _stock_conv(m)
            and _plain(m))


def _is_bn(m: nn.Module, c: int) -> bool:
    return type(m) in _BNS and m.num_features == c and _plain(m)


def _only_this_tensor(node, value) -> bool:
    """``node`` takes ``value`` as its first argument and no other tensor (no second operand)."""
    from torch.fx import Node

    if not node.args or node.args[0] is not value:
        return False
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return not any(isinstance(a, Node) for a in rest)


def _spatial_pad(node, spatial: int) -> bool:
    """``F.pad(x, pad, ...)`` that pads only the last ``spatial`` dims (never the channels)."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    return isinstance(pad, (tuple, list)) and len(pad) <= 2 * spatial and all(isinstance(p, int) for p in pad)


def _graph_chains(graph, mods: dict, join) -> list:
    """The chains of one traced graph (names relative to the traced module, then ``join``-ed)."""
    uses: dict[str, int] = {}
    for node in graph.nodes:  # a module called twice, or whose weight is read directly, is not a member
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            uses[owner] = uses.get(owner, 0) + 2
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_layer(mods[node.target]) or uses[node.target] != 1:
            continue
        prod = mods[node.target]
        c, linear = _out_channels(prod), isinstance(prod, nn.Linear)
        spatial = 0 if linear else prod.weight.dim() - 2
        through, cur = [], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if not _only_this_tensor(nxt, cur):
                break
            if nxt.op == "call_module":
                m = mods[nxt.target]
                if type(m) in _ELEMENTWISE_MODULES and _plain(m):  # stateless: may be called more than once
                    cur = nxt
                    continue
                if uses.get(nxt.target) != 1:
                    break
                if _is_layer(m):
                    if _in_channels(m) == c and isinstance(m, nn.Linear) == linear:
                        chains.append(ChannelChain(join(node.target), join(nxt.target), tuple(through)))
                    break
                if not linear and (_is_bn(m, c) or _is_depthwise(m, c)):
                    through.append(join(nxt.target))
                    cur = nxt
                    continue
                break
            if nxt.op == "call_function" and (nxt.target in _ELEMENTWISE_FUNCTIONS
                                             or nxt.target is F.pad and not linear and _spatial_pad(nxt, spatial)):
                cur = nxt
                continue
            if nxt.op == "call_method" and nxt.target in _ELEMENTWISE_METHODS:
                cur = nxt
                continue
            break
    return chains


def _trace_both_modes(module: nn.Module) -> list:
    """The module's graphs in eval and in train mode (code may differ: auxiliary heads, dropout);
    every submodule's own mode is restored afterwards."""
    from torch import fx

    flags = [(m, m.training) for m in module.modules()]
    try:
        graphs = []
        for mode in (False, True):
            module.train(mode)
            graphs.append(fx.symbolic_trace(module).graph)
        return graphs
    finally:
        for m, f in flags:
            m.training = f


def _find(module: nn.Module, prefix: str, untraced: list | None) -> list:
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    try:
        graphs = _trace_both_modes(module)
    except Exception:  # noqa: BLE001 - fx raises many kinds; search the children instead
        if untraced is not None:
            untraced.append(prefix or type(module).__name__)
        return [c for name, child in module.named_children() for c in _find(child, join(name), untraced)]
    mods = dict(module.named_modules())
    found = [_graph_chains(g, mods, join) for g in graphs]
    return [c for c in found[0] if all(c in f for f in found[1:])]  # a chain in both modes


def find_channel_chains(module: nn.Module, prefix: str = "", untraced: list | None = None) -> list[ChannelChain]:
    """The channel chains inside ``module``, found by ``torch.fx`` symbolic tracing in eval and in
    train mode (a chain must hold in both), with names prefixed by ``prefix``.

    Members are plain stock modules: layers with parametrizations, ``torch.nn.utils.prune``
    masks, old-style ``weight_norm`` or forward hooks, modules called twice, whose weight is
    read directly, or registered under two names are never part of a chain. A module that does
    not trace (data-dependent control flow, as in most Hugging Face model classes) is searched
    child by child instead, so chains inside its blocks are still found; chains that cross
    between children of an untraceable module are missed (a missed chain stays dense), and its
    children are assumed to be used through their own ``forward`` only (the code of a module
    that does not trace cannot be read). The names of the modules that did not trace are
    appended to ``untraced`` when a list is given.
    """
    chains = _find(module, prefix, untraced)
    base = f"{prefix}." if prefix else ""
    names: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1

    def once(name):
        return names.get(id(module.get_submodule(name[len(base):])), 0) == 1

    return [c for c in chains if all(once(n) for n in (c.producer, c.consumer, *c.through))]


# ----------------------------------------------------------------------------- surgery
_SIZES = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features")


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.clone(), requires_grad=old.requires_grad)


def _slice_masks(m: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    """``attach_mask``'s ``<name>_mask`` buffer follows its tensor."""
    mask = m._buffers.get(f"{name}_mask")
    if mask is not None:
        m._buffers[f"{name}_mask"] = mask.index_select(dim, idx.to(mask.device)).clone()


def _keep_outputs(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight, m.weight.data.index_select(0, idx))
    _slice_masks(m, "weight", 0, idx)
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias.data.index_select(0, idx))
        _slice_masks(m, "bias", 0, idx)
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)
        if m.groups != 1:  # depthwise: one filter per channel
            m.in_channels = m.groups = len(idx)


def _keep_inputs(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight, m.weight.data.index_select(1, idx))
    _slice_masks(m, "weight", 1, idx)
    if isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        m.in_channels = len(idx)


def _keep_bn(m: nn.Module, idx: torch.Tensor) -> None:
    if m.weight is not None:
        m.weight = _param(m.weight, m.weight.data.index_select(0, idx))
        m.bias = _param(m.bias, m.bias.data.index_select(0, idx))
    if m.running_mean is not None:
        m.running_mean = m.running_mean.index_select(0, idx).clone()
        m.running_var = m.running_var.index_select(0, idx).clone()
    m.num_features = len(idx)


class _Snapshot:
    """The parameters, buffers and sizes of some modules, to put back if a surgery fails."""

    def __init__(self, modules):
        self.saved = [(m, dict(m._parameters), dict(m._buffers), {a: getattr(m, a) for a in _SIZES if hasattr(m, a)})
                      for m in modules]

    def restore(self) -> None:
        for m, params, buffers, sizes in self.saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for a, v in sizes.items():
                setattr(m, a, v)


@dataclass
class ChannelReport:
    """What :func:`prune_channels` removed: per chain (keyed by its producer) the channels
    before/after and the removed indices; parameter counts before/after."""

    criterion: str
    sparsity: float
    chains: dict = field(default_factory=dict)
    untraced: list = field(default_factory=list)
    scope: str = "chain"
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    method: str = "channels"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        n = sum(len(c["removed"]) for c in self.chains.values())
        total = sum(c["channels"] for c in self.chains.values())
        return (f"prune_channels: criterion={self.criterion} sparsity={self.sparsity} scope={self.scope}: removed "
                f"{n} of {total} channels ({n / max(total, 1):.3f}) in {len(self.chains)} chains; params "
                f"{self.params_before} -> {self.params_after} "
                f"({self.params_after / max(self.params_before, 1):.3f}x); {self.seconds:.2f}s")


def _check_chain(model: nn.Module, chain) -> tuple:
    if not isinstance(chain, ChannelChain):
        raise TypeError(f"chains: expected ChannelChain entries, got {type(chain).__name__}")
    try:
        p, q = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
        through = [model.get_submodule(t) for t in chain.through]
    except AttributeError as e:
        raise ValueError(f"chains: {chain} names a module the model does not have ({e})") from None
    for name, m in ((chain.producer, p), (chain.consumer, q)):
        if not _is_layer(m):
            raise ValueError(f"chains: {chain}: {name} is a {type(m).__name__}"
                             + ("" if _plain(m) else " with a parametrization, a pruning mask or forward hooks")
                             + "; producer and consumer must be stock Linear layers or convolutions with groups=1")
    if isinstance(p, nn.Linear) != isinstance(q, nn.Linear):
        raise ValueError(f"chains: {chain}: producer and consumer must both be Linear or both be convolutions, "
                         f"got {type(p).__name__} and {type(q).__name__}")
    c = _out_channels(p)
    if _in_channels(q) != c:
        raise ValueError(f"chains: {chain}: the producer has {c} output channels, the consumer "
                         f"{_in_channels(q)} inputs")
    for name, t in zip(chain.through, through):
        if not (_is_bn(t, c) or _is_depthwise(t, c)):
            raise ValueError(f"chains: {chain}: {name} is a {type(t).__name__}; between producer and consumer only "
                             f"a plain BatchNorm or depthwise convolution over the {c} channels can be listed")
    return p, q, through


def _check_roles(resolved: dict) -> None:
    """Each module plays one part: producer of one chain, consumer of one chain (a module may be
    both, for two chains in a row), or a through-module of one chain and nothing else."""
    roles: dict[int, list] = {}
    for chain, p, q, through in resolved.values():
        for role, m in [("producer", p), ("consumer", q)] + [("through", t) for t in through]:
            roles.setdefault(id(m), []).append((role, chain))
    for parts in roles.values():
        kinds = [r for r, _ in parts]
        if len(parts) > 1 and (len(set(kinds)) != len(kinds) or "through" in kinds):
            raise ValueError(f"chains: {parts[0][1]} and {parts[1][1]} both change the same module "
                             f"(as {kinds[0]} and {kinds[1]}); each module may be one chain's producer and "
                             f"another's consumer, nothing more")


def _input_norms(model: nn.Module, consumers: dict, batches) -> dict:
    """``{producer name: sum over inputs and positions of x_j^2}`` (float64) for each consumer."""
    sums, handles = {}, []

    def hook(name, linear):
        def pre(mod, args):
            x = args[0].detach().double()
            if linear:
                s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            else:
                if x.dim() == mod.weight.dim() - 1:  # an unbatched convolution input
                    x = x.unsqueeze(0)
                s = x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
            sums[name] = s if name not in sums else sums[name] + s
        return pre

    for name, q in consumers.items():
        handles.append(q.register_forward_pre_hook(hook(name, isinstance(q, nn.Linear))))
    try:
        if run_batches(model, batches, explain=True) == 0:
            raise ValueError("calibration: empty; give at least one batch")
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in consumers if n not in sums]
    if missing:
        raise ValueError(f"calibration: the consumer of chain {missing[0]!r} never ran on it")
    return sums


def _n_remove(c: int, s: float, round_to: int) -> int:
    keep = c - int(round(s * c))
    keep = max(round_to, int(round(keep / round_to)) * round_to) if round_to > 1 else max(keep, 1)
    return max(0, c - min(keep, c))


def _global_counts(scores: dict, sparsity: float, round_to: int) -> dict:
    """How many channels each chain loses under one ranking over all chains: each chain's scores
    divided by their mean, the ``round(sparsity * total)`` lowest removed (ties: chain order,
    then index), then each chain's kept count rounded to a multiple of ``round_to`` (at least
    ``round_to``, at most its channels)."""
    flat, owner = [], []
    for name, sc in scores.items():
        mean = sc.mean()  # finite (checked by the caller); an all-zero chain ranks first
        flat.append(sc / mean if mean > 0 else torch.zeros_like(sc))
        owner += [name] * len(sc)
    flat = torch.cat(flat)
    k = int(round(sparsity * flat.numel()))
    removed = {name: 0 for name in scores}
    for i in torch.sort(flat, stable=True).indices[:k].tolist():
        removed[owner[i]] += 1
    out = {}
    for name, sc in scores.items():
        c = len(sc)
        keep = max(c - removed[name], 1)
        if round_to > 1:
            keep = min(c, max(round_to, int(round(keep / round_to)) * round_to))
        out[name] = c - keep
    return out


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v}")


@torch.no_grad()
def prune_channels(model: nn.Module, sparsity: float, calibration=None, *, criterion: str = "magnitude",
                   chains=None, round_to: int = 1, batch_size: int = 8, scope: str = "chain") -> ChannelReport:
    """Remove ``sparsity`` of the channels of every channel chain of ``model``, in place.

    Args:
        model: any ``nn.Module``; it keeps its identity and shrinks. Its parameters are new
            tensors afterwards: build the optimizer (and ``MaskedTraining``) after pruning.
        sparsity: the fraction of channels to remove, in [0, 1): of each chain (``scope="chain"``:
            a chain of ``c`` channels keeps ``c - round(sparsity * c)``, rounded to a multiple of
            ``round_to``, at least ``round_to``, at least one channel) or of all chains together
            (``scope="global"``).
        calibration: inputs for ``criterion="activation"`` / ``"wanda"``: a tensor (split into
            ``batch_size`` rows, each called as ``model(batch)``), a dict of keyword arguments
            (one batch), or an iterable of batches (tensor, tuple of args or dict of kwargs).
            The model runs in eval mode for it.
        criterion: ``"magnitude" | "activation" | "wanda"`` (module docstring).
        chains: the chains to prune (:class:`ChannelChain`); default :func:`find_channel_chains`
            of ``model``. The report's ``untraced`` lists the modules that search could not trace.
        scope: ``"chain"`` (default): the same fraction from every chain; ``"global"``: the
            ``round(sparsity * total)`` channels with the lowest scores over all chains, each
            chain's scores first divided by their mean (so chains of different scales compare),
            then every chain's kept count rounded to a multiple of ``round_to`` (at least
            ``round_to``, at least one channel): the total removed is then only close to
            ``sparsity``; the report prints the fraction reached.

    Returns a :class:`ChannelReport`. Everything is checked and every chain's channels chosen
    before the model changes, and a surgery that fails puts every module back. Raises
    ValueError for a sparsity outside [0, 1), an unknown criterion, missing calibration, chains
    that do not fit the model or change one module twice, a model with no chain, or a
    calibration batch the model fails on (its dtypes and shapes named); TypeError for wrong
    argument types.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a float, got {type(sparsity).__name__}")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity: must be in [0, 1) (the fraction of channels to remove), got {sparsity}")
    if criterion not in CHANNEL_CRITERIA:
        raise ValueError(f"criterion: unknown {criterion!r}; expected one of {', '.join(CHANNEL_CRITERIA)}")
    _check_int("round_to", round_to, 1)
    if scope not in ("chain", "global"):
        raise ValueError(f"scope: expected 'chain' (the same fraction from every chain) or 'global' (one ranking "
                         f"over all chains), got {scope!r}")
    _check_int("batch_size", batch_size, 1)
    untraced: list = []
    if chains is None:
        chains = find_channel_chains(model, untraced=untraced)
        if not chains:
            raise ValueError(f"model: no channel chain found in {type(model).__name__} (a layer whose output "
                             f"channels reach exactly one other layer through per-channel operations only)"
                             + (f"; torch.fx could not trace {', '.join(untraced[:5])}" if untraced else ""))
    else:
        if isinstance(chains, ChannelChain):
            raise TypeError("chains: expected a list of ChannelChain, got one ChannelChain")
        chains = list(chains)
        if not chains:
            raise ValueError("chains: empty; give at least one ChannelChain, or None to find them")
    resolved = {}
    for c in chains:
        r = _check_chain(model, c)
        if c.producer in resolved:
            raise ValueError(f"chains: producer {c.producer!r} is listed twice")
        resolved[c.producer] = (c, *r)
    _check_roles(resolved)
    if criterion != "magnitude" and calibration is None:
        raise ValueError(f"calibration: criterion={criterion!r} needs calibration inputs")
    batches = None if calibration is None else iter_batches(calibration, batch_size)

    params_before = sum(p.numel() for p in model.parameters())
    norms = {}
    if criterion != "magnitude":
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            norms = _input_norms(model, {name: r[2] for name, r in resolved.items()}, batches)
        finally:
            for m, f in flags:
                m.training = f
    # choose every chain's channels first (scores in float64; ties go to the lower index)
    scores = {}
    for name, (chain, p, q, through) in resolved.items():
        c = _out_channels(p)
        w = q.weight.detach().double().transpose(0, 1).reshape(c, -1).pow(2).sum(1)  # ||consumer[:, j]||^2
        if criterion == "magnitude":
            score = w
        elif criterion == "activation":
            score = norms[name]
        else:
            score = norms[name].to(w.device).sqrt() * w.sqrt()
        scores[name] = score.cpu()
        if not bool(torch.isfinite(scores[name]).all()):
            raise ValueError(f"calibration: chain {name!r} has non-finite {criterion} scores (NaN or inf in its "
                             f"consumer's weight or inputs); nothing was removed")
    counts = (_global_counts(scores, sparsity, round_to) if scope == "global"
              else {name: _n_remove(len(sc), sparsity, round_to) for name, sc in scores.items()})
    plans = {}
    for name, score in scores.items():
        c, k = len(score), counts[name]
        order = torch.sort(score, stable=True).indices
        plans[name] = (c, k, sorted(order[:k].tolist()), torch.tensor(sorted(order[k:].tolist()), dtype=torch.long))
    snapshot = _Snapshot({id(m): m for _, p, q, through in resolved.values() for m in (p, q, *through)}.values())
    try:
        for name, (chain, p, q, through) in resolved.items():
            c, k, removed, keep = plans[name]
            if k:
                _keep_outputs(p, keep.to(p.weight.device))
                for t in through:
                    (_keep_bn if isinstance(t, _BNS) else _keep_outputs)(t, keep.to(t.weight.device if t.weight
                                                                                    is not None else p.weight.device))
                _keep_inputs(q, keep.to(q.weight.device))
    except BaseException:
        snapshot.restore()
        raise
    report = ChannelReport(criterion=criterion, sparsity=float(sparsity), untraced=untraced, scope=scope)
    for name, (chain, p, q, through) in resolved.items():
        c, k, removed, _ = plans[name]
        report.chains[name] = dict(consumer=chain.consumer, through=list(chain.through), channels=c,
                                   kept=c - k, removed=removed)
    report.params_before = params_before
    report.params_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - t0
    return report
