"""Compressed checkpoints of pruned models: 2:4 layers as values + meta, the rest as-is.

A checkpoint is a directory:

* ``model.safetensors``: the state dict of the model with its 2:4 layers converted to
  :class:`sparse_kernels.nn.SparseLinear` (so each such layer stores ``values``
  ``[out, in/2]`` in the weight dtype and ``meta`` ``[out, in/16]`` int16, see
  :mod:`sparse_kernels.reference.sparse24`), every other tensor unchanged.  Tensors that share
  storage (tied embeddings) are stored once.  The safetensors metadata repeats the format name
  and version.  A permuted 2:4 layer (channel permutation) also stores ``in_perm``
  ``[in_features]`` int64, and ``values``/``meta`` hold its weight in permuted column order
  (see :mod:`sparse_kernels.nn`).
* a 2:4 int4 layer (:class:`sparse_kernels.nn.SparseLinearInt4`, format ``"2:4-int4"``) stores
  ``qvalues`` ``[out, in_pad/4]`` uint8 (the int4 codes + 8, two per byte), ``meta`` as a 2:4
  layer and ``scales`` ``[out, in_pad/group_size]`` (see docs/FORMAT.md, "2:4 int4"), plus
  ``in_perm`` when permuted; the JSON records its ``group_size``.
* ``sparse_kernels.json``: ``format`` (:data:`FORMAT_NAME`) and ``format_version`` (6 when it
  holds 2:4 int4 experts, else 5 when it holds compressed expert parameters, else 4 when a layer
  is 2:4 int4, else 3 when a layer is permuted, else 2)
  (:data:`FORMAT_VERSION`), the base model it came from, the Hugging Face model class and
  config (when there is one), which layers are ``2:4`` (with their dense shape, original module
  type, bias and, for a permuted layer, ``"in_perm": true``) and which are ``masked``
  (unstructured), the shape and dtype of every stored
  tensor, the aliases of tied tensors, the size and SHA-256 of the tensors file and the bytes on
  disk against the dense model.
* a ``masked`` layer's weight ``W`` is stored bitmask-compressed (format version 2) when that
  is smaller: ``KEY.bitmask`` uint8 ``[rows, ceil(cols/8)]`` (bit ``c % 8`` of byte ``c / 8``
  set where the element is not zero; NaN counts as a value) and ``KEY.nonzeros``, those
  elements in row-major order; ``bitmask`` in the JSON records each such ``KEY``'s shape, dtype
  and count.  Load rebuilds ``W`` bit for bit except that ``-0.0`` comes back as ``+0.0`` (equal
  values; pruning's ``W * mask`` leaves about half of the zeros negative).  At 50% that is
  0.53x of a float32 weight's bytes and 0.56x of a 16-bit one (as 2:4), instead of 1x.
* the 3-D expert parameters of a mixture-of-experts model (``gate_up_proj`` / ``down_proj`` of a
  transformers experts module, :mod:`sparse_kernels.pruning.experts`) with at least 10% zeros
  (pruned in place by :func:`sparse_kernels.prune`) are stored bitmask-compressed the same way,
  as the 2-D matrix ``[E * rows, cols]``; their ``bitmask`` entry adds ``tensor_shape`` (the
  3-D shape to restore) and ``experts`` in the JSON records each one's sparsity (format version
  5, written only when there is such a parameter); a :class:`sparse_kernels.nn.SparseExpertsInt4`
  stores its ``P_qvalues``, ``P_meta``, ``P_scales`` as they are (format version 6).
* optionally the tokenizer files (``tokenizer.save_pretrained``).

Writes are atomic: :func:`save` checks its arguments, then writes every file to a temporary
name in the same directory (flushed and fsynced; the tokenizer into a temporary folder) before
any is ``os.replace``-d into place, so a failed save leaves an existing checkpoint as it was and
no temporary file behind.  The tensors file is replaced first, then the JSON, which names its
SHA-256 (a crash between the two leaves a checkpoint that fails to load with a clear error
rather than one that loads the wrong weights), then the tokenizer files are moved in.

:func:`load` checks, before building anything: the format name and version, the file size
(truncation), the SHA-256 (corruption), the stored tensors against the manifest (names, shapes,
dtypes), every bitmask-compressed tensor (bitmask shape, padding bits, popcount against the stored
values), every 2:4 layer's meta nibbles (the six valid ones, 4 8 9 12 13 14) and every permuted
layer's ``in_perm`` (int64, each input channel exactly once); any failure raises
:class:`CheckpointError` (a ValueError) naming the file or layer and what is wrong.  Then it
rebuilds the model with its 2:4 layers as SparseLinear (``permuted=True`` where recorded) and
loads every tensor strictly, each in its stored dtype (unless ``dtype=``).  Checkpoints without permuted layers are unchanged (an older reader
rejects one with an ``in_perm``: an unexpected tensor).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

import torch
import torch.nn as nn

FORMAT_NAME = "sparse_kernels.pruned_lm"
FORMAT_VERSION = 6  # 2: masked layers bitmask-compressed; 3: permuted 2:4 layers (in_perm); 4: 2:4 int4 layers;
#                    5: pruned 3-D expert parameters bitmask-compressed; 6: 2:4 int4 experts
READ_VERSIONS = (1, 2, 3, 4, 5, 6)
_VERSION_PERM = 3
_VERSION_INT4 = 4
_VERSION_EXPERTS = 5
_VERSION_EXPERTS_INT4 = 6
# A checkpoint without permuted layers is written as version 2, so earlier readers still load it;
# one with them is version 3, which earlier readers refuse by its version (not by a stray tensor).
_VERSION_WITHOUT_PERM = 2
CONFIG_NAME = "sparse_kernels.json"
TENSORS_NAME = "model.safetensors"
PATTERN_24 = "2:4"
PATTERN_24_INT4 = "2:4-int4"
MASKED = "masked"
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                    torch.int16, torch.int32, torch.int64, torch.int8,
                                                    torch.uint8, torch.bool)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: wrong format/version, truncated, corrupted or inconsistent."""


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------- layer helpers
def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as ``module`` (nn.Linear, HF GPT-2 ``Conv1D``
    or :class:`sparse_kernels.nn.SparseLinear`).

    The weight is shared for nn.Linear, transposed (a copy) for Conv1D, whose weight is
    ``[in, out]``, and the dense weight in the original column order (a copy, un-permuted for a
    permuted 2:4 layer: ``SparseLinear.to_dense``) for SparseLinear.  Raises TypeError for
    anything else.
    """
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, _sparse_linear_cls()):
        return module.to_dense()
    conv = _conv1d_cls()
    if conv is not None and isinstance(module, conv):
        w = module.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if module.bias is not None:
                lin.bias.copy_(module.bias)
        return lin
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_2to4(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the last dim of ``weight [out, in]`` has at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4 != 0:
        return False
    nnz = (weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return bool((nnz <= 2).all())


def _sparse_linear_cls():
    from ..nn import SparseLinear

    return SparseLinear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def find_sparse_layers(model: nn.Module) -> dict[str, str]:
    """``{name: "2:4"}`` for every SparseLinear with a 2:4 pattern and every nn.Linear/Conv1D whose
    weight is exactly 2:4 sparse; ``{name: "2:4-int4"}`` for every SparseLinearInt4;
    ``{name: "masked"}`` for SparseLinear layers with a mask."""
    from ..nn import SparseLinearInt4

    sl = _sparse_linear_cls()
    conv = _conv1d_cls()
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinearInt4):
            out[name] = PATTERN_24_INT4
        elif isinstance(mod, sl):
            out[name] = PATTERN_24 if getattr(mod, "pattern", None) == PATTERN_24 else MASKED
        elif isinstance(mod, nn.Linear) or (conv is not None and isinstance(mod, conv)):
            w = as_linear(mod).weight
            if w.numel() and is_2to4(w) and bool((w != 0).any()):
                out[name] = PATTERN_24
    return out


@torch.no_grad()
def to_sparse(model: nn.Module, layers: dict[str, str]) -> dict[str, dict]:
    """Swap the ``layers`` named ``"2:4"`` for SparseLinear (in place); returns their descriptions
    (with those of the ``"2:4-int4"`` layers, which must be SparseLinearInt4 already).

    nn.Linear and Conv1D weights must already be 2:4 sparse (a pruned model); SparseLinear
    layers are kept.  ``"masked"`` layers stay as they are (their weights are stored
    bitmask-compressed by :func:`save`), except unstructured SparseLinear layers, which become the
    nn.Linear of their masked weight (:func:`save` puts the originals back once it has the state
    dict; :func:`load` rebuilds them).  Raises ValueError if a
    layer named ``"2:4"`` is not 2:4 sparse.
    """
    from ..nn import SparseLinearInt4

    sl = _sparse_linear_cls()
    conv = _conv1d_cls()
    info: dict[str, dict] = {}
    for name, kind in layers.items():
        if kind == PATTERN_24_INT4:
            mod = model.get_submodule(name)
            if not isinstance(mod, SparseLinearInt4):
                raise ValueError(f"layer {name!r} is listed as {PATTERN_24_INT4} but is a {type(mod).__name__}, not a "
                                 f"SparseLinearInt4 (sparse_kernels.quantize_int4 makes them)")
            info[name] = {"format": PATTERN_24_INT4, "in_features": mod.in_features,
                          "out_features": mod.out_features, "bias": mod.bias is not None,
                          "module": "SparseLinearInt4", "group_size": mod.group_size}
            if mod.in_perm is not None:
                info[name]["in_perm"] = True
            continue
        if kind != PATTERN_24:
            mod = model.get_submodule(name)
            if isinstance(mod, sl):  # unstructured SparseLinear: stored as its dense (masked) weight
                _replace(model, name, mod.to_dense())
            continue
        mod = model.get_submodule(name)
        if isinstance(mod, sl):
            if getattr(mod, "pattern", None) != PATTERN_24:
                raise ValueError(f"layer {name!r} is listed as 2:4 but is a SparseLinear with pattern "
                                 f"{mod.pattern!r}; list it as 'masked'")
            info[name] = {"format": PATTERN_24, "in_features": mod.in_features, "out_features": mod.out_features,
                          "bias": mod.bias is not None, "module": "SparseLinear"}
            if getattr(mod, "in_perm", None) is not None:
                info[name]["in_perm"] = True
            continue
        orig = "Conv1D" if conv is not None and isinstance(mod, conv) else type(mod).__name__
        lin = as_linear(mod)
        if not is_2to4(lin.weight):
            raise ValueError(f"layer {name!r} is listed as 2:4 but its weight is not 2:4 sparse")
        info[name] = {"format": PATTERN_24, "in_features": lin.in_features, "out_features": lin.out_features,
                      "bias": lin.bias is not None, "module": orig}
        # The weight is already 2:4: its nonzeros are the mask (skips re-ranking every group).
        _replace(model, name, sl.from_dense(lin, pattern=PATTERN_24, mask=lin.weight != 0))
    return info


# ---------------------------------------------------------------- atomic IO
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: str, write) -> str:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it and give it the mode a
    plain open() would; returns ``tmp`` (removed if this fails)."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp made it 0600
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp)``, fsync it, then ``os.replace`` it onto ``path``."""
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _staging(directory: str):
    """For a save of several files into ``directory`` (created if needed) that must leave what is
    there untouched until all of them are written: yields the list of staged ``(tmp, final)``
    pairs (:func:`_stage`, :func:`_publish`), and removes every temporary file or folder still
    there on the way out, and ``directory`` too if it was created here and the save failed."""
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    staged: list[tuple[str, str | None]] = []
    ok = False
    try:
        yield staged
        ok = True
    finally:
        for tmp, _ in staged:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.unlink(tmp)
        if created and not ok:
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _stage(staged: list, path: str, write) -> str:
    """Write ``path``'s new content to a temporary file (:func:`_write_temp`) recorded in ``staged``."""
    tmp = _write_temp(path, write)
    staged.append((tmp, path))
    return tmp


