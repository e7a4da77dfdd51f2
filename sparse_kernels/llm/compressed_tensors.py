"""Read and write sparse checkpoints in compressed-tensors' format (llm-compressor's).

llm-compressor saves pruned models as Hugging Face directories whose ``config.json`` carries
``quantization_config = {"quant_method": "compressed-tensors", "sparsity_config": {...}}`` and
whose safetensors hold each sparse Linear weight in one of three ``sparsity_config.format``\\ s:

* ``sparse-24-bitmask``: ``PREFIX.compressed [rows, cols/2]`` (the kept values, row-major),
  ``PREFIX.bitmask [rows, ceil(cols/8)]`` uint8 (bit ``c % 8`` of byte ``c / 8`` = column ``c``
  kept, two per group of four) and ``PREFIX.shape`` (the dense ``[rows, cols]``);
* ``sparse-bitmask`` (any pattern): ``PREFIX.compressed`` 1-D nonzeros, ``PREFIX.bitmask``,
  ``PREFIX.shape`` and ``PREFIX.row_offsets [rows]`` (where each row's values start);
* ``dense``: plain weights; ``targets``/``ignore`` and ``sparsity_structure`` say which layers are
  sparse and how.

compressed-tensors 0.13 and later dropped these sparse compressors, and with them transformers'
ability to load such checkpoints compressed; vLLM dropped its 2:4 kernels.  :func:`load` reads
them straight into :class:`sparse_kernels.nn.SparseLinear`: a 2:4 weight becomes ``values``/``meta``
by a table lookup on its bitmask (:func:`sparse_kernels.from_compressed_tensors_24`), a
``sparse-bitmask`` one our bitmask layer as stored (the same bit order), never the dense weight
(unless ``unstructured="dense"``).  :func:`save` writes a model with SparseLinear layers back in
that format, readable by compressed-tensors 0.12 and earlier (and by the llm-compressor and
transformers releases that use such a compressed-tensors; transformers 5 needs compressed-tensors
0.15 or later, which has no sparse decompressors).

Quantized checkpoints (llm-compressor's sparse FP8 / INT8 / W4A16 models: ``float-quantized``,
``int-quantized``, ``naive-quantized`` and ``pack-quantized`` weights) are read by dequantizing
each weight once, on load, exactly as compressed-tensors does (``(q - zero_point) * scale`` in the
scale's dtype, per tensor, channel, group, activation-ordered group or block), so a 2:4 FP8 model
runs on our 16-bit 2:4 kernels.  ``marlin-24`` (2:4 int4/int8 in Marlin's tiled layout, which
compressed-tensors writes but cannot read) is unshuffled and dequantized the same way.
Input-activation quantization is emulated with ``load(..., activations="emulate")``
(:func:`fake_quantize_activation`); otherwise, and always for KV-cache and output activations,
those scales are dropped and listed in :attr:`LoadInfo.quantization`.  FP4 (``nvfp4-pack-quantized``) and transforms are refused with a
clear error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import checkpoint as ckpt

QUANT_METHOD = "compressed-tensors"
FORMAT_24 = "sparse-24-bitmask"
FORMAT_BITMASK = "sparse-bitmask"
FORMAT_DENSE = "dense"
READ_FORMATS = (FORMAT_24, FORMAT_BITMASK, FORMAT_DENSE)
# the compressed-tensors release whose sparse format save() writes: the last one with sparse compressors
WRITES_FORMAT_OF = "0.12.2"
UNSTRUCTURED = ("bitmask", "dense")
_PARTS = {FORMAT_24: ("shape", "compressed", "bitmask"), FORMAT_BITMASK: ("shape", "compressed", "bitmask",
                                                                             "row_offsets")}


class CompressedTensorsError(ckpt.CheckpointError):
    """A compressed-tensors checkpoint this code cannot read (a ValueError): names file and problem."""


@dataclass
class LoadInfo:
    """What :func:`load` found: the sparsity config, and per converted layer its pattern."""

    path: str
    sparsity_config: dict
    layers: dict[str, str] = field(default_factory=dict)  # module name -> "2:4" | "bitmask" | "dense" | "2:4 int4"
    # for a quantized checkpoint: its format, the weight schemes, the layers dequantized and to
    # which dtype, and what was stored but not applied (activation / KV-cache scales)
    quantization: dict | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "sparsity_config": self.sparsity_config, "layers": dict(self.layers),
                "quantization": self.quantization}


# ------------------------------------------------------------------ config
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CompressedTensorsError(f"{path}: unreadable or not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CompressedTensorsError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


# weight formats whose weights load dequantized; "dense" stores them unquantized (scales beside)
QUANT_READ_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "marlin-24",
                      FORMAT_DENSE)
_WHY_NOT = {"nvfp4-pack-quantized": "FP4 weights", "mixed-precision": "a format per config group, none given"}
_STRATEGIES = ("tensor", "channel", "group", "block")
# stored quantization parameters that belong to activations or the KV cache: dropped, not applied
_NOT_APPLIED = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                "k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point", "q_zero_point")
_WEIGHT_QPARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_packed", "weight_shape")
_MARLIN24_PARTS = ("weight_packed", "scale_packed", "meta")


@dataclass
class _Scheme:
    """One config group's weight quantization, as :func:`_dequantize` needs it."""

    group: str
    targets: list
    format: str
    type: str = "int"
    num_bits: int = 8
    strategy: str = "tensor"
    group_size: int | None = None
    block: tuple | None = None
    activations: str | None = None  # what the group quantizes besides weights (not applied)
    symmetric: bool = True
    has_weights: bool = True  # False: a group that quantizes activations only
    input_acts: dict | None = None  # its input_activations QuantizationArgs (load(activations="emulate"))


def _is_quantized(qc: dict) -> bool:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        return True  # malformed: _schemes says how
    return bool(any(isinstance(g, dict) and (g.get("weights") or g.get("input_activations")) for g in groups.values())
                or (groups and qc.get("format") not in (None, FORMAT_DENSE)) or qc.get("kv_cache_scheme"))


def _schemes(qc: dict) -> tuple[list[_Scheme], list[str]]:
    """The weight quantization of each config group, and what is quantized but not applied
    (activations, KV cache).  Raises ValueError (the caller names the file) for what this code
    cannot dequantize exactly."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ValueError(f"config_groups must be a JSON object, got {type(groups).__name__}")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise ValueError(f"ignore must be a list of strings, got {ignore!r}")
    out, notes = [], []
    for gname, g in groups.items():
        if not isinstance(g, dict):
            raise ValueError(f"config group {gname!r} must be a JSON object, got {type(g).__name__}")
        fmt = g.get("format") or qc.get("format") or FORMAT_DENSE
        if fmt not in QUANT_READ_FORMATS:
            why = _WHY_NOT.get(fmt, "unknown")
            raise ValueError(f"config group {gname!r}: quantization format {fmt!r} ({why}) is not supported; "
                             f"sparse_kernels dequantizes {', '.join(QUANT_READ_FORMATS)}")
        acts = [f"{k.split('_')[0]} activations: {_describe(g[k])}" for k in ("input_activations", "output_activations")
                if isinstance(g.get(k), dict)]
        notes += [f"{gname} {a}" for a in acts]
        w = g.get("weights")
        targets = g.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"config group {gname!r}: targets must be a list of strings, got {targets!r}")
        ia = g.get("input_activations") if isinstance(g.get("input_activations"), dict) else None
        if not isinstance(w, dict):  # activations only: its layers' weights are not quantized
            out.append(_Scheme(gname, targets, fmt, activations="; ".join(acts) or None, has_weights=False,
                               input_acts=ia))
            continue
        typ, bits, strategy, gs = (str(w.get("type", "int")).lower(), w.get("num_bits", 8), w.get("strategy"),
                                   w.get("group_size"))
        # compressed-tensors' QuantizationArgs rules: no strategy means tensor, or group for
        # group_size > 0, or channel for group_size -1; names in any case; "8x8" block strings
        strategy = (str(strategy).lower() if strategy is not None
                    else "group" if isinstance(gs, int) and gs > 0 else "channel" if gs == -1 else "tensor")
        block = w.get("block_structure")
        if isinstance(block, str):
            try:
                block = [int(b) for b in block.lower().split("x")]
            except ValueError:
                raise ValueError(f"config group {gname!r}: block_structure {block!r} is not ROWSxCOLS") from None
        symmetric = w.get("symmetric", True)
        if w.get("dynamic"):
            raise ValueError(f"config group {gname!r}: weights.dynamic is set; weights must be stored quantized")
        if (typ, bits) != ("float", 8) and not (typ == "int" and isinstance(bits, int) and 2 <= bits <= 8):
            raise ValueError(f"config group {gname!r}: weights of type {typ!r} with {bits} bits are not supported "
                             f"(int with 2..8 bits, or float with 8 bits: float8_e4m3fn)")
        if strategy not in _STRATEGIES:
            raise ValueError(f"config group {gname!r}: weight strategy {strategy!r} is not supported (one of "
                             f"{', '.join(_STRATEGIES)})")
        if strategy == "group" and not (isinstance(gs, int) and gs > 0):
            raise ValueError(f"config group {gname!r}: strategy 'group' needs a positive group_size, got {gs!r}")
        if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                        and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"config group {gname!r}: strategy 'block' needs block_structure [rows, cols], "
                             f"got {block!r}")
        if fmt == "pack-quantized" and typ != "int":
            raise ValueError(f"config group {gname!r}: pack-quantized weights must be int, got {typ!r}")
        if fmt == "pack-quantized" and not symmetric and strategy in ("group", "channel"):
            raise ValueError(f"config group {gname!r}: asymmetric pack-quantized weights per {strategy} store packed "
                             f"zero points, which compressed-tensors itself cannot decompress")
        if fmt == "marlin-24" and (typ != "int" or bits not in (4, 8) or strategy not in ("group", "channel")
                                   or (strategy == "group" and gs != 128) or not w.get("symmetric", True)):
            raise ValueError(f"config group {gname!r}: marlin-24 holds symmetric int4/int8 weights per channel or "
                             f"per group of 128, got {typ}{bits} per {strategy}"
                             f"{f' {gs}' if strategy == 'group' else ''}, symmetric={w.get('symmetric', True)}")
        out.append(_Scheme(gname, targets, fmt, typ, bits, strategy, gs, tuple(block) if block else None,
                           "; ".join(acts) or None, bool(symmetric), input_acts=ia))
    kv = qc.get("kv_cache_scheme")
    if isinstance(kv, dict):
        notes.append(f"KV cache: {_describe(kv)}")
    return out, notes


def _describe(a: dict) -> str:
    """``float8 dynamic per token`` for a QuantizationArgs dict."""
    typ = {"float": "float", "int": "int"}.get(a.get("type"), str(a.get("type")))
    return (f"{typ}{a.get('num_bits')} {'dynamic' if a.get('dynamic') else 'static'} per "
            f"{a.get('strategy') or 'tensor'}")


def _section(cfg: dict):
    """The compression section of a config.json: ``quantization_config`` with ``quant_method:
    compressed-tensors`` (compressed-tensors 0.5 and later), else the ``compression_config`` that
    compressed-tensors up to 0.4 (the sparseml era) wrote, quantization fields and
    ``sparsity_config`` alike.  ``(section, None)`` or ``(None, why not)``."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return qc, None
    legacy = cfg.get("compression_config")
    if isinstance(legacy, dict) and legacy.get("quant_method", QUANT_METHOD) == QUANT_METHOD and legacy:
        return legacy, None
    got = qc.get("quant_method") if isinstance(qc, dict) else qc
    return None, (f"quantization_config.quant_method is {got!r}, expected {QUANT_METHOD!r}, and there is no "
                  f"compression_config (not a compressed-tensors checkpoint)")


