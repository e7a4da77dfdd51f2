"""``SparseLinear`` (a drop-in nn.Linear on sparse kernels) and ``sparsify(model)``.

Three storage modes:

* ``pattern="2:4"``: parameter ``values [out, in_pad/2]`` and buffer ``meta [out, in_pad/16]``
  int16 (canonical 2:4 format, :mod:`sparse_kernels.reference.sparse24`), ``in_pad`` =
  ``in_features`` rounded up to 16 (x is zero-padded internally, the padded weight columns are
  zero, so the answer is unchanged).  Forward is :func:`sparse_kernels.sparse_linear`.  ``values``
  is trainable; the pattern (meta) is fixed.
* ``pattern=None`` (any sparsity): parameter ``weight [out, in]`` and buffer ``mask [out,
  ceil(in/8)]`` uint8 bit-packed (:func:`sparse_kernels.pack_mask`).  Forward is
  :func:`sparse_kernels.masked_linear`; ``weight.grad`` is masked.
* ``pattern="bitmask"`` (any sparsity, compressed): parameter ``values [nnz]`` (the nonzeros) and
  buffers ``bitmask [out, ceil(in/8)]`` uint8 and ``row_ptr [out + 1]`` int64
  (:mod:`sparse_kernels.reference.bitmask`): (1 - sparsity) of the value bytes plus one bit per
  weight.  Forward is :func:`sparse_kernels.bitmask_linear`; ``values`` is trainable, the pattern
  fixed; ``load_state_dict`` sizes ``values`` from the stored nonzeros.

Permuted 2:4 (``SparseLinear(..., permuted=True)`` or ``from_dense(..., in_perm=p)``; channel
permutation as in NVIDIA ASP and RIA): an int64 buffer ``in_perm [in_features]``, a permutation of
``range(in_features)``.  ``values``/``meta`` hold the 2:4 weight ``S`` in permuted column order and
the layer computes ``y = x[..., in_perm] @ S.T + bias``; the dense weight in the original column
order is ``W = S[:, argsort(in_perm)]`` (``W[:, in_perm] = S``), which ``dense_weight()`` and
``to_dense()`` return.  The gather runs on x's device before padding and every backend (no host
sync; ``torch.compile(fullgraph=True)`` tested on CPU; CUDA-graph capture: tested in
tests/test_sparse_linear_perm.py, not yet run on a GPU).  ``in_perm`` is in the state_dict
only for permuted layers, and ``load_state_dict`` checks that it is a permutation (ValueError
naming the layer otherwise).

Checkpoints (:mod:`sparse_kernels.llm.checkpoint`) store unstructured layers of both kinds
bitmask-compressed and rebuild them as the same kind of layer, with ``weight != 0`` as the pattern
(a kept weight that is exactly zero comes back pruned).

Caches (not in the state_dict, rebuilt by ``refresh_cache()``, which ``from_dense``, ``.to()``/
``.cuda()``, ``load_state_dict`` and ``eval()`` call):

* ``meta_dev``: the CUDA backend's device-layout metadata (``reorder_meta_mma`` from
  sparse_kernels/ops/mma_layout.py, looked up lazily; no cache when it is absent);
* the backend choice per (device, dtype, batch bucket, backend, ``SPARSE_KERNELS_BACKEND``), so
  a forward skips the public wrapper's validation and selection (``_forward_resolved``);
* cuSPARSELt: with ``backend="cusparselt"`` on a CUDA build with cuSPARSELt, ``eval()`` stores
  ``torch._cslt_compress(W)`` (rows padded to 16, :func:`sparse_kernels.ops.linear.cslt_pack`)
  and eval-mode forwards call ``torch._cslt_sparse_mm`` on it directly; in training mode the op
  compresses per call (correct, slow).  After changing ``values`` by hand call
  ``refresh_cache()``.  It is a second copy of the weight, so ``auto`` never makes it; it pays
  only for prefill-sized batches: on the H200 (2026-11-28) torch's cuSPARSELt path beat cuBLAS
  only at batch 8192 on the 14336-wide shapes (1.33-1.53x) and cost 0.53-1.3 ms per call at any
  batch (a plan per call), against 0.012-0.065 ms for the mma.sp kernel at batch 1-16.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import _registry as R
from .ops import _validate as V
from .ops import bitmask as B
from .ops import int4 as I4
from .ops import linear as L
from .ops import permutation as P
from .ops.sparse24 import compress_2to4, decompress_2to4

PATTERNS = ("2:4", None, "bitmask")


def _check_pattern(pattern):
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: got {pattern!r}, expected '2:4', None (any sparsity, weight + bit-packed mask) "
                         f"or 'bitmask' (any sparsity, compressed: nonzeros + bitmask)")


def _refresh_after_load(module, incompatible_keys):
    module.refresh_cache()  # a module-level function, so whole models still pickle


def check_in_perm(in_perm, in_features: int, name: str = "in_perm") -> None:
    """Raise unless ``in_perm`` is a 1-D integer tensor holding each of ``0..in_features-1`` once.

    TypeError for a non-tensor or a non-integer dtype; ValueError for a wrong shape, an index out
    of range or a repeated index (the message names ``name``, what it got and what it needs).
    Tensors on the meta device are checked for dtype and shape only.
    """
    if not isinstance(in_perm, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D integer tensor (a permutation of range({in_features})), "
                        f"got {type(in_perm).__name__}")
    if in_perm.dtype.is_floating_point or in_perm.dtype.is_complex or in_perm.dtype == torch.bool:
        raise TypeError(f"{name}: dtype {in_perm.dtype} is not an integer dtype; expected int64 indices "
                        f"(a permutation of range({in_features}))")
    if tuple(in_perm.shape) != (in_features,):
        raise ValueError(f"{name}: shape {tuple(in_perm.shape)} must be ({in_features},), one index per input "
                         f"channel (in_features={in_features})")
    if in_perm.device.type == "meta" or in_features == 0:
        return
    p = in_perm.detach().long()
    bad = ((p < 0) | (p >= in_features)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{name}: holds {int(p[i])} at position {i}, outside 0..{in_features - 1}; "
                         f"expected a permutation of range({in_features})")
    counts = torch.bincount(p, minlength=in_features)
    dup = (counts > 1).nonzero()
    if dup.numel():
        d = int(dup[0, 0])
        raise ValueError(f"{name}: index {d} appears {int(counts[d])} times; a permutation of "
                         f"range({in_features}) holds each index exactly once")


class _StoredLinear(nn.Module):
    """What SparseLinear and SparseLinearInt4 share: ``to_dense`` from their ``dense_weight()``,
    ``nbytes`` and ``drop_permutation``."""

    def to_dense(self) -> nn.Linear:
        """An equivalent nn.Linear (the dense weight in ``dense_weight()``'s dtype)."""
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def nbytes(self) -> int:
        """Bytes of the stored tensors: this module's parameters and buffers (values + meta, weight +
        mask, or codes + meta + scales; bias, in_perm)."""
        ts = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in ts)

    def drop_permutation(self) -> None:
        """Forget ``in_perm`` without touching the stored weight: from now on the layer expects
        its input already permuted (``x[..., in_perm]``), e.g. because the layers producing it
        were permuted instead (:func:`sparse_kernels.pruning.fold.fold_permutations`)."""
        if self._buffers.get("in_perm") is None:
            raise ValueError("drop_permutation: this layer has no input permutation (in_perm is None)")
        self._buffers["in_perm"] = None
        refresh = getattr(self, "refresh_cache", None)
        if refresh is not None:
            refresh()


