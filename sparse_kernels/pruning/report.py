"""What :func:`sparse_kernels.prune` reports (:class:`PruneReport`, :class:`LayerReport`), how
it measures the output errors in it, and its progress bar."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .layers import _get_weight, layer_input_rows

__all__ = ["LayerReport", "PruneReport"]


@dataclass
class LayerReport:
    """One pruned layer.

    ``shape``: the weight as ``[out_features, in_features]``.  ``sparsity``: fraction of zeros
    in its mask.  ``loss``: SparseGPT's own objective, ``sum (w - q)^2 / U_ii^2 / 2`` over the
    layer (None for other methods; not comparable across methods).  ``output_error``: the
    relative output error ``||X W_orig^T - X W_pruned^T||_F / ||X W_orig^T||_F`` (no bias),
    ``X`` being every input the layer received while the calibration ran through the
    *pruned* block (so upstream layers of the same block are already pruned); the same
    measure for every method, None without calibration or where it does not apply (the
    layer was not called in that pass, or the method replaced it or changed its shape).
    ``seconds``: time to prune it.  ``permutation_gain`` (``prune(permute=...)`` only): the
    relative rise of the N:M-kept importance that the input-channel permutation bought.
    ``perm`` (int64 ``[in_features]``, with ``permute=``): the permutation, ``W_pruned[:, perm]``
    is N:M.  ``dsnot_swaps`` (``prune(dsnot=...)`` only): how many grow/drop pairs DSnoT applied
    to the layer's mask.  ``calibration_tokens`` (expert matrices of mixture-of-experts models
    only): how many calibration rows that expert multiplied in the statistics pass (0: it was
    pruned by magnitude).  ``mask`` is kept only while :func:`prune` converts the layers.
    """

    block: int
    name: str
    shape: tuple
    sparsity: float
    loss: float | None
    seconds: float
    output_error: float | None = None
    mask: torch.Tensor | None = field(default=None, repr=False)
    permutation_gain: float | None = None
    perm: torch.Tensor | None = field(default=None, repr=False)
    dsnot_swaps: int | None = None
    calibration_tokens: int | None = None


@dataclass
class PruneReport:
    """What :func:`prune` did: one :class:`LayerReport` per layer (sparsity, SparseGPT loss,
    relative output error, time), per-block relative output error
    ``||block_pruned(x) - block_dense(x)|| / ||block_dense(x)||`` on the calibration inputs
    (None without calibration), total seconds."""

    method: str
    sparsity: str
    layers: list = field(default_factory=list)
    block_output_error: list = field(default_factory=list)
    seconds: float = 0.0
    #: with ``owl=``: ``{"m", "lmbda", "outlier_ratio": [per block], "block_sparsity": [per block]}``
    owl: dict | None = None
    #: with ``permute=`` and ``convert=``: the consumers whose permutation was folded into the
    #: layers before them (``"<block>.<path>"``, :func:`sparse_kernels.pruning.fold.fold_permutations`)
    folded_permutations: list = field(default_factory=list)
    #: advice about the pruned model (e.g. BatchNorm statistics to re-estimate), printed last
    notes: list = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        total = sum(_numel(r.shape) for r in self.layers)
        return sum(r.sparsity * _numel(r.shape) for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for r in d["layers"]:
            r.pop("mask", None)
            r.pop("perm", None)
        d["overall_sparsity"] = self.overall_sparsity
        return d

    def __str__(self) -> str:
        lines = [f"prune: method={self.method} sparsity={self.sparsity} layers={len(self.layers)} "
                 f"overall sparsity={self.overall_sparsity:.4f} time={self.seconds:.2f}s"]
        lines.append(f"{'block':>5}  {'layer':<32} {'shape':>14} {'sparsity':>8} {'loss':>12} {'out err':>9} "
                     f"{'time s':>8}")
        for r in self.layers:
            loss = "-" if r.loss is None else f"{r.loss:.4g}"
            out_err = "-" if r.output_error is None else f"{r.output_error:.4f}"
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.block:>5}  {r.name:<32} {shape:>14} {r.sparsity:>8.4f} {loss:>12} {out_err:>9} "
                         f"{r.seconds:>8.3f}")
        lines.append("loss: SparseGPT's objective sum (w-q)^2/d^2/2; out err: ||x W^T - x W_pruned^T|| / ||x W^T||")
        errs = [f"{e:.4f}" if e is not None else "-" for e in self.block_output_error]
        lines.append("block output rel. error: " + ", ".join(errs))
        gains = [r.permutation_gain for r in self.layers if r.permutation_gain is not None]
        if gains:
            lines.append(f"channel permutation: kept importance +{100 * sum(gains) / len(gains):.2f}% on average "
                         f"(min +{100 * min(gains):.2f}%, max +{100 * max(gains):.2f}%)")
        if self.owl is not None:
            lines.append(f"OWL (m={self.owl['m']:g}, lmbda={self.owl['lmbda']:g}) block sparsity: "
                         + ", ".join(f"{v:.4f}" for v in self.owl["block_sparsity"]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------ progress
class _SimpleProgress:
    def __init__(self, total, desc, file=None):
        self.total, self.desc, self.n, self.t0, self.file = total, desc, 0, time.perf_counter(), file

    def update(self, k=1):
        self.n += k
        print(f"{self.desc}: {self.n}/{self.total} blocks ({time.perf_counter() - self.t0:.1f} s)",
              file=self.file or sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="block")


class _NullProgress:
    def update(self, k=1):
        pass

    def close(self):
        pass



def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _block_error(pruned_out: list, dense_out: list) -> float:
    """``||pruned - dense|| / ||dense||`` over all batches; sums on the device, one host read."""
    dev = dense_out[0].device
    sums = torch.zeros(2, dtype=_sum_dtype(dev), device=dev)
    for p, d in zip(pruned_out, dense_out):
        d = d.float()
        sums[0] += (p.float() - d).pow(2).sum(dtype=sums.dtype)
        sums[1] += d.pow(2).sum(dtype=sums.dtype)
    num, den = sums.tolist()
    return math.sqrt(num / den) if den > 0 else 0.0


class _OutputError:
    """Forward hook summing ``||x (W0 - W)^T||^2`` and ``||x W0^T||^2`` over every call of one
    layer: ``W0`` its original weight ``[out, in]``, ``W`` the current (pruned) one, ``x`` the
    layer's input.  Products in float32, sums in float64 (float32 on MPS) on the layer's
    device: no host sync until :meth:`value` (one per layer)."""

    def __init__(self, w0: torch.Tensor):
        self.w0 = w0
        self.sums = torch.zeros(2, dtype=_sum_dtype(w0.device), device=w0.device)
        self.calls = 0
        self.applicable = True

    def hook(self, module, args, kwargs, output) -> None:  # registered with_kwargs=True
        w = _get_weight(module)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or w.shape != self.w0.shape:
            self.applicable = False
            return
        x = layer_input_rows(module, x.detach()).to(torch.float32)
        w0 = self.w0.to(torch.float32)
        y0 = F.linear(x, w0)
        e = F.linear(x, w0 - w.to(torch.float32))
        self.sums[0] += e.pow(2).sum(dtype=self.sums.dtype)
        self.sums[1] += y0.pow(2).sum(dtype=self.sums.dtype)
        self.calls += 1

    def value(self) -> float | None:
        if not self.applicable or self.calls == 0:
            return None
        num, den = self.sums.tolist()
        if den > 0:
            return math.sqrt(num / den)
        return 0.0 if num == 0 else math.inf
