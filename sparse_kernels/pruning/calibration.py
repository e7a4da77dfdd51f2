"""Calibration plumbing of :func:`sparse_kernels.prune`: turning calibration data into model
calls, capturing the first block's inputs (hidden states plus every extra argument the model
passes), and running a block on stored inputs."""

from __future__ import annotations

from typing import Iterable

import torch

__all__: list[str] = []


class _Captured(Exception):
    """Raised by the first block's pre-hook: its inputs are stored, the rest of the model is skipped."""


def _vocab_size(model) -> int | None:
    """``config.vocab_size`` of a language model (its calibration is token ids), else None."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _is_hf(model) -> bool:
    return _vocab_size(model) is not None


def describe(x) -> str:
    """A short account of a batch for error messages: dtypes and shapes, not values."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    return type(x).__name__


def check_token_ids(ids, vocab_size: int | None, where: str = "calibration") -> None:
    """Raise unless ``ids`` are token ids a language model can embed: an integer tensor
    ``[n, seqlen]`` with ``n, seqlen >= 1``, every id ``>= 0`` and, when ``vocab_size`` is known,
    ``< vocab_size``."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: expected a LongTensor [n, seqlen] of token ids, got {describe(ids)}")
    if ids.dim() != 2:
        raise ValueError(f"{where}: expected token ids of shape [n, seqlen], got shape {tuple(ids.shape)}")
    if 0 in ids.shape:
        raise ValueError(f"{where}: needs at least one sequence of at least one token, got shape {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        need = ">= 0" if vocab_size is None else f"in [0, {vocab_size}) (the model's config.vocab_size)"
        raise ValueError(f"{where}: token ids must be {need}, got min {lo}, max {hi}")


def check_batch(batch, vocab_size: int | None, where: str, positional: bool = True) -> None:
    """Raise unless ``batch`` is one calibration batch: a tensor, a tuple/list of positional
    arguments (``positional``) or a dict of keyword arguments.  For a language model
    (``vocab_size`` given) its token ids (the tensor, the first positional argument or
    ``input_ids``) are checked by :func:`check_token_ids`."""
    kinds = (torch.Tensor, dict, tuple, list) if positional else (torch.Tensor, dict)
    if not isinstance(batch, kinds):
        raise TypeError(f"{where}: expected a batch: a tensor" + (", a tuple of positional arguments" if positional
                        else "") + f" or a dict of keyword arguments, got {type(batch).__name__}")
    if vocab_size is None:
        return
    if isinstance(batch, dict):
        if "input_ids" in batch:
            check_token_ids(batch["input_ids"], vocab_size, f"{where}['input_ids']")
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{where}: expected positional arguments led by the token ids, "
                             f"got an empty {type(batch).__name__}")
        check_token_ids(batch[0], vocab_size, f"{where}[0]")
    else:
        check_token_ids(batch, vocab_size, where)


def check_iterable(calibration) -> None:
    """Raise unless ``calibration`` (not a tensor) is an iterable of batches; a bare dict would be
    read as its keys."""
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected a tensor or an iterable of batches, got {type(calibration).__name__}")
    if isinstance(calibration, dict):
        raise TypeError("calibration: got a dict, which would be read as its keys; give a list of batches, each a "
                        "dict of keyword arguments: [{'input_ids': ids, ...}]")


def _batches(model, calibration, batch_size: int):
    """Yield model inputs: a tensor, a tuple (positional args) or a dict (keyword args)."""
    vocab = _vocab_size(model)
    if isinstance(calibration, torch.Tensor):
        if vocab is not None:
            check_token_ids(calibration, vocab)
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration: needs at least one sample, got shape {tuple(calibration.shape)}")
        for i in range(0, calibration.shape[0], batch_size):
            yield calibration[i:i + batch_size]
        return
    check_iterable(calibration)
    for i, b in enumerate(calibration):
        check_batch(b, vocab, f"calibration[{i}]")
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


def run_batches(model, batches, explain: bool = False) -> int:
    """Call ``model`` on each batch (moved to its device), under ``no_grad``; returns how many.
    A tensor is ``model(batch)``, a tuple ``model(*batch)``, a dict ``model(**batch)``.
    ``explain``: a batch the model fails on (RuntimeError, TypeError, IndexError; not out of
    memory) raises ValueError naming the batch's dtypes and shapes instead."""
    p0 = next(model.parameters(), None)
    n = 0
    with torch.no_grad():
        for b in batches:
            check_batch(b, None, f"calibration[{n}]")
            try:
                _call(model, b if p0 is None else _to(b, p0.device), {})
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, IndexError) as e:
                if not explain:
                    raise
                raise ValueError(f"calibration: {type(model).__name__} fails on batch {n}, {describe(b)} "
                                 f"({type(e).__name__}: {e}); give inputs of the shape and dtype its forward "
                                 f"takes") from e
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
