"""Model-level speed and memory: weight bytes, greedy generation tokens/s, dense against sparse.

Tokens/s is measured on greedy decoding (``do_sample=False``) of exactly ``new_tokens`` tokens
(``min_new_tokens`` forces the length), after one short warm-up generation, repeated
``repeats`` times (interleaved across models by :func:`compare_generation`): the median with p20/p80 over the repeats is reported (STYLE.md).  The time
includes the prompt's prefill; with a short prompt the decode steps (batch 1, memory-bound:
where 2:4 weights help) dominate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, tied/shared tensors counted once."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def linear_bytes(model: nn.Module, names: list[str] | None = None) -> int:
    """Bytes held by the layers ``names`` (default: every nn.Linear and SparseLinear), bias included."""
    from ..nn import SparseLinear

    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))]
    total = 0
    for n in names:
        mod = model.get_submodule(n)
        total += sum(t.numel() * t.element_size() for t in list(mod.parameters(recurse=False))
                     + list(mod.buffers(recurse=False)))
    return total


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    tokens_per_s: float
    p20: float
    p80: float
    seconds: list

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _generate_once(model, tokenizer, enc, n: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out, time.perf_counter() - t0


@torch.no_grad()
def compare_generation(models: dict, tokenizer, prompt: str, *, new_tokens: int = 32, repeats: int = 3,
                       warmup_tokens: int = 4) -> dict[str, GenerationResult]:
    """Greedy continuations of ``prompt`` by every model of ``{label: model}`` and their speed.

    The timed runs are interleaved (model A, model B, A, B, ...) so a change in machine load
    hits every model alike; each model gets one warm-up generation first.
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"generate: new_tokens and repeats must be positive, got {new_tokens}, {repeats}")
    encs = {}
    for label, model in models.items():
        model.eval()
        encs[label] = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        _generate_once(model, tokenizer, encs[label], warmup_tokens)
    times: dict[str, list] = {k: [] for k in models}
    outs = {}
    for _ in range(repeats):
        for label, model in models.items():
            outs[label], t = _generate_once(model, tokenizer, encs[label], new_tokens)
            times[label].append(t)
    res = {}
    for label in models:
        new = outs[label][0, encs[label]["input_ids"].shape[1]:]
        rates = [new.numel() / t for t in times[label]]
        res[label] = GenerationResult(text=tokenizer.decode(new, skip_special_tokens=True), new_tokens=int(new.numel()),
                                      tokens_per_s=statistics.median(rates), p20=_quantile(rates, 0.2),
                                      p80=_quantile(rates, 0.8), seconds=times[label])
    return res


def generate(model, tokenizer, prompt: str, *, new_tokens: int = 32, repeats: int = 3,
             warmup_tokens: int = 4) -> GenerationResult:
    """Greedy continuation of ``prompt`` and its speed; see the module docstring."""
    return compare_generation({"m": model}, tokenizer, prompt, new_tokens=new_tokens, repeats=repeats,
                              warmup_tokens=warmup_tokens)["m"]


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, L, vocab]`` of ``ids [b, L]`` (no cache), as a detached tensor."""
    out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).detach()
