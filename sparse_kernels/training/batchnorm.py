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


def tracking_batchnorms(model: nn.Module) -> list:
    """The BatchNorm layers of ``model`` that keep running statistics (what
    :func:`recalibrate_batchnorm` re-estimates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration, batch_size: int = 32) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm layer of ``model``.

    Args:
        model: any ``nn.Module`` with ``BatchNorm1d/2d/3d`` (or SyncBatchNorm) layers that track
            running statistics.
        calibration: inputs: a tensor (split into ``batch_size`` rows, each called as
            ``model(batch)``), a dict of keyword arguments (one batch), or an iterable of batches
            (tensor: ``model(batch)``; tuple: ``model(*batch)``, so give a labelled DataLoader
            as ``(x for x, _ in loader)``; dict: ``model(**batch)``), read lazily. Tensors are
            moved to the model's device.
        batch_size: rows per forward pass for a tensor ``calibration``.

    The statistics are the average over all batches weighted by the values each batch gives the
    layer (a short last batch counts for what it holds); each layer's ``momentum`` and every
    module's train/eval mode are restored afterwards. A layer no batch reached keeps its
    statistics (with a warning); if a forward pass fails, every layer gets its statistics back.
    Returns the number of BatchNorm layers re-estimated. Raises ValueError when the model has
    none, when a lazy BatchNorm is not initialized yet, or when ``calibration`` is empty.
    """
    from torch.nn.parameter import is_lazy

    from ..pruning.calibration import iter_batches, run_batches

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    bns = tracking_batchnorms(model)
    if not bns:
        raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer that tracks running statistics")
    if any(is_lazy(m.running_mean) for m in bns):
        raise ValueError("model: a lazy BatchNorm is not initialized yet; run one forward pass first")
    batches = iter_batches(calibration, batch_size)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    seen = {id(m): 0 for m in bns}

    def weigh(m, args):  # momentum = this batch's share of all the values seen so far
        n = args[0].numel() // max(args[0].shape[1] if args[0].dim() > 1 else args[0].shape[0], 1)
        seen[id(m)] += n
        m.momentum = n / seen[id(m)]

    handles = [m.register_forward_pre_hook(weigh) for m in bns]
    reached = None
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.train()
        if run_batches(model, batches) == 0:
            raise ValueError("calibration: empty; give at least one batch")
        reached = [int(m.num_batches_tracked) > 0 for m in bns]
    finally:
        for h in handles:
            h.remove()
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