class SparseLinear(_StoredLinear):
    """A Linear layer stored sparse.  Build it with :meth:`from_dense`.

    Args:
        in_features, out_features, bias: as nn.Linear.
        pattern: ``"2:4"``, None or ``"bitmask"`` (see the module docstring).
        backend: forwarded to the op (``auto | reference | cpp | cuda | triton | cusparselt |
            decompress``);
            None means ``SPARSE_KERNELS_BACKEND`` or ``auto``.
        permuted: 2:4 only: the layer has an input-channel permutation, buffer ``in_perm``
            (identity until :meth:`from_dense` or ``load_state_dict`` fills it; see the module
            docstring).  Raises ValueError with another pattern.
    """

    def __init__(self, in_features, out_features, bias=True, pattern="2:4", backend=None, device=None, dtype=None,
                 permuted: bool = False):
        super().__init__()
        _check_pattern(pattern)
        if permuted and pattern != "2:4":
            raise ValueError(f"permuted: an input-channel permutation is only supported with pattern='2:4' (it "
                             f"moves weights between groups of 4), got pattern={pattern!r}")
        if backend is not None:
            R.requested_backend(backend)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.pattern, self.backend = pattern, backend
        fk = dict(device=device, dtype=dtype or torch.get_default_dtype())
        if pattern == "2:4":
            self.in_padded = (self.in_features + 15) // 16 * 16
            self.values = nn.Parameter(torch.zeros(out_features, self.in_padded // 2, **fk))
            self.register_buffer("meta", torch.full((out_features, self.in_padded // 16), 0x4444,
                                                     dtype=torch.int16, device=device))
        elif pattern == "bitmask":  # an all-zero weight until from_dense / load_state_dict fills it
            self.in_padded = self.in_features
            self.values = nn.Parameter(torch.zeros(0, **fk))
            self.register_buffer("bitmask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int64, device=device))
        else:
            self.in_padded = self.in_features
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, **fk))
            self.register_buffer("mask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                     device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        self.register_buffer("in_perm", torch.arange(self.in_features, device=device) if permuted else None)
        self._meta_dev = None
        self._cslt = None
        self._ops = {}  # backend name per (device, dtype, batch bucket, backend, env): _forward_resolved
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern="2:4", mask=None, backend=None, in_perm=None) -> "SparseLinear":
        """Build from ``linear``.  2:4: ``mask`` (bool ``[out, in]``, must be 2:4) or, if None, the
        2 largest |w| of every group of 4 along ``in``.  None: ``mask`` (bool, any pattern) or, if
        None, ``weight != 0``.  Raises ValueError for a mask of the wrong shape or not 2:4.

        ``in_perm`` (2:4 only): a permutation of ``range(in_features)`` (1-D integer tensor); the
        layer stores ``(W * mask)[:, in_perm]``, which must then be 2:4 (``mask`` is in the original
        column order, like the weight), or with ``mask=None`` the 2 largest |w| of every group of 4
        of ``W[:, in_perm]``.  Stored as int64 on the weight's device.  Raises TypeError/ValueError
        for an ``in_perm`` that is not such a permutation (:func:`check_in_perm`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_pattern(pattern)
        w = linear.weight.detach()
        out_f, in_f = w.shape
        if in_perm is not None:
            if pattern != "2:4":
                raise ValueError(f"in_perm: an input-channel permutation is only supported with pattern='2:4' (it "
                                 f"moves weights between groups of 4), got pattern={pattern!r}")
            check_in_perm(in_perm, in_f)
            in_perm = in_perm.to(device=w.device, dtype=torch.int64)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != (out_f, in_f):
                raise ValueError(f"mask: shape {tuple(mask.shape)} must equal the weight's {(out_f, in_f)}")
            mask = mask.to(w.device)
            w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        mod = cls(in_f, out_f, bias=linear.bias is not None, pattern=pattern, backend=backend,
                  device=w.device, dtype=w.dtype, permuted=in_perm is not None)
        with torch.no_grad():
            if pattern == "2:4":
                if in_perm is not None:
                    w = w.index_select(1, in_perm)
                    mod.in_perm.copy_(in_perm)
                wp = F.pad(w, (0, mod.in_padded - in_f))
                try:
                    values, meta = compress_2to4(wp, prune=mask is None)
                except ValueError as e:
                    after = " after the permutation in_perm (mask[:, in_perm])" if in_perm is not None else ""
                    raise ValueError(f"mask: is not 2:4 sparse along in_features{after} ({e})") from None
                mod.values.copy_(values)
                mod.meta.copy_(meta)
            elif pattern == "bitmask":
                values, bitmask, row_ptr = B.compress_bitmask(w, mask)
                mod.values.data = values.clone()
                mod.bitmask.copy_(bitmask)
                mod.row_ptr.copy_(row_ptr)
            else:
                m = mask if mask is not None else w != 0
                mod.weight.copy_(w)
                mod.mask.copy_(L.pack_mask(m))
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        mod.refresh_cache()
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``[out_features, in_features]`` (zeros where pruned), in the
        original column order (a permuted layer's stored columns are put back: ``W[:, in_perm] = S``)."""
        if self.pattern == "2:4":
            s = decompress_2to4(self.values.detach(), self.meta)[:, : self.in_features]
            if self.in_perm is not None:
                s = s.index_select(1, torch.argsort(self.in_perm))
            return s
        if self.pattern == "bitmask":
            return B.decompress_bitmask(self.values.detach(), self.bitmask, self.row_ptr, self.in_features)
        m = L.unpack_mask(self.mask, self.in_features)
        return torch.where(m, self.weight.detach(), torch.zeros((), dtype=self.weight.dtype, device=m.device))

    # ------------------------------------------------------------ caches
    def refresh_cache(self) -> None:
        """Rebuild the device-layout caches (see the module docstring)."""
        self._meta_dev = None
        self._cslt = None
        self._ops = {}
        perm = self._buffers.get("in_perm")
        if perm is not None and perm.dtype != torch.int64:  # e.g. load_state_dict(..., assign=True)
            self._buffers["in_perm"] = perm.long()
        if self.pattern != "2:4" or self.meta.device.type != "cuda":
            return
        fn = L.reorder_meta_mma_fn()
        if fn is not None and self.values.dtype in (torch.float16, torch.bfloat16):
            self._meta_dev = fn(self.meta)
        if self.backend == "cusparselt" and not self.training and R.why_unavailable(
                "sparse_linear", "cusparselt", "cuda") is None:
            with torch.no_grad():
                self._cslt = L.cslt_pack(self.values.detach(), self.meta, self.values.dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._buffers.setdefault("in_perm", None)  # a module pickled before permuted layers existed

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.refresh_cache()
        return out

    def train(self, mode: bool = True):
        out = super().train(mode)
        if not mode:
            self.refresh_cache()
        return out

    # ------------------------------------------------------------ forward
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a bitmask layer's values hold its nonzeros: size them from what is loaded (in place, so
        # the Parameter object an optimizer may hold stays the same)
        v = state_dict.get(prefix + "values")
        if self.pattern == "bitmask" and isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape != self.values.shape:
            self.values.data = torch.empty(v.shape, dtype=self.values.dtype, device=self.values.device)
        if self.pattern == "2:4":
            self._check_loaded_perm(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_perm(self, state_dict, prefix):
        """A 2:4 state dict's values are in permuted order exactly when it holds ``in_perm``: loading
        one kind into the other kind of layer would compute a wrong answer, so it raises (even with
        strict=False), as does an ``in_perm`` that is not a permutation."""
        p = state_dict.get(prefix + "in_perm")
        layer = prefix[:-1] or type(self).__name__
        if self.in_perm is None:
            if p is not None:
                raise ValueError(f"{prefix}in_perm: layer {layer!r} was built without a channel permutation but the "
                                 f"state dict holds one (its values are in permuted column order); build it with "
                                 f"SparseLinear(..., permuted=True)")
            return
        if p is None:
            if prefix + "values" in state_dict:
                raise ValueError(f"{prefix}in_perm: layer {layer!r} is permuted (permuted=True) but the state dict "
                                 f"has values and no in_perm (a layer without a permutation); build it with "
                                 f"permuted=False")
            return
        check_in_perm(p, self.in_features, f"{prefix}in_perm (layer {layer!r})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            return L.masked_linear(x, self.weight, self.mask, self.bias, backend=self.backend)
        if self.pattern == "bitmask":
            return B.bitmask_linear(x, self.values, self.bitmask, self.row_ptr, self.bias, backend=self.backend)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dim is {x.shape[-1]} but this layer has in_features={self.in_features}")
        perm = self._buffers.get("in_perm")
        if perm is not None:
            try:
                x = P.gather_validated(x, perm)
            except (RuntimeError, ValueError):
                V.same_device(x=x, in_perm=perm)  # the clear error for the common cause
                raise
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        if self._cslt is not None and not self.training and x.device.type == "cuda" and x.dtype == self.values.dtype:
            lead = x.shape[:-1]
            y = L.cslt_matmul(x.reshape(-1, x.shape[-1]), self._cslt, self.bias, self.out_features)
            return y.reshape(*lead, self.out_features)
        md = self._meta_dev if self._meta_dev is not None and self._meta_dev.device == x.device else None
        if (not torch.compiler.is_compiling() and x.dtype == self.values.dtype and x.device == self.values.device
                and (self.bias is None or self.bias.dtype == x.dtype)):
            return self._forward_resolved(x, md)
        # anything unusual (compile, a dtype or device mismatch: the wrapper's errors) goes the long way
        return L.sparse_linear(x, self.values, self.meta, self.bias, backend=self.backend, meta_dev=md)

    def _forward_resolved(self, x, md):
        """The wrapper's work minus what the module guarantees: values/meta/bias were validated
        when they were built or loaded, and the backend choice is cached per (device, dtype,
        batch bucket, self.backend, SPARSE_KERNELS_BACKEND).  Buckets are powers of two,
        floor(log2(batch)): the same choice as the exact batch because every CUDA threshold is a
        power of two (ops/linear.py).  A 64x64 layer at batch 1 on CPU: 19.2 -> 14.6 us per call
        (nn.Linear: 4.0 us; the op alone: 5.6 us), 2026-11-28."""
        x2 = x.reshape(-1, self.in_padded)
        m = x2.shape[0]
        bucket = m.bit_length()
        key = (x2.device.type, x2.dtype, bucket, self.backend, os.environ.get(R.ENV_VAR))
        ops = self.__dict__.get("_ops")
        if ops is None:  # a module pickled before this cache existed
            ops = self._ops = {}
        b = ops.get(key)  # a backend name, not the op: modules must stay picklable
        if b is None:
            rep_m = 1 << (bucket - 1) if bucket else 0
            b = ops[key] = R.select("sparse_linear", self.backend, x2.device, rep_m, x2.dtype, 2 * self.values.numel())
        y = R.get_op("sparse_linear", b)(x2, self.values, self.meta, self.bias, md)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        pat = {"2:4": "2:4", "bitmask": "bitmask"}.get(self.pattern, "unstructured")
        perm = ", permuted=True" if self.in_perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={pat}, backend={self.backend or 'auto'}{perm}")


# ---------------------------------------------------------------- sparsify
@dataclass
class SparsifyReport:
    """What :func:`sparsify` did: swapped layer names, skipped ``(name, reason)``, bytes of the
    swapped layers' weights before and after."""

    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    #: which function made the report (``"sparsify"`` or ``"quantize_int4"``), for ``str()``
    action: str = "sparsify"

    def __str__(self):
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        return (f"{self.action}: {len(self.layers)} layers swapped, {len(self.skipped)} skipped, "
                f"{self.bytes_before} -> {self.bytes_after} bytes ({ratio:.3f}x)")


def _matches(rule, name, mod) -> bool:
    if callable(rule):
        return bool(rule(name, mod))
    rules = [rule] if isinstance(rule, str) else list(rule)
    return any(fnmatch.fnmatchcase(name, r) for r in rules)


def sparsify(model: nn.Module, pattern="2:4", include=None, exclude=None, backend=None,
             permute=False) -> SparsifyReport:
    """Replace every eligible ``nn.Linear`` of ``model`` by :class:`SparseLinear`, in place.

    Eligible: exactly ``nn.Linear`` (subclasses such as MultiheadAttention's out_proj are read
    directly by their owner and are skipped) with a float16/bfloat16/float32 weight, whose
    qualified name matches ``include`` (None = all) and not ``exclude``.  ``include``/``exclude``
    are a glob (``"layers.*.mlp.*"``), a list of globs, or a callable ``(name, module) -> bool``.
    2:4 keeps the 2 largest |w| of each group of 4; ``pattern=None`` and ``"bitmask"`` keep
    ``weight != 0``.  ``permute`` (2:4 only: ``True`` or a dict of
    :func:`sparse_kernels.pruning.permutation.find_permutation` options): first search each
    layer's input-channel permutation that keeps the most ``|w|`` under 2:4, and store the layer
    permuted (``in_perm``); layers whose ``in_features`` is not a multiple of 4 stay unpermuted.

    Mixture-of-experts models: with ``pattern="2:4"`` (and no ``permute``) each transformers
    experts module (3-D expert weights) matched by ``include``/``exclude`` becomes a
    :class:`SparseExperts` keeping the 2 largest |w| of every group of 4 of each expert's matrix;
    with other patterns they are listed in ``skipped``.
    """
    _check_pattern(pattern)
    from .pruning.experts import is_experts_module
    from .pruning.permutation import find_permutation, parse_permute, search_options

    perm_opts = parse_permute(permute)
    if perm_opts is not None and pattern != "2:4":
        raise ValueError(f"permute: only a 2:4 pattern has groups to rearrange, got pattern={pattern!r}")
    if perm_opts is not None and "fold" in perm_opts:
        raise ValueError("permute: 'fold' is an option of prune(); after sparsify call "
                         "sparse_kernels.pruning.fold_permutations(model)")
    report = SparsifyReport()
    for name, mod in list(model.named_modules()):
        if name and is_experts_module(mod) and (include is None or _matches(include, name, mod)) and not (
                exclude is not None and _matches(exclude, name, mod)):
            if pattern != "2:4" or perm_opts is not None:
                report.skipped.append((name, "an experts module: SparseExperts holds 2:4 experts without a "
                                             "permutation"))
                continue
            _swap(model, name, mod, SparseExperts.from_experts(mod, backend=backend, prune=True), report)
            continue
        if not isinstance(mod, nn.Linear):
            continue
        if name == "":
            report.skipped.append((name, "the model itself is a Linear; use SparseLinear.from_dense"))
            continue
        if type(mod) is not nn.Linear:
            report.skipped.append((name, f"{type(mod).__name__} is a subclass of nn.Linear"))
            continue
        if include is not None and not _matches(include, name, mod):
            continue
        if exclude is not None and _matches(exclude, name, mod):
            continue
        if mod.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            report.skipped.append((name, f"weight dtype {mod.weight.dtype}"))
            continue
        if perm_opts is not None and mod.in_features % 4 == 0:
            perm = find_permutation(mod.weight.detach().float().abs(), 2, 4, **search_options(perm_opts))
            new = SparseLinear.from_dense(mod, pattern=pattern, backend=backend, in_perm=perm)
        else:
            new = SparseLinear.from_dense(mod, pattern=pattern, backend=backend)
        _swap(model, name, mod, new, report)
    return report


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module, report: SparsifyReport) -> None:
    """Put ``new`` in place of the submodule ``name`` (``old``), in its training mode, and count it."""
    new.train(old.training)
    report.bytes_before += sum(t.numel() * t.element_size() for t in old.parameters(recurse=False))
    report.bytes_after += new.nbytes()
    model.set_submodule(name, new)
    report.layers.append(name)


# ---------------------------------------------------------------- 2:4 int4
class SparseLinearInt4(_StoredLinear):
    """A 2:4 Linear layer whose kept values are int4 codes times a float scale per row and group
    of ``group_size`` input columns (:mod:`sparse_kernels.reference.int4`): buffers ``qvalues
    [out, in_pad/4]`` uint8, ``meta [out, in_pad/16]`` int16, ``scales [out, in_pad/group_size]``,
    parameter ``bias``.  ``in_pad`` = ``in_features`` rounded up to 16 (padded columns hold zeros);
    ``group_size=None`` means one scale per row (``in_pad``).  Forward is
    :func:`sparse_kernels.sparse_linear_int4` (fp32 accumulation of the exact weight
    ``(code - 8) * scale``); an ``in_perm`` buffer as in :class:`SparseLinear` when permuted.

    For inference: the weight is frozen (grads flow to x and bias).  Build with
    :meth:`from_sparse` (round-to-nearest of a 2:4 :class:`SparseLinear`), :meth:`from_dense`, or
    :func:`quantize_int4` on a whole model; :meth:`to_sparse` gives the 16-bit 2:4 layer back.
    A float16 weight in 2:4 int4 takes 1/3 of the bytes of the 16-bit 2:4 layer (codes and meta;
    scales add 2 bytes per row and group).
    """

    def __init__(self, in_features, out_features, bias=True, group_size: int | None = 128, backend=None, device=None,
                 dtype=None, permuted: bool = False):
        super().__init__()
        if backend is not None:
            R.requested_backend(backend)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.in_padded = (self.in_features + 15) // 16 * 16
        g = self.in_padded if group_size is None else group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 16 or self.in_padded % g:
            raise ValueError(f"group_size: got {group_size!r}; it must be None (one scale per row) or a positive "
                             f"multiple of 16 dividing the padded in_features {self.in_padded}")
        self.group_size, self.backend = g, backend
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("qvalues", torch.full((out_features, self.in_padded // 4), 0x88, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("meta", torch.full((out_features, self.in_padded // 16), 0x4444, dtype=torch.int16,
                                                device=device))
        self.register_buffer("scales", torch.ones(out_features, self.in_padded // g, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("in_perm", torch.arange(self.in_features, device=device) if permuted else None)

    @classmethod
    def from_sparse(cls, layer: SparseLinear, group_size: int | None = 128) -> "SparseLinearInt4":
        """Round-to-nearest symmetric int4 of a 2:4 SparseLinear's kept values (scale = max |v| / 7
        per row and group, in the layer's dtype); pattern, permutation and bias are kept."""
        if not isinstance(layer, SparseLinear) or layer.pattern != "2:4":
            raise TypeError(f"layer: expected a 2:4 SparseLinear, got {type(layer).__name__}"
                            f"{'' if not isinstance(layer, SparseLinear) else f' with pattern {layer.pattern!r}'}")
        from .reference.int4 import quantize_values

        v = layer.values.detach()
        backend = layer.backend if layer.backend in R.OPS["sparse_linear_int4"].backends else None
        mod = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, group_size=group_size,
                  backend=backend, device=v.device, dtype=v.dtype, permuted=layer.in_perm is not None)
        q, s = quantize_values(v, mod.group_size)
        mod.qvalues.copy_(q)
        mod.meta.copy_(layer.meta)
        mod.scales.copy_(s)
        with torch.no_grad():
            if layer.bias is not None:
                mod.bias.copy_(layer.bias.detach())
            if layer.in_perm is not None:
                mod.in_perm.copy_(layer.in_perm)
        return mod

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, in_perm=None,
                   backend=None) -> "SparseLinearInt4":
        """The layer whose weight is ``codes * scales`` exactly: ``codes`` integer ``[out, in]`` in
        ``-8..7``, 2:4 along ``in`` (zeros where pruned), ``scales [out, in / G]`` (its dtype is
        the layer's); ``in_perm`` as in :class:`SparseLinear` (``codes`` in permuted column
        order).  What :func:`sparse_kernels.prune` with ``int4=`` builds.  Raises ValueError for
        codes out of range or not 2:4, or scales that do not fit."""
        from .reference.int4 import pack_codes

        V.tensor("scales", scales, ndim=2, dtypes=V.FLOAT_DTYPES)
        if (not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.is_floating_point()
                or codes.dtype == torch.bool or codes.is_complex()):
            raise TypeError(f"codes: expected a 2-D integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        out_f, in_f = codes.shape
        if in_f % 16:
            raise ValueError(f"codes: {in_f} input features; int4 groups (a multiple of 16 columns) need a multiple "
                             f"of 16")
        if scales.shape[0] != out_f or scales.shape[1] == 0 or in_f % scales.shape[1]:
            raise ValueError(f"scales: shape {tuple(scales.shape)} does not fit codes {tuple(codes.shape)}")
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("scales: must be finite")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,)):
            raise ValueError(f"bias: expected shape ({out_f},), got {tuple(getattr(bias, 'shape', ()))}")
        if bool(((codes < -8) | (codes > 7)).any()):
            raise ValueError("codes: int4 codes must lie in -8..7")
        mod = cls(in_f, out_f, bias=bias is not None, group_size=in_f // scales.shape[1], backend=backend,
                  device=codes.device, dtype=scales.dtype, permuted=in_perm is not None)
        cp = F.pad(codes.to(torch.float16), (0, mod.in_padded - in_f))
        try:
            values, meta = compress_2to4(cp)
        except ValueError as e:
            raise ValueError(f"codes: not 2:4 along in_features ({e})") from None
        mod.qvalues.copy_(pack_codes(values.to(torch.int16)))
        mod.meta.copy_(meta)
        mod.scales.copy_(scales)
        with torch.no_grad():
            if bias is not None:
                mod.bias.copy_(bias)
            if in_perm is not None:
                check_in_perm(in_perm, in_f)
                mod.in_perm.copy_(in_perm)
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, group_size: int | None = 128, mask=None, in_perm=None
                   ) -> "SparseLinearInt4":
        """:meth:`SparseLinear.from_dense` (2:4: ``mask`` or the 2 largest |w| of each group of 4),
        then :meth:`from_sparse`."""
        return cls.from_sparse(SparseLinear.from_dense(linear, "2:4", mask=mask, in_perm=in_perm), group_size)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight in the original column order, in
        ``dtype`` (default: the scales' dtype; float32 is exact)."""
        from .reference.int4 import decompress_2to4_int4

        w = decompress_2to4_int4(self.qvalues, self.meta, self.scales, dtype or self.scales.dtype)
        w = w[:, : self.in_features]
        if self.in_perm is not None:
            w = w.index_select(1, torch.argsort(self.in_perm))
        return w

    def to_sparse(self) -> SparseLinear:
        """The 16-bit 2:4 SparseLinear with the dequantized values (in the scales' dtype)."""
        from .reference.int4 import dequantize_values

        dtype = self.scales.dtype
        sl = SparseLinear(self.in_features, self.out_features, bias=self.bias is not None, pattern="2:4",
                          backend=self.backend, device=self.qvalues.device, dtype=dtype,
                          permuted=self.in_perm is not None)
        with torch.no_grad():
            sl.values.copy_(dequantize_values(self.qvalues, self.scales).to(dtype))
            sl.meta.copy_(self.meta)
            if self.bias is not None:
                sl.bias.copy_(self.bias.detach())
            if self.in_perm is not None:
                sl.in_perm.copy_(self.in_perm)
        sl.refresh_cache()
        return sl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dim is {x.shape[-1]} but this layer has in_features={self.in_features}")
        perm = self._buffers.get("in_perm")
        if perm is not None:
            x = P.gather_validated(x, perm)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return I4.sparse_linear_int4(x, self.qvalues, self.meta, self.scales, bias, backend=self.backend)

    def extra_repr(self) -> str:
        perm = ", permuted=True" if self.in_perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern=2:4 int4, group_size={self.group_size}, backend={self.backend or 'auto'}{perm}")


def quantize_int4(model: nn.Module, group_size: int | None = 128, include=None, exclude=None) -> SparsifyReport:
    """Replace every 2:4 :class:`SparseLinear` of ``model`` by :class:`SparseLinearInt4` and every
    :class:`SparseExperts` by :class:`SparseExpertsInt4` (round-to-nearest int4 of their kept
    values), in place; ``include``/``exclude`` as in :func:`sparsify`.  A module whose padded input
    features the group size does not divide is skipped (listed with the reason).  A replaced
    module's forward pre-hooks move to its int4 module.  Returns the report (bytes before and
    after)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
                                   or group_size % 16):
        raise ValueError(f"group_size: got {group_size!r}; it must be None (one scale per row) or a positive "
                         f"multiple of 16")
    report = SparsifyReport(action="quantize_int4")
    for name, mod in list(model.named_modules()):
        linear = isinstance(mod, SparseLinear) and mod.pattern == "2:4"
        if not (linear or type(mod) is SparseExperts) or name == "":
            continue
        if include is not None and not _matches(include, name, mod):
            continue
        if exclude is not None and _matches(exclude, name, mod):
            continue
        pads = [mod.in_padded] if linear else [getattr(mod, n + "_meta").shape[-1] * 16 for n in mod.params]
        if group_size is not None and any(p % group_size for p in pads):
            report.skipped.append((name, f"group_size {group_size} does not divide its {'/'.join(map(str, pads))} "
                                         f"(padded) input features"))
            continue
        new = (SparseLinearInt4 if linear else SparseExpertsInt4).from_sparse(mod, group_size)
        # forward pre-hooks on the layer's input (e.g. compressed-tensors' emulated activation
        # quantization) apply to the int4 layer as well
        new._forward_pre_hooks.update(mod._forward_pre_hooks)
        new._forward_pre_hooks_with_kwargs.update(mod._forward_pre_hooks_with_kwargs)
        report.bytes_before += mod.nbytes()
        report.bytes_after += new.nbytes()
        model.set_submodule(name, new)
        report.layers.append(name)
    return report


# ---------------------------------------------------------------- mixture-of-experts
def _check_experts_module(experts) -> None:
    from .pruning.experts import is_experts_module

    if not isinstance(experts, nn.Module) or not is_experts_module(experts):
        raise TypeError(f"experts: expected a transformers experts module with 3-D expert parameters "
                        f"(gate_up_proj / down_proj), got {type(experts).__name__}")


class SparseExperts(nn.Module):
    """The routed experts of a Hugging Face transformers MoE block with 2:4 weights.

    Built by :meth:`from_experts` from a transformers experts module (3-D ``gate_up_proj`` /
    ``up_proj`` / ``down_proj`` parameters, :mod:`sparse_kernels.pruning.experts`) whose every
    expert matrix is 2:4 along its input (what ``prune(..., sparsity="2:4")`` leaves): for each
    such parameter ``P`` it stores parameter ``P_values [E, out, in_pad/2]`` and buffer
    ``P_meta [E, out, in_pad/16]`` int16 (the 2:4 format of each expert's ``[out, in]`` matrix,
    whatever the module's ``is_transposed``; ``in_pad`` = ``in`` rounded up to 16, the input is
    zero-padded as in :class:`SparseLinear`), keeps the biases (``P_bias``), copies of the
    activation, gate (the module's own ``_apply_gate``: SwiGLU, gpt-oss's clamped gate, ...),
    post-expert norm and configuration attributes, and computes what transformers' experts
    implementations compute: for each expert that tokens were routed to,
    ``down(gate(gate_up(x)))`` with :func:`sparse_kernels.sparse_linear` (fp32 accumulation),
    scaled by the routing weight and summed per token in fp32. A 16-bit expert weight takes 9/16
    of its dense bytes. ``values`` is trainable (the pattern, in ``meta``, is fixed).

    Build one with :meth:`from_experts` (also to load a state_dict into: from the transformers
    module of the same shapes); ``dense_param(P)`` gives the parameter back in the source layout.
    """

    #: names the module sets itself (a source attribute of that name is not copied)
    _OWN = ("params", "backend", "source_class", "num_experts", "in_features", "training", "config", "group_size")

    def __init__(self):  # use from_experts
        super().__init__()
        self.params: list = []
        self.in_features: dict = {}
        self.backend = None
        self._gate_fn = None

    @classmethod
    def _shell(cls, src: nn.Module, backend) -> "SparseExperts":
        """A module of this class without weights, with ``src``'s configuration: ``src`` is a
        transformers experts module (its attributes, children and ``_apply_gate``) or a
        SparseExperts (its copies of them)."""
        import copy

        if backend is not None:
            R.requested_backend(backend)
        mod = cls()
        mod.backend = backend
        mod.source_class = src.source_class if isinstance(src, SparseExperts) else type(src).__name__
        for k, v in vars(src).items():  # configuration: has_gate, has_bias, alpha, limit, act_fn functions, ...
            if k.startswith("_") or k in SparseExperts._OWN or isinstance(v, (torch.Tensor, nn.Module)):
                continue
            setattr(mod, k, v if callable(v) else copy.deepcopy(v))
        for name, child in src.named_children():  # act_fn, post_expert_norm (copies: not shared)
            mod.add_module(name, copy.deepcopy(child))
        mod._gate_fn = src._gate_fn if isinstance(src, SparseExperts) else getattr(type(src), "_apply_gate", None)
        return mod

    @classmethod
    def from_experts(cls, experts: nn.Module, backend=None, prune: bool = False) -> "SparseExperts":
        """``experts``: a transformers experts module; ``backend`` for ``sparse_linear``; ``prune``:
        keep the 2 largest |w| of every group of 4 instead of requiring 2:4 (ValueError naming the
        parameter otherwise)."""
        from .pruning.experts import expert_params, out_in

        _check_experts_module(experts)
        mod = SparseExperts._shell(experts, backend)
        for name, p in expert_params(experts).items():
            w = out_in(experts, p.detach())
            e, out_f, in_f = w.shape
            in_pad = (in_f + 15) // 16 * 16
            w = F.pad(w, (0, in_pad - in_f)).reshape(e * out_f, in_pad).contiguous()
            try:
                values, meta = compress_2to4(w, prune=prune)
            except ValueError as err:
                raise ValueError(f"experts: {name} is not 2:4 along its input features ({err}; rows count "
                                 f"expert by expert, {out_f} per expert); prune it to 2:4 first or pass "
                                 f"prune=True") from None
            mod.register_parameter(name + "_values", nn.Parameter(values.reshape(e, out_f, in_pad // 2)))
            mod.register_buffer(name + "_meta", meta.reshape(e, out_f, in_pad // 16))
            mod._add_bias(name, getattr(experts, name + "_bias", None))
            mod.in_features[name] = in_f
        return mod._finish(experts)

    def _add_bias(self, name: str, b) -> None:
        self.register_parameter(name + "_bias", None if b is None else nn.Parameter(b.detach().clone()))
        self.params.append(name)

    def _finish(self, src: nn.Module) -> "SparseExperts":
        """Check the parameter set, take ``src``'s training mode, and run one token through expert
        0, so that what forward needs (act_fn, gate attributes) is known to be there."""
        if "down_proj" not in self.params or not ({"gate_up_proj", "up_proj"} & set(self.params)):
            raise ValueError(f"experts: {self.source_class} has {self.params}; {type(self).__name__} needs "
                             f"down_proj and gate_up_proj or up_proj")
        meta = getattr(self, self.params[0] + "_meta")
        self.num_experts = int(meta.shape[0])
        self.train(src.training)
        first = "gate_up_proj" if "gate_up_proj" in self.params else "up_proj"
        dtype = self._dtype()
        try:
            x = torch.zeros(1, self.in_features[first], dtype=dtype, device=meta.device)
            with torch.no_grad():
                self(x, torch.zeros(1, 1, dtype=torch.long, device=x.device), torch.ones(1, 1, dtype=dtype,
                                                                                        device=x.device))
        except Exception as err:  # noqa: BLE001 - any failure means the copy cannot run
            raise TypeError(f"experts: {self.source_class}'s forward cannot be reproduced from what "
                            f"{type(self).__name__} copies ({type(err).__name__}: {err})") from None
        return self

    def _dtype(self) -> torch.dtype:
        """The dtype the experts compute in (that of the stored values)."""
        return getattr(self, self.params[0] + "_values").dtype

    def nbytes(self) -> int:
        """Bytes of the stored expert weights (values, meta, biases)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters(recurse=False))
                   + list(self.buffers(recurse=False)))

    def dense_param(self, name: str) -> torch.Tensor:
        """The dense 3-D parameter ``name`` in the source module's layout (``[E, in, out]`` where it
        was ``is_transposed``)."""
        v, m = getattr(self, name + "_values").detach(), getattr(self, name + "_meta")
        e, out_f, half = v.shape
        w = decompress_2to4(v.reshape(e * out_f, half), m.reshape(e * out_f, -1)).reshape(e, out_f, half * 2)
        from .pruning.experts import out_in

        return out_in(self, w[:, :, :self.in_features[name]]).contiguous()

    def _bias(self, name, x, e):
        b = getattr(self, name + "_bias")
        return None if b is None else b[e] if b.dtype == x.dtype else b[e].to(x.dtype)

    def _linear(self, name, x, e):
        values = getattr(self, name + "_values")
        pad = values.shape[-1] * 2 - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad))
        return L.sparse_linear(x, values[e], getattr(self, name + "_meta")[e], self._bias(name, x, e),
                               backend=self.backend)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        first = "gate_up_proj" if "gate_up_proj" in self.params else "up_proj"
        for e in torch.unique(top_k_index).tolist():  # one host sync, as the eager loop's nonzero()
            if e < 0 or e >= self.num_experts:  # expert-parallel sentinels
                continue
            token_idx, pos = torch.where(top_k_index == e)
            h = self._linear(first, hidden_states[token_idx], e)
            if getattr(self, "has_gate", True) and first == "gate_up_proj" and self._gate_fn is not None:
                h = self._gate_fn(self, h)
            else:
                h = self.act_fn(h)
            y = self._linear("down_proj", h, e)
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            out.index_add_(0, token_idx, y.float() * top_k_weights[token_idx, pos, None].float())
        return out.to(hidden_states.dtype)

    def _pattern(self) -> str:
        return "2:4"

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}=[{self.num_experts}, {getattr(self, n + '_meta').shape[1]}, "
                           f"{self.in_features[n]}]" for n in self.params)
        return f"{self.source_class}, {self._pattern()}, {shapes}, backend={self.backend or 'auto'}"


