"""Structured pruning of any model's inner channels: CNN filters, MLP hidden units.

A *channel chain* is a producer layer whose output channels reach exactly one consumer layer
through per-channel operations only::

    producer (Conv1d/2d/3d with groups=1, or Linear)
      -> any of: BatchNorm, a depthwise convolution (groups = channels), an elementwise
         activation (ReLU, GELU, SiLU, ...), Dropout, Identity
      -> consumer (Conv1d/2d/3d with groups=1, or Linear)

Channel j is then removed by deleting producer output j (weight row and bias), entry j of each
BatchNorm (weight, bias, running mean and variance) and of each depthwise convolution, and
consumer input j (weight column). Nothing else in the model sees those channels, so the smaller
model computes exactly what the original computes with the consumer's input column j zeroed,
up to float summation order (``tests/test_structured_channels.py`` checks this on ResNet- and
MobileNet-style blocks). A residual add, concatenation, pooling to a head, flatten, LayerNorm, or
a second consumer ends a chain: such channels are shared, and removing them needs surgery on
every layer that touches them (not done here).

:func:`find_channel_chains` finds the chains with ``torch.fx`` (symbolic tracing of the model,
or of its children, recursively, where the model does not trace). :func:`prune_channels` scores the
channels of every chain, removes the same fraction from each and returns a
:class:`ChannelReport`. Criteria (the lowest score goes first; ties go to the lower index):

* ``"magnitude"``: ``||consumer[:, j]||^2``, the squared weights that read channel j (the
  producer's row is left out: a BatchNorm after it would undo its scale);
* ``"activation"``: the squared L2 norm, over calibration inputs and positions, of the
  consumer's input channel j;
* ``"wanda"``: the two combined, ``||x_j||_2 * ||consumer[:, j]||_2`` (Wanda's score summed over
  a channel's weights, as the structured variant of Wanda and FLAP-style methods do).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.layers import _stock_conv

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


def _is_layer(m: nn.Module) -> bool:
    """A stock Linear, or a stock convolution with groups=1 (a subclass that transforms its weight
    or input in ``forward`` would not compute the masked original after the surgery)."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    return isinstance(m, _CONVS) and m.groups == 1 and _stock_conv(m)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _is_depthwise(m: nn.Module, c: int) -> bool:
    return isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels == c


def _only_this_tensor(node, value) -> bool:
    """``node`` takes ``value`` as its first argument and no other tensor (no second operand)."""
    from torch.fx import Node

    if not node.args or node.args[0] is not value:
        return False
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return not any(isinstance(a, Node) for a in rest)


