"""Shared test helpers: skip markers, comparisons that explain failures, tolerances.

Nothing here touches CUDA at import or collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparse_kernels  # noqa: F401  (defines every op)
from sparse_kernels.ops import _registry as R


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sm() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if _cuda() else (0, 0)


requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
requires_sm80 = pytest.mark.skipif(
    "not __import__('torch').cuda.is_available() or __import__('torch').cuda.get_device_capability() < (8, 0)",
    reason="needs an sm_80+ GPU",
)
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def have_backend(op: str, backend: str, device: str) -> bool:
    return R.why_unavailable(op, backend, device) is None


def skip_unless_backend(op: str, backend: str, device: str) -> None:
    why = R.why_unavailable(op, backend, device)
    if why is not None:
        pytest.skip(f"{op}/{backend}/{device}: {why}")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if _cuda() else [])


# Elementwise tolerances by dtype (STYLE.md: dtype-keyed table).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1.3e-6 * 10),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


def _explain(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    idx = tuple(int(i) for i in bad.nonzero()[0])
    frac = bad.float().mean().item()
    return (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ ({frac:.3%}); first at {idx}: "
        f"got {actual[idx].item()!r}, expected {expected[idx].item()!r}"
    )


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-for-bit equality (so -0.0 != +0.0 and NaN == NaN with the same payload)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype.is_floating_point:
        ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.contiguous().view(ibits), e.contiguous().view(ibits)
    bad = a != e
    if bad.any():
        raise AssertionError(_explain(actual.detach().cpu(), expected.detach().cpu(), bad, what))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor", **tol) -> None:
    """Elementwise closeness with the dtype-keyed table (override with atol=/rtol=)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    t = dict(TOL[actual.dtype])
    t.update(tol)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = ~((a - e).abs() <= t["atol"] + t["rtol"] * e.abs())
    bad |= a.isnan() != e.isnan()
    if bad.any():
        raise AssertionError(_explain(a, e, bad, what) + f" (atol={t['atol']}, rtol={t['rtol']})")


def assert_matmul_close(actual, exact, lowp, what="matmul", factor=2.0, floor=None):
    """FlashAttention's rule: our error vs an fp64 result must be within ``factor`` x the error
    of PyTorch doing the same math in the same low precision (``lowp``)."""
    exact = exact.detach().double().cpu()
    ours = (actual.detach().double().cpu() - exact).abs().max().item()
    base = (lowp.detach().double().cpu() - exact).abs().max().item()
    if floor is None:
        floor = 1e-6 * max(exact.abs().max().item(), 1.0)
    assert not torch.isnan(actual).any(), f"{what}: NaN in output"
    assert ours <= factor * base + floor, f"{what}: max error {ours:.3e} > {factor} x torch's {base:.3e} (+{floor:.1e})"


POISON = float("nan")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (or -1 for ints): any element a kernel never writes shows up."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, POISON)
    return torch.full_like(t, -1)


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, loaded by path (benchmarks/ is not a package)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sgd_losses(module, x, target, steps: int, lr: float = 0.1) -> list:
    """Train ``module`` for ``steps`` SGD steps on an MSE loss; the loss before each step."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(module(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def pytest_collection_modifyitems(config, items):
    """A test parametrized with backend "triton" counts as a Triton test (``-m triton``), so
    CI's TRITON_INTERPRET=1 pass runs it wherever it lives."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v == "triton" for v in params.values()):
            item.add_marker(pytest.mark.triton)


def save_word_model_dir(d, model, extra_words: str = "", n_words: int = 2000):
    """A local Hugging Face model directory for the CLI tests: ``model`` saved in ``d`` with a
    word-level tokenizer, plus ``text.txt`` (``n_words`` words of that vocabulary) next to it.
    Returns the text file's path.  Needs ``tokenizers`` and ``transformers``."""
    import tokenizers
    import transformers

    words = ["[UNK]", "</s>"] + ("and the of to in that he shall unto for i his a lord they be " + extra_words).split()
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(d)
    model.save_pretrained(d)
    text = d.parent / f"{d.name}_text.txt"
    text.write_text(" ".join(words[2 + (i * 7) % (len(words) - 2)] for i in range(n_words)))
    return text