def is_compressed_tensors(path: str) -> bool:
    """True when ``path`` is a directory holding a *sparse* compressed-tensors checkpoint that
    :func:`load` reads (config.json: ``quant_method: compressed-tensors``, or the legacy
    ``compression_config``; a ``sparsity_config``; no quantization, or weight quantization that
    :func:`load` dequantizes).  Other compressed-tensors models (dense quantized ones, FP4) are
    left to transformers (``from_pretrained`` with compressed-tensors installed)."""
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        return False
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    qc, _ = _section(cfg) if isinstance(cfg, dict) else (None, None)
    if qc is None or not isinstance(qc.get("sparsity_config"), dict) or not qc["sparsity_config"]:
        return False
    try:
        _schemes(qc)
    except ValueError:
        return False
    return not qc.get("transform_config")


def read_config(path: str) -> tuple[dict, dict]:
    """``(model config without its compression section, sparsity_config)`` of the checkpoint
    ``path`` (see :func:`_section` for where that section is).

    Raises CompressedTensorsError for a missing or unreadable config.json, a checkpoint that is
    not compressed-tensors, quantization :func:`load` cannot dequantize (FP4, dynamic weights), transforms, and a sparsity format other than :data:`READ_FORMATS`.
    """
    cfg, sc, _ = _read_config(path)
    return cfg, sc


def _read_config(path: str):
    """:func:`read_config`, plus the quantization section: None, or ``{"format", "schemes",
    "not_applied"}`` (see :func:`_schemes`)."""
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        raise CompressedTensorsError(f"{path}: config.json is missing (not a Hugging Face model directory)")
    cfg = _read_json(cpath)
    qc, why = _section(cfg)
    if qc is None:
        raise CompressedTensorsError(f"{cpath}: {why}")
    cfg.pop("quantization_config", None)
    cfg.pop("compression_config", None)
    quant = None
    if _is_quantized(qc):
        try:
            schemes, notes = _schemes(qc)
        except ValueError as e:
            raise CompressedTensorsError(f"{cpath}: {e}") from e
        quant = {"format": qc.get("format"), "schemes": schemes, "not_applied": notes, "ignore": qc.get("ignore") or []}
    if qc.get("transform_config"):
        raise CompressedTensorsError(f"{cpath}: transform_config is set (rotations); sparse_kernels does not apply "
                                     f"compressed-tensors transforms")
    sc = qc.get("sparsity_config") or {}
    if not isinstance(sc, dict):
        raise CompressedTensorsError(f"{cpath}: sparsity_config must be a JSON object, got {type(sc).__name__}")
    sfmt = sc.get("format", FORMAT_DENSE) if sc else FORMAT_DENSE
    if sfmt not in READ_FORMATS:
        raise CompressedTensorsError(f"{cpath}: sparsity format {sfmt!r} is not supported; sparse_kernels reads "
                                     f"{', '.join(READ_FORMATS)} (marlin-24 is a quantization format)")
    if "model_type" not in cfg:
        raise CompressedTensorsError(f"{cpath}: model_type is missing; cannot build the model")
    return cfg, dict(sc, format=sfmt), quant


# ------------------------------------------------------------------ targets (compressed-tensors' matching)
def _matches(name: str, module: nn.Module, targets) -> bool:
    """compressed-tensors' rule: ``re:PATTERN`` matches the name from its start (``re.match``), any
    other target the exact name or the name of a class in the module's MRO."""
    for t in targets or ():
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or any(c.__name__ == t for c in type(module).__mro__):
            return True
    return False


def _targeted(model: nn.Module, sc: dict) -> list[str]:
    targets = sc.get("targets") or ["Linear"]
    return [n for n, m in model.named_modules()
            if n and _matches(n, m, targets) and not _matches(n, m, sc.get("ignore") or ())]


# ------------------------------------------------------------------ tensors
def _tensor_files(path: str) -> list[str]:
    """``model.safetensors`` when there is one (as transformers and compressed-tensors choose),
    else the shards named by ``model.safetensors.index.json``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(index):
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CompressedTensorsError(f"{index}: weight_map is missing or empty")
        files = sorted(set(wm.values()))
    else:
        raise CompressedTensorsError(f"{path}: no model.safetensors or model.safetensors.index.json (only "
                                     f"safetensors checkpoints are read)")
    out = []
    for f in files:
        p = os.path.join(path, f)
        if os.path.basename(f) != f or not os.path.isfile(p):
            raise CompressedTensorsError(f"{path}: tensors file {f!r} named by the index is missing")
        out.append(p)
    return out


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for p in _tensor_files(path):
        try:
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    if k in tensors:
                        raise CompressedTensorsError(f"{p}: tensor {k!r} is stored twice")
                    tensors[k] = f.get_tensor(k)
        except SafetensorError as e:
            raise CompressedTensorsError(f"{p}: not a readable safetensors file ({e})") from e
    return tensors


def _shape(prefix: str, t: torch.Tensor) -> tuple[int, int]:
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool) or t.numel() != 2:
        raise CompressedTensorsError(f"{prefix}.shape: expected two integers (the dense [rows, cols]), got "
                                     f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    rows, cols = (int(v) for v in t.flatten().tolist())
    if rows <= 0 or cols <= 0:
        raise CompressedTensorsError(f"{prefix}.shape: [{rows}, {cols}] is not a valid weight shape")
    return rows, cols


def _pop_compressed(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """Take every compressed weight's parts out of ``tensors``: ``{module prefix: {part: tensor}}``."""
    parts = _PARTS.get(fmt)
    if parts is None:
        return {}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for k in [k for k in tensors if k.rsplit(".", 1)[-1] in parts]:
        prefix, part = k.rsplit(".", 1)
        if part == "shape" and prefix + ".compressed" not in tensors:
            continue  # a module's own tensor that happens to be called "shape"
        found.setdefault(prefix, {})[part] = tensors[k]
    out = {}
    for prefix, d in found.items():
        if "compressed" not in d and "bitmask" not in d:
            continue
        missing = [p for p in parts if p not in d]
        if missing:
            raise CompressedTensorsError(f"{prefix}: compressed as {fmt} but {', '.join(prefix + '.' + m for m in missing)} "
                                         f"is missing")
        for p in parts:
            del tensors[prefix + "." + p]
        out[prefix] = d
    return out