def _write_text(text: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def _publish(directory: str, staged: list, tokenizer=None) -> None:
    """Save ``tokenizer`` (when given) into a temporary folder, then ``os.replace`` each staged
    file onto its name, in order, then move the tokenizer's files in."""
    moves = list(staged)
    if tokenizer is not None:  # a tokenizer that fails must do so before anything is replaced
        tokdir = tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=directory)
        staged.append((tokdir, None))
        tokenizer.save_pretrained(tokdir)
        moves += [(os.path.join(tokdir, f), os.path.join(directory, f)) for f in sorted(os.listdir(tokdir))]
    for tmp, final in moves:
        os.replace(tmp, final)
    _fsync_dir(directory)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- arguments
def _check_path(path, what: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a str or os.PathLike, got {type(path).__name__} {path!r}")
    return os.fspath(path)


def _check_save_args(path, tokenizer) -> str:
    """``path`` (a str or PathLike that is not a file) as a str; ``tokenizer`` None or with save_pretrained."""
    path = _check_path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} exists and is not a directory")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer: expected None or a tokenizer with save_pretrained(), got "
                        f"{type(tokenizer).__name__}")
    return path


def _check_module(model, what: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected an nn.Module, got {type(model).__name__} {model!r}")


def _json_dict(value, what: str) -> dict:
    """``value`` checked to be a dict that JSON can store, or {} for None."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{what}: expected a dict or None, got {type(value).__name__} {value!r}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: must hold only JSON values (str, numbers, bool, None, lists, dicts): {e}") from None
    return value


def _check_load_args(dtype, device) -> None:
    """``dtype`` None or a floating torch.dtype, ``device`` one torch can allocate on (TypeError/ValueError)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError) as e:  # (AssertionError: torch built without CUDA)
        raise ValueError(f"device: {device!r} is not a device torch can use here ({e})") from None


