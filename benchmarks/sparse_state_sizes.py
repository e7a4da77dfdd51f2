"""File sizes of a pruned vision model stored with ``save_sparse`` against its dense safetensors.

Model: Hugging Face ``ResNetForImageClassification`` built from ``ResNetConfig(num_labels=1000)``
(ResNet-50: 25.6 M parameters with its 1000-class head; random weights, no download: sizes
depend on the pattern, not the values). Its bottleneck blocks' convolutions are pruned by magnitude (2:4
along input channels, or 50% / 70% unstructured; the stem and the classifier stay dense), the
model is cast to ``--dtype``, then written twice: ``safetensors.torch.save_file`` of the
state_dict (dense) and ``save_sparse``. Each file is read back with ``load_sparse`` and checked
against the model (zeros up to their sign). Medians of ``--repeats`` save / load times.

Writes ``sparse_state_sizes.json`` into ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/sparse_state_sizes.py      # a few seconds on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_kernels import load_sparse, prune, save_sparse  # noqa: E402
from sparse_kernels.info import cpu_name  # noqa: E402

SETTINGS = ["2:4", 0.5, 0.7]


def resnet50():
    import transformers

    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).eval()


def timed(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    args = ap.parse_args()
    from safetensors.torch import save_file

    dtype = getattr(torch, args.dtype)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for setting in SETTINGS:
            model = resnet50()
            blocks = [layer for stage in model.resnet.encoder.stages for layer in stage.layers]
            report = prune(model, "magnitude", setting, blocks=blocks, progress=False)
            model = model.to(dtype)
            state = model.state_dict()
            dense_path, sparse_path = os.path.join(d, "dense.safetensors"), os.path.join(d, "sparse.safetensors")
            contiguous = {k: v.contiguous() for k, v in state.items()}
            _, t_dense = timed(lambda: save_file(contiguous, dense_path), args.repeats)
            rep, t_save = timed(lambda: save_sparse(model, sparse_path), args.repeats)
            back, t_load = timed(lambda: load_sparse(sparse_path), args.repeats)
            for k, v in state.items():  # the round trip, zeros up to their sign
                b = back[k]
                if v.is_floating_point():
                    assert bool(((b == v) | (b.isnan() & v.isnan())).all()), k
                else:
                    assert torch.equal(b, v), k
            counts = {}
            for f in rep.formats.values():
                counts[f] = counts.get(f, 0) + 1
            rows.append(dict(setting=str(setting), pruned_layers=len(report.layers),
                             overall_sparsity_of_pruned=report.overall_sparsity,
                             dense_file_bytes=os.path.getsize(dense_path), sparse_file_bytes=rep.file_bytes,
                             ratio=rep.file_bytes / os.path.getsize(dense_path), formats=counts,
                             save_dense_s=t_dense, save_sparse_s=t_save, load_sparse_s=t_load))
    secs = time.perf_counter() - t_start
    env = dict(device=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               seconds=round(secs, 1), load_avg_1_5_15min=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sparse_state_sizes.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, config=vars(args), model="HF ResNetForImageClassification(ResNetConfig(num_labels=1000)), "
                       "bottleneck convolutions pruned by magnitude", rows=rows), f, indent=1)
    print(f"ResNet-50 shape, {args.dtype}:")
    for r in rows:
        print(f"  {r['setting']:>4}: {r['dense_file_bytes'] / 2**20:7.1f} MiB dense -> {r['sparse_file_bytes'] / 2**20:7.1f} "
              f"MiB ({r['ratio']:.3f}x); {r['formats']}; save {r['save_sparse_s']:.2f} s (dense {r['save_dense_s']:.2f} s), "
              f"load {r['load_sparse_s']:.2f} s")
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
