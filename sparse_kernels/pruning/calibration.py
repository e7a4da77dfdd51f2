"""Calibration plumbing of :func:`sparse_kernels.prune`: turning calibration data into model
calls, capturing the first block's inputs (hidden states plus every extra argument the model
passes), and running a block on stored inputs."""

from __future__ import annotations

from typing import Iterable

import torch

__all__: list[str] = []


class _Captured(Exception):
    """Raised by the first block's pre-hook: its inputs are stored, the rest of the model is skipped."""


def _is_hf(model) -> bool:
    return getattr(getattr(model, "config", None), "vocab_size", None) is not None


def _batches(model, calibration, batch_size: int):
    """Yield model inputs: a tensor, a tuple (positional args) or a dict (keyword args)."""
    hf = _is_hf(model)
    if isinstance(calibration, torch.Tensor):
        if hf:
            if calibration.dtype not in (torch.int64, torch.int32):
                raise TypeError(
                    f"calibration: dtype {str(calibration.dtype).replace('torch.', '')} is not supported for a "
                    f"language model; expected token ids as a LongTensor [n, seqlen]"
                )
            if calibration.dim() != 2:
                raise ValueError(f"calibration: expected token ids of shape [n, seqlen], got shape {tuple(calibration.shape)}")
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration: needs at least one sample, got shape {tuple(calibration.shape)}")
        for i in range(0, calibration.shape[0], batch_size):
            yield calibration[i:i + batch_size]
        return
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected a tensor or an iterable of batches, got {type(calibration).__name__}")
    for i, b in enumerate(calibration):
        if hf and isinstance(b, torch.Tensor) and (b.dtype not in (torch.int64, torch.int32) or b.dim() != 2):
            raise ValueError(
                f"calibration[{i}]: expected token ids, a LongTensor [batch, seqlen], got "
                f"{str(b.dtype).replace('torch.', '')} of shape {tuple(b.shape)}"
            )
        yield b


def iter_batches(calibration, batch_size: int):
    """Model inputs from ``calibration`` for models that are not language models (no token-id
    checks): a tensor split into ``batch_size`` rows (a last chunk of one row joins the one
    before: BatchNorm cannot normalize a single row), a dict (one batch of keyword arguments), or
    any iterable of batches, read lazily (a tuple or list is a sequence of batches, as in
    :func:`sparse_kernels.prune`; give positional arguments as a list of tuples). The argument is
    checked now (TypeError for anything else, ValueError for an empty tensor); the caller counts
    the batches of an iterable."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration: needs at least one sample, got shape {tuple(calibration.shape)}")
        chunks = list(calibration.split(batch_size))
        if len(chunks) > 1 and chunks[-1].shape[0] == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        return iter(chunks)
    if isinstance(calibration, dict):
        return iter([calibration])
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected a tensor, a dict of keyword arguments or an iterable of batches, "
                        f"got {type(calibration).__name__}")
    return iter(calibration)


def run_batches(model, batches) -> int:
    """Call ``model`` on each batch (moved to its device), under ``no_grad``; returns how many.
    A tensor is ``model(batch)``, a tuple ``model(*batch)``, a dict ``model(**batch)``."""
    p0 = next(model.parameters(), None)
    n = 0
    with torch.no_grad():
        for b in batches:
            _call(model, b if p0 is None else _to(b, p0.device), {})
            n += 1
    return n


def _call(model, batch, extra: dict):
    if isinstance(batch, dict):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def _capture_inputs(model, first_block, calibration, batch_size, device):
    """Run the calibration through ``model`` up to ``first_block``; return its inputs as
    ``[(hidden, args, kwargs), ...]`` (one entry per batch)."""
    store = []

    def hook(module, args, kwargs):
        if not args:
            raise ValueError(
                "prune: the first block was called without a positional hidden-states argument; "
                "pass blocks=[...] whose first block takes the activations as its first argument"
            )
        hidden, rest = args[0], tuple(args[1:])
        store.append((hidden.detach(), rest, dict(kwargs)))
        raise _Captured

    extra = {"use_cache": False} if _is_hf(model) else {}
    p0 = next(model.parameters(), None)
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in _batches(model, calibration, batch_size):
            if p0 is not None:
                batch = _to(batch, p0.device)
            try:
                _call(model, batch, extra)
            except _Captured:
                continue
            raise ValueError("calibration: a batch ran through the model without reaching the first block")
    finally:
        handle.remove()
    if not store:
        raise ValueError("calibration: is empty; give at least one batch")
    return store if device is None else [_to(s, device) for s in store]


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block(block, inputs):
    return [_block_out(block(h, *args, **kw)).detach() for h, args, kw in inputs]