# ---------------------------------------------------------------- save
def _unique_tensors(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    keep: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in sd.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        keep[k] = v.detach().contiguous()
    return keep, aliases


def _hf_config(model: nn.Module) -> tuple[str | None, dict | None]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None, None
    d = cfg.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(k, None)
    return type(model).__name__, d


def save(model: nn.Module, path: str, *, layers: dict[str, str] | None = None, base_model: dict | None = None,
         tokenizer=None, pruning: dict | None = None) -> dict:
    """Save ``model`` compressed into the directory ``path`` (created if needed); returns the config dict.

    ``layers``: ``{module name: "2:4" | "masked"}``; default :func:`find_sparse_layers`.  The
    model is modified in place: its 2:4 layers become SparseLinear (they compute the same thing).
    ``base_model``: a JSON dict describing where the dense model came from (stored as-is).
    ``tokenizer``: saved next to the weights when given.  ``pruning``: free-form JSON dict of how
    the model was pruned.  The returned dict's ``sizes`` holds the bytes on disk and the dense
    equivalent.

    The arguments are checked before anything is written, and every file (the tokenizer's in a
    temporary folder) is written in full before the first one replaces its old version, so a save
    that fails leaves the checkpoint already at ``path`` as it was.
    """
    _check_module(model)
    path = _check_save_args(path, tokenizer)
    base_model, pruning = _json_dict(base_model, "base_model"), _json_dict(pruning, "pruning")
    if layers is not None and not isinstance(layers, dict):
        raise TypeError(f"layers: expected a dict {{module name: format}} or None, got {type(layers).__name__}")
    layers = find_sparse_layers(model) if layers is None else dict(layers)
    bad = {k: v for k, v in layers.items() if v not in (PATTERN_24, PATTERN_24_INT4, MASKED)}
    if bad:
        raise ValueError(f"save: layer formats must be '2:4', '2:4-int4' or 'masked', got {bad}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"layers: {missing[:3]} are not modules of {type(model).__name__}")
    if "" in layers:  # load replaces layers inside their parent module; the root has none
        raise ValueError(f"layers: the model itself ('', a {type(model).__name__}) cannot be a layer of its "
                         f"checkpoint; save nn.Sequential(model) instead")
    from ..nn import SparseLinearInt4

    int4 = sorted(n for n, mod in model.named_modules() if isinstance(mod, SparseLinearInt4))
    unlisted = [n for n in int4 if layers.get(n) != PATTERN_24_INT4]
    if unlisted:  # its buffers would be stored, but load could not rebuild the layer
        raise ValueError(f"save: layers {unlisted[:3]} are SparseLinearInt4 but not listed as '2:4-int4'")
    sl = _sparse_linear_cls()
    kept = {n: model.get_submodule(n) for n, k in layers.items()
            if k == MASKED and isinstance(model.get_submodule(n), sl)}
    wrong = sorted(n for n, mod in kept.items() if mod.pattern == PATTERN_24)
    if wrong:  # stored masked, it would come back as a pattern load cannot rebuild
        raise ValueError(f"save: layers {wrong} are 2:4 SparseLinear layers listed as 'masked'; list them as '2:4'")
    unstructured = {n: mod.pattern or "masked" for n, mod in kept.items()}
    try:
        info24 = to_sparse(model, layers)
        sd = model.state_dict()
        masked_w = {n: as_linear(model.get_submodule(n)).weight for n, k in layers.items() if k == MASKED}
    finally:  # the model keeps its unstructured SparseLinear layers, also when saving fails here
        for n, mod in kept.items():
            _replace(model, n, mod)
    tensors, aliases = _unique_tensors(sd)
    _densify_sparse_experts(model, tensors, keep_int4=True)
    model_class, model_config = _hf_config(model)
    dense_bytes = sparse_bytes = sparse_dense_bytes = 0
    for k, v in tensors.items():
        dense_bytes += v.numel() * v.element_size()
    for name, li in info24.items():
        lb = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(name + "."))
        wdt = next(v for k, v in tensors.items() if k.startswith(name + ".") and v.is_floating_point()).dtype
        dense_w = li["in_features"] * li["out_features"] * torch.empty((), dtype=wdt).element_size()
        dense_b = li["out_features"] * torch.empty((), dtype=wdt).element_size() if li["bias"] else 0
        sparse_bytes += lb
        sparse_dense_bytes += dense_w + dense_b
        dense_bytes += dense_w + dense_b - lb
    masked = {}
    for name, kind in layers.items():
        if kind == MASKED:
            w = masked_w[name]
            masked[name] = {"sparsity": float((w == 0).float().mean())}
            if name in unstructured:
                masked[name]["sparse_linear_pattern"] = unstructured[name]
    bitmask = {}
    masked_bytes = masked_dense_bytes = 0
    for name in masked:
        key = name + ".weight"
        if key not in tensors:  # stored under another name (tied): left dense
            continue
        w = tensors[key]
        masked_dense_bytes += w.numel() * w.element_size()
        enc = _encode_bitmask(w)
        if enc is None:
            masked_bytes += w.numel() * w.element_size()
            continue
        del tensors[key]
        tensors[key + ".bitmask"], tensors[key + ".nonzeros"] = enc
        bitmask[key] = {"shape": list(w.shape), "dtype": _dtype_name(w.dtype), "nnz": int(enc[1].numel())}
        masked_bytes += enc[0].numel() + enc[1].numel() * enc[1].element_size()
    experts, experts_bytes, experts_dense_bytes, int4_extra = _compress_experts(model, tensors, bitmask)
    dense_bytes += int4_extra
    if any(v.get("pattern") == PATTERN_24_INT4 for v in experts.values()):
        version = _VERSION_EXPERTS_INT4
    elif experts:
        version = _VERSION_EXPERTS
    elif any(li["format"] == PATTERN_24_INT4 for li in info24.values()):
        version = _VERSION_INT4
    elif any(li.get("in_perm") for li in info24.values()):
        version = _VERSION_PERM
    else:
        version = _VERSION_WITHOUT_PERM
    meta = {"format": FORMAT_NAME, "format_version": str(version)}

    def write_tensors(tmp):
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=meta)

    with _staging(path) as staged:
        tmp = _stage(staged, os.path.join(path, TENSORS_NAME), write_tensors)
        file_bytes = os.path.getsize(tmp)
        cfg = {
            "format": FORMAT_NAME,
            "format_version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_version": torch.__version__,
            "base_model": base_model,
            "model_class": model_class,
            "model_config": model_config,
            "tokenizer_saved": tokenizer is not None,
            "layers": info24,
            "masked": masked,
            "bitmask": bitmask,
            "experts": experts,
            "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
            "aliases": aliases,
            "tensors_file": TENSORS_NAME,
            "tensors_bytes": file_bytes,
            "tensors_sha256": sha256_file(tmp),
            "pruning": pruning,
            "sizes": {
                "file_bytes": file_bytes,
                "dense_tensor_bytes": dense_bytes,
                "sparse_layers_bytes": sparse_bytes,
                "sparse_layers_dense_bytes": sparse_dense_bytes,
                "sparse_layers_ratio": (sparse_bytes / sparse_dense_bytes) if sparse_dense_bytes else None,
                "masked_layers_bytes": masked_bytes,
                "masked_layers_dense_bytes": masked_dense_bytes,
                "masked_layers_ratio": (masked_bytes / masked_dense_bytes) if masked_dense_bytes else None,
                "experts_bytes": experts_bytes,
                "experts_dense_bytes": experts_dense_bytes,
                "experts_ratio": (experts_bytes / experts_dense_bytes) if experts_dense_bytes else None,
                "file_vs_dense_ratio": file_bytes / dense_bytes if dense_bytes else None,
            },
        }
        _stage(staged, os.path.join(path, CONFIG_NAME), _write_text(json.dumps(cfg, indent=1)))
        _publish(path, staged, tokenizer)  # the tensors, then the JSON naming their hash, then the tokenizer
    return cfg


