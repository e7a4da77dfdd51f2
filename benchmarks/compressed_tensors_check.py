"""A compressed-tensors sparse checkpoint, read by us and by compressed-tensors itself, compared.

Given a directory in compressed-tensors' sparse format (e.g. from ``sparse-kernels prune
--format compressed-tensors``, or an llm-compressor model), this

1. loads it with :func:`sparse_kernels.llm.compressed_tensors.load` (SparseLinear layers) and
   times the load;
2. when a compressed-tensors with sparse compressors (<= 0.12) is importable, builds the same
   architecture dense, lets the library decompress the checkpoint into it
   (``ModelCompressor.decompress``) and compares every sparse layer's weight with ours, bit for
   bit;
3. evaluates the perplexity of our model and of the library's dense one on the same tokens
   (New Testament, the CLI's windows), and the weight bytes in memory of both.

Writes JSON to ``--out``.  Without the library only steps 1 and 3 (ours) run.
"""

from __future__ import annotations

import argparse
import datetime
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
    cfg, _ = ct.read_config(path)
    m = checkpoint.model_from_config(cfg)
    ModelCompressor.from_pretrained(path).decompress(path, m)
    m.tie_weights()  # decompress assigns new Parameters, untying; transformers' loader ties them again
    return m.eval(), {"compressed_tensors": lib_version}


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
           "made_by": args.made_by, "sparsity_config": info.sparsity_config,
           "layers": {p: sum(v == p for v in info.layers.values()) for p in set(info.layers.values())},
           "load_s_ours": round(load_s, 3), "eval_tokens": int(ev.numel()),
           "weights_bytes_ours": bench.tensor_bytes(ours),
           "ppl_ours": evaluate.perplexity(ours, ev, progress=False).ppl}
    lib, lib_info = _library_model(args.path)
    if lib is not None:
        lib = lib.to(next(ours.parameters()).dtype)
        diff = []
        for name in info.layers:
            a, b = ours.get_submodule(name), lib.get_submodule(name)
            if not _same_bits(a.dense_weight() if hasattr(a, "dense_weight") else a.weight, b.weight):
                diff.append(name)
        doc.update(library=lib_info, layers_compared=len(info.layers), layers_differing_bits=diff,
                   weights_bytes_library_dense=bench.tensor_bytes(lib),
                   ppl_library_dense=evaluate.perplexity(lib, ev, progress=False).ppl)
    write_json(doc, args.out)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
