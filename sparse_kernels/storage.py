"""Any model's state_dict stored compressed, and read back bit for bit: :func:`save_sparse`,
:func:`load_sparse`.

For models the LLM checkpoint format (:mod:`sparse_kernels.llm.checkpoint`) does not cover
(vision models, anything that is not a Hugging Face causal LM): a pruned model keeps its dense
modules, and this stores each of its pruned tensors in the smallest of

* ``"2:4"``: every group of 4 along the input dimension holds at most 2 nonzeros: the 2:4
  format's ``values`` and ``meta`` (docs/FORMAT.md), 9/16 of the dense bytes for 16-bit
  tensors. A convolution weight ``[out, C, *kernel]`` is read channels-last,
  ``[out, kernel..., C]``, the layout :func:`sparse_kernels.prune` gives N:M convolutions;
* ``"bitmask"``: any pattern: the nonzeros, one bit per element and a row offset per row
  (:func:`sparse_kernels.compress_bitmask` of the same 2-D view);
* ``"dense"``: as it is (tensors that are not float16/bfloat16/float32 with 2 or more
  dimensions, or where neither format saves bytes). A tensor of 3 or more dimensions is tried
  both as a convolution weight (channels-last) and as stacked matrices ``[..., in]`` (a
  Mixture-of-Experts weight ``[E, out, in]``: groups along its last dimension); the entry's
  ``"view"`` records which;

and ``"alias"`` for a tensor that is another entry's tensor (tied weights: the same storage,
offset, shape and strides). A stored entry
must decompress to the original bits (NaN and inf included), with one exception: a zero comes
back as ``+0.0`` whatever its sign (pruning writes ``w * 0``, which is ``-0.0`` for a negative
``w``; the two compare and compute alike but for the sign of ``1/x``). An entry that would not
round-trip is stored dense. Dense entries keep every bit. One safetensors
file, written atomically; its metadata key ``sparse_kernels`` holds a JSON description of every
entry, with the SHA-256 of its stored tensors' bytes (format version 2; version 1 files, which
have none, still load), validated on load (:class:`SparseStateError`, naming the entry, for
anything that does not fit, corrupted bytes included).

    report = save_sparse(model, "pruned.safetensors")
    model.load_state_dict(load_sparse("pruned.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .pruning.layers import channels_last_2d, from_channels_last_2d

__all__ = ["save_sparse", "load_sparse", "SparseStateError", "StorageReport"]

FORMAT_VERSION = 2  # 2: each stored entry records the SHA-256 of its tensors ("sha256")
READ_VERSIONS = (1, 2)
_META_KEY = "sparse_kernels"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class SparseStateError(ValueError):
    """A file :func:`load_sparse` cannot trust: not ours, another version, or an entry whose
    tensors do not describe the tensor it claims."""


@dataclass
class StorageReport:
    """What :func:`save_sparse` wrote: per entry its format and stored bytes; totals."""

    path: str
    formats: dict = field(default_factory=dict)
    #: the bytes of the state_dict's distinct tensors (a tied weight counted once)
    dense_bytes: int = 0
    stored_bytes: int = 0
    file_bytes: int = 0

    def __str__(self) -> str:
        counts = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return (f"save_sparse: {self.path}: {kinds}; tensors {self.dense_bytes} -> {self.stored_bytes} bytes "
                f"({self.stored_bytes / max(self.dense_bytes, 1):.3f}x), file {self.file_bytes} bytes")


def _view2d(t: torch.Tensor, view: str = "channels_last") -> torch.Tensor:
    """``[out, in]`` as it is. 3+ dims: ``"channels_last"`` reads ``[out, C, *kernel]`` as
    ``[out, prod(kernel) * C]`` (a convolution); ``"rows"`` reads ``[..., in]`` as
    ``[prod(leading), in]`` (stacked matrices, e.g. a Mixture-of-Experts weight ``[E, out, in]``)."""
    if t.dim() > 2 and view == "rows":
        return t.reshape(-1, t.shape[-1])
    return channels_last_2d(t)


def _from_view2d(v: torch.Tensor, shape, view: str = "channels_last") -> torch.Tensor:
    if len(shape) == 2 or view == "rows":
        return v.reshape(shape)
    return from_channels_last_2d(v, shape).contiguous()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


_MAGNITUDE = {2: 0x7FFF, 4: 0x7FFFFFFF}


def _nonzero(v: torch.Tensor) -> torch.Tensor:
    """Elements to store: every bit pattern but a zero of either sign (NaN, inf and subnormals
    included, whatever ``torch.set_flush_denormal`` says)."""
    return (_bits(v) & _MAGNITUDE[v.element_size()]) != 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, except that a zero may come back with the other sign."""
    return bool(((_bits(a) == _bits(b)) | (~_nonzero(a) & ~_nonzero(b))).all())


