"""Perplexity of a causal LM on one token stream, by the standard sliding window.

Windows of ``window`` tokens start every ``stride`` tokens.  Each token is scored once, by
the first window that reaches it, with all the context that window holds before it:

* window ``k`` covers ``[begin, end)`` with ``begin = k * stride``, ``end = min(begin + window, n)``;
* it scores the tokens ``[max(prev_end, begin + 1), end)`` (a window cannot score its own
  first token, which has no context inside it); ``prev_end`` is the previous window's end;
* the walk stops at the first window that reaches ``n``.

With ``stride == window`` (the default) the windows are disjoint and each window's first
token goes unscored; with ``stride < window`` every token but the stream's first is scored
and each has at least ``window - stride`` tokens of context.  This is the Hugging Face
"perplexity of fixed-length models" computation, but the NLL is summed per token and divided
by the number of scored tokens, so the result is exact rather than a mean of window means.

``ppl = exp(sum of token NLLs / number of scored tokens)``, computed in fp32/fp64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Span:
    """One window: feed ``tokens[begin:end]``, score ``tokens[score_from:end]``."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def window_spans(n_tokens: int, window: int, stride: int | None = None) -> list[Span]:
    """The windows of the sliding-window evaluation of ``n_tokens`` tokens (module docstring).

    Raises ValueError if ``n_tokens < 2``, ``window < 2`` or ``stride`` is outside ``[1, window]``
    (a stride longer than the window would leave tokens unscored).
    """
    stride = window if stride is None else stride
    if n_tokens < 2:
        raise ValueError(f"window_spans: need at least 2 tokens, got n_tokens={n_tokens}")
    if window < 2:
        raise ValueError(f"window_spans: window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"window_spans: stride must be in [1, window={window}], got {stride}")
    spans: list[Span] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            spans.append(Span(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    n_scored: int
    n_tokens: int
    n_windows: int
    window: int
    stride: int
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, *, window: int = 512, stride: int | None = None,
               batch_size: int = 1, progress: bool = False, desc: str = "eval") -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` (LongTensor ``[n]`` or ``[1, n]``).

    ``model(input_ids=[b, L])`` must return logits ``[b, L, vocab]`` (or an object with
    ``.logits``), as Hugging Face causal LMs do.  Windows of equal length run ``batch_size`` at
    a time.  The model is put in eval mode and left there.

    Raises ValueError on a tokens tensor that is not 1-D or ``[1, n]``, and the errors of
    :func:`window_spans`.
    """
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"perplexity: tokens must be [n] or [1, n], got shape {tuple(tokens.shape)}")
    stride = window if stride is None else stride
    spans = window_spans(tokens.numel(), window, stride)
    model.eval()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    batches: list[list[Span]] = []
    for s in spans:  # group consecutive windows of the same length
        if batches and len(batches[-1]) < batch_size and batches[-1][0].end - batches[-1][0].begin == s.end - s.begin:
            batches[-1].append(s)
        else:
            batches.append([s])
    bar = _bar(len(spans), desc) if progress else None
    for group in batches:
        ids = torch.stack([tokens[s.begin : s.end] for s in group]).to(device)
        logits = _logits(model, ids)
        for j, s in enumerate(group):
            a, b = s.score_from - s.begin, s.end - s.begin
            pred = logits[j, a - 1 : b - 1].float()
            total += F.cross_entropy(pred, ids[j, a:b], reduction="sum").double().cpu()
            count += s.n_scored
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    nll = float(total) / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_scored=count, n_tokens=tokens.numel(),
                            n_windows=len(spans), window=window, stride=stride,
                            seconds=time.perf_counter() - t0)


def _bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        return None
    return tqdm(total=total, desc=desc, unit="win", leave=False)
