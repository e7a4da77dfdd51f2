"""Recovery fine-tuning of a pruned language model with its masks fixed.

:func:`finetune` runs a short AdamW loop on token batches (the calibration text, say) after
pruning. Pruned weights stay exactly zero (:class:`~sparse_kernels.training.MaskedTraining`):

* layers with a ``weight_mask`` buffer or an unstructured SparseLinear keep their masks;
* 2:4 SparseLinear layers train their ``values``; the metadata, hence the pattern, is fixed;
* plain ``nn.Linear`` layers (and GPT-2 ``Conv1D``, stock convolutions) pruned in place (zeros, no
  mask), as ``prune(...)`` leaves them, get a mask ``weight != 0`` first when at least
  ``mask_zeros`` (default 10%) of their weights are zero; so do the 3-D expert parameters of
  mixture-of-experts modules (``gate_up_proj_mask``, ``down_proj_mask``).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..pruning.experts import expert_params, is_experts_module
from ..pruning.layers import _is_conv1d, _stock_conv
from .masks import MaskedTraining, attach_mask, get_mask, masked_parameters, remove_mask


def mask_zeros_(model: nn.Module, min_fraction: float = 0.1) -> list[str]:
    """Attach ``weight_mask = weight != 0`` to every unmasked ``nn.Linear``, GPT-2 ``Conv1D`` and
    stock ``nn.Conv1d/2d/3d`` whose fraction of exact zeros is at least ``min_fraction`` (what
    :func:`sparse_kernels.prune` pruned in place), so that :class:`MaskedTraining` keeps the zeros;
    likewise ``<param>_mask`` for the 3-D expert parameters of mixture-of-experts modules
    (:mod:`sparse_kernels.pruning.experts`).  Returns the names of the layers it masked (an
    expert parameter as ``"<module>.<param>"``).

    The default 10% skips dense layers whose few exact zeros come from quantization (a
    GGUF-dequantized SmolLM2's tied ``lm_head`` has over 1% zeros); pruned layers have far more."""
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"mask_zeros: expected a fraction in (0, 1], got {min_fraction}")
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear or _is_conv1d(m) or _stock_conv(m):
            params = {"weight": m.weight}
        elif is_experts_module(m):
            params = expert_params(m)
        else:
            continue
        for pname, p in params.items():
            # (a mask on a computed weight would do nothing)
            if get_mask(m, pname) is None and not parametrize.is_parametrized(m, pname):
                nz = p.detach() != 0
                if 1.0 - nz.float().mean().item() >= min_fraction:
                    attach_mask(m, nz, pname)
                    names.append(name if pname == "weight" else f"{name}.{pname}" if name else pname)
    return names


def _batches(token_batches, batch_size: int):
    if isinstance(token_batches, torch.Tensor):
        if token_batches.dim() != 2 or token_batches.dtype != torch.long:
            raise ValueError(
                f"token_batches: expected a LongTensor [n, seqlen], got {token_batches.dtype} "
                f"with shape {tuple(token_batches.shape)}")
        if token_batches.shape[0] == 0:
            raise ValueError("token_batches: empty (0 sequences)")
        chunks = list(token_batches.split(batch_size))
        return itertools.cycle(chunks)
    items = list(token_batches)
    if not items:
        raise ValueError("token_batches: empty iterable")
    return itertools.cycle(items)


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
             mask_zeros: float | None = 0.1, keep_masks: bool = False, log_every: int = 0,
             device: torch.device | str | None = None, progress: bool = False) -> dict:
    """Fine-tune ``model`` for ``steps`` AdamW steps with every pruning mask held fixed.

    Args:
        model: a causal LM returning ``.loss`` for ``labels=input_ids`` (Hugging Face style), or
            any module together with ``loss_fn(model, batch) -> scalar``.
        token_batches: a LongTensor ``[n, seqlen]`` (split into ``batch_size`` rows) or an
            iterable of batches (LongTensor ``[b, seqlen]`` or dicts with ``input_ids``); cycled.
        steps: number of optimizer steps (>= 1).
        lr: peak learning rate; linear warmup over ``warmup`` steps, then cosine decay to 10%.
        mask_zeros: see :func:`mask_zeros_` (None disables).
        keep_masks: keep the ``weight_mask`` buffers that ``mask_zeros`` attached (default: remove
            them at the end, so the model keeps its original structure and state_dict keys; the
            pruned weights stay zero). Masks the model already had are never removed.
        device: where batches go (default: the model's first parameter's device).

    Returns a dict: ``steps``, ``losses`` (per step), ``loss_first``, ``loss_last`` (mean of the
    last 10% of steps), ``seconds``, ``masked_layers`` (how many layers kept masks).

    Raises ValueError on ``steps < 1``, ``lr <= 0`` or malformed ``token_batches``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameters with requires_grad=True")
    device = device or params[0].device
    it = _batches(token_batches, batch_size)
    added = mask_zeros_(model, mask_zeros) if mask_zeros else []
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
            if max_grad_norm:
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
