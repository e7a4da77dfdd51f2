"""Recovery fine-tuning of a pruned language model with its masks fixed.

:func:`finetune` runs a short AdamW loop on token batches (the calibration text, say) after
pruning. Pruned weights stay exactly zero (:class:`~sparse_kernels.training.MaskedTraining`):

* layers with a ``weight_mask`` buffer or an unstructured SparseLinear keep their masks;
* 2:4 SparseLinear layers train their ``values``; the metadata, hence the pattern, is fixed;
* plain ``nn.Linear`` layers (and GPT-2 ``Conv1D``, stock convolutions) pruned in place (zeros, no
  mask), as ``prune(...)`` leaves them, get a mask ``weight != 0`` first when at least
  ``mask_zeros`` (default 10%) of their weights are zero, or when ``mask_layers`` names them; so
  do the 3-D expert parameters of mixture-of-experts modules (``gate_up_proj_mask``,
  ``down_proj_mask``).
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..pruning.calibration import check_token_ids
from ..pruning.experts import expert_params, is_experts_module
from ..pruning.layers import _is_conv1d, _stock_conv
from .masks import MaskedTraining, _is_24_sparse_linear, attach_mask, get_mask, masked_parameters, remove_mask
from .schedule import _check_int


def mask_zeros_(model: nn.Module, min_fraction: float | None = 0.1, *,
                layers: Iterable[str] | None = None) -> list[str]:
    """Attach ``weight_mask = weight != 0`` to every unmasked ``nn.Linear``, GPT-2 ``Conv1D`` and
    stock ``nn.Conv1d/2d/3d`` whose fraction of exact zeros is at least ``min_fraction`` (what
    :func:`sparse_kernels.prune` pruned in place), so that :class:`MaskedTraining` keeps the zeros;
    likewise ``<param>_mask`` for the 3-D expert parameters of mixture-of-experts modules
    (:mod:`sparse_kernels.pruning.experts`).  Returns the names of the layers it masked (an
    expert parameter as ``"<module>.<param>"``).

    ``layers``: names (as returned) of layers to mask too, whatever their fraction of zeros: the
    layers ``prune`` pruned, say, since a layer pruned to 5% (or by OWL) may fall under the
    threshold.  ``min_fraction=None`` masks only those.  A named layer that is masked already, or a
    2:4 SparseLinear (its pattern is fixed), is left as it is.

    The default 10% skips dense layers whose few exact zeros come from quantization (a
    GGUF-dequantized SmolLM2's tied ``lm_head`` has over 1% zeros); pruned layers have far more.

    Raises TypeError/ValueError on a ``min_fraction`` outside (0, 1], ValueError on a name in
    ``layers`` that is none of these layers (before masking anything)."""
    if min_fraction is not None:
        if isinstance(min_fraction, bool) or not isinstance(min_fraction, numbers.Real):
            raise TypeError(f"mask_zeros: expected a fraction in (0, 1] or None, got {type(min_fraction).__name__}")
        if not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"mask_zeros: expected a fraction in (0, 1] or None, got {min_fraction}")
    if isinstance(layers, str):
        raise TypeError(f"mask_layers: expected an iterable of layer names, got the str {layers!r}")
    wanted = set(layers or ())
    todo, known = [], set()
    for name, m in model.named_modules():
        if type(m) is nn.Linear or _is_conv1d(m) or _stock_conv(m):
            params = {"weight": m.weight}
        elif is_experts_module(m):
            params = expert_params(m)
        else:
            if _is_24_sparse_linear(m) or get_mask(m) is not None:
                known.add(name)
            continue
        for pname, p in params.items():
            qname = name if pname == "weight" else f"{name}.{pname}" if name else pname
            known.add(qname)
            # (a mask on a computed weight would do nothing)
            if get_mask(m, pname) is None and not parametrize.is_parametrized(m, pname):
                todo.append((qname, m, pname, p))
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"mask_layers: {unknown[:3]} (of {len(unknown)}) name no nn.Linear, Conv1D, convolution, "
                         f"expert parameter or masked layer of the model")
    names = []
    for qname, m, pname, p in todo:
        nz = p.detach() != 0
        if qname in wanted or (min_fraction is not None and 1.0 - nz.float().mean().item() >= min_fraction):
            attach_mask(m, nz, pname)
            names.append(qname)
    return names


def _batches(token_batches, batch_size: int, token_ids: bool, vocab_size: int | None):
    """The batches, cycled; with ``token_ids`` (the default loss) each is checked to hold token ids."""
    if isinstance(token_batches, torch.Tensor):
        if token_batches.dim() != 2 or token_batches.dtype != torch.long:
            raise ValueError(
                f"token_batches: expected a LongTensor [n, seqlen], got {token_batches.dtype} "
                f"with shape {tuple(token_batches.shape)}")
        if token_batches.shape[0] == 0:
            raise ValueError("token_batches: empty (0 sequences)")
        items = list(token_batches.split(batch_size))
        where = "token_batches"
    else:
        items = list(token_batches)
        if not items:
            raise ValueError("token_batches: empty iterable")
        where = "token_batches[{}]"
    if token_ids:
        for i, b in enumerate(items):
            _check_token_ids(where.format(i), b, vocab_size)
    return itertools.cycle(items)


def _check_token_ids(where: str, batch, vocab_size: int | None) -> None:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{where}: expected a LongTensor [b, seqlen] or a dict with 'input_ids', "
                        f"got {type(batch).__name__}")
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"{where}: expected a LongTensor [b, seqlen] of token ids with b >= 1 and seqlen >= 2 "
                         f"(the loss predicts each next token), got {ids.dtype} with shape {tuple(ids.shape)}")
    check_token_ids(ids, vocab_size, where)


def _check_positive(name: str, v, *, zero: bool = False, none: bool = False) -> None:
    """``v`` a finite real > 0 (``zero``: >= 0; ``none``: or None)."""
    if v is None and none:
        return
    what = f"a finite number {'>= 0' if zero else '> 0'}" + (" or None" if none else "")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__}")
    if not (math.isfinite(v) and (v >= 0 if zero else v > 0)):
        raise ValueError(f"{name}: expected {what}, got {v}")


def _causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    kw = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    if isinstance(batch, dict):
        out = model(**{"labels": batch["input_ids"], **batch, **kw})
    else:
        out = model(input_ids=batch, labels=batch, **kw)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError("model: returned no .loss for labels=input_ids; pass loss_fn=(model, batch) -> loss")
    return loss


def finetune(model: nn.Module, token_batches, steps: int, lr: float = 1e-5, *, batch_size: int = 4,
             weight_decay: float = 0.0, warmup: int = 0, max_grad_norm: float | None = 1.0,
             loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
             mask_zeros: float | None = 0.1, mask_layers: Iterable[str] | None = None, keep_masks: bool = False,
             log_every: int = 0, device: torch.device | str | None = None, progress: bool = False) -> dict:
    """Fine-tune ``model`` for ``steps`` AdamW steps with every pruning mask held fixed.

    Args:
        model: a causal LM returning ``.loss`` for ``labels=input_ids`` (Hugging Face style), or
            any module together with ``loss_fn(model, batch) -> scalar``.
        token_batches: a LongTensor ``[n, seqlen]`` (split into ``batch_size`` rows) or an
            iterable of batches (LongTensor ``[b, seqlen]`` or dicts with ``input_ids``); cycled.
            Without ``loss_fn`` every batch must hold token ids in ``[0, model.config.vocab_size)``
            and at least 2 tokens a row.
        steps: number of optimizer steps (>= 1).
        lr: peak learning rate (finite, > 0); linear warmup over ``warmup`` steps, then cosine
            decay to 10%.
        max_grad_norm: clip the gradient norm to this (finite, > 0); None: no clipping.
        mask_zeros: mask every layer with at least this fraction (in (0, 1]) of zeros; see
            :func:`mask_zeros_` (None disables).
        mask_layers: names of layers to mask whatever their fraction of zeros (the layers pruned,
            e.g. ``sparse_kernels.llm.demo.block_layer_names(model)``); with ``mask_zeros=None``
            exactly these.
        keep_masks: keep the ``weight_mask`` buffers that ``mask_zeros``/``mask_layers`` attached
            (default: remove them at the end, so the model keeps its original structure and
            state_dict keys; the pruned weights stay zero). Masks the model already had are never removed.
        device: where batches go (default: the model's first parameter's device).

    Returns a dict: ``steps``, ``losses`` (per step), ``loss_first``, ``loss_last`` (mean of the
    last 10% of steps), ``seconds``, ``masked_layers`` (how many layers kept masks).

    Raises TypeError/ValueError on a malformed argument or ``token_batches``, before changing the model.
    """
    for name, v, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                         ("log_every", log_every, 0)):
        _check_int(name, v, low)
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, zero=True)
    _check_positive("max_grad_norm", max_grad_norm, none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameters with requires_grad=True")
    device = device or params[0].device
    it = _batches(token_batches, batch_size, loss_fn is None,
                  getattr(getattr(model, "config", None), "vocab_size", None))
    masking = mask_zeros is not None or mask_layers is not None
    added = mask_zeros_(model, mask_zeros, layers=mask_layers) if masking else []
    loss_fn = loss_fn or _causal_lm_loss
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(t):
        if t < warmup:
            return (t + 1) / warmup
        frac = (t - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    mt = MaskedTraining(model, opt)
    mt.apply()
    was_training = model.training
    model.train()
    losses = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="finetune")
        except ImportError:
            bar = None
    try:
        for step in range(steps):
            batch = next(it)
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
            loss = loss_fn(model, batch)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if log_every and (step + 1) % log_every == 0:
                print(f"finetune step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    finally:
        mt.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    n_masked = len({q for q, _, _ in masked_parameters(model)})
    if not keep_masks:
        for name in added:  # a layer's name, or "<experts module>.<param>" for an expert parameter
            if not name:  # the model itself is the masked layer
                remove_mask(model)
                continue
            parent, _, last = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if isinstance(getattr(owner, last, None), nn.Module):
                remove_mask(getattr(owner, last))
            else:
                remove_mask(owner, last)
    tail = max(1, steps // 10)
    return {
        "steps": steps,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": sum(losses[-tail:]) / tail,
        "seconds": time.perf_counter() - t0,
        "masked_layers": n_masked,
    }


def lm_loss(model: nn.Module, token_batches: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss of a causal LM over ``token_batches`` [n, seqlen] (no grad)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in token_batches.split(batch_size):
            tot += float(_causal_lm_loss(model, b)) * b.shape[0]
            n += b.shape[0]
    model.train(was)
    return tot / n


__all__ = ["finetune", "lm_loss", "mask_zeros_"]
