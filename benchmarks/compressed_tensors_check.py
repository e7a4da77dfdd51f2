"""A compressed-tensors sparse checkpoint, read by us and by compressed-tensors itself, compared.

Given a directory in compressed-tensors' sparse format (e.g. from ``sparse-kernels prune
--format compressed-tensors``, or an llm-compressor model), this

1. loads it with :func:`sparse_kernels.llm.compressed_tensors.load` (SparseLinear layers) and
   times the load;
2. when a compressed-tensors with sparse compressors (<= 0.12) is importable, builds the same
   architecture dense, lets the library decompress the checkpoint into it
   (``ModelCompressor.decompress``) and compares every sparse layer's weight with ours, bit for
   bit (a quantized checkpoint is dequantized by the library as transformers loads it, and run
   with its activation quantization off, as ours runs);
3. evaluates the perplexity of our model and of the library's dense one on the same tokens
   (New Testament, the CLI's windows), and the weight bytes in memory of both;
4. for a checkpoint that quantizes input activations, also ours with them emulated
   (``activations="emulate"``) against the library's model with its activation quantization on:
   the perplexities, and whether our dense load (``convert=False``) with emulated activations
   gives the library's logits bit for bit on the first window.

Writes JSON to ``--out``.  Without the library only steps 1 and 3 (ours) run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import device_name, versions, write_json  # noqa: E402
from sparse_kernels.llm import bench, checkpoint, data, evaluate, models  # noqa: E402
from sparse_kernels.llm import compressed_tensors as ct  # noqa: E402


def _library_model(path: str):
    try:
        from compressed_tensors import __version__ as lib_version
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.sparse_compressors import BitmaskCompressor  # <= 0.12 only
    except ImportError:
        return None, None
    del BitmaskCompressor  # imported only to tell a release with sparse compressors
    cfg, _, quant = ct._read_config(path)
    m = checkpoint.model_from_config(cfg)
    if quant is not None:  # transformers' in-memory route (see library_decompress)
        fixture_helpers().library_decompress(path, m)
        for mod in m.modules():  # weights dequantized as ours are; activations not quantized either
            if hasattr(mod, "quantization_scheme"):
                mod.quantization_enabled = False
    else:
        ModelCompressor.from_pretrained(path).decompress(path, m)
    m.tie_weights()  # decompress assigns new Parameters, untying; transformers' loader ties them again
    return m.eval(), {"compressed_tensors": lib_version}


def fixture_helpers():
    """tests/data/make_compressed_tensors_fixtures.py as a module: its ``set_qparams`` (a minmax
    observer) and ``library_decompress`` (the library's own dequantizing load)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "data",
                        "make_compressed_tensors_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_compressed_tensors_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="compressed-tensors checkpoint directory")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--made-by", default=None, help="how the checkpoint was made (recorded as is)")
    ap.add_argument("--out", default="benchmarks/results/cpu/compressed_tensors_check.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ours, info = ct.load(args.path)
    load_s = time.perf_counter() - t0
    tok = models.load_tokenizer(models.ModelSource("ckpt", "hf", args.path))
    ev = data.eval_tokens(tok, args.eval_tokens)
    doc = {"what": __doc__.split("\n")[0], "date": datetime.date.today().isoformat(), "device": device_name("cpu"),
           "versions": versions(), "path": args.path,
           "made_by": args.made_by, "sparsity_config": info.sparsity_config, "quantization": info.quantization,
           "layers": {p: sum(v == p for v in info.layers.values()) for p in set(info.layers.values())},
           "load_s_ours": round(load_s, 3), "eval_tokens": int(ev.numel()),
           "weights_bytes_ours": bench.tensor_bytes(ours),
           "ppl_ours": evaluate.perplexity(ours, ev, progress=False).ppl}
    lib, lib_info = _library_model(args.path)
    if lib is not None:
        lib = checkpoint._to_dtype(lib, next(ours.parameters()).dtype)  # rotary inv_freq stays float32
        diff = []
        for name in info.layers:
            a, b = ours.get_submodule(name), lib.get_submodule(name)
            if not _same_bits(a.dense_weight() if hasattr(a, "dense_weight") else a.weight, b.weight):
                diff.append(name)
        doc.update(library=lib_info, layers_compared=len(info.layers), layers_differing_bits=diff,
                   weights_bytes_library_dense=bench.tensor_bytes(lib),
                   ppl_library_dense=evaluate.perplexity(lib, ev, progress=False).ppl)
        if info.quantization:  # what the quantized model gives with its activation quantization on
            for mod in lib.modules():
                if hasattr(mod, "quantization_scheme"):
                    mod.quantization_enabled = True
            doc["ppl_library_dense_activations_quantized"] = evaluate.perplexity(lib, ev, progress=False).ppl
    if info.quantization and any("input activations" in n for n in info.quantization["not_applied"]):
        emu, emu_info = ct.load(args.path, activations="emulate")
        doc["activations_emulated"] = emu_info.quantization["emulated"]
        doc["ppl_ours_activations_emulated"] = evaluate.perplexity(emu, ev, progress=False).ppl
        del emu
        if lib is not None:  # dense layers + emulated activations against the library, bit for bit
            dense, _ = ct.load(args.path, convert=False, activations="emulate")
            window = ev[:512].unsqueeze(0)
            with torch.no_grad():
                a = dense(input_ids=window, use_cache=False).logits
                b = lib(input_ids=window, use_cache=False).logits
            doc["logits_dense_emulated_equal_library_bits"] = _same_bits(a, b)
    write_json(doc, args.out)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