class SparseExpertsInt4(SparseExperts):
    """:class:`SparseExperts` whose kept values are int4 codes times a float scale per row and group
    of ``group_size`` input columns, as :class:`SparseLinearInt4` per expert: for each expert
    parameter ``P``, buffers ``P_qvalues [E, out, in_pad/4]`` uint8, ``P_meta [E, out, in_pad/16]``
    int16 and ``P_scales [E, out, in_pad/group_size]`` (``group_size=None``: one scale per row),
    parameter ``P_bias``.  Forward is :class:`SparseExperts`' on
    :func:`sparse_kernels.sparse_linear_int4` (the exact weight ``(code - 8) * scale``, fp32
    accumulation).  For inference: the weights are frozen (grads flow to the input and biases).

    Build with :meth:`from_sparse` (round-to-nearest of a 2:4 SparseExperts; what
    :func:`quantize_int4` does), :meth:`from_codes` (exact codes and scales: what
    ``prune(..., int4=G, convert=True)`` builds from SparseGPT's joint quantization);
    :meth:`to_sparse` gives the 16-bit SparseExperts back.  A 16-bit expert weight takes about 1/3
    of the bytes of its 16-bit 2:4 form (codes and meta; scales add 2 bytes per row and group).
    """

    @classmethod
    def _allocate(cls, src: nn.Module, shapes: dict, biases: dict, group_size, dtype, device,
                  backend) -> "SparseExpertsInt4":
        """The shell of ``src`` with zero-code buffers for ``shapes`` (``{P: (E, out, in)}``)."""
        mod = cls._shell(src, backend)
        for name, (e, out_f, in_f) in shapes.items():
            in_pad = (in_f + 15) // 16 * 16
            g = in_pad if group_size is None else group_size
            if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 16 or in_pad % g:
                raise ValueError(f"group_size: got {group_size!r}; it must be None (one scale per row) or a positive "
                                 f"multiple of 16 dividing the padded input features of {name} ({in_pad})")
            mod.register_buffer(name + "_qvalues", torch.full((e, out_f, in_pad // 4), 0x88, dtype=torch.uint8,
                                                              device=device))
            mod.register_buffer(name + "_meta", torch.full((e, out_f, in_pad // 16), 0x4444, dtype=torch.int16,
                                                           device=device))
            mod.register_buffer(name + "_scales", torch.ones(e, out_f, in_pad // g, dtype=dtype, device=device))
            mod._add_bias(name, biases.get(name))
            mod.in_features[name] = in_f
        mod.group_size = group_size
        return mod

    @classmethod
    def from_sparse(cls, experts: SparseExperts, group_size: int | None = 128) -> "SparseExpertsInt4":
        """Round-to-nearest symmetric int4 of a 2:4 SparseExperts' kept values (scale = max |v| / 7
        per row and group, in the values' dtype); meta, biases and configuration are kept."""
        from .reference.int4 import quantize_values

        if not isinstance(experts, SparseExperts) or isinstance(experts, SparseExpertsInt4):
            raise TypeError(f"experts: expected a 16-bit SparseExperts, got {type(experts).__name__}")
        shapes, biases = {}, {}
        for n in experts.params:
            v = getattr(experts, n + "_values")
            shapes[n] = (v.shape[0], v.shape[1], experts.in_features[n])
            biases[n] = getattr(experts, n + "_bias")
        v = getattr(experts, experts.params[0] + "_values")
        backend = experts.backend if experts.backend in R.OPS["sparse_linear_int4"].backends else None
        mod = cls._allocate(experts, shapes, biases, group_size, v.dtype, v.device, backend)
        for n in experts.params:
            v = getattr(experts, n + "_values").detach()
            e, out_f, half = v.shape
            q, s = quantize_values(v.reshape(e * out_f, half), half * 2 // mod._groups(n))
            getattr(mod, n + "_qvalues").copy_(q.reshape(e, out_f, -1))
            getattr(mod, n + "_meta").copy_(getattr(experts, n + "_meta"))
            getattr(mod, n + "_scales").copy_(s.reshape(e, out_f, -1))
        return mod._finish(experts)

    @classmethod
    def from_codes(cls, experts: nn.Module, codes: dict, scales: dict, backend=None) -> "SparseExpertsInt4":
        """The experts whose weights are ``codes * scales`` exactly: ``experts`` a transformers experts
        module (configuration and biases; its weights are not read), and for each of its expert
        parameters ``P``, ``codes[P]`` integer ``[E, out, in]`` in ``-8..7``, 2:4 along ``in`` (a
        multiple of 16), and ``scales[P]`` ``[E, out, in / G]`` (their dtype is the experts'), one
        group size ``G`` for all.  ValueError naming the parameter for codes out of range or not
        2:4, or scales that do not fit."""
        from .pruning.experts import expert_params

        _check_experts_module(experts)
        params = expert_params(experts)
        if not isinstance(codes, dict) or not isinstance(scales, dict) or set(codes) != set(params) \
                or set(scales) != set(params):
            raise ValueError(f"codes, scales: expected dicts with the keys {sorted(params)}, got "
                             f"{sorted(codes) if isinstance(codes, dict) else type(codes).__name__} and "
                             f"{sorted(scales) if isinstance(scales, dict) else type(scales).__name__}")
        flat, groups = {}, set()
        for n in params:
            c, s = codes[n], scales[n]
            if not isinstance(c, torch.Tensor) or c.dim() != 3 or not isinstance(s, torch.Tensor) or s.dim() != 3 \
                    or c.shape[:2] != s.shape[:2]:
                raise ValueError(f"codes[{n!r}], scales[{n!r}]: expected 3-D tensors [E, out, in] and [E, out, groups], "
                                 f"got {tuple(getattr(c, 'shape', ()))} and {tuple(getattr(s, 'shape', ()))}")
            try:
                flat[n] = SparseLinearInt4.from_codes(c.reshape(-1, c.shape[-1]), s.reshape(-1, s.shape[-1]))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{n}: {err}") from None
            groups.add(flat[n].group_size)
        if len(groups) != 1:
            raise ValueError(f"scales: one group size for every expert parameter, got {sorted(groups)}")
        shapes = {n: tuple(codes[n].shape) for n in params}
        biases = {n: getattr(experts, n + "_bias", None) for n in params}
        s0 = scales[next(iter(params))]
        mod = cls._allocate(experts, shapes, biases, groups.pop(), s0.dtype, s0.device, backend)
        for n, lin in flat.items():
            e, out_f = shapes[n][:2]
            for part in ("qvalues", "meta", "scales"):
                getattr(mod, f"{n}_{part}").copy_(getattr(lin, part).reshape(e, out_f, -1))
        return mod._finish(experts)

    def _groups(self, name: str) -> int:
        """Scale groups per row of parameter ``name``."""
        return getattr(self, name + "_scales").shape[-1]

    def _dtype(self) -> torch.dtype:
        return getattr(self, self.params[0] + "_scales").dtype

    def to_sparse(self) -> SparseExperts:
        """The 16-bit 2:4 SparseExperts with the dequantized values (in the scales' dtype)."""
        from .reference.int4 import dequantize_values

        se = SparseExperts._shell(self, self.backend)
        for n in self.params:
            q, s = getattr(self, n + "_qvalues"), getattr(self, n + "_scales")
            e, out_f = q.shape[:2]
            v = dequantize_values(q.reshape(e * out_f, -1), s.reshape(e * out_f, -1)).to(s.dtype)
            se.register_parameter(n + "_values", nn.Parameter(v.reshape(e, out_f, -1)))
            se.register_buffer(n + "_meta", getattr(self, n + "_meta").clone())
            se._add_bias(n, getattr(self, n + "_bias"))
            se.in_features[n] = self.in_features[n]
        return se._finish(self)

    def dense_param(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense 3-D parameter ``name`` in the source module's layout, in ``dtype`` (default:
        the scales' dtype; float32 is exact)."""
        from .pruning.experts import out_in
        from .reference.int4 import decompress_2to4_int4

        q, m, s = (getattr(self, f"{name}_{p}") for p in ("qvalues", "meta", "scales"))
        e, out_f = q.shape[:2]
        w = decompress_2to4_int4(q.reshape(e * out_f, -1), m.reshape(e * out_f, -1), s.reshape(e * out_f, -1),
                                 dtype or s.dtype).reshape(e, out_f, -1)
        return out_in(self, w[:, :, :self.in_features[name]]).contiguous()

    def _linear(self, name, x, e):
        q = getattr(self, name + "_qvalues")
        pad = q.shape[-1] * 4 - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad))
        return I4.sparse_linear_int4(x, q[e], getattr(self, name + "_meta")[e], getattr(self, name + "_scales")[e],
                                     self._bias(name, x, e), backend=self.backend)

    def _pattern(self) -> str:
        return f"2:4 int4, group_size={self.group_size}"
