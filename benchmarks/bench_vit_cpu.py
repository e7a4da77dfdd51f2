"""End-to-end CPU inference of a 2:4-pruned vision transformer against the dense one.

Model: Hugging Face ``ViTForImageClassification`` built from the default ``ViTConfig`` (ViT-B/16
at 224x224: 12 layers, hidden 768, MLP 3072, 197 tokens per image; random weights, no download:
the time does not depend on the values). Its encoder's Linear layers (q, k, v, attention
output, MLP in and out: 72 layers) are pruned 2:4 by magnitude with ``convert=True``, so they
run ``sparse_linear`` on the packed weights (``backend="auto"``); patch embedding and classifier
stay dense. Timed: ``model(pixel_values)`` under ``torch.inference_mode`` for ``--batch``
images, float32 and bfloat16, dense and 2:4 in turn per round (3 warm-up calls, then the median
of ``--repeats`` calls; the median of 3 rounds). The outputs of the two are compared (the 2:4
model against the dense model with the same weights masked) before timing.

Writes ``bench_vit_cpu.json`` into ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/bench_vit_cpu.py      # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_kernels import prune  # noqa: E402
from sparse_kernels.info import cpu_name  # noqa: E402


def time_models(models: dict, x, repeats: int, rounds: int = 3) -> dict:
    per_round = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, m in models.items():
                for _ in range(3):
                    m(pixel_values=x)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m(pixel_values=x)
                    ts.append(time.perf_counter() - t0)
                per_round[k].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in per_round.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    args = ap.parse_args()
    import transformers

    t_start = time.perf_counter()
    torch.manual_seed(0)
    dense = transformers.ViTForImageClassification(transformers.ViTConfig()).eval()
    masked = copy.deepcopy(dense)
    prune(masked, "magnitude", "2:4", progress=False)  # the same 2:4 weights, dense layers
    sparse = copy.deepcopy(masked)
    report = prune(sparse, "magnitude", "2:4", progress=False, convert=True)  # already 2:4: same weights, packed
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        m_dense, m_masked, m_sparse = (m.to(dtype) for m in (dense, masked, sparse))
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224, dtype=dtype)
            with torch.inference_mode():
                a, b = m_masked(pixel_values=x).logits.float(), m_sparse(pixel_values=x).logits.float()
            err = ((a - b).norm() / a.norm()).item()
            t = time_models({"dense": m_dense, "2:4": m_sparse}, x, args.repeats)
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), batch=batch, tokens=batch * 197,
                             dense_ms=1e3 * t["dense"], sparse_ms=1e3 * t["2:4"], speedup=t["dense"] / t["2:4"],
                             rel_err_vs_masked=err))
            print(f"{rows[-1]['dtype']:>8} batch {batch}: dense {rows[-1]['dense_ms']:.1f} ms, 2:4 "
                  f"{rows[-1]['sparse_ms']:.1f} ms ({rows[-1]['speedup']:.2f}x); rel. error vs masked dense {err:.1e}")
    secs = time.perf_counter() - t_start
    env = dict(device=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               seconds=round(secs, 1), load_avg_1_5_15min=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_vit_cpu.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, config=vars(args), model="HF ViTForImageClassification(ViTConfig()) (ViT-B/16)",
                       sparse_layers=len(report.layers), rows=rows), f, indent=1)
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