def find_channel_chains(module: nn.Module, prefix: str = "", untraced: list | None = None) -> list[ChannelChain]:
    """The channel chains inside ``module``, found by ``torch.fx`` symbolic tracing, with names
    prefixed by ``prefix``.

    A module that does not trace (data-dependent control flow, as in most Hugging Face model
    classes) is searched child by child instead, so chains inside its blocks are still found;
    only chains that cross between children of an untraceable module are missed (a missed chain
    stays dense, nothing wrong is removed). The names of the modules that did not trace are
    appended to ``untraced`` when a list is given.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - fx raises many kinds; search the children instead
        if untraced is not None:
            untraced.append(prefix or type(module).__name__)
        join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        return [c for name, child in module.named_children()
                for c in find_channel_chains(child, join(name), untraced)]
    mods = dict(module.named_modules())
    seen_modules: dict[str, int] = {}
    for node in graph.nodes:  # a module called twice (weight sharing) cannot be a chain member
        if node.op == "call_module":
            seen_modules[node.target] = seen_modules.get(node.target, 0) + 1
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_layer(mods[node.target]) or seen_modules[node.target] != 1:
            continue
        c = _out_channels(mods[node.target])
        linear = isinstance(mods[node.target], nn.Linear)
        through, cur = [], node
        while True:
            if len(cur.users) != 1:
                break
            nxt = next(iter(cur.users))
            if nxt.op == "call_module":
                m = mods[nxt.target]
                if not _only_this_tensor(nxt, cur):
                    break
                if isinstance(m, _ELEMENTWISE_MODULES):  # stateless: may be called more than once
                    cur = nxt
                    continue
                if seen_modules[nxt.target] != 1:  # weights shared by two call sites
                    break
                if _is_layer(m):
                    if _in_channels(m) == c and isinstance(m, nn.Linear) == linear:
                        chains.append(ChannelChain(join(node.target), join(nxt.target), tuple(through)))
                    break
                if not linear and (isinstance(m, _BNS) and m.num_features == c or _is_depthwise(m, c)):
                    through.append(join(nxt.target))
                    cur = nxt
                    continue
                break
            if nxt.op == "call_function" and nxt.target in _ELEMENTWISE_FUNCTIONS and _only_this_tensor(nxt, cur):
                cur = nxt
                continue
            if nxt.op == "call_method" and nxt.target in _ELEMENTWISE_METHODS and _only_this_tensor(nxt, cur):
                cur = nxt
                continue
            break
    return chains


# ----------------------------------------------------------------------------- surgery
def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.clone(), requires_grad=old.requires_grad)


def _keep_outputs(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight, m.weight.data.index_select(0, idx))
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias.data.index_select(0, idx))
    if isinstance(m, nn.Linear):
        m.out_features = len(idx)
    else:
        m.out_channels = len(idx)
        if m.groups != 1:  # depthwise: one filter per channel
            m.in_channels = m.groups = len(idx)


def _keep_inputs(m: nn.Module, idx: torch.Tensor) -> None:
    m.weight = _param(m.weight, m.weight.data.index_select(1, idx))
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


# ----------------------------------------------------------------------------- driver
@dataclass
class ChannelReport:
    """What :func:`prune_channels` removed: per chain (keyed by its producer) the channels
    before/after and the removed indices; parameter counts before/after."""

    criterion: str
    sparsity: float
    chains: dict = field(default_factory=dict)
    untraced: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    method: str = "channels"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        n = sum(len(c["removed"]) for c in self.chains.values())
        return (f"prune_channels: criterion={self.criterion} sparsity={self.sparsity}: removed {n} channels in "
                f"{len(self.chains)} chains; params {self.params_before} -> {self.params_after} "
                f"({self.params_after / max(self.params_before, 1):.3f}x); {self.seconds:.2f}s")


def _check_chain(model: nn.Module, chain) -> tuple:
    if not isinstance(chain, ChannelChain):
        raise TypeError(f"chains: expected ChannelChain entries, got {type(chain).__name__}")
    try:
        p, q = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
        through = [model.get_submodule(t) for t in chain.through]
    except AttributeError as e:
        raise ValueError(f"chains: {chain} names a module the model does not have ({e})") from None
    if not _is_layer(p) or not _is_layer(q) or isinstance(p, nn.Linear) != isinstance(q, nn.Linear):
        raise ValueError(f"chains: {chain}: producer and consumer must both be Linear or both be convolutions "
                         f"with groups=1, got {type(p).__name__} and {type(q).__name__}")
    c = _out_channels(p)
    if _in_channels(q) != c:
        raise ValueError(f"chains: {chain}: the producer has {c} output channels, the consumer "
                         f"{_in_channels(q)} inputs")
    for name, t in zip(chain.through, through):
        if not (isinstance(t, _BNS) and t.num_features == c or _is_depthwise(t, c)):
            raise ValueError(f"chains: {chain}: {name} is a {type(t).__name__}; between producer and consumer only "
                             f"BatchNorm or a depthwise convolution over the {c} channels can be listed")
    return p, q, through


def _batches(calibration, batch_size: int) -> list:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration: needs at least one sample, got shape {tuple(calibration.shape)}")
        return list(calibration.split(batch_size))
    if isinstance(calibration, (str, bytes)):
        raise TypeError(f"calibration: expected a tensor or an iterable of batches, got {type(calibration).__name__}")
    out = list(calibration)
    if not out:
        raise ValueError("calibration: empty; give at least one batch")
    return out


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _input_norms(model: nn.Module, consumers: dict, batches) -> dict:
    """``{producer name: sum over inputs and positions of x_j^2}`` for each consumer's input."""
    sums, handles = {}, []

    def hook(name, linear):
        def pre(mod, args):
            x = args[0].detach().float()
            if not linear and x.dim() == mod.weight.dim() - 1:  # an unbatched convolution input
                x = x.unsqueeze(0)
            s = x.pow(2).sum(tuple(range(x.dim() - 1))) if linear else x.pow(2).transpose(0, 1).reshape(
                x.shape[1], -1).sum(1)
            sums[name] = s if name not in sums else sums[name] + s
        return pre

    for name, q in consumers.items():
        handles.append(q.register_forward_pre_hook(hook(name, isinstance(q, nn.Linear))))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, torch.Tensor):
                    b = b.to(device)
                _call(model, b)
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


