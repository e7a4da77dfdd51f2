"""Re-estimating BatchNorm statistics after pruning (no training).

Pruning a convolution changes the distribution of its outputs, but the BatchNorm after it keeps
the dense model's running mean and variance. :func:`recalibrate_batchnorm` resets them and
re-estimates them from calibration data: forward passes with only the BatchNorm layers in
training mode (Dropout and everything else in eval mode), no gradients, no weight changes.
The post-pruning "BatchNorm tuning" of Frantar & Alistarh's Optimal Brain Compression and of
Hubara et al.'s work on N:M sparsity; cheap, and the first thing to try on a pruned CNN.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["recalibrate_batchnorm"]


def _batches(calibration, batch_size: int) -> list:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration: needs at least one sample, got shape {tuple(calibration.shape)}")
        return list(calibration.split(batch_size))
    if isinstance(calibration, dict):
        return [calibration]
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise TypeError(f"calibration: expected a tensor, a dict of keyword arguments or an iterable of batches, "
                        f"got {type(calibration).__name__}")
    out = list(calibration)
    if not out:
        raise ValueError("calibration: empty; give at least one batch")
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration, batch_size: int = 32) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm layer of ``model``.

    Args:
        model: any ``nn.Module`` with ``BatchNorm1d/2d/3d`` (or SyncBatchNorm) layers that track
            running statistics.
        calibration: inputs: a tensor (split into ``batch_size`` rows, each called as
            ``model(batch)``), a dict of keyword arguments (one batch), or an iterable of batches
            (tensor, tuple of args or dict of kwargs).
        batch_size: rows per forward pass for a tensor ``calibration``.

    Every batch counts equally (a cumulative average: ``momentum=None`` while it runs); each
    layer's ``momentum`` and every module's train/eval mode are restored afterwards. A layer no
    batch reached keeps its statistics (with a warning); if a forward pass fails, every layer
    gets its statistics back. Returns the number of BatchNorm layers re-estimated. Raises
    ValueError when the model has none.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer that tracks running statistics")
    batches = _batches(calibration, batch_size)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    p0 = next(model.parameters(), None)
    reached = None
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for b in batches:
            if p0 is not None and isinstance(b, torch.Tensor):
                b = b.to(p0.device)
            if isinstance(b, dict):
                model(**b)
            elif isinstance(b, (tuple, list)):
                model(*b)
            else:
                model(b)
        reached = [int(m.num_batches_tracked) > 0 for m in bns]
    finally:
        for m, f in flags:
            m.training = f
        for m, mom in momenta:
            m.momentum = mom
        for k, (m, mean, var, n) in enumerate(saved):  # every layer after a failure; those no batch reached
            if reached is None or not reached[k]:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
    missed = reached.count(False)
    if missed:
        warnings.warn(f"recalibrate_batchnorm: {missed} of {len(bns)} BatchNorm layers saw no batch (a branch the "
                      f"forward pass does not take in eval mode?); their statistics were kept", stacklevel=3)
    return len(bns) - missed