def _is_24_experts(mod: nn.Module) -> bool:
    """Every expert matrix ``[out, in]`` of the transformers experts module ``mod`` is 2:4 along
    ``in`` (at most 2 nonzeros in each group of 4; ``in`` a multiple of 4)."""
    from ..pruning.experts import expert_params, out_in

    params = expert_params(mod)
    for p in params.values():
        w = out_in(mod, p.detach())
        if w.shape[-1] % 4 or ((w.reshape(-1, 4) != 0).sum(-1) > 2).any():
            return False
    return bool(params)


def _common_dtype(tensors: dict) -> torch.dtype | None:
    """The float dtype most of the elements of ``tensors`` have (by elements, not tensors: int4
    layers' scales are many small tensors), None without float tensors."""
    count: dict = {}
    for t in tensors.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


def _densify_sparse_experts(model: nn.Module, tensors: dict, keep_int4: bool = False) -> None:
    """In ``tensors``, replace each :class:`sparse_kernels.nn.SparseExperts`' ``P_values``/``P_meta``
    (a SparseExpertsInt4's ``P_qvalues``/``P_meta``/``P_scales``, dequantized, unless ``keep_int4``)
    by the dense 3-D parameter ``P`` of the transformers module it came from (the layout the
    model's config rebuilds; :func:`_compress_experts` then stores it compressed and :func:`load`
    turns it back into SparseExperts).  Int4 experts are dequantized to the dtype most of the
    model's float elements have (their scales may have kept another one through ``load(dtype=)``)."""
    from ..nn import SparseExperts, SparseExpertsInt4

    dtype = _common_dtype(tensors)
    for mname, mod in model.named_modules():
        if isinstance(mod, SparseExperts) and not (keep_int4 and isinstance(mod, SparseExpertsInt4)):
            for pname in mod.params:
                key = f"{mname}.{pname}" if mname else pname
                for part in ("values", "qvalues", "meta", "scales"):
                    tensors.pop(f"{key}_{part}", None)
                w = mod.dense_param(pname, dtype) if isinstance(mod, SparseExpertsInt4) else mod.dense_param(pname)
                tensors[key] = w.cpu()


def _compress_experts(model: nn.Module, tensors: dict, bitmask: dict) -> tuple[dict, int, int, int]:
    """Bitmask-compress, in ``tensors``, every stored 3-D expert parameter with at least 10% zeros
    (recorded in ``bitmask`` with its ``tensor_shape``), and every parameter of a SparseExperts or
    of an experts module whose every expert matrix is 2:4 along its input (recorded with
    ``"pattern": "2:4"``, so :func:`load` rebuilds them as SparseExperts); a SparseExpertsInt4's
    parameters stay as they are (``P_qvalues``, ``P_meta``, ``P_scales``), recorded with
    ``"pattern": "2:4-int4"`` and their shape and group size.  Returns
    ``({key: {"sparsity"[, "pattern", ...]}}, bytes stored, dense bytes)`` over those parameters,
    and the dense bytes the int4 ones stand for beyond what they store (``tensors`` held them as
    codes, not as dense parameters)."""
    from ..nn import SparseExperts, SparseExpertsInt4
    from ..pruning.experts import EXPERT_PARAMS, is_experts_module

    experts, stored, dense, int4_extra = {}, 0, 0, 0
    for mname, mod in model.named_modules():
        if isinstance(mod, SparseExpertsInt4):
            for pname in mod.params:
                key = f"{mname}.{pname}" if mname else pname
                parts = [tensors[f"{key}_{p}"] for p in ("qvalues", "meta", "scales")]
                e, out_f = parts[0].shape[:2]
                in_f = mod.in_features[pname]
                experts[key] = {"sparsity": 0.5, "pattern": PATTERN_24_INT4, "num_experts": e, "out_features": out_f,
                                "in_features": in_f, "group_size": mod.group_size}
                nbytes = sum(t.numel() * t.element_size() for t in parts)
                stored += nbytes
                dense += e * out_f * in_f * parts[2].element_size()
                int4_extra += e * out_f * in_f * parts[2].element_size() - nbytes
            continue
        dense_experts = is_experts_module(mod)
        sparse = isinstance(mod, SparseExperts) or (dense_experts and _is_24_experts(mod))
        if not (sparse or dense_experts):
            continue
        for pname in EXPERT_PARAMS:
            key = f"{mname}.{pname}" if mname else pname
            w = tensors.get(key)
            if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point():
                continue
            sparsity = 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)
            if sparsity < 0.1 and not sparse:
                continue
            experts[key] = {"sparsity": sparsity, **({"pattern": PATTERN_24} if sparse else {})}
            nbytes = w.numel() * w.element_size()
            dense += nbytes
            enc = _encode_bitmask(w.reshape(-1, w.shape[-1]))
            if enc is None:
                stored += nbytes
                continue
            del tensors[key]
            tensors[key + ".bitmask"], tensors[key + ".nonzeros"] = enc
            bitmask[key] = {"shape": [w.shape[0] * w.shape[1], w.shape[2]], "dtype": _dtype_name(w.dtype),
                            "nnz": int(enc[1].numel()), "tensor_shape": list(w.shape)}
            stored += enc[0].numel() + enc[1].numel() * enc[1].element_size()
    return experts, stored, dense, int4_extra