def _bitmask_parts(prefix: str, d: dict[str, torch.Tensor]):
    """sparse-bitmask parts -> our ``(values, bitmask, row_ptr)``, checked; and the dense shape."""
    from ..ops.bitmask import check_bitmask
    from ..reference.linear import unpack_mask

    rows, cols = _shape(prefix, d["shape"])
    values, bitmask, offs = d["compressed"], d["bitmask"], d["row_offsets"]
    if offs.dtype not in (torch.int32, torch.int64) or tuple(offs.shape) != (rows,):
        raise CompressedTensorsError(f"{prefix}.row_offsets: expected int64[{rows}], got "
                                     f"{str(offs.dtype).replace('torch.', '')}{list(offs.shape)}")
    row_ptr = torch.cat((offs.to(torch.int64), torch.tensor([values.numel()])))
    try:
        check_bitmask(values, bitmask, row_ptr, cols)
        if bitmask.shape[0] != rows:
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows, the shape says {rows}")
        counts = unpack_mask(bitmask, bitmask.shape[1] * 8).sum(1)
        if cols % 8 and int(unpack_mask(bitmask, bitmask.shape[1] * 8)[:, cols:].sum()):
            raise ValueError(f"bits are set past column {cols} (padding must be zero)")
        if int(counts.sum()) != values.numel():
            raise ValueError(f"the bitmask marks {int(counts.sum())} elements but compressed holds {values.numel()}")
        bad = (row_ptr.diff() != counts).nonzero()
        if int(row_ptr[0]) != 0 or bad.numel():
            r = 0 if int(row_ptr[0]) != 0 else int(bad[0])
            raise ValueError(f"row_offsets do not match the bitmask's popcounts (first at row {r})")
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CompressedTensorsError(f"{prefix}: {e}") from e
    return values, bitmask, row_ptr, (rows, cols)


def _dense_from_parts(prefix: str, fmt: str, d: dict[str, torch.Tensor]) -> torch.Tensor:
    from ..reference.bitmask import decompress_bitmask
    from ..reference.sparse24 import decompress_2to4

    if fmt == FORMAT_24:
        values, meta, (rows, cols) = _parts_24(prefix, d)
        return decompress_2to4(values, meta)[:, :cols].contiguous()
    values, bitmask, row_ptr, (rows, cols) = _bitmask_parts(prefix, d)
    return decompress_bitmask(values, bitmask, row_ptr, cols)


def _parts_24(prefix: str, d: dict[str, torch.Tensor]):
    from ..interop import from_compressed_tensors_24

    rows, cols = _shape(prefix, d["shape"])
    if cols % 4:
        raise CompressedTensorsError(f"{prefix}.shape: [{rows}, {cols}]: 2:4 needs a multiple of 4 columns")
    try:
        values, meta = from_compressed_tensors_24(d["compressed"], d["bitmask"], cols)
    except (TypeError, ValueError) as e:
        raise CompressedTensorsError(f"{prefix}: {e}") from e
    if values.shape[0] != rows:
        raise CompressedTensorsError(f"{prefix}: {values.shape[0]} rows stored, the shape says {rows}")
    return values, meta, (rows, cols)


# ------------------------------------------------------------------ quantized weights
def _scheme_for(name: str, mod: nn.Module, quant: dict):
    """The config group that quantizes module ``name``, by compressed-tensors' precedence: an
    exact name, then a ``re:`` pattern, then a class name (targets sorted, a later group's
    target overriding an earlier one's); None when ignored or unmatched."""
    if _matches(name, mod, quant["ignore"]):
        return None
    by_target = {t: sch for sch in quant["schemes"] for t in sch.targets}
    targets = sorted(by_target, key=lambda t: (t.startswith("re:"), t))
    hits = [t for t in targets if (re.match(t[3:], name) if t.startswith("re:") else t == name)]
    hits += [t for t in targets if not t.startswith("re:") and t not in hits
             and any(c.__name__ == t for c in type(mod).__mro__)]
    return by_target[hits[0]] if hits else None


def _unpack_int32(prefix: str, packed: torch.Tensor, shape: torch.Tensor, bits: int) -> torch.Tensor:
    """pack-quantized ``weight_packed`` -> int8 ``[rows, cols]``: ``32 // bits`` values per int32
    along each row, lowest bits first, each stored as ``q + 2**(bits-1)`` (unsigned)."""
    rows, cols = _shape(prefix + ".weight", shape)
    return (_unpack_codes(prefix, packed, bits, rows, cols) - (1 << (bits - 1))).to(torch.int8)