@torch.no_grad()
def prune_channels(model: nn.Module, sparsity: float, calibration=None, *, criterion: str = "magnitude",
                   chains=None, round_to: int = 1, batch_size: int = 8) -> ChannelReport:
    """Remove ``sparsity`` of the channels of every channel chain of ``model``, in place.

    Args:
        model: any ``nn.Module``; it keeps its identity and shrinks.
        sparsity: the fraction of each chain's channels to remove, in [0, 1); a chain of ``c``
            channels keeps ``c - round(sparsity * c)``, rounded to a multiple of ``round_to``
            (at least ``round_to``, at least one channel).
        calibration: inputs for ``criterion="activation"`` / ``"wanda"``: a tensor (split into
            ``batch_size`` rows, each called as ``model(batch)``) or an iterable of batches
            (tensor, tuple of args or dict of kwargs).
        criterion: ``"magnitude" | "activation" | "wanda"`` (module docstring).
        chains: the chains to prune (:class:`ChannelChain`); default :func:`find_channel_chains`
            of ``model``. The report's ``untraced`` lists the modules that search could not trace.

    Returns a :class:`ChannelReport`. Raises ValueError for a sparsity outside [0, 1), an
    unknown criterion, missing calibration, chains that do not fit the model (checked before
    anything changes) or a model with no chain; TypeError for wrong argument types.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a float, got {type(sparsity).__name__}")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity: must be in [0, 1) (the fraction of each chain's channels to remove), "
                         f"got {sparsity}")
    if criterion not in CHANNEL_CRITERIA:
        raise ValueError(f"criterion: unknown {criterion!r}; expected one of {', '.join(CHANNEL_CRITERIA)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: expected an int >= 1, got {round_to!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    untraced: list = []
    chains = find_channel_chains(model, untraced=untraced) if chains is None else list(chains)
    if not chains:
        raise ValueError(f"model: no channel chain found in {type(model).__name__} (a layer whose output channels "
                         f"reach exactly one other layer through per-channel operations only)"
                         + (f"; torch.fx could not trace {', '.join(untraced[:5])}" if untraced else ""))
    resolved = {c.producer: (c, *_check_chain(model, c)) for c in chains}
    if len(resolved) != len(chains):
        raise ValueError("chains: a producer is listed twice")
    batches = _batches(calibration, batch_size)
    if criterion != "magnitude" and not batches:
        raise ValueError(f"calibration: criterion={criterion!r} needs calibration inputs")

    params_before = sum(p.numel() for p in model.parameters())
    norms = {}
    if criterion != "magnitude":
        was_training = model.training
        model.eval()
        try:
            norms = _input_norms(model, {name: r[2] for name, r in resolved.items()}, batches)
        finally:
            model.train(was_training)
    report = ChannelReport(criterion=criterion, sparsity=float(sparsity), untraced=untraced)
    for name, (chain, p, q, through) in resolved.items():
        c = _out_channels(p)
        w = q.weight.detach().float().transpose(0, 1).reshape(c, -1).pow(2).sum(1)  # ||consumer[:, j]||^2
        score = {"magnitude": w, "activation": norms.get(name), "wanda": None}[criterion]
        if criterion == "wanda":
            score = norms[name].to(w.device).sqrt() * w.sqrt()
        k = _n_remove(c, sparsity, round_to)
        order = torch.sort(score.double().cpu(), stable=True).indices
        removed = sorted(order[:k].tolist())
        keep = torch.tensor(sorted(order[k:].tolist()), dtype=torch.long)
        if k:
            dev = p.weight.device
            _keep_outputs(p, keep.to(dev))
            for t in through:
                (_keep_bn if isinstance(t, _BNS) else _keep_outputs)(t, keep.to(dev))
            _keep_inputs(q, keep.to(q.weight.device))
        report.chains[name] = dict(consumer=chain.consumer, through=list(chain.through), channels=c,
                                   kept=c - k, removed=removed)
    report.params_before = params_before
    report.params_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - t0
    return report
