"""Quantize a sparse compressed-tensors checkpoint with compressed-tensors itself, as
llm-compressor's FP8-dynamic / W8A8 schemes do, to check our dequantizing loader on a real model.

Reads a sparse checkpoint (e.g. from ``sparse-kernels prune --format compressed-tensors``), casts it
to ``--dtype``, attaches the library's quantization scheme (``--scheme fp8-dynamic``: float8
weights per output channel, float8 activations dynamic per token, lm_head ignored; ``w8a8``: the
same in int8), sets each weight's scale from its min/max (llm-compressor's default minmax
observer) and writes the checkpoint with ``ModelCompressor`` (quantization, then the 2:4 / bitmask
sparsity of the source), tokenizer included.  Needs compressed-tensors <= 0.12 (the last with
sparse compressors), e.g. on PYTHONPATH.  Then run ``benchmarks/compressed_tensors_check.py`` on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compressed_tensors_check import fixture_helpers  # noqa: E402
from sparse_kernels.llm import compressed_tensors as ct  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="sparse compressed-tensors checkpoint directory")
    ap.add_argument("out", help="where to write the quantized checkpoint")
    ap.add_argument("--scheme", choices=("fp8-dynamic", "w8a8"), default="fp8-dynamic")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = ap.parse_args(argv)

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)

    m, info = ct.load(args.src, convert=False, dtype=getattr(torch, args.dtype))
    typ, fmt = ("float", "float-quantized") if args.scheme == "fp8-dynamic" else ("int", "int-quantized")
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type=typ, strategy="channel", symmetric=True),
        input_activations=QuantizationArgs(num_bits=8, type=typ, strategy="token", dynamic=True, symmetric=True))
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    fixture_helpers().set_qparams(m)
    for mod in m.modules():
        if hasattr(mod, "quantization_scheme"):
            mod.quantization_status = QuantizationStatus.FROZEN
    sc = {k: v for k, v in info.sparsity_config.items() if k not in ("global_sparsity", "registry_requires_subclass")}
    scfg = SparsityCompressionConfig.load_from_registry(sc.pop("format"), **sc)
    comp = ModelCompressor.from_pretrained_model(m, sparsity_config_or_format=scfg, quantization_format=fmt)
    m.tie_weights()
    sd = comp.compress(m)
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    tied = {"lm_head.weight"} if getattr(m.config, "tie_word_embeddings", False) else set()
    save_file({k: v.contiguous() for k, v in sd.items() if k not in tied}, os.path.join(args.out, "model.safetensors"),
              metadata={"format": "pt"})
    m.config.save_pretrained(args.out)
    comp.update_config(args.out)
    for f in os.listdir(args.src):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(os.path.join(args.src, f), args.out)
    print(f"wrote {args.out}: {args.scheme} + {info.sparsity_config['format']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
