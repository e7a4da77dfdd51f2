"""Mixture-of-experts weights as :func:`sparse_kernels.prune` sees them.

Hugging Face transformers 5 stores the routed experts of its MoE models (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...) as one module per block holding 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (``[E, in, out]`` where the module says
``is_transposed``, as gpt-oss does), not as ``nn.Linear`` layers; such a module is marked by the
``use_experts_implementation`` decorator (``is_transposed``, ``has_bias``, ... attributes). Those
parameters hold most of an MoE model's weights, and a pruner that only walks ``nn.Linear``
layers leaves them dense.

Here each expert's matrix becomes an :class:`ExpertMatrix`: a stand-in layer whose ``weight``
is a 2-D ``[out, in]`` view into the 3-D parameter (written in place) and whose forward hooks
see exactly the rows that expert multiplies: while a hook is registered, the experts module
runs its eager implementation (the per-expert loop; the grouped-matmul ones are switched off
for the call) under a ``TorchFunctionMode`` that recognizes ``F.linear(x, P[e])`` and
``x @ P[e]`` by the storage of their weight operand. ``down_proj``'s inputs are therefore the
model's own activation of the gated projection, whatever its gate (SwiGLU, gpt-oss's clamped
one, ...), without this module knowing it.

With ``all_experts`` (``prune(calibrate_all_experts=True)``, the default, as llm-compressor
calibrates) each call first runs the module once more, for the statistics only, with every
token routed to every expert (its output discarded; rows that are not finite, which an expert
may produce in float16 on tokens it was never trained for, are left out of the statistics);
the call itself then runs as routed, so the model's output is untouched. Without it each expert
sees only its routed tokens, and an expert that receives none is pruned by magnitude
(``prune``'s report says which).

If a call processes tokens but no expert matmul is recognized (an implementation that
multiplies by a copy, ``P[e].float()``, or by all experts at once), the tap raises instead of
letting every expert fall back silently.

Routers are left out: an ``nn.Linear`` that is a direct child of a module holding an experts
module and has 1 or ``E`` outputs (Qwen2-MoE's ``shared_expert_gate``, routers written as
Linear layers) is not pruned (:func:`router_layers`).
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ExpertMatrix", "expert_matrices", "expert_params", "is_experts_module", "out_in", "router_layers"]

#: the 3-D parameters of a transformers experts module that are pruned
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")

# the calls whose second operand is a weight: F.linear(x, W [out, in]) and x @ W [in, out]
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


def expert_params(m: nn.Module) -> dict:
    """``{name: tensor}`` of ``m``'s 3-D expert parameters (of :data:`EXPERT_PARAMS`), in that order."""
    out = {}
    for name in EXPERT_PARAMS:
        p = getattr(m, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            out[name] = p
    return out


def is_experts_module(m: nn.Module) -> bool:
    """A transformers ``use_experts_implementation`` module with 3-D expert parameters."""
    return isinstance(getattr(m, "is_transposed", None), bool) and bool(expert_params(m))


def out_in(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The experts ``[E, out, in]`` of ``module``'s 3-D parameter ``p`` (a transposed view where the
    module stores ``[E, in, out]``, ``is_transposed``)."""
    return p.transpose(1, 2) if module.is_transposed else p


class ExpertMatrix:
    """Expert ``index``'s matrix of ``module.<param>`` (3-D), read and written as ``[out, in]``.

    Not an ``nn.Module``: it stands in for a layer inside :func:`sparse_kernels.prune` (weight,
    forward hooks). ``weight`` is a view into the parameter (a transposed view for
    ``is_transposed`` modules); copying into it changes the model. ``part`` (``"gate"`` or
    ``"up"``) selects the gate or the up rows of a gated ``gate_up_proj`` (the first and second
    half, or the even and odd rows where the module is not ``is_concatenated``), so that they are
    pruned as the separate ``gate_proj`` and ``up_proj`` layers of a dense model are."""

    def __init__(self, module: nn.Module, param: str, index: int, part: str | None = None):
        self._module = weakref.ref(module)  # (the per-module cache must not keep the module alive)
        self.param, self.index, self.part = param, index, part
        self.interleaved = not getattr(module, "is_concatenated", True)

    def rows(self, n: int):
        """The rows (output features) of the full matrix, out of ``n``, that this part holds."""
        if self.part is None:
            return slice(None)
        if self.interleaved:
            return slice(0, None, 2) if self.part == "gate" else slice(1, None, 2)
        return slice(0, n // 2) if self.part == "gate" else slice(n // 2, n)

    @property
    def module(self) -> nn.Module:
        m = self._module()
        if m is None:
            raise RuntimeError(f"ExpertMatrix {self.param}[{self.index}]: its experts module no longer exists")
        return m

    @property
    def weight(self) -> torch.Tensor:
        w = out_in(self.module, getattr(self.module, self.param).data)[self.index]
        return w[self.rows(w.shape[0])]

    @property
    def bias(self):
        b = getattr(self.module, self.param + "_bias", None)
        return None if b is None else b.data[self.index][self.rows(b.shape[1])]

    def register_forward_hook(self, hook, *, with_kwargs: bool = False):
        """``hook(matrix, args, kwargs, output)`` (``with_kwargs``) or ``hook(matrix, args, output)``
        each time the experts module multiplies this expert's inputs ``args[0]`` by this matrix
        (``output``: that product, without bias).  Returns a handle with ``remove()``."""
        return _tap(self.module).add(self, hook, with_kwargs)

    def __repr__(self) -> str:
        out, inp = self.weight.shape
        part = f".{self.part}" if self.part else ""
        return f"ExpertMatrix({type(self.module).__name__}.{self.param}[{self.index}]{part}, out={out}, in={inp})"


# one ExpertMatrix per (module, param, index), so that identities hold across calls
_MATRICES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def expert_matrices(module: nn.Module) -> dict:
    """``{"<param>[<e>]": ExpertMatrix}`` for every expert of ``module``'s 3-D parameters; a gated
    ``gate_up_proj`` gives two, ``"gate_up_proj[<e>].gate"`` and ``"gate_up_proj[<e>].up"``."""
    if not is_experts_module(module):
        return {}
    cache = _MATRICES.setdefault(module, {})
    out = {}
    for name, p in expert_params(module).items():
        split = name == "gate_up_proj" and getattr(module, "has_gate", True)
        for e in range(p.shape[0]):
            for part in (("gate", "up") if split else (None,)):
                key = f"{name}[{e}]" + (f".{part}" if part else "")
                if key not in cache:
                    cache[key] = ExpertMatrix(module, name, e, part)
                out[key] = cache[key]
    return out


class _Handle:
    def __init__(self, tap, key):
        self.tap, self.key = tap, key

    def remove(self) -> None:
        self.tap.remove(self.key)


class _Mode(TorchFunctionMode):
    """Calls every hook registered for the expert matrix a matmul's weight operand is a view of."""

    def __init__(self, tap):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _LINEAR or func in _MATMUL:
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(args[0], torch.Tensor):
                self.tap.dispatch(w, args[0], out, linear=func in _LINEAR)
        return out


class _ExpertsTap:
    """The hooks of one experts module's :class:`ExpertMatrix` stand-ins."""

    def __init__(self, module: nn.Module):
        self.module = weakref.ref(module)
        self.hooks: dict = {}  # key -> (matrix, hook, with_kwargs)
        self.next_key = 0
        self.handles: list = []
        self.all_experts = False
        self.calls: list = []  # per call in progress (nested calls stack): [mode, (config, impl) | None, matched]
        self.collecting = True  # False while the routed call of an all-experts call runs (already counted)

    def add(self, matrix: ExpertMatrix, hook, with_kwargs: bool) -> _Handle:
        key, self.next_key = self.next_key, self.next_key + 1
        self.hooks[key] = (matrix, hook, with_kwargs)
        if not self.handles:
            m = self.module()
            self.handles = [m.register_forward_pre_hook(self._pre, with_kwargs=True),
                            m.register_forward_hook(self._post, with_kwargs=True, always_call=True)]
        return _Handle(self, key)

    def remove(self, key) -> None:
        self.hooks.pop(key, None)
        if not self.hooks:
            for h in self.handles:
                h.remove()
            self.handles = []
            while self.calls:  # a call an interrupt (not an Exception: no always_call hook) left open
                self._end()

    # -- one call of the experts module
    def _pre(self, module, args, kwargs):
        cfg = getattr(module, "config", None)
        impl = getattr(cfg, "_experts_implementation", None)
        saved = None
        if impl is not None and impl != "eager":
            cfg._experts_implementation = "eager"  # the per-expert loop: one matmul per expert matrix
            saved = (cfg, impl)
        mode = _Mode(self)
        mode.__enter__()
        self.calls.append([mode, saved, 0])
        if self.all_experts:
            all_args, all_kwargs = _route_all(module, args, kwargs)
            module.forward(*all_args, **all_kwargs)  # statistics only (output discarded; hooks not re-run)
            self.collecting = False  # the routed call that follows was counted above
        return None

    def _post(self, module, args, kwargs, output):
        matched = self.calls[-1][2] if self.calls else 1
        self._end()
        if output is None:  # the forward raised: let its own error through
            return
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if matched == 0 and isinstance(hidden, torch.Tensor) and hidden.numel() and self.hooks:
            raise ValueError(f"{type(module).__name__}: processed {hidden.shape[0]} tokens but multiplied none of "
                             f"them by a recognizable expert matrix (its forward must call F.linear(x, P[e]) or "
                             f"x @ P[e] on a view of the 3-D parameter P); its experts cannot be calibrated: leave "
                             f"them out with layer_filter, or prune them with method='magnitude'")

    def _end(self) -> None:
        mode, saved, _ = self.calls.pop()
        self.collecting = True
        mode.__exit__(None, None, None)
        if saved is not None:
            cfg, impl = saved
            cfg._experts_implementation = impl

    def dispatch(self, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, linear: bool) -> None:
        m = self.module()
        for name, p in expert_params(m).items():
            if tuple(w.shape) != tuple(p.shape[1:]):
                continue
            if (w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                    or tuple(w.stride()) != tuple(p.stride()[1:])):
                continue
            offset = w.storage_offset() - p.storage_offset()
            if offset < 0 or offset % p.stride(0):
                continue
            index = offset // p.stride(0)
            if linear == bool(m.is_transposed):
                raise ValueError(f"{type(m).__name__}.{name}: the module says is_transposed={m.is_transposed} but "
                                 f"its forward multiplied expert {index} as " + ("F.linear(x, W[e])" if linear else
                                                                                 "x @ W[e]")
                                 + "; its expert matrices cannot be read as [out, in]")
            if self.calls:
                self.calls[-1][2] += 1
            if not self.collecting:
                return
            if self.all_experts:  # rows an expert overflowed on (tokens it never gets) stay out
                finite = torch.isfinite(x).all(-1)
                if not bool(finite.all()):
                    x, out = x[finite], out[finite]
            for matrix, hook, with_kwargs in list(self.hooks.values()):
                if matrix.param == name and matrix.index == index:
                    y = out[..., matrix.rows(out.shape[-1])]  # this part's output features
                    if with_kwargs:
                        hook(matrix, (x,), {}, y)
                    else:
                        hook(matrix, (x,), y)
            return


_TAPS: "weakref.WeakKeyDictionary[nn.Module, _ExpertsTap]" = weakref.WeakKeyDictionary()


def _tap(module: nn.Module) -> _ExpertsTap:
    if module not in _TAPS:
        _TAPS[module] = _ExpertsTap(module)
    return _TAPS[module]


class route_all_experts:
    """Context manager: while it is open, calibration calls of ``modules``' hooked experts send
    every token to every expert (weight 0 where the router did not pick it)."""

    def __init__(self, modules, enabled: bool = True):
        self.taps = [_tap(m) for m in modules] if enabled else []

    def __enter__(self):
        for t in self.taps:
            t.all_experts = True
        return self

    def __exit__(self, *exc):
        for t in self.taps:
            t.all_experts = False
        return False


def _route_all(module, args, kwargs):
    """``(args, kwargs)`` of an experts call ``(hidden_states, top_k_index, top_k_weights)``
    rewritten to route every token to every expert: index ``[T, E]`` = 0..E-1 on each row,
    weights ``[T, E]`` = the router's weight where it picked the expert, else 0 (the statistics
    call's output is discarded, the weights only keep its arithmetic ordinary)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"calibrate_all_experts: cannot read the routing of {type(module).__name__}'s call ({e}); "
                         f"pass calibrate_all_experts=False") from None
    names = list(inspect.signature(module.forward).parameters)
    if len(names) < 3 or names[1] not in bound.arguments or names[2] not in bound.arguments:
        raise ValueError(f"calibrate_all_experts: {type(module).__name__}.forward is not called as (hidden_states, "
                         f"expert indices, expert weights); pass calibrate_all_experts=False")
    index, weights = bound.arguments[names[1]], bound.arguments[names[2]]
    experts = next(iter(expert_params(module).values())).shape[0]
    if (not isinstance(index, torch.Tensor) or not isinstance(weights, torch.Tensor) or index.dim() != 2
            or weights.shape != index.shape or index.is_floating_point()):
        raise ValueError(f"calibrate_all_experts: {type(module).__name__} was called with expert indices and weights "
                         f"that are not two [tokens, k] tensors; pass calibrate_all_experts=False")
    index = index.long()
    valid = (index >= 0) & (index < experts)  # expert-parallel sentinels are dropped
    full = torch.zeros(index.shape[0], experts + 1, dtype=weights.dtype, device=weights.device)
    full.scatter_add_(1, torch.where(valid, index, experts), torch.where(valid, weights, torch.zeros_like(weights)))
    bound.arguments[names[1]] = torch.arange(experts, device=index.device).expand(index.shape[0], experts)
    bound.arguments[names[2]] = full[:, :experts].contiguous()
    return bound.args, bound.kwargs


def router_layers(block: nn.Module) -> set:
    """Names (inside ``block``) of the ``nn.Linear`` layers that route tokens in an MoE block: direct
    children of a module that holds an experts module, with 1 output (a shared-expert gate) or as
    many outputs as there are experts (a router written as a Linear layer)."""
    out = set()
    for name, mod in block.named_modules():
        experts = [c for c in mod.children() if is_experts_module(c)]
        if not experts:
            continue
        counts = {1} | {next(iter(expert_params(c).values())).shape[0] for c in experts}
        for child_name, child in mod.named_children():
            if isinstance(child, nn.Linear) and child.out_features in counts:
                out.add(f"{name}.{child_name}" if name else child_name)
    return out