def _unpack_codes(prefix: str, packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """int32 ``[rows, ceil(cols / (32/bits))]`` -> the unsigned ``bits``-bit codes ``[rows, cols]``
    (int32), word ``c`` holding columns ``c*(32/bits) + i`` at bits ``bits*i``."""
    per = 32 // bits
    need = (rows, -(-cols // per))
    if packed.dtype != torch.int32 or tuple(packed.shape) != need:
        raise CompressedTensorsError(f"{prefix}.weight_packed: expected int32{list(need)} ({bits}-bit codes in "
                                     f"{rows} rows of {cols}), got {str(packed.dtype).replace('torch.', '')}"
                                     f"{list(packed.shape)}")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :cols]


def _marlin24_perms(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Marlin 2:4's shuffles (nm-vllm's ``marlin_24_perms``, as compressed-tensors applies them):
    the order of the 1024 codes of each 64x16 tile of the transposed compressed weight (so that
    each thread's vector load holds its mma.sp fragment, codes interleaved for the dequantizing
    shifts), and the order of each 64 scales of a row of groups."""
    perm = []
    for i in range(32):
        col = i // 4
        base = [16 * row + (col // 2) * 256 + 8 * (col % 2) + 4 * block
                for block in (0, 1) for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)]
        perm += [p + j for j in range(4) for p in base]
    inter = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    perm_t = torch.tensor(perm).reshape(-1, len(inter))[:, inter].flatten()
    scale_perm = torch.tensor([8 * i + j for i in range(8) for j in (0, 4, 1, 5, 2, 6, 3, 7)])
    return perm_t, scale_perm


def _from_marlin24(prefix: str, parts: dict, sch: _Scheme, rows: int, cols: int) -> torch.Tensor:
    """A ``marlin-24`` weight -> its dequantized dense float16 ``[rows, cols]``:
    ``(code - 2**(bits-1)) * scale`` in float16 (what the Marlin kernel computes) of
    :func:`_marlin24_codes`.  compressed-tensors writes this format and cannot read it back."""
    from ..reference.sparse24 import decompress_2to4

    values, meta, scale = _marlin24_codes(prefix, parts, sch, rows, cols)
    try:
        q = decompress_2to4(values, meta)
    except (TypeError, ValueError) as e:
        raise CompressedTensorsError(f"{prefix}.meta: {e}") from e
    return q * scale.repeat_interleave(cols // scale.shape[1], 1)


def _marlin24_codes(prefix: str, parts: dict, sch: _Scheme, rows: int, cols: int):
    """A ``marlin-24`` weight -> ``(q [rows, cols/2] float16 integers, meta [rows, cols/16] in our
    format, scales [rows, groups] float16)``: undo Marlin's code shuffle and 16x16 tiling of the
    transposed compressed codes, read the metadata (CUTLASS's encoding, in Marlin's row order) and
    unshuffle the group scales."""
    from ..interop import _cutlass_meta_offsets

    bits, tile = sch.num_bits, 16
    k, n = cols // 2, rows  # the compressed weight, transposed: [cols/2, rows]
    if cols % 32 or rows % 64:
        raise CompressedTensorsError(f"{prefix}: a marlin-24 weight needs rows in multiples of 64 and columns in "
                                     f"multiples of 32 (Marlin's tiles), the model's is [{rows}, {cols}]")
    codes = _unpack_codes(prefix, parts["weight_packed"], bits, k // tile, n * tile)
    perm, scale_perm = _marlin24_perms(bits)
    codes = codes.reshape(-1, perm.numel())[:, torch.argsort(perm)]
    codes = codes.reshape(k // tile, n // tile, tile, tile).permute(0, 2, 1, 3).reshape(k, n)
    values = (codes - (1 << (bits - 1))).to(torch.float16).t().contiguous()  # [rows, cols/2]
    meta = parts["meta"]
    if meta.dtype != torch.int16 or meta.numel() != rows * cols // 16:
        raise CompressedTensorsError(f"{prefix}.meta: expected int16 with {rows * cols // 16} elements (CUTLASS "
                                     f"metadata of a [{rows}, {cols}] weight), got "
                                     f"{str(meta.dtype).replace('torch.', '')}{list(meta.shape)}")
    # Marlin's CUTLASS-style metadata: int16 [rows, cols/16] stored as [cols/32, 2*rows]
    offs = _cutlass_meta_offsets(rows, cols // 16, "cpu", marlin=True)
    meta = meta.contiguous().reshape(-1).gather(0, offs).view(rows, cols // 16)
    groups = cols // sch.group_size if sch.strategy == "group" else 1
    scale = parts["scale_packed"]
    if scale.dtype != torch.float16 or tuple(scale.shape) != (groups, rows):
        raise CompressedTensorsError(f"{prefix}.scale_packed: expected float16[{groups}, {rows}], got "
                                     f"{str(scale.dtype).replace('torch.', '')}{list(scale.shape)}")
    if sch.strategy == "group" and sch.group_size < k:  # (the writer compares with cols/2)
        scale = scale.reshape(-1, scale_perm.numel())[:, torch.argsort(scale_perm)].reshape(groups, rows)
    return values, meta, scale.t().contiguous()


def _quantized_from_parts(prefix: str, fmt: str, parts: dict) -> torch.Tensor:
    """The dense quantized weight (int8 / float8 codes) of a sparse-compressed quantized layer: the
    1-byte codes ride through the float decompression as exact float16 integers 0..255."""
    vals = parts["compressed"]
    if vals.element_size() != 1:
        raise CompressedTensorsError(f"{prefix}.compressed: a quantized layer stores 1-byte codes (int8, "
                                     f"float8_e4m3fn), got {str(vals.dtype).replace('torch.', '')}")
    codes = vals.contiguous().view(torch.uint8).to(torch.float16)
    dense = _dense_from_parts(prefix, fmt, dict(parts, compressed=codes))
    return dense.to(torch.uint8).view(vals.dtype)


def _expand(prefix: str, what: str, t: torch.Tensor, sch: _Scheme, rows: int, cols: int, g_idx) -> torch.Tensor:
    """A scale / zero point of ``sch.strategy`` broadcast to ``[rows, cols]`` (or ``[1, 1]``)."""
    st = sch.strategy
    if st == "tensor":
        if t.numel() != 1:
            raise CompressedTensorsError(f"{prefix}.{what}: per-tensor quantization needs one value, got "
                                         f"shape {list(t.shape)}")
        return t.reshape(1, 1)
    if st == "channel":
        need = (rows, 1)
    elif st == "group":
        if cols % sch.group_size:
            raise CompressedTensorsError(f"{prefix}: {cols} columns are not a multiple of group_size "
                                         f"{sch.group_size}")
        need = (rows, cols // sch.group_size)
    else:
        bh, bw = sch.block
        if rows % bh or cols % bw:
            raise CompressedTensorsError(f"{prefix}: the weight [{rows}, {cols}] is not divisible into "
                                         f"{bh}x{bw} blocks")
        need = (rows // bh, cols // bw)
    if tuple(t.shape) != need:
        raise CompressedTensorsError(f"{prefix}.{what}: {st} quantization of a [{rows}, {cols}] weight needs shape "
                                     f"{list(need)}, got {list(t.shape)}")
    if st == "channel":
        return t
    if st == "group":
        return t[:, g_idx]
    return t.repeat_interleave(sch.block[0], 0).repeat_interleave(sch.block[1], 1)


def _dequantize(prefix: str, q: torch.Tensor, parts: dict, sch: _Scheme) -> torch.Tensor:
    """compressed-tensors' dequantization, element for element: ``(q - zero_point) * scale`` in the
    scale's dtype (float8 and int8 codes convert to it exactly)."""
    want = torch.float8_e4m3fn if sch.type == "float" else torch.int8
    if q.dtype != want or q.dim() != 2:
        raise CompressedTensorsError(f"{prefix}.weight: {sch.format} {sch.type}{sch.num_bits} weights are stored as "
                                     f"2-D {str(want).replace('torch.', '')}, got {str(q.dtype).replace('torch.', '')}"
                                     f"{list(q.shape)}")
    rows, cols = q.shape
    scale, zp, g_idx = parts["weight_scale"], parts.get("weight_zero_point"), parts.get("weight_g_idx")
    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise CompressedTensorsError(f"{prefix}.weight_scale: expected float16/bfloat16/float32/float64, got "
                                     f"{str(scale.dtype).replace('torch.', '')}")
    if zp is None and not sch.symmetric:
        raise CompressedTensorsError(f"{prefix}.weight_zero_point is missing; config group {sch.group!r} is "
                                     f"asymmetric (symmetric: false)")
    idx = None
    if sch.strategy == "group":
        if cols % sch.group_size:
            raise CompressedTensorsError(f"{prefix}: {cols} columns are not a multiple of group_size "
                                         f"{sch.group_size}")
        ngroups = cols // sch.group_size
        if g_idx is not None and not bool((g_idx == -1).any()):  # activation order: column -> group
            if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (cols,):
                raise CompressedTensorsError(f"{prefix}.weight_g_idx: expected int32[{cols}], got "
                                             f"{str(g_idx.dtype).replace('torch.', '')}{list(g_idx.shape)}")
            if bool(((g_idx < 0) | (g_idx >= ngroups)).any()):
                raise CompressedTensorsError(f"{prefix}.weight_g_idx: group indices must lie in [0, {ngroups})")
            # the library sorts the columns by group and cuts them into runs of group_size
            if bool((torch.bincount(g_idx.long(), minlength=ngroups) != sch.group_size).any()):
                raise CompressedTensorsError(f"{prefix}.weight_g_idx: every group must hold exactly group_size="
                                             f"{sch.group_size} columns")
            idx = g_idx.long()
        else:
            idx = torch.arange(cols) // sch.group_size
    x = q.to(scale.dtype)
    if zp is not None:
        x = x - _expand(prefix, "weight_zero_point", zp, sch, rows, cols, idx).to(scale.dtype)
    return x * _expand(prefix, "weight_scale", scale, sch, rows, cols, idx)


def _int4_parts(name: str, sch: _Scheme, parts: dict, q: torch.Tensor | None, marlin=None):
    """``(qvalues, meta, scales)`` of :class:`sparse_kernels.nn.SparseLinearInt4` for a symmetric
    int4 layer whose codes are 2:4 (``q`` the int8 codes ``[rows, cols]``, or ``marlin`` the output
    of :func:`_marlin24_codes`), or None when the layer does not fit that format (it is then
    dequantized): groups a multiple of 16 in column order, ``cols % 16 == 0``."""
    from ..ops.sparse24 import compress_2to4
    from ..reference.int4 import pack_codes

    if sch.num_bits != 4 or sch.strategy not in ("group", "channel") or parts.get("weight_zero_point") is not None:
        return None
    if marlin is not None:
        from ..reference.sparse24 import check_meta

        values, meta, scales = marlin
        cols = 2 * values.shape[1]
        try:
            check_meta(meta)
        except ValueError as e:
            raise CompressedTensorsError(f"{name}.meta: {e}") from e
    else:
        rows, cols = q.shape
        g_idx = parts.get("weight_g_idx")
        if g_idx is not None and not bool((g_idx == -1).any()) and not torch.equal(
                g_idx.long(), torch.arange(cols) // sch.group_size):
            return None  # activation order: groups are not runs of columns
        if cols % 16 or not bool(((q.reshape(rows, -1, 4) != 0).sum(-1) <= 2).all()):
            return None
        scales = parts["weight_scale"]
        values, meta = compress_2to4(q.to(torch.float16))
    g = cols // scales.shape[1]
    if cols % 16 or g % 16 or scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return pack_codes(values.to(torch.int16)), meta, scales.contiguous()


def _dequantize_layers(m: nn.Module, tensors: dict, compressed: dict, fmt: str, quant: dict, path: str,
                       int4: str = "dequantize") -> tuple[dict, set[str], dict]:
    """Replace every quantized weight in ``tensors`` (and in ``compressed``, sparse-compressed
    ones) by its dequantized dense weight ``NAME.weight``; drop the weight quantization parameters
    and the activation / KV-cache scales.  Returns the summary for :attr:`LoadInfo.quantization`,
    the names of the layers dequantized, and with ``int4="keep"`` the int4 2:4 layers kept
    quantized: ``{name: (qvalues, meta, scales)}`` (see :func:`_int4_parts`)."""
    modules = dict(m.named_modules())
    scaled = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    for name in sorted(scaled - set(modules)):
        raise CompressedTensorsError(f"{path}: {name}.weight_scale is stored but {name!r} is not a module of "
                                     f"{type(m).__name__}")
    done, dtypes, stored_dense, kept = [], set(), [], {}
    for name, mod in modules.items():
        sch = _scheme_for(name, mod, quant) if name else None
        if sch is None or not sch.has_weights:
            if name in scaled:
                raise CompressedTensorsError(f"{path}: {name}.weight_scale is stored but no config group "
                                             f"quantizes the weight of {name!r} (or it is ignored)")
            continue
        if getattr(mod, "weight", None) is None:
            continue
        keys = _MARLIN24_PARTS if sch.format == "marlin-24" else _WEIGHT_QPARAMS
        parts = {k: tensors.pop(f"{name}.{k}") for k in keys if f"{name}.{k}" in tensors}
        if sch.format == FORMAT_DENSE:  # stored unquantized (fake-quantized values): taken as they are
            stored_dense.append(name)
            continue
        if sch.format == "marlin-24":
            stray = [f"{name}.{k}" for k in _WEIGHT_QPARAMS if f"{name}.{k}" in tensors and k != "weight_packed"]
            if stray:
                raise CompressedTensorsError(f"{path}: {name!r} is stored as marlin-24, which has no {stray[0]}")
            missing = [f"{name}.{k}" for k in _MARLIN24_PARTS if k not in parts]
            if missing:
                raise CompressedTensorsError(f"{path}: config group {sch.group!r} stores {name!r} as marlin-24 but "
                                             f"{', '.join(missing)} is missing")
            codes = _marlin24_codes(name, parts, sch, *mod.weight.shape)
            keep = _int4_parts(name, sch, parts, None, codes) if int4 == "keep" and isinstance(mod, nn.Linear) else None
            if keep is not None:
                kept[name] = keep
                continue
            w = _from_marlin24(name, parts, sch, *mod.weight.shape)
            tensors[name + ".weight"] = w
            done.append(name)
            dtypes.add(w.dtype)
            continue
        if "weight_scale" not in parts:
            raise CompressedTensorsError(f"{path}: config group {sch.group!r} quantizes {name!r} ({sch.format}) "
                                         f"but {name}.weight_scale is missing")
        if sch.format == "pack-quantized":
            if "weight_packed" not in parts or "weight_shape" not in parts:
                raise CompressedTensorsError(f"{path}: {name}: pack-quantized but {name}.weight_packed / "
                                             f"{name}.weight_shape is missing")
            q = _unpack_int32(name, parts["weight_packed"], parts["weight_shape"], sch.num_bits)
        elif name in compressed:
            q = _quantized_from_parts(name, fmt, compressed.pop(name))
        elif name + ".weight" in tensors:
            q = tensors.pop(name + ".weight")
        else:
            raise CompressedTensorsError(f"{path}: {name}: quantized, but neither {name}.weight nor its "
                                         f"compressed parts are stored")
        w = _dequantize(name, q, parts, sch)  # validates q, the scales and g_idx
        keep = _int4_parts(name, sch, parts, q) if int4 == "keep" and isinstance(mod, nn.Linear) else None
        if keep is not None:
            kept[name] = keep
            continue
        tensors[name + ".weight"] = w
        done.append(name)
        dtypes.add(w.dtype)
    dropped = sorted(k for k in tensors if k.rsplit(".", 1)[-1] in _NOT_APPLIED)
    for k in dropped:
        del tensors[k]
    # the model's own float dtype (its unquantized floating tensors): dequantized weights follow it
    own = {t.dtype for k, t in tensors.items() if t.is_floating_point() and t.element_size() > 1
           and k[: -len(".weight")] not in done}
    cast = next(iter(own)) if len(own) == 1 and dtypes - own else None
    if cast is not None:
        for name in done:
            tensors[name + ".weight"] = tensors[name + ".weight"].to(cast)
    return {"format": quant["format"],
            "schemes": {s.group: {"format": s.format, "weights": f"{s.type}{s.num_bits} per {s.strategy}"
                                  + (f" {s.group_size}" if s.strategy == "group" else "")
                                  + (f" {s.block[0]}x{s.block[1]}" if s.block else "")}
                        for s in quant["schemes"] if s.has_weights},
            "dequantized_layers": len(done), "int4_layers": len(kept), "stored_unquantized_layers": len(stored_dense),
            "dequantized_to": str(cast or (next(iter(dtypes)) if len(dtypes) == 1 else sorted(map(str, dtypes)))
                                  ).replace("torch.", ""),
            "cast_from": sorted(str(d).replace("torch.", "") for d in dtypes - {cast}) if cast is not None else [],
            "not_applied": quant["not_applied"] + ([f"{len(dropped)} activation / KV-cache scale tensors dropped"]
                                                   if dropped else [])}, set(done), kept


def quantization_note(q: dict) -> str:
    """One line for the user about a quantized checkpoint :func:`load` dequantized."""
    cast = f" (computed in {'/'.join(q['cast_from'])}, then cast)" if q.get("cast_from") else ""
    parts = [f"{q['dequantized_layers']} layers dequantized to {q['dequantized_to']}{cast} on load"
             if q["dequantized_layers"] else "",
             f"{q['int4_layers']} int4 2:4 layers kept int4" if q.get("int4_layers") else ""]
    line = f"{q['format']} weights: " + ", ".join(p for p in parts if p)
    line += f"; emulated: {'; '.join(q['emulated'])}" if q.get("emulated") else ""
    return line + (f"; not applied: {'; '.join(q['not_applied'])}" if q["not_applied"] else "")


# ------------------------------------------------------------------ input activations (emulated)
ACTIVATIONS = ("ignore", "emulate")


@dataclass(frozen=True)
class ActivationArgs:
    """An input_activations QuantizationArgs that :func:`fake_quantize_activation` emulates."""

    type: str  # "int" | "float"
    num_bits: int
    strategy: str  # "token" | "tensor"
    symmetric: bool
    dynamic: bool

    @classmethod
    def parse(cls, group: str, a: dict) -> "ActivationArgs":
        """From a config group's ``input_activations``; ValueError for what cannot be emulated
        exactly (FP4, group or block strategies, dynamic="local", more than 8 bits)."""
        typ, bits, gs = str(a.get("type", "int")).lower(), a.get("num_bits", 8), a.get("group_size")
        strategy = a.get("strategy")  # QuantizationArgs' rule when unset, as for weights (_schemes)
        strategy = (str(strategy).lower() if strategy is not None
                    else "group" if isinstance(gs, int) and gs > 0 else "channel" if gs == -1 else "tensor")
        dynamic = a.get("dynamic", False)
        if (typ, bits) != ("float", 8) and not (typ == "int" and isinstance(bits, int) and 2 <= bits <= 8):
            raise ValueError(f"config group {group!r}: input activations of type {typ!r} with {bits} bits cannot be "
                             f"emulated (int with 2..8 bits, or float8_e4m3fn)")
        if dynamic not in (True, False) or strategy not in (("token", "tensor") if dynamic else ("tensor",)):
            raise ValueError(f"config group {group!r}: input activations {_describe(dict(a, strategy=strategy))} "
                             f"(dynamic={dynamic!r}) cannot be emulated: dynamic per token or tensor, or static per "
                             f"tensor")
        return cls(typ, bits, strategy, bool(a.get("symmetric", True)), bool(dynamic))

    def range(self, device):
        """``(q_min, q_max)`` as compressed-tensors' ``calculate_range`` makes them (0-dim tensors)."""
        if self.type == "float":
            f = torch.finfo(torch.float8_e4m3fn)
            return torch.tensor(f.min, device=device), torch.tensor(f.max, device=device)
        r = 2 ** self.num_bits
        return torch.tensor(-r / 2, device=device), torch.tensor(r / 2 - 1, device=device)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.type == "float" else torch.int8


def fake_quantize_activation(x: torch.Tensor, args: ActivationArgs, scale: torch.Tensor | None = None,
                             zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` quantized and dequantized as compressed-tensors 0.12 does to a layer's input
    (``forward_quantize``), operation for operation, so bit for bit.  Dynamic: the scale (and an
    asymmetric zero point) from ``x``'s min/max per token (over the dims after the first two, as
    the library reduces them: a 2-D input gets one scale) or per tensor, 0 always in range,
    ``max |x| / (range / 2)`` symmetric or ``(max - min) / range`` asymmetric, at least float32's
    eps, in ``x``'s dtype.  Static: the stored ``scale`` (and ``zero_point``).  Then
    ``clamp(x / scale + zp)`` to the type's range, rounded (``torch.round``, or a cast to
    float8_e4m3fn), and ``(q - zp) * scale`` in the scale's dtype."""
    q_min, q_max = args.range(x.device)
    if args.dynamic:
        dims = tuple(range(2, x.dim())) if args.strategy == "token" else ()
        if dims:
            mn, mx = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        else:
            mn, mx = torch.aminmax(x)
        mn, mx = torch.min(mn, torch.zeros_like(mn)), torch.max(mx, torch.zeros_like(mx))
        width = float(q_max - q_min)
        eps = torch.finfo(torch.float32).eps
        if args.symmetric:
            scale = torch.clamp(torch.max(mn.abs(), mx.abs()) / (width / 2), min=eps)
            zero_point = torch.zeros(scale.shape, device=x.device, dtype=mn.dtype)
        else:
            scale = torch.clamp((mx - mn) / width, min=eps)
            zero_point = torch.clamp(q_min - (mn / scale), q_min, q_max)
        if args.type == "int":
            zero_point = torch.round(zero_point)
        zero_point = zero_point.to(args.code_dtype)
        if scale.dim() == 0:
            scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    scaled = x / scale
    if zero_point is not None:
        scaled += zero_point.to(x.dtype)
    clamped = torch.clamp(scaled, q_min, q_max)
    q = clamped.to(torch.float8_e4m3fn).to(clamped.dtype) if args.type == "float" else torch.round(clamped)
    out = q.to(scale.dtype)
    if zero_point is not None:
        out = out - zero_point.to(scale.dtype)
    return out * scale


class ActivationQuantizer:
    """A forward pre-hook that fake-quantizes a layer's input (:func:`fake_quantize_activation`);
    what ``load(activations="emulate")`` registers."""

    def __init__(self, args: ActivationArgs, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None):
        self.args, self.scale, self.zero_point = args, scale, zero_point

    def __call__(self, module, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].numel() == 0:
            return None
        scale, dev = self.scale, inputs[0].device
        want = _layer_dtype(module) or inputs[0].dtype
        if scale is not None and (scale.device != dev or scale.dtype != want):
            # the model moved or was cast after loading: compressed-tensors' input_scale is a
            # parameter of the layer and follows it
            self.scale = scale = scale.to(device=dev, dtype=want)
            self.zero_point = None if self.zero_point is None else self.zero_point.to(dev)
        return (fake_quantize_activation(inputs[0], self.args, scale, self.zero_point),) + tuple(inputs[1:])


def _layer_dtype(mod: nn.Module) -> torch.dtype | None:
    """The dtype of a layer's weight (or 2:4 values), which compressed-tensors gives its
    ``input_scale``; None for a layer without one (an int4 layer: its scales keep the stored
    dtype, while the library's weight has the model's dtype, which the input has)."""
    for k in ("weight", "values"):
        t = getattr(mod, k, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


def _emulate_activations(m: nn.Module, act_layers: dict, act_tensors: dict, path: str) -> list[str]:
    """Register an :class:`ActivationQuantizer` on every layer of ``act_layers`` (name -> scheme);
    static scales come from ``act_tensors`` (``NAME.input_scale`` / ``NAME.input_zero_point``),
    cast as compressed-tensors' parameters hold them (the layer's dtype; the code dtype); the
    hook moves them to the input's device on its first call.
    Returns the config groups emulated."""
    groups = set()
    for name, sch in act_layers.items():
        try:
            args = ActivationArgs.parse(sch.group, sch.input_acts)
        except ValueError as e:
            raise CompressedTensorsError(f"{path}: {e}") from None
        mod = m.get_submodule(name)
        scale = zp = None
        if not args.dynamic:
            scale = act_tensors.get(name + ".input_scale")
            if scale is None or not scale.is_floating_point() or scale.numel() != 1:
                raise CompressedTensorsError(f"{path}: {name}: static input activations need one floating-point "
                                             f"{name}.input_scale, got {None if scale is None else list(scale.shape)}")
            scale = scale.reshape(1).to(_layer_dtype(mod) or scale.dtype)  # (int4 layers: the input's, per call)
            if not args.symmetric:
                zp = act_tensors.get(name + ".input_zero_point")
                if zp is None or zp.numel() != 1:
                    raise CompressedTensorsError(f"{path}: {name}: asymmetric static input activations need one "
                                                 f"{name}.input_zero_point")
                zp = zp.reshape(1).to(args.code_dtype)
        mod.register_forward_pre_hook(ActivationQuantizer(args, scale, zp))
        groups.add(sch.group)
    return sorted(groups)


# ------------------------------------------------------------------ load
def _skeleton(cfg: dict) -> nn.Module:
    """The Hugging Face model of ``cfg`` with its parameters on the meta device (no memory, no init)."""
    return ckpt.model_from_config(cfg, empty=True)


def _sparse_24_from_weight(w: torch.Tensor, bias) -> nn.Module:
    """A 2:4 SparseLinear holding exactly ``w`` (2:4 already; ``-0.0`` kept bit for bit)."""
    from ..nn import SparseLinear
    from ..ops.sparse24 import compress_2to4

    rows, cols = w.shape
    sl = SparseLinear(cols, rows, bias=bias is not None, pattern="2:4", dtype=w.dtype)
    values, meta = compress_2to4(nn.functional.pad(w, (0, sl.in_padded - cols)))
    sl.values.copy_(values)
    sl.meta.copy_(meta)
    if bias is not None:
        sl.bias.copy_(bias)
    sl.refresh_cache()
    return sl


_POPCOUNT4 = torch.tensor([bin(i).count("1") for i in range(16)])


def _bitmask_fits_24(parts: dict) -> bool:
    """Every group of 4 columns of a sparse-bitmask weight marks at most 2 (read off the bitmask)."""
    shape, bitmask = parts.get("shape"), parts.get("bitmask")
    if shape is None or bitmask is None or bitmask.dtype != torch.uint8 or shape.numel() != 2:
        return False
    cols = int(shape.flatten()[1])
    if cols <= 0 or cols % 4 or bitmask.dim() != 2 or bitmask.shape[1] != (cols + 7) // 8:
        return False
    from ..interop import bitmask_groups

    return bool((_POPCOUNT4[bitmask_groups(bitmask)[:, : cols // 4]] <= 2).all())


def _sparse_layer(name: str, mod: nn.Module, fmt: str, parts: dict, bias, unstructured: str):
    """The SparseLinear (or nn.Linear) for compressed layer ``name``; ``(module, pattern)``."""
    from ..nn import SparseLinear

    if fmt == FORMAT_BITMASK and _bitmask_fits_24(parts):  # stored as a bitmask, but 2:4: run it as 2:4
        w = _dense_from_parts(name, fmt, parts)  # at most 2 marked per group of 4: 2:4 by construction
        _check_fits(name, mod, *w.shape)
        return _sparse_24_from_weight(w, bias), "2:4"
    if fmt == FORMAT_24:
        values, meta, (rows, cols) = _parts_24(name, parts)
        _check_fits(name, mod, rows, cols)
        sl = SparseLinear(cols, rows, bias=bias is not None, pattern="2:4", dtype=values.dtype)
        with torch.no_grad():
            sl.values.copy_(values)
            sl.meta.copy_(meta)
        pattern = "2:4"
    elif unstructured == "bitmask":
        values, bitmask, row_ptr, (rows, cols) = _bitmask_parts(name, parts)
        _check_fits(name, mod, rows, cols)
        sl = SparseLinear(cols, rows, bias=bias is not None, pattern="bitmask", dtype=values.dtype)
        with torch.no_grad():
            sl.values.data = values.clone()
            sl.bitmask.copy_(bitmask)
            sl.row_ptr.copy_(row_ptr)
        pattern = "bitmask"
    else:
        w = _dense_from_parts(name, fmt, parts)
        _check_fits(name, mod, *w.shape)
        sl = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
        with torch.no_grad():
            sl.weight.copy_(w)
        pattern = "dense"
    if bias is not None:
        sl.bias.data = bias.detach().clone()
    if isinstance(sl, SparseLinear):
        sl.refresh_cache()
    return sl, pattern


def _bitmask_is_smaller(w: torch.Tensor) -> bool:
    """The bitmask layout (nonzeros + 1 bit a weight + int64 row offsets) takes fewer bytes than ``w``."""
    rows, cols = w.shape
    nnz = int((w != 0).sum())
    return nnz * w.element_size() + rows * ((cols + 7) // 8) + 8 * (rows + 1) < w.numel() * w.element_size()


def _check_fits(name: str, mod: nn.Module, rows: int, cols: int) -> None:
    w = getattr(mod, "weight", None)
    if w is not None and tuple(w.shape) != (rows, cols):
        raise CompressedTensorsError(f"{name}: the stored weight is [{rows}, {cols}] but the model's is "
                                     f"{list(w.shape)}")


def _fill_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give tied parameters missing from the file (e.g. ``lm_head.weight`` with tied embeddings)
    the tensor stored under another name of the same parameter."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    for names in groups.values():
        have = [n for n in names if n in tensors]
        for n in names:
            if n not in tensors and have:
                tensors[n] = tensors[have[0]]


INT4 = ("dequantize", "keep")


@torch.no_grad()
def load(path: str, *, dtype: torch.dtype | None = None, device: str = "cpu", convert: bool = True,
         unstructured: str = "bitmask", int4: str = "dequantize",
         activations: str = "ignore") -> tuple[nn.Module, LoadInfo]:
    """Load a compressed-tensors sparse checkpoint directory as a model with SparseLinear layers.

    Args:
        path: a Hugging Face model directory written by llm-compressor / compressed-tensors
            (safetensors, one file or sharded with an index).
        dtype: cast after loading (default: as stored).
        device: where the model goes.
        convert: False loads every weight dense (nn.Linear), as compressed-tensors decompresses it.
        unstructured: for layers that are not 2:4: ``"bitmask"`` (SparseLinear on the bitmask
            format, as stored) or ``"dense"`` (nn.Linear).
        int4: ``"dequantize"`` (every quantized weight) or ``"keep"``: symmetric int4 layers whose
            codes are 2:4 (``marlin-24``, ``pack-quantized`` W4A16 in column-order groups of a
            multiple of 16, or per channel) become :class:`sparse_kernels.nn.SparseLinearInt4`,
            codes and scales as stored (3 bits a weight instead of 9; the kernel computes
            ``q * scale`` exactly in float32, where compressed-tensors rounds it to the scale's
            dtype).  Other layers are dequantized.
        activations: ``"ignore"`` runs the layers on unquantized inputs; ``"emulate"`` registers a
            forward pre-hook (:class:`ActivationQuantizer`) on every layer whose config group
            quantizes its input activations, which quantizes and dequantizes the input as
            compressed-tensors does (:func:`fake_quantize_activation`: int or FP8, dynamic per
            token or tensor, or static per tensor from the stored ``input_scale``), so the model
            computes what the quantized model computes.  Hooks are not saved with the model.

    2:4 layers (``sparse-24-bitmask``; for ``sparse-bitmask``, layers whose bitmask marks at most 2
    of every 4 columns; for ``dense``, targeted layers whose weight is 2:4) become 2:4
    SparseLinear.  Compressed weights of modules other than nn.Linear are decompressed.

    Quantized weights are dequantized first, bit for bit as compressed-tensors does, to the
    scale's dtype (cast to the model's dtype if its other tensors have another); a targeted layer
    whose dequantized weight is 2:4 then becomes 2:4 SparseLinear, another sparse one follows
    ``unstructured``.  KV-cache and output-activation quantization is not applied, nor input
    activations' unless ``activations="emulate"`` (listed in
    ``LoadInfo.quantization["not_applied"]``; the emulated groups in ``["emulated"]``).

    Returns ``(model, LoadInfo)``; raises CompressedTensorsError (a ValueError) naming the file or
    layer for anything it cannot read exactly.
    """
    from ..nn import SparseLinear
    from .checkpoint import _replace, _to_dtype, is_2to4

    ckpt._check_load_args(dtype, device)
    if not isinstance(convert, bool):
        raise TypeError(f"convert: expected True or False, got {convert!r}")
    if unstructured not in UNSTRUCTURED:
        raise ValueError(f"unstructured: got {unstructured!r}, expected one of {', '.join(UNSTRUCTURED)}")
    if int4 not in INT4:
        raise ValueError(f"int4: got {int4!r}, expected one of {', '.join(INT4)}")
    if int4 == "keep" and not convert:
        raise ValueError("int4: 'keep' builds SparseLinearInt4 layers; convert=False loads every weight dense")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations: got {activations!r}, expected one of {', '.join(ACTIVATIONS)}")
    cfg, sc, quant = _read_config(path)
    fmt = sc["format"]
    structure = str(sc.get("sparsity_structure") or "unstructured").lower()
    tensors = _read_tensors(path)
    compressed = _pop_compressed(tensors, fmt)
    if fmt != FORMAT_DENSE and not compressed:
        raise CompressedTensorsError(f"{path}: config.json says sparsity format {fmt!r} but the tensors hold no "
                                     f"compressed weight (*.compressed / *.bitmask)")
    try:
        m = _skeleton(cfg)
    except ckpt._config_errors() as e:
        raise CompressedTensorsError(f"{path}: cannot build model_type {cfg.get('model_type')!r} from config.json "
                                     f"({type(e).__name__}: {e})") from e
    info = LoadInfo(path=path, sparsity_config=sc)
    act_layers, act_tensors = {}, {}
    if activations == "emulate" and quant is not None:  # matched on the skeleton's own module classes
        act_layers = {n: sch for n, mod in m.named_modules()
                      if (sch := _scheme_for(n, mod, quant)) is not None and sch.input_acts}
        act_tensors = {k: tensors[k] for k in tensors if k.rsplit(".", 1)[-1] in ("input_scale", "input_zero_point")}
    dequantized: set[str] = set()
    if quant is not None:  # quantized weights -> dense dequantized ones, sparse-converted below
        info.quantization, dequantized, kept = _dequantize_layers(m, tensors, compressed, fmt, quant, path,
                                                                  int4 if convert else "dequantize")
        for name, (qv, meta, scales) in kept.items():  # int4 2:4 layers kept quantized
            from ..nn import SparseLinearInt4

            mod = m.get_submodule(name)
            rows, cols = mod.weight.shape
            bias = tensors.pop(name + ".bias", None)
            new = SparseLinearInt4(cols, rows, bias=bias is not None, group_size=cols // scales.shape[1],
                                   dtype=scales.dtype)
            new.qvalues.copy_(qv)
            new.meta.copy_(meta)
            new.scales.copy_(scales)
            if bias is not None:
                new.bias.data = bias.detach().clone()
            _replace(m, name, new)
            info.layers[name] = "2:4 int4"
    modules = dict(m.named_modules())
    for name, parts in compressed.items():
        mod = modules.get(name)
        if mod is None:
            raise CompressedTensorsError(f"{path}: compressed weight {name!r} is not a module of "
                                         f"{type(m).__name__}")
        if isinstance(mod, nn.Linear) and convert:
            new, pattern = _sparse_layer(name, mod, fmt, parts, tensors.pop(name + ".bias", None), unstructured)
            _replace(m, name, new)
            info.layers[name] = pattern
        else:
            tensors[name + ".weight"] = _dense_from_parts(name, fmt, parts)
    # dense-stored targets ("dense" format) and dequantized ones: 2:4 weights -> 2:4 SparseLinear,
    # the others per `unstructured`
    if convert:
        for name in [n for n in _targeted(m, sc) if fmt == FORMAT_DENSE or n in dequantized]:
            mod, w = m.get_submodule(name), tensors.get(name + ".weight")
            if not isinstance(mod, nn.Linear) or w is None or w.dim() != 2:
                continue
            pattern = "2:4" if is_2to4(w) else ("bitmask" if unstructured == "bitmask" and structure != "2:4"
                                                and _bitmask_is_smaller(w) else None)
            if pattern is None:
                continue  # kept dense: not 2:4 and (a 2:4 target, unstructured="dense", or too dense to gain)
            _check_fits(name, mod, *w.shape)
            del tensors[name + ".weight"]
            bias = tensors.pop(name + ".bias", None)
            if pattern == "2:4":
                new = _sparse_24_from_weight(w, bias)
            else:
                lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
                lin.weight.copy_(w)
                if bias is not None:
                    lin.bias.copy_(bias)
                new = SparseLinear.from_dense(lin, pattern="bitmask")
            _replace(m, name, new)
            info.layers[name] = pattern
    # everything else: load strictly into the skeleton (meta parameters are replaced, not copied)
    for name, new in [(n, mod) for n, mod in m.named_modules() if n in info.layers]:
        for k, t in new.state_dict().items():
            tensors[f"{name}.{k}"] = t
    if hasattr(m, "tie_weights"):
        m.tie_weights()  # tied parameters share one object from here on: _fill_tied sees them
    _fill_tied(m, tensors)
    try:
        m.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CompressedTensorsError(f"{path}: the stored tensors do not fit {type(m).__name__}: {e}") from e
    if hasattr(m, "tie_weights") and getattr(m.config, "tie_word_embeddings", False):
        m.tie_weights()
    leftover = [n for n, p in list(m.named_parameters()) + list(m.named_buffers()) if p.is_meta]
    if leftover:
        raise CompressedTensorsError(f"{path}: no tensor was stored for {leftover[:5]}")
    m = m.to(device)
    if dtype is not None:  # int4 layers keep their scales as stored (the kernels take any float dtype)
        from ..nn import SparseLinearInt4

        scales = {n: mod.scales for n, mod in m.named_modules() if isinstance(mod, SparseLinearInt4)}
        m = _to_dtype(m, dtype)
        for n, sc in scales.items():
            m.get_submodule(n)._buffers["scales"] = sc
    if act_layers:
        emulated = _emulate_activations(m, act_layers, act_tensors, path)
        q = info.quantization
        q["emulated"] = [n for n in q["not_applied"] if any(n.startswith(f"{g} input activations: ") for g in emulated)]
        q["not_applied"] = [n for n in q["not_applied"] if n not in q["emulated"]]
    return m.eval(), info


# ------------------------------------------------------------------ save
SAVE_FORMATS = ("auto", FORMAT_24, FORMAT_BITMASK)


def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    from ..nn import SparseLinear

    return {n: mod for n, mod in model.named_modules() if isinstance(mod, SparseLinear)}


def _not_24(mod: nn.Module) -> str | None:
    """Why ``sparse-24-bitmask`` cannot hold SparseLinear ``mod`` (None when it can)."""
    if mod.pattern != "2:4":
        return f"is {mod.pattern or 'masked'} (not 2:4)"
    if mod.in_perm is not None:
        return "has an input-channel permutation (its weight is 2:4 only in permuted column order)"
    if mod.in_features % 4:
        return f"has {mod.in_features} input features (2:4 groups need a multiple of 4)"
    return None


def _choose_format(layers: dict[str, nn.Module], fmt: str) -> str:
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"format: got {fmt!r}, expected one of {', '.join(SAVE_FORMATS)}")
    if not layers:
        raise ValueError("model: it has no SparseLinear layers to store compressed (prune with convert=True or "
                         "call sparse_kernels.sparsify first)")
    why = {n: w for n, w in ((n, _not_24(mod)) for n, mod in layers.items()) if w is not None}
    if fmt == "auto":
        return FORMAT_BITMASK if why else FORMAT_24
    if fmt == FORMAT_24 and why:
        name = next(iter(why))
        raise ValueError(f"format: {FORMAT_24!r} cannot hold layer {name!r}, which {why[name]}; use "
                         f"format={FORMAT_BITMASK!r} or 'auto'")
    return fmt


def _compressed_entries(name: str, mod: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    from ..interop import to_compressed_tensors_24
    from ..reference.bitmask import compress_bitmask

    rows, cols = mod.out_features, mod.in_features
    if fmt == FORMAT_24:
        compressed, bitmask = to_compressed_tensors_24(mod.values.detach().cpu(), mod.meta.cpu(), cols)
        out = {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": compressed, "bitmask": bitmask}
    else:
        if mod.pattern == "bitmask" and mod.in_perm is None:
            values, bitmask, row_ptr = mod.values.detach().cpu(), mod.bitmask.cpu(), mod.row_ptr.cpu()
        else:
            values, bitmask, row_ptr = compress_bitmask(mod.dense_weight().cpu())
        out = {"shape": torch.tensor([rows, cols]), "compressed": values.contiguous(), "bitmask": bitmask.contiguous(),
               "row_offsets": row_ptr[:-1].contiguous()}
    return {f"{name}.{k}": v for k, v in out.items()}


def _int4_layers(model: nn.Module) -> dict[str, nn.Module]:
    from ..nn import SparseLinearInt4

    return {n: mod for n, mod in model.named_modules() if isinstance(mod, SparseLinearInt4)}


def _int4_group(mod) -> int | None:
    """The compressed-tensors group size of an int4 layer; None: per channel (one scale per row)."""
    return None if mod.scales.shape[1] == 1 else mod.group_size


def _pack_quantized_entries(name: str, mod) -> dict[str, torch.Tensor]:
    """A SparseLinearInt4 (unpermuted) as compressed-tensors ``pack-quantized`` (4-bit,
    symmetric): ``weight_packed`` int32 ``[rows, cols/8]`` (eight codes ``q + 8`` a word, lowest
    bits first), ``weight_scale`` and ``weight_shape``."""
    from ..reference.int4 import unpack_codes
    from ..reference.sparse24 import decompress_2to4

    rows, cols = mod.out_features, mod.in_features
    q = decompress_2to4(unpack_codes(mod.qvalues.cpu()).to(torch.float32), mod.meta.cpu())[:, :cols]
    out = {}
    codes = (q.to(torch.int32) + 8).reshape(rows, -1)
    codes = torch.nn.functional.pad(codes, (0, (-cols) % 8), value=8).reshape(rows, -1, 8)
    packed = torch.zeros(rows, codes.shape[1], dtype=torch.int64)
    for i in range(8):
        packed |= codes[:, :, i].to(torch.int64) << (4 * i)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # two's complement
    scales = mod.scales.detach().cpu()
    if _int4_group(mod) is None:
        scales = scales[:, :1]
    out.update(weight_packed=packed, weight_scale=scales.contiguous(), weight_shape=torch.tensor([rows, cols]))
    return {f"{name}.{k}": v for k, v in out.items()}


def _int4_quant_config(int4: dict[str, nn.Module]) -> dict:
    """The quantization part of ``quantization_config`` for int4 layers: one config group per
    group size (targets: the layers' exact names), pack-quantized, weights only."""
    by_group: dict = {}
    for name, mod in sorted(int4.items()):
        by_group.setdefault(_int4_group(mod), []).append(name)
    groups = {}
    for i, (g, names) in enumerate(sorted(by_group.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))):
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False, "block_structure": None,
                   "strategy": "channel" if g is None else "group", "group_size": g, "actorder": None,
                   "observer": "minmax", "observer_kwargs": {}}
        groups[f"group_{i}"] = {"targets": names, "weights": weights, "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    return {"config_groups": groups, "format": "pack-quantized", "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "quantization_status": "compressed"}


def _check_architecture(cfg: dict, layers: dict[str, nn.Module]) -> None:
    """Each SparseLinear must stand where the architecture (rebuilt from its config, on the meta
    device) has an nn.Linear of the same shape: a reader builds that module and fills its weight."""
    if "model_type" not in cfg:
        raise ValueError("model: its config has no model_type; compressed-tensors checkpoints are Hugging Face models")
    arch = _skeleton({k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")})
    for name, mod in layers.items():
        try:
            orig = arch.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model: layer {name!r} is not a module of {type(arch).__name__} built from the model's "
                             f"config") from None
        shape = tuple(getattr(orig, "weight", torch.empty(0)).shape)
        if not isinstance(orig, nn.Linear) or shape != (mod.out_features, mod.in_features):
            raise ValueError(f"model: layer {name!r} is a {type(orig).__name__} with weight {list(shape)} in "
                             f"{cfg['model_type']}, not an nn.Linear [{mod.out_features}, {mod.in_features}]; "
                             f"compressed-tensors stores the architecture's own weight layout (use the default "
                             f"sparse_kernels checkpoint format)")


def _remove_stale(path: str) -> None:
    """Once the new files are in ``path``: remove what an earlier checkpoint there would be read
    instead of (or besides) the new one: our own ``sparse_kernels.json``, and a sharded index with its shards."""
    own = os.path.join(path, ckpt.CONFIG_NAME)
    if os.path.isfile(own):
        os.remove(own)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            shards = set((_read_json(index).get("weight_map") or {}).values())
        except CompressedTensorsError:
            shards = set()
        os.remove(index)
        for f in shards:
            p = os.path.join(path, str(f))
            if os.path.basename(str(f)) == str(f) and f != "model.safetensors" and os.path.isfile(p):
                os.remove(p)


@torch.no_grad()
def save(model: nn.Module, path: str, *, format: str = "auto", tokenizer=None) -> dict:
    """Write ``model`` (a Hugging Face model with SparseLinear layers) as a compressed-tensors
    checkpoint directory: ``config.json`` with ``quantization_config.sparsity_config``, and
    ``model.safetensors``.  Returns the sparsity config written.

    ``format``: ``"sparse-24-bitmask"`` (every SparseLinear 2:4 and unpermuted),
    ``"sparse-bitmask"`` (any pattern; a permuted layer is stored with its columns put back), or
    ``"auto"`` (the first when it fits).  Only SparseLinear layers are stored compressed (the
    targets); every other tensor as it is, tied tensors once; ``sparsity_structure`` is ``"2:4"``
    when every layer is 2:4 (in either format), and the config's dtype the stored one.

    A model whose sparse layers are :class:`sparse_kernels.nn.SparseLinearInt4` is written as
    llm-compressor writes a 2:4 W4A16 model: ``pack-quantized`` 4-bit symmetric weights (codes,
    scales per group or channel) and a ``dense`` sparsity config; :func:`load` with
    ``int4="keep"`` reads them back as they were, and compressed-tensors decompresses them.
    Refused: mixing int4 and 16-bit sparse layers, permuted int4 layers (their groups would need
    activation order, which compressed-tensors 0.13+ no longer reads), and groups that do not
    divide a layer's in_features.  Files are
    written atomically: every file (the tokenizer's in a temporary folder) is written in full
    before the first replaces its old version (model.safetensors, then config.json, then the
    tokenizer's), so a failed save leaves what was in ``path`` as it was; only then are an earlier
    checkpoint's ``sparse_kernels.json``, sharded index and shards in ``path`` removed, so that no
    reader takes them for the new one.  ``tokenizer``: saved alongside.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"model: expected a Hugging Face model (with .config), got {type(model).__name__}")
    path = ckpt._check_save_args(path, tokenizer)
    layers = _sparse_layers(model)
    int4 = _int4_layers(model)
    if int4 and layers:
        raise ValueError(f"model: it mixes 2:4 int4 layers ({next(iter(int4))!r}) with 16-bit SparseLinear layers "
                         f"({next(iter(layers))!r}); compressed-tensors checkpoints here hold one kind (replace the "
                         f"int4 layers by their .to_sparse(), or quantize the others with quantize_int4)")
    cfg = model.config.to_dict()
    cfg.pop("compression_config", None)  # a legacy section would compete with the one written here
    if int4:
        fmt = FORMAT_DENSE
        for name, mod in int4.items():
            if mod.in_perm is not None:
                raise ValueError(f"model: int4 layer {name!r} has an input-channel permutation; compressed-tensors "
                                 f"could only express its groups in activation order (g_idx), which compressed-"
                                 f"tensors 0.13 and later no longer read: save it 16-bit (.to_sparse()) or prune it "
                                 f"without permute")
            if _int4_group(mod) is not None and mod.in_features % mod.group_size:
                raise ValueError(f"model: int4 layer {name!r} has {mod.in_features} input features, not a multiple of "
                                 f"its group size {mod.group_size}; compressed-tensors needs whole groups (use a group "
                                 f"size dividing it, or one scale per row)")
        if format not in ("auto", FORMAT_DENSE):
            raise ValueError(f"format: int4 layers are stored pack-quantized with a 'dense' sparsity format, got "
                             f"{format!r}; use 'auto'")
        _check_architecture(cfg, int4)
    else:
        fmt = _choose_format(layers, format)
        _check_architecture(cfg, layers)
    sd = {}
    for name, mod in layers.items():
        sd.update(_compressed_entries(name, mod, fmt))
        if mod.bias is not None:
            sd[f"{name}.bias"] = mod.bias.detach()
    for name, mod in int4.items():
        sd.update(_pack_quantized_entries(name, mod))
        if mod.bias is not None:
            sd[f"{name}.bias"] = mod.bias.detach()
    layers = layers or int4
    skip = tuple(n + "." for n in layers)
    for k, v in model.state_dict().items():
        if not k.startswith(skip):
            sd[k] = v
    ckpt._densify_sparse_experts(model, sd)  # SparseExperts: the dense 3-D parameters the config rebuilds
    sd, _aliases = ckpt._unique_tensors({k: v.detach().cpu().contiguous() for k, v in sd.items()})
    n_sparse = sum(mod.out_features * mod.in_features for mod in layers.values())
    zeros = sum(int((mod.dense_weight() == 0).sum()) for mod in layers.values())
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip)) + n_sparse
    all_24 = bool(int4) or not any(_not_24(mod) for mod in layers.values())
    sc = {"format": fmt, "global_sparsity": zeros / max(total, 1), "ignore": [],
          "registry_requires_subclass": False,
          "sparsity_structure": "2:4" if all_24 else "unstructured", "targets": sorted(layers)}
    floats = [t.dtype for t in sd.values() if t.is_floating_point()]
    if floats:  # the dtype the tensors are stored in, not the one the model was configured with
        name = str(max(set(floats), key=floats.count)).replace("torch.", "")
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[key] = name
    # exactly these keys: compressed-tensors reads any other key as a quantization config
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "sparsity_config": sc, "transform_config": {},
                                  "version": WRITES_FORMAT_OF}
    if int4:
        cfg["quantization_config"].update(_int4_quant_config(int4))
    text = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    with ckpt._staging(path) as staged:
        ckpt._stage(staged, os.path.join(path, "model.safetensors"),
                    lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
        ckpt._stage(staged, os.path.join(path, "config.json"), ckpt._write_text(text))
        ckpt._publish(path, staged, tokenizer)
    _remove_stale(path)
    return sc