def _sizes(v: torch.Tensor, nonzero: torch.Tensor, formats) -> dict:
    """The bytes each applicable format would take (computed, nothing compressed yet)."""
    rows, cols = v.shape
    elt, out = v.element_size(), {}
    if "2:4" in formats and cols % 16 == 0 and int(nonzero.view(rows, cols // 4, 4).sum(-1).max()) <= 2:
        out["2:4"] = rows * cols // 2 * elt + rows * cols // 16 * 2
    if "bitmask" in formats:
        out["bitmask"] = int(nonzero.sum()) * elt + rows * ((cols + 7) // 8) + (rows + 1) * 8
    return out


def _compress(fmt: str, v: torch.Tensor, nonzero: torch.Tensor):
    """The format's tensors for ``v``, or None when they would not give ``v`` back."""
    from .ops import bitmask, sparse24

    if fmt == "2:4":
        values, meta = sparse24.compress_2to4(torch.where(nonzero, v, torch.zeros((), dtype=v.dtype)))
        parts, back = {"values": values, "meta": meta}, sparse24.decompress_2to4(values, meta)
    else:
        values, mask, row_ptr = bitmask.compress_bitmask(v, nonzero)
        parts = {"values": values, "bitmask": mask, "row_ptr": row_ptr}
        back = bitmask.decompress_bitmask(values, mask, row_ptr, v.shape[1])
    return parts if _same(back, v) else None


def _digest(parts: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the raw bytes of an entry's stored tensors, concatenated in the order of their
    names (a dense entry: its one tensor)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(parts[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _state(obj) -> dict:
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, dict):
        state = obj
    else:
        raise TypeError(f"obj: expected an nn.Module or a dict of str -> tensor (a state_dict), got "
                        f"{type(obj).__name__}")
    for k, t in state.items():
        if not isinstance(k, str):
            raise TypeError(f"obj: keys must be str, got {type(k).__name__} {k!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"obj: entry {k!r} is a {type(t).__name__} (extra state?), not a tensor; save_sparse "
                            f"stores tensors only")
    return state


def _identity(t: torch.Tensor):
    """Two entries with this identity are the same tensor (tied weights): taken on the original
    tensor, wherever it lives, so no temporary copy's address can be reused by another."""
    if not t.numel():
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype, t.is_conj(), t.is_neg())


def save_sparse(obj, path: str, *, formats=("2:4", "bitmask")) -> StorageReport:
    """Write ``obj``'s state_dict (an ``nn.Module`` or the dict itself) to ``path``, each pruned
    tensor in the smallest format of ``formats`` that round-trips it bit for bit (zeros up to
    their sign; module docstring). The sizes are computed before anything is compressed, and
    only the chosen format is built and checked, one tensor at a time. Atomic: ``path`` is
    complete or untouched. Returns a :class:`StorageReport`."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - an optional dependency
        raise ImportError("save_sparse needs safetensors (pip install safetensors)") from e
    from .llm.checkpoint import _atomic_write, _check_path

    path = _check_path(path)
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory; save_sparse writes one file")
    if isinstance(formats, str):
        formats = (formats,)
    if not isinstance(formats, (tuple, list)):
        raise TypeError(f"formats: expected a str or a tuple of them, got {type(formats).__name__}")
    bad = [f for f in formats if f not in ("2:4", "bitmask")]
    if bad:
        raise ValueError(f"formats: unknown {bad[0]!r}; expected a subset of ('2:4', 'bitmask')")
    state = _state(obj)
    tensors, entries = {}, {}
    report = StorageReport(path=path)
    seen: dict[tuple, str] = {}
    written: set = set()  # storages a dense entry already holds (safetensors refuses shared memory)
    for key, t in state.items():
        if "::" in key:
            raise ValueError(f"obj: key {key!r} contains '::', which this format uses to name an entry's parts")
        t = t.detach()
        ident = _identity(t)
        if ident is not None and ident in seen:
            entries[key] = {"format": "alias", "of": seen[ident]}
            report.formats[key] = "alias"
            continue
        if ident is not None:
            seen[ident] = key
        report.dense_bytes += _nbytes(t)
        t = t.resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            t = t.cpu()
        parts = chosen = None
        if t.dtype in _FLOAT and t.dim() >= 2 and t.numel() and t.shape[0]:
            # every (size, format, view) that applies, smallest first: a 3+-dim tensor is tried as a
            # convolution (channels-last) and as stacked matrices (rows)
            options = []
            for view in ("channels_last", "rows") if t.dim() > 2 else ("channels_last",):
                v = _view2d(t, view).contiguous()
                nonzero = _nonzero(v)
                options += [(size, fmt, view) for fmt, size in _sizes(v, nonzero, formats).items()]
                del v, nonzero
            for size, fmt, view in sorted(options, key=lambda o: o[0]):
                if size >= _nbytes(t):
                    break
                v = _view2d(t, view).contiguous()
                parts = _compress(fmt, v, _nonzero(v))
                if parts is not None:
                    chosen, chosen_view = fmt, view
                    break
        if parts is None:
            dense = t.contiguous()
            if dense.untyped_storage().data_ptr() in written:
                dense = dense.clone()
            written.add(dense.untyped_storage().data_ptr())
            tensors[key] = dense
            entries[key] = {"format": "dense", "sha256": _digest({key: dense})}
            report.formats[key] = "dense"
            report.stored_bytes += _nbytes(t)
            continue
        parts = {name: p.contiguous() for name, p in parts.items()}
        for name, p in parts.items():
            tensors[f"{key}::{name}"] = p
        entries[key] = {"format": chosen, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                        "sha256": _digest(parts)}
        if t.dim() > 2:
            entries[key]["view"] = chosen_view
        report.formats[key] = chosen
        report.stored_bytes += _nbytes(*parts.values())
    meta = {_META_KEY: json.dumps({"format_version": FORMAT_VERSION, "entries": entries})}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    report.file_bytes = os.path.getsize(path)
    return report


def _fail(key: str, what: str):
    raise SparseStateError(f"{key}: {what}")


def _check_digest(key: str, entry: dict, parts: dict[str, torch.Tensor], version: int) -> None:
    if version < 2:  # version 1 recorded no checksum
        return
    want = entry.get("sha256")
    if not isinstance(want, str):
        _fail(key, f"no 'sha256' recorded (format version {version} records one for every stored entry)")
    got = _digest(parts)
    if got != want:
        _fail(key, f"corrupted: the SHA-256 of its stored tensors is {got}, the file records {want}")


def _shape(key: str, entry: dict) -> tuple:
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        _fail(key, f"shape {shape!r} is not a list of 2 or more positive ints")
    return tuple(shape)


def _rebuild(key: str, entry: dict, parts: dict) -> torch.Tensor:
    from .ops import bitmask, sparse24

    fmt = entry["format"]
    shape = _shape(key, entry)
    dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        _fail(key, f"dtype {entry.get('dtype')!r} is not float16, bfloat16 or float32")
    view = entry.get("view", "channels_last")
    if view not in ("channels_last", "rows") or (view == "rows" and len(shape) < 3):
        _fail(key, f"view {view!r} is not 'channels_last' or 'rows' (the latter for 3+ dims)")
    rows, cols = (math.prod(shape[:-1]), shape[-1]) if view == "rows" else (shape[0], math.prod(shape[1:]))
    want = {"2:4": ("values", "meta"), "bitmask": ("values", "bitmask", "row_ptr")}[fmt]
    missing = [n for n in want if n not in parts]
    if missing or len(parts) != len(want):
        _fail(key, f"a {fmt} entry needs the tensors {', '.join(want)}; the file has {', '.join(sorted(parts)) or 'none'}")
    if parts["values"].dtype != dtype:
        _fail(key, f"values are {parts['values'].dtype}, the entry says {dtype}")
    try:
        if fmt == "2:4":
            values, meta = parts["values"], parts["meta"]
            if tuple(values.shape) != (rows, cols // 2) or tuple(meta.shape) != (rows, cols // 16) or cols % 16:
                _fail(key, f"values {tuple(values.shape)} / meta {tuple(meta.shape)} do not fit a {rows} x {cols} "
                           f"2:4 weight (values [rows, cols/2], meta [rows, cols/16], cols % 16 == 0)")
            v = sparse24.decompress_2to4(values, meta)  # validates the meta nibbles
        else:
            values, mask, row_ptr = parts["values"], parts["bitmask"], parts["row_ptr"]
            if (values.dim() != 1 or tuple(mask.shape) != (rows, (cols + 7) // 8) or mask.dtype != torch.uint8
                    or tuple(row_ptr.shape) != (rows + 1,) or row_ptr.dtype != torch.int64):
                _fail(key, f"values {tuple(values.shape)} / bitmask {tuple(mask.shape)} {mask.dtype} / row_ptr "
                           f"{tuple(row_ptr.shape)} {row_ptr.dtype} do not fit a {rows} x {cols} bitmask weight")
            v = bitmask.decompress_bitmask(values, mask, row_ptr, cols)  # checks popcounts against row_ptr
    except SparseStateError:
        raise
    except (ValueError, TypeError) as e:
        _fail(key, f"the {fmt} tensors are inconsistent ({e})")
    return _from_view2d(v, shape, view)


def load_sparse(path: str, model: nn.Module | None = None, *, strict: bool = True) -> dict:
    """Read a :func:`save_sparse` file back into a state_dict of dense tensors (bit-exact but for
    the sign of zeros in compressed entries, on the CPU). With ``model``, also ``model.load_state_dict(state, strict=strict)``. Raises
    :class:`SparseStateError` (a ValueError) for a file that is not ours, another format version,
    an entry that does not describe its tensor or whose bytes do not match its SHA-256;
    FileNotFoundError for a missing file; TypeError for arguments of the wrong type and ValueError
    when the tensors do not fit ``model``."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - an optional dependency
        raise ImportError("load_sparse needs safetensors (pip install safetensors)") from e
    from .llm.checkpoint import _check_module, _check_path

    path = _check_path(path)
    if model is not None:
        _check_module(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected True or False, got {strict!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors for a corrupt file
        raise SparseStateError(f"path: {path!r} is not a readable safetensors file ({e})") from None
    if _META_KEY not in meta:
        raise SparseStateError(f"path: {path!r} has no {_META_KEY!r} metadata; it was not written by save_sparse")
    try:
        desc = json.loads(meta[_META_KEY])
        version, entries = desc["format_version"], desc["entries"]
    except (ValueError, KeyError, TypeError) as e:
        raise SparseStateError(f"path: the {_META_KEY!r} metadata is not valid ({e})") from None
    if type(version) is not int or version not in READ_VERSIONS:
        raise SparseStateError(f"path: format version {version!r}; this sparse_kernels reads versions "
                               f"{', '.join(map(str, READ_VERSIONS))}")
    if not isinstance(entries, dict):
        raise SparseStateError("path: the entries are not a dict")
    parts: dict[str, dict] = {}
    for name, t in stored.items():
        key, sep, part = name.rpartition("::")
        if sep:
            parts.setdefault(key, {})[part] = t
    used = set()
    state = {}
    for key, entry in entries.items():
        fmt = entry.get("format") if isinstance(entry, dict) else None
        if fmt == "dense":
            if key not in stored:
                _fail(key, "a dense entry whose tensor is missing from the file")
            _check_digest(key, entry, {key: stored[key]}, version)
            state[key] = stored[key]
            used.add(key)
        elif fmt in ("2:4", "bitmask"):
            _check_digest(key, entry, parts.get(key, {}), version)
            state[key] = _rebuild(key, entry, parts.get(key, {}))
            used.update(f"{key}::{n}" for n in parts.get(key, {}))
        elif fmt != "alias":
            _fail(key, f"unknown format {fmt!r} (expected dense, 2:4, bitmask or alias)")
    for key, entry in entries.items():  # an alias names a stored (non-alias) entry: order does not matter
        if entry.get("format") == "alias":
            src = entry.get("of")
            if not isinstance(src, str) or src not in state:
                _fail(key, f"an alias of {src!r}, which is not a stored entry of the file")
            state[key] = state[src]
    extra = sorted(set(stored) - used)
    if extra:
        raise SparseStateError(f"path: tensors {extra[:3]} belong to no entry")
    state = {k: state[k] for k in entries}  # the saved order
    if model is not None:
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise ValueError(f"model: the tensors of {path!r} do not fit this {type(model).__name__}: {e}") from None
    return state