# ---------------------------------------------------------------- load
def read_config(path: str) -> dict:
    """Read and check ``sparse_kernels.json`` of the checkpoint directory ``path``.

    Raises CheckpointError when it is missing, not JSON, of another format or of a format
    version this code does not read, or when a field load relies on has the wrong type.
    """
    cpath = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cpath):
        raise CheckpointError(f"{path}: not a sparse_kernels checkpoint ({CONFIG_NAME} is missing)")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cpath}: unreadable or not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cpath}: format is {cfg.get('format') if isinstance(cfg, dict) else None!r}, "
                              f"expected {FORMAT_NAME!r}")
    v = cfg.get("format_version")
    if isinstance(v, bool) or v not in READ_VERSIONS:
        raise CheckpointError(f"{cpath}: format_version {v!r} is not supported; this sparse_kernels reads "
                              f"versions {', '.join(map(str, READ_VERSIONS))}")
    for key in ("layers", "masked", "tensors", "aliases", "tensors_bytes", "tensors_sha256"):
        if key not in cfg:
            raise CheckpointError(f"{cpath}: the required field {key!r} is missing")
    _check_manifest(cpath, cfg)
    return cfg


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_manifest(cpath: str, cfg: dict) -> None:
    """The types of the manifest's fields that :func:`load` reads before its own checks."""
    def need(ok: bool, what: str, expected: str, got) -> None:
        if not ok:
            raise CheckpointError(f"{cpath}: {what} must be {expected}, got {repr(got)[:200]}")

    for key in ("layers", "masked", "bitmask", "experts", "aliases", "tensors"):
        need(isinstance(cfg.get(key, {}), dict), repr(key), "a JSON object", cfg.get(key))
    for k, spec in cfg["tensors"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        need(isinstance(shape, list) and all(map(_is_count, shape)) and isinstance(spec.get("dtype"), str),
             f"the 'tensors' entry {k!r}", '{"shape": [non-negative ints], "dtype": "<name>"}', spec)
    for k, target in cfg["aliases"].items():
        need(isinstance(target, str), f"the alias {k!r}", "the name of a stored tensor", target)
    need(_is_count(cfg["tensors_bytes"]), "'tensors_bytes'", "a non-negative int", cfg["tensors_bytes"])
    need(isinstance(cfg["tensors_sha256"], str), "'tensors_sha256'", "a hex string", cfg["tensors_sha256"])
    tf = cfg.get("tensors_file", TENSORS_NAME)
    need(isinstance(tf, str) and tf not in ("", ".", "..") and os.path.basename(tf) == tf, "'tensors_file'",
         "a file name in the checkpoint directory", tf)
    mc = cfg.get("model_config")
    need(mc is None or (isinstance(mc, dict) and (not mc or isinstance(mc.get("model_type"), str))),
         "'model_config'", "null or a JSON object with a string 'model_type'",
         {"model_type": mc.get("model_type")} if isinstance(mc, dict) else mc)


def _read_tensors(path: str, cfg: dict, verify_hash: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    tpath = os.path.join(path, cfg.get("tensors_file", TENSORS_NAME))
    if not os.path.isfile(tpath):
        raise CheckpointError(f"{tpath}: the tensors file is missing")
    size = os.path.getsize(tpath)
    if size != cfg["tensors_bytes"]:
        what = "truncated" if size < cfg["tensors_bytes"] else "longer than written"
        raise CheckpointError(f"{tpath}: the file is {what}: {size} bytes on disk, {cfg['tensors_bytes']} expected")
    if verify_hash:
        digest = sha256_file(tpath)
        if digest != cfg["tensors_sha256"]:
            raise CheckpointError(f"{tpath}: corrupted: SHA-256 {digest} does not match the recorded "
                                  f"{cfg['tensors_sha256']}")
    try:
        with safe_open(tpath, framework="pt") as f:
            fmeta = f.metadata() or {}
            if fmeta.get("format") != FORMAT_NAME or fmeta.get("format_version") != str(cfg["format_version"]):
                raise CheckpointError(f"{tpath}: its metadata names format {fmeta.get('format')!r} version "
                                      f"{fmeta.get('format_version')!r}, expected {FORMAT_NAME!r} "
                                      f"{cfg['format_version']}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{tpath}: not a readable safetensors file ({e})") from e
    expected, got = set(cfg["tensors"]), set(tensors)
    if expected != got:
        raise CheckpointError(f"{tpath}: tensors do not match the manifest: missing {sorted(expected - got)[:5]}, "
                              f"unexpected {sorted(got - expected)[:5]}")
    for k, spec in cfg["tensors"].items():
        t = tensors[k]
        if list(t.shape) != list(spec["shape"]) or _dtype_name(t.dtype) != spec["dtype"]:
            raise CheckpointError(f"{tpath}: tensor {k!r} is {_dtype_name(t.dtype)}{list(t.shape)}, the manifest "
                                  f"says {spec['dtype']}{spec['shape']}")
    _decode_bitmasks(tpath, cfg.get("bitmask", {}), tensors, cfg["format_version"])
    return tensors


# ---------------------------------------------------------------- bitmask compression (masked layers)
def _encode_bitmask(w: torch.Tensor):
    """``(bitmask, nonzeros)`` of a 2-D float tensor, or None when that would not be smaller."""
    from ..reference.bitmask import compress_bitmask

    if w.dim() != 2 or not w.is_floating_point():
        return None
    # the bitmask format's own compressor: W != 0 is stored, so NaN is stored and -0.0 is not (it
    # comes back +0.0, an equal value; pruning writes W * mask, so about half its zeros are -0.0)
    nonzeros, bitmask, _ = compress_bitmask(w.detach().cpu().contiguous())
    if nonzeros.numel() * w.element_size() + bitmask.numel() >= w.numel() * w.element_size():
        return None
    return bitmask, nonzeros


def _decode_bitmasks(tpath: str, specs: dict, tensors: dict[str, torch.Tensor], version: int) -> None:
    """Rebuild each bitmask-compressed tensor in place of its two stored parts (validated first);
    an entry with a ``tensor_shape`` (a 3-D expert parameter, format version 5) is reshaped to it."""
    from ..ops.linear import unpack_mask

    if not isinstance(specs, dict):
        raise CheckpointError(f"{tpath}: the manifest's 'bitmask' entry is not a mapping")
    for key, spec in specs.items():
        bm, nz = tensors.pop(key + ".bitmask", None), tensors.pop(key + ".nonzeros", None)
        where = f"{tpath}: bitmask-compressed {key!r}"
        try:
            rows, cols = (int(d) for d in spec["shape"])
            dtype, count = _DTYPES[spec["dtype"]], int(spec["nnz"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its manifest entry {spec!r} is malformed ({e})") from e
        if rows < 0 or cols < 0 or count < 0 or key in tensors:
            raise CheckpointError(f"{where}: its manifest entry {spec!r} is inconsistent (negative sizes, or the "
                                  f"tensor is also stored uncompressed)")
        if bm is None or nz is None:
            raise CheckpointError(f"{where}: {key}.bitmask or {key}.nonzeros is missing")
        if bm.dtype != torch.uint8 or list(bm.shape) != [rows, (cols + 7) // 8]:
            raise CheckpointError(f"{where}: the bitmask is {_dtype_name(bm.dtype)}{list(bm.shape)}, expected "
                                  f"uint8{[rows, (cols + 7) // 8]}")
        if nz.dtype != dtype or nz.dim() != 1 or nz.numel() != count:
            raise CheckpointError(f"{where}: the nonzeros are {_dtype_name(nz.dtype)}{list(nz.shape)}, expected "
                                  f"{spec['dtype']}[{count}]")
        if cols % 8 and rows and int((bm[:, -1] >> (cols % 8)).count_nonzero()):
            raise CheckpointError(f"{where}: bits are set past column {cols} (padding must be zero)")
        present = unpack_mask(bm, cols)
        n_set = int(present.sum())
        if n_set != count:
            raise CheckpointError(f"{where}: the bitmask marks {n_set} elements but {count} are stored")
        w = torch.zeros(rows, cols, dtype=dtype)
        w[present] = nz
        if "tensor_shape" in spec:
            shape = spec["tensor_shape"]
            if version < _VERSION_EXPERTS:
                raise CheckpointError(f"{where}: a tensor_shape needs format_version {_VERSION_EXPERTS}; the checkpoint "
                                      f"says {version}")
            if (not isinstance(shape, list) or len(shape) != 3
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
                    or shape[0] * shape[1] != rows or shape[2] != cols):
                raise CheckpointError(f"{where}: tensor_shape {shape!r} does not match the stored [{rows}, {cols}] "
                                      f"(expected three positive ints [E, rows, cols] with E * rows = {rows})")
            w = w.reshape(shape)
        tensors[key] = w


def _check_layer(name: str, li: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Validate one 2:4 layer's values/meta (or a 2:4 int4 layer's qvalues/meta/scales): shapes
    against the layer, dtypes, meta nibbles, int4 group size and finite scales; and a permuted
    layer's ``in_perm`` (int64, a permutation of its input channels)."""
    from ..reference.sparse24 import check_meta

    if not isinstance(li, dict):
        raise CheckpointError(f"layer {name!r}: its entry must be a JSON object, got {type(li).__name__}")
    for k, kind in (("in_features", int), ("out_features", int), ("bias", bool)):
        v = li.get(k)
        if not isinstance(v, kind) or (kind is int and (isinstance(v, bool) or v <= 0)):
            raise CheckpointError(f"layer {name!r}: {k!r} must be a {'positive int' if kind is int else 'bool'}, "
                                  f"got {v!r}")
    fmt = li.get("format", PATTERN_24)
    if fmt not in (PATTERN_24, PATTERN_24_INT4):
        raise CheckpointError(f"layer {name!r}: format {fmt!r} is not one this sparse_kernels reads "
                              f"({PATTERN_24!r}, {PATTERN_24_INT4!r})")
    int4 = fmt == PATTERN_24_INT4
    what = f"{fmt} layer {name!r}"
    key = name + (".qvalues" if int4 else ".values")
    values, meta = tensors.get(key), tensors.get(name + ".meta")
    if values is None or meta is None:
        raise CheckpointError(f"{what}: {key} or {name}.meta is missing")
    out_f, in_f = li["out_features"], li["in_features"]
    per = 4 if int4 else 2  # columns per stored element
    cols = values.shape[1] * per if values.dim() == 2 else -1
    if (values.dim() != 2 or values.shape[0] != out_f or cols != (in_f + 15) // 16 * 16
            or list(meta.shape) != [out_f, cols // 16]):
        raise CheckpointError(f"{what}: {key.rsplit('.', 1)[1]} {list(values.shape)} / meta {list(meta.shape)} do "
                              f"not fit a [{out_f}, {in_f}] weight ({key.rsplit('.', 1)[1]} [out, in_pad/{per}], "
                              f"meta [out, in_pad/16], in_pad = in_features rounded up to 16)")
    if meta.dtype != torch.int16 or (values.dtype != torch.uint8 if int4 else not values.is_floating_point()):
        raise CheckpointError(f"{what}: meta must be int16 and {'qvalues uint8' if int4 else 'values floating point'}, "
                              f"got {_dtype_name(meta.dtype)} and {_dtype_name(values.dtype)}")
    try:
        check_meta(meta)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from e
    if int4:
        _check_int4_scales(name, li, tensors, out_f, cols)
    _check_perm(name, li, tensors, in_f)


def _check_int4_scales(name: str, li: dict, tensors: dict[str, torch.Tensor], out_f: int, cols: int) -> None:
    g, scales = li.get("group_size"), tensors.get(name + ".scales")
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 16 or cols % g:
        raise CheckpointError(f"2:4-int4 layer {name!r}: group_size {g!r} must be a positive multiple of 16 dividing "
                              f"the {cols} padded input features")
    if scales is None:
        raise CheckpointError(f"2:4-int4 layer {name!r}: {name}.scales is missing")
    if list(scales.shape) != [out_f, cols // g] or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CheckpointError(f"2:4-int4 layer {name!r}: scales {list(scales.shape)} {_dtype_name(scales.dtype)} must "
                              f"be float16/bfloat16/float32 [{out_f}, {cols // g}] (one per row and group of {g})")
    if not bool(torch.isfinite(scales).all()):
        raise CheckpointError(f"2:4-int4 layer {name!r}: scales must be finite")


def _check_perm(name: str, li: dict, tensors: dict[str, torch.Tensor], in_f: int) -> None:
    from ..nn import check_in_perm

    permuted, perm = li.get("in_perm", False), tensors.get(name + ".in_perm")
    if not isinstance(permuted, bool):
        raise CheckpointError(f"2:4 layer {name!r}: its 'in_perm' entry must be true or false, got {permuted!r}")
    if not permuted:
        if perm is not None:
            raise CheckpointError(f"2:4 layer {name!r}: {name}.in_perm is stored but the layer is not recorded as "
                                  f"permuted (\"in_perm\": true)")
        return
    if perm is None:
        raise CheckpointError(f"2:4 layer {name!r}: recorded as permuted but {name}.in_perm is missing")
    if perm.dtype != torch.int64:
        raise CheckpointError(f"2:4 layer {name!r}: {name}.in_perm must be int64, got {_dtype_name(perm.dtype)}")
    try:
        check_in_perm(perm, in_f, f"{name}.in_perm")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"2:4 layer {name!r}: {e}") from e


def _config_errors() -> tuple[type[BaseException], ...]:
    """What building a Hugging Face model from a bad config dict raises (huggingface_hub's strict
    dataclass validation error is not a ValueError)."""
    errors = (ValueError, KeyError, TypeError, AttributeError, ImportError, OSError, RuntimeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return errors + (StrictDataclassError,)


def _skeleton(path: str, cfg: dict, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    if not cfg.get("model_config"):
        raise CheckpointError("the checkpoint holds no Hugging Face config: pass model= (a module of the same "
                              "architecture) to load it")
    try:
        return model_from_config(cfg["model_config"])
    except _config_errors() as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: cannot build a model from its model_config "
                              f"({type(e).__name__}: {e})") from e


def _linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear-like module (nn.Linear, Conv1D, SparseLinear,
    SparseLinearInt4), None for anything else."""
    from ..nn import SparseLinearInt4

    if isinstance(mod, (nn.Linear, _sparse_linear_cls(), SparseLinearInt4)):
        return mod.in_features, mod.out_features
    conv = _conv1d_cls()
    if conv is not None and isinstance(mod, conv):
        return tuple(mod.weight.shape)  # [in, out]
    return None


def _check_replaced(m: nn.Module, name: str, what: str, in_f: int, out_f: int) -> None:
    """The module ``name`` that load replaces must be a Linear-like ``[in_f -> out_f]`` layer: load
    must not turn another architecture into this one."""
    try:
        old = m.get_submodule(name) if name else None
    except AttributeError as e:
        raise CheckpointError(f"{what} {name!r} is not a module of {type(m).__name__}") from e
    if old is None:
        raise CheckpointError(f"{what} '': the model itself cannot be replaced (layers live inside a parent module)")
    got = _linear_shape(old)
    if got != (in_f, out_f):
        has = type(old).__name__ + ("" if got is None else f" with in_features {got[0]}, out_features {got[1]}")
        raise CheckpointError(f"{what} {name!r}: the checkpoint records a linear layer with in_features {in_f}, "
                              f"out_features {out_f}; the model holds a module of type {has} there")


def _match_dtypes(m: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each parameter and buffer the dtype of its stored tensor, so that load_state_dict copies
    it bit for bit instead of casting it (a float32 norm in a bfloat16 model stays float32); tied
    parameters stay tied."""
    done: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        mname, _, attr = key.rpartition(".")
        try:
            mod = m.get_submodule(mname)
        except AttributeError:
            continue  # load_state_dict names it
        for store in (mod._parameters, mod._buffers):
            cur = store.get(attr)
            if cur is None or cur.dtype == t.dtype:
                continue
            if cur.is_floating_point() != t.is_floating_point():
                raise CheckpointError(f"{key}: stored as {_dtype_name(t.dtype)}, but the model holds a "
                                      f"{_dtype_name(cur.dtype)} {'parameter' if store is mod._parameters else 'buffer'} "
                                      f"there")
            if id(cur) not in done:
                new = torch.empty_like(cur, dtype=t.dtype)
                done[id(cur)] = nn.Parameter(new, cur.requires_grad) if isinstance(cur, nn.Parameter) else new
            store[attr] = done[id(cur)]


def model_from_config(config: dict, *, empty: bool = False) -> nn.Module:
    """The Hugging Face causal LM of a config dict (``model_type`` plus its fields), freshly
    initialised; ``empty=True`` puts its parameters on the meta device instead (no memory, no
    init; buffers stay real) when accelerate is installed, for a caller that fills every weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(config)
    hf_cfg = AutoConfig.for_model(mc.pop("model_type"), **mc)
    if empty:
        try:
            from accelerate import init_empty_weights
        except ImportError:  # without accelerate: a normal (allocated, initialised) build
            pass
        else:
            with init_empty_weights(include_buffers=False):
                return AutoModelForCausalLM.from_config(hf_cfg)
    return AutoModelForCausalLM.from_config(hf_cfg)


@torch.no_grad()
def load(path: str, *, model: nn.Module | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
         verify_hash: bool = True, int4: str = "keep") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save`; returns ``(model, config dict)``.

    ``model``: a module of the saved architecture to fill (needed when the checkpoint has no
    Hugging Face config); by default the model is rebuilt from the stored config.  The 2:4
    layers come back as SparseLinear.  ``dtype`` casts after loading (default: as stored).
    ``verify_hash=False`` skips the SHA-256 (the structural checks still run).  2:4 int4 layers
    come back as SparseLinearInt4 with their scales as stored, whatever ``dtype``
    (``int4="keep"``), or as the 16-bit SparseLinear of their dequantized values
    (``int4="dequantize"``).

    Every tensor comes back in its stored dtype (a float32 norm of a bfloat16 model included) unless
    ``dtype`` is given.  A layer the checkpoint records as 2:4 (or an unstructured SparseLinear)
    replaces the module of that name, which must be a linear layer (nn.Linear, Conv1D,
    SparseLinear, SparseLinearInt4) of the recorded shape.

    Raises CheckpointError (a ValueError) on any mismatch; see the module docstring.
    TypeError/ValueError for bad arguments.
    """
    path = _check_path(path)
    if model is not None:
        _check_module(model)
    _check_load_args(dtype, device)
    if not isinstance(verify_hash, bool):
        raise TypeError(f"verify_hash: expected True or False, got {verify_hash!r}")
    if int4 not in ("keep", "dequantize"):
        raise ValueError(f"int4: got {int4!r}, expected 'keep' or 'dequantize'")
    cfg = read_config(path)
    tensors = _read_tensors(path, cfg, verify_hash)
    for name, li in cfg["layers"].items():
        _check_layer(name, li, tensors)
        if li.get("in_perm") and cfg["format_version"] < _VERSION_PERM:
            raise CheckpointError(f"2:4 layer {name!r} is recorded as permuted, which needs format_version "
                                  f"{_VERSION_PERM}; the checkpoint says {cfg['format_version']}")
        if li.get("format") == PATTERN_24_INT4 and cfg["format_version"] < _VERSION_INT4:
            raise CheckpointError(f"layer {name!r} is recorded as {PATTERN_24_INT4}, which needs format_version "
                                  f"{_VERSION_INT4}; the checkpoint says {cfg['format_version']}")
    for k, target in cfg["aliases"].items():
        if target not in tensors:
            raise CheckpointError(f"alias {k!r} points at {target!r}, which is not stored")
        tensors[k] = tensors[target]
    common = _common_dtype(tensors)
    m = _skeleton(path, cfg, model)
    if common is not None:  # the common dtype first: _match_dtypes then changes only the exceptions
        m = _to_dtype(m, common)
    from ..nn import SparseExpertsInt4, SparseLinearInt4

    sl = _sparse_linear_cls()
    for name, li in cfg["layers"].items():
        _check_replaced(m, name, f"{li.get('format', PATTERN_24)} layer", li["in_features"], li["out_features"])
        if li.get("format") == PATTERN_24_INT4:
            q4 = SparseLinearInt4(li["in_features"], li["out_features"], bias=li["bias"], group_size=li["group_size"],
                                  dtype=tensors[name + ".scales"].dtype, permuted=li.get("in_perm", False))
            _replace(m, name, q4)
            continue
        _replace(m, name, sl(li["in_features"], li["out_features"], bias=li["bias"], pattern=PATTERN_24,
                             dtype=tensors[name + ".values"].dtype,
                             permuted=li.get("in_perm", False)))  # filled by load_state_dict below
    unstructured = {}  # SparseLinear unstructured layers: loaded as nn.Linear, then rebuilt as such
    for name, li in cfg["masked"].items():
        pat = li.get("sparse_linear_pattern") if isinstance(li, dict) else None
        if pat is None:
            continue
        w = tensors.get(name + ".weight")
        if pat not in ("masked", "bitmask") or w is None or w.dim() != 2:
            raise CheckpointError(f"{path}: unstructured layer {name!r} ({pat!r}) has no 2-D {name}.weight stored")
        _check_replaced(m, name, "unstructured layer", w.shape[1], w.shape[0])
        # the stored weight is [out, in] (Linear layout), whatever the skeleton holds there
        _replace(m, name, nn.Linear(w.shape[1], w.shape[0], bias=name + ".bias" in tensors, dtype=w.dtype))
        unstructured[name] = None if pat == "masked" else pat
    _int4_experts(m, cfg.get("experts", {}), tensors, path, cfg["format_version"])
    _match_dtypes(m, tensors)
    try:
        m.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the stored tensors do not fit the model: {e}") from e
    for name, pat in unstructured.items():
        _replace(m, name, sl.from_dense(m.get_submodule(name), pattern=pat))
    _rebuild_sparse_experts(m, cfg.get("experts", {}), path, cfg["format_version"])
    m = m.to(device)
    quantized = (SparseLinearInt4, SparseExpertsInt4)
    if dtype is not None:  # int4 layers keep their scales as stored (the kernels take any float dtype)
        scales = [(n, b, t) for n, mod in m.named_modules() if isinstance(mod, quantized)
                  for b, t in mod._buffers.items() if b == "scales" or b.endswith("_scales")]
        m = _to_dtype(m, dtype)
        for n, b, t in scales:
            m.get_submodule(n)._buffers[b] = t
    if int4 == "dequantize":
        for n in [n for n, mod in m.named_modules() if isinstance(mod, quantized)]:
            _replace(m, n, _dequantized(m.get_submodule(n), dtype))
    return m.eval(), cfg


def _rebuild_sparse_experts(m: nn.Module, experts: dict, path: str, version: int) -> None:
    """Turn each experts module whose parameters are recorded with ``"pattern": "2:4"`` back into
    a SparseExperts (CheckpointError when they are not 2:4, or the entry names no such module)."""
    from ..nn import SparseExperts

    if not all(isinstance(v, dict) for v in experts.values()):  # (read_config checked it is a dict)
        raise CheckpointError(f"{path}: the manifest's 'experts' entry is not a mapping of objects")
    if experts and version < _VERSION_EXPERTS:
        raise CheckpointError(f"{path}: an 'experts' entry needs format_version {_VERSION_EXPERTS}; the checkpoint "
                              f"says {version}")
    bad = {k: v["pattern"] for k, v in experts.items() if v.get("pattern", PATTERN_24) not in (PATTERN_24,
                                                                                              PATTERN_24_INT4)}
    if bad:
        raise CheckpointError(f"{path}: expert parameters with an unknown pattern {bad} (this sparse_kernels reads "
                              f"'{PATTERN_24}' and '{PATTERN_24_INT4}')")
    modules = sorted({k.rpartition(".")[0] for k, v in experts.items() if v.get("pattern") == PATTERN_24})
    for name in modules:
        try:
            mod = m.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{path}: 2:4 experts {name!r} is not a module of {type(m).__name__}") from e
        try:
            _replace(m, name, SparseExperts.from_experts(mod))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: 2:4 experts {name!r} cannot be rebuilt: {e}") from e


def _int4_experts(m: nn.Module, experts: dict, tensors: dict, path: str, version: int) -> None:
    """Before the state dict is loaded: replace each experts module whose parameters are recorded
    with ``"pattern": "2:4-int4"`` by a SparseExpertsInt4 of their shapes (filled by
    ``load_state_dict``), after checking the entries against the module and the stored codes,
    meta and scales as :func:`_check_layer` checks a 2:4-int4 layer (CheckpointError otherwise)."""
    from ..nn import SparseExpertsInt4
    from ..pruning.experts import expert_params, is_experts_module, out_in

    modules: dict[str, dict] = {}
    for k, v in experts.items():
        if isinstance(v, dict) and v.get("pattern") == PATTERN_24_INT4:
            mname, _, pname = k.rpartition(".")
            modules.setdefault(mname, {})[pname] = v
    if modules and version < _VERSION_EXPERTS_INT4:
        raise CheckpointError(f"{path}: {PATTERN_24_INT4} experts need format_version {_VERSION_EXPERTS_INT4}; the "
                              f"checkpoint says {version}")
    for name, entries in sorted(modules.items()):
        what = f"{path}: {PATTERN_24_INT4} experts {name!r}"
        try:
            mod = m.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{what} is not a module of {type(m).__name__}") from e
        have = expert_params(mod) if is_experts_module(mod) else {}
        if set(entries) != set(have):
            raise CheckpointError(f"{what}: records {sorted(entries)}, the model's {type(mod).__name__} there has "
                                  f"expert parameters {sorted(have)}")
        groups = {json.dumps(v.get("group_size")) for v in entries.values()}
        g = next(iter(entries.values())).get("group_size")
        if len(groups) != 1 or not (g is None or (type(g) is int and g > 0)):
            raise CheckpointError(f"{what}: group_size must be one positive int (or null) for all its parameters, "
                                  f"got {sorted(groups)}")
        shapes = {}
        for pname, v in entries.items():
            e, out_f, in_f = out_in(mod, have[pname]).shape
            got = [v.get("num_experts"), v.get("out_features"), v.get("in_features")]
            if got != [e, out_f, in_f]:
                raise CheckpointError(f"{what}: {pname} is recorded as [experts, out, in] = {got}, the model's is "
                                      f"{[e, out_f, in_f]}")
            key = f"{name}.{pname}"
            parts = {p: tensors.get(f"{key}_{p}") for p in ("qvalues", "meta", "scales")}
            for p, t in parts.items():
                if t is None or t.dim() != 3 or list(t.shape[:2]) != [e, out_f]:
                    raise CheckpointError(f"{what}: {key}_{p} must be stored as [{e}, {out_f}, ...], got "
                                          f"{None if t is None else list(t.shape)}")
            in_pad = (in_f + 15) // 16 * 16
            _check_layer(key, {"format": PATTERN_24_INT4, "in_features": in_f, "out_features": e * out_f, "bias": False,
                               "group_size": in_pad if g is None else g},
                         {f"{key}.{p}": t.reshape(e * out_f, -1) for p, t in parts.items()})
            shapes[pname] = (e, out_f, in_f)
        scales = tensors[f"{name}.{next(iter(entries))}_scales"]
        try:
            new = SparseExpertsInt4._allocate(mod, shapes, {p: getattr(mod, p + "_bias", None) for p in shapes}, g,
                                              scales.dtype, scales.device, None)._finish(mod)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{what} cannot be rebuilt: {e}") from e
        _replace(m, name, new)


def _dequantized(mod, dtype):
    """The 16-bit 2:4 SparseLinear (SparseExperts) of a SparseLinearInt4 (SparseExpertsInt4), values
    rounded to ``dtype``, default the scales' dtype."""
    sl = mod.to_sparse()
    return sl if dtype is None else _to_dtype(sl, dtype)


def _to_dtype(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``m.to(dtype)`` except for non-persistent float buffers, which keep their dtype, as in a model
    loaded with ``from_pretrained(dtype=...)``: Hugging Face keeps e.g. the rotary ``inv_freq`` in
    float32.  Casting it too changed a bfloat16 model's logits after a save/load round trip."""
    keep = [(mod, name, buf) for mod in m.modules() for name, buf in mod._buffers.items()
            if buf is not None and buf.is_floating_point() and name in mod._non_persistent_buffers_set]
    m = m.to(dtype)
    for mod, name, buf in keep:
        mod._buffers[name] = buf
    return m


def describe_sizes(cfg: dict) -> dict:
    """Bytes on disk against the dense model, from a config returned by :func:`save` or :func:`load`."""
    return dict(cfg.get("sizes", {}))
