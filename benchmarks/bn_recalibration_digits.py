"""BatchNorm re-estimation after one-shot pruning of a CNN (``recalibrate_batchnorm``).

Data as ``cnn_pruning_digits.py``. Model: the same residual CNN with a BatchNorm after each
convolution (stem, and both 3x3 convolutions of each of the three blocks), trained ``--epochs``
epochs per seed. The six block convolutions are pruned one-shot (magnitude or SparseGPT,
``--calib`` training images as calibration, no fine-tuning); the test accuracy is taken with the
dense model's BatchNorm statistics and after ``recalibrate_batchnorm`` on the same calibration
images.

Writes ``bn_recalibration_digits.json`` into ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/bn_recalibration_digits.py      # 3 seeds, under a minute on 2 cores
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cnn_pruning_digits import digits_args, accuracy, load_data, train, write_json  # noqa: E402
from sparse_kernels.pruning import prune  # noqa: E402
from sparse_kernels.training import recalibrate_batchnorm  # noqa: E402

SPARSITIES = [0.5, 0.7, 0.8, "2:4"]
METHODS = ["magnitude", "sparsegpt"]


class BNBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResCNNBN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(BNBlock(c) for _ in range(3))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def main():
    args = digits_args(__doc__).parse_args()

    t0 = time.perf_counter()
    data = load_data()
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = ResCNNBN(args.channels)
        train(dense, data, args.epochs, seed)
        rows.append(dict(seed=seed, method="dense", sparsity="0", accuracy=accuracy(dense, data), accuracy_bn=None))
        calib = data[0][torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(100 + seed))[:args.calib]]
        for sparsity in SPARSITIES:
            for method in METHODS:
                m = copy.deepcopy(dense)
                prune(m, method, sparsity, calibration=calib, blocks=list(m.blocks), batch_size=64, progress=False)
                acc = accuracy(m, data)
                recalibrate_batchnorm(m, calib, batch_size=64)
                rows.append(dict(seed=seed, method=method, sparsity=str(sparsity), accuracy=acc,
                                 accuracy_bn=accuracy(m, data)))
    secs = time.perf_counter() - t0
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['method']} {r['sparsity']}", []).append(r)
    summary = {k: dict(acc_mean=statistics.mean(r["accuracy"] for r in v),
                       acc_bn_mean=None if v[0]["accuracy_bn"] is None else statistics.mean(r["accuracy_bn"] for r in v))
               for k, v in summary.items()}
    path = write_json(args, "bn_recalibration_digits.json", secs, summary=summary, rows=rows)
    print(f"dense (with BatchNorm): {summary['dense 0']['acc_mean']:.4f} (mean of {args.seeds} seeds)")
    print(f"{'sparsity':>8} " + " ".join(f"{m:>24}" for m in METHODS) + "   (accuracy: pruned -> BN re-estimated)")
    for sparsity in SPARSITIES:
        cells = [f"{summary[f'{m} {sparsity}']['acc_mean']:.4f} -> {summary[f'{m} {sparsity}']['acc_bn_mean']:.4f}"
                 for m in METHODS]
        print(f"{str(sparsity):>8} " + " ".join(f"{c:>24}" for c in cells))
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
