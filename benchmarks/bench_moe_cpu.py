"""Speed of a 2:4 mixture-of-experts model on CPU: ``SparseExperts`` (+ ``SparseLinear``) against
the dense transformers model, on the upcycled SmolLM2 MoE of ``moe_smollm2.py``.

For each dtype: the dense MoE with transformers' default experts implementation
(``grouped_mm``) and with its ``eager`` loop, and the same model pruned 2:4 by magnitude (speed
only: the values do not matter here) and converted (``prune(..., convert=True)``: attention
projections -> SparseLinear, experts -> SparseExperts). Measured: greedy generation
(``sparse_kernels.llm.bench.compare_generation``: interleaved runs, one warm-up each, median
tokens/s with p20/p80) and one experts module alone on ``T`` routed tokens (median of
``--repeats`` calls after a warm-up), plus the bytes of the expert weights. The greedy outputs
of dense and 2:4 models differ (different weights). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import device_name, run_record, write_json  # noqa: E402
from moe_smollm2 import upcycle_to_mixtral  # noqa: E402


def experts_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if ".experts." in n)


def time_experts(mod, hidden, index, weights, repeats):
    with torch.no_grad():
        mod(hidden, index, weights)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mod(hidden, index, weights)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", default="1,8,64", help="routed tokens for the experts-module timing")
    ap.add_argument("--int4", type=int, default=None, metavar="G",
                    help="also the 2:4 model rounded to int4 in groups of G (quantize_int4: SparseLinearInt4, "
                         "SparseExpertsInt4)")
    ap.add_argument("--prompt", default="In the beginning God created the heaven and the earth. And the earth was")
    ap.add_argument("--out", default="benchmarks/results/cpu/bench_moe_cpu.json")
    args = ap.parse_args(argv)
    import sparse_kernels as sk
    from sparse_kernels.llm import bench, models
    from sparse_kernels.nn import SparseExperts, SparseExpertsInt4

    llama, tok, src = models.load_model(None)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        dense = upcycle_to_mixtral(llama, args.experts, args.top_k).to(dtype)
        eager = copy.deepcopy(dense)
        eager.config._experts_implementation = "eager"
        sparse = copy.deepcopy(dense)
        sk.prune(sparse, method="magnitude", sparsity="2:4", progress=False, convert=True)
        assert all(isinstance(b.mlp.experts, SparseExperts) for b in sparse.model.layers)
        contenders = {"dense (grouped_mm)": dense, "dense (eager)": eager, "2:4 (SparseExperts)": sparse}
        if args.int4 is not None:
            q = copy.deepcopy(sparse)
            sk.quantize_int4(q, args.int4)
            assert all(isinstance(b.mlp.experts, SparseExpertsInt4) for b in q.model.layers)
            contenders[f"2:4 int4 g{args.int4} (SparseExpertsInt4)"] = q
        gens = bench.compare_generation(contenders, tok, args.prompt, new_tokens=args.new_tokens,
                                        repeats=args.repeats)
        base = gens["dense (grouped_mm)"].tokens_per_s
        for label, g in gens.items():
            row = {"what": "generation", "dtype": dname, "model": label, "tokens_per_s": round(g.tokens_per_s, 2),
                   "p20": round(g.p20, 2), "p80": round(g.p80, 2), "speedup_vs_grouped_mm": round(g.tokens_per_s / base, 3),
                   "experts_bytes": experts_bytes(contenders[label]), "new_tokens": g.new_tokens}
            rows.append(row)
            print(json.dumps(row), flush=True)
        g = torch.Generator().manual_seed(0)
        for t in (int(x) for x in args.tokens.split(",")):
            hidden = torch.randn(t, llama.config.hidden_size, generator=g).to(dtype)
            index = torch.stack([torch.randperm(args.experts, generator=g)[:args.top_k] for _ in range(t)])
            weights = torch.softmax(torch.randn(t, args.top_k, generator=g), -1).to(dtype)
            times = {label: time_experts(m.model.layers[0].mlp.experts, hidden, index, weights, args.repeats * 4)
                     for label, m in contenders.items()}
            for label, ms in times.items():
                row = {"what": "experts module", "dtype": dname, "model": label, "tokens": t, "ms": round(ms, 4),
                       "speedup_vs_grouped_mm": round(times["dense (grouped_mm)"] / ms, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del dense, eager, sparse, contenders  # (and the int4 copy)
    doc = run_record(f"2:4 MoE on CPU: {src.name} upcycled to {args.experts} experts top-{args.top_k}, SparseExperts "
                     f"against transformers' dense experts", "bench_moe_cpu.py", argv, rows,
                     machine=f"{device_name('cpu')}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
                     prompt=args.prompt)
    write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
