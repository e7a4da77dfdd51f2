"""One-shot pruning of a small residual CNN: magnitude vs Wanda vs SparseGPT, no fine-tuning.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, ships with scikit-learn, no download),
pixels / 16, a fixed stratified 80/20 train/test split. Model: a stem ``Conv2d(1, C, 3)``, three
residual blocks of two ``Conv2d(C, C, 3, padding=1)``, global average pooling, ``Linear(C, 10)``;
trained with Adam (lr 3e-3, batch 64, ``--epochs`` epochs). The six block convolutions are pruned
(``sparse_kernels.prune(model, method, sparsity, calibration=images, blocks=model.blocks)``),
the stem (one input channel) and the head stay dense. Calibration: ``--calib`` training images.

Contenders: magnitude (one threshold per layer), magnitude with one threshold per output row
(Wanda's comparison group), Wanda, Wanda with one threshold per layer (``scope="layer"``),
SparseGPT. Per seed (initialisation and batch order) and setting, the test accuracy after pruning (and, at
80%, 90% and 2:4, after ``--ft-epochs`` epochs of fine-tuning with the pruned weights kept at
zero: ``mask_zeros_`` + ``MaskedTraining``, Adam lr 1e-3) and the blocks' relative output errors
(mean over the three blocks) go into ``cnn_pruning_digits.json``
in ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/cnn_pruning_digits.py      # 3 seeds, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_kernels.info import cpu_name  # noqa: E402
from sparse_kernels.pruning import prune  # noqa: E402
from sparse_kernels.training import MaskedTraining, mask_zeros_  # noqa: E402

SPARSITIES = [0.5, 0.7, 0.8, 0.9, "2:4", "4:8"]
FT_SPARSITIES = ("0.8", "0.9", "2:4")  # also fine-tuned afterwards (--ft-epochs, masks kept)
# label -> (method, options); "magnitude/row" has Wanda's comparison group (one threshold per output row)
METHODS = {"magnitude": ("magnitude", {}), "magnitude/row": ("magnitude", {"scope": "row"}),
           "wanda": ("wanda", {}), "wanda/layer": ("wanda", {"scope": "layer"}), "sparsegpt": ("sparsegpt", {})}


def load_data(split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=split_seed, stratify=y)
    img = lambda a: torch.tensor(a / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)  # noqa: E731
    return img(xtr), torch.tensor(ytr), img(xte), torch.tensor(yte)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResCNN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.ModuleList(Block(c) for _ in range(3))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def train(model, data, epochs, seed, batch=64, lr=3e-3, masked=False, opt=None, on_epoch=None, on_step=None):
    """Adam (or ``opt``) over shuffled mini-batches; ``on_epoch(epoch)`` before each epoch,
    ``on_step()`` after each optimizer step."""
    xtr, ytr = data[0], data[1]
    opt = opt if opt is not None else torch.optim.Adam(model.parameters(), lr=lr)
    if masked:  # pruned weights (weight_mask buffers) stay zero, Adam state included
        MaskedTraining(model, opt)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step()
    model.eval()


@torch.no_grad()
def accuracy(model, data):
    return (model(data[2]).argmax(1) == data[3]).float().mean().item()


def digits_args(doc: str, *, seeds: int = 3, **extra) -> argparse.ArgumentParser:
    """The digits benchmarks' common options (--seeds, --epochs, --channels, --calib, --ft-epochs,
    --out) plus ``extra`` ({"--name": (type, default)})."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--ft-epochs", type=int, default=5)
    for name, (typ, default) in extra.items():
        ap.add_argument(name, type=typ, default=default)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    return ap


def write_json(args, name: str, secs: float, **payload) -> str:
    """``args.out/name`` with the machine, versions, date, seconds and load next to ``payload``."""
    import sklearn

    env = dict(device=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               sklearn=sklearn.__version__, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               seconds=round(secs, 1), load_avg_1_5_15min=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(dict(env=env, config=vars(args), **payload), f, indent=1)
    return path


def main():
    args = digits_args(__doc__).parse_args()

    data = load_data()
    t0 = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = ResCNN(args.channels)
        train(dense, data, args.epochs, seed)
        rows.append(dict(seed=seed, method="dense", sparsity="0", accuracy=accuracy(dense, data)))
        calib = data[0][torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(100 + seed))[:args.calib]]
        for sparsity in SPARSITIES:
            for label, (method, options) in METHODS.items():
                model = ResCNN(args.channels)
                model.load_state_dict(dense.state_dict())
                model.eval()
                report = prune(model, method, sparsity, calibration=calib, blocks=list(model.blocks), batch_size=64,
                               progress=False, **options)
                err = statistics.mean(report.block_output_error)
                acc = accuracy(model, data)
                acc_ft = None
                if args.ft_epochs and str(sparsity) in FT_SPARSITIES:  # recovery with the zeros kept
                    mask_zeros_(model)
                    train(model, data, args.ft_epochs, 1000 + seed, lr=1e-3, masked=True)
                    acc_ft = accuracy(model, data)
                rows.append(dict(seed=seed, method=label, sparsity=str(sparsity), accuracy=acc,
                                 accuracy_ft=acc_ft, block_output_error=err, seconds=report.seconds))
    secs = time.perf_counter() - t0

    summary = {}
    for r in rows:
        summary.setdefault(f"{r['method']} {r['sparsity']}", []).append(r)
    summary = {k: dict(acc_mean=statistics.mean(r["accuracy"] for r in v), acc_min=min(r["accuracy"] for r in v),
                       acc_max=max(r["accuracy"] for r in v),
                       acc_ft_mean=(statistics.mean(r["accuracy_ft"] for r in v)
                                    if v[0].get("accuracy_ft") is not None else None))
               for k, v in summary.items()}
    path = write_json(args, "cnn_pruning_digits.json", secs, summary=summary, rows=rows)

    print(f"dense: {summary['dense 0']['acc_mean']:.4f} (test accuracy, mean of {args.seeds} seeds)")
    print(f"{'sparsity':>8} " + " ".join(f"{m:>24}" for m in METHODS) + "   (accuracy mean [min-max]; block error)")
    for sparsity in SPARSITIES:
        cells = []
        for m in METHODS:
            s = summary[f"{m} {sparsity}"]
            e = statistics.mean(r["block_output_error"] for r in rows if r["method"] == m and r["sparsity"] == str(sparsity))
            cells.append(f"{s['acc_mean']:.4f} [{s['acc_min']:.3f}-{s['acc_max']:.3f}] {e:.3f}")
        print(f"{str(sparsity):>8} " + " ".join(f"{c:>24}" for c in cells))
    if args.ft_epochs:
        print(f"after {args.ft_epochs} epochs of fine-tuning with the masks kept:")
        for sparsity in FT_SPARSITIES:
            print(f"{sparsity:>8} " + " ".join(f"{summary[f'{m} {sparsity}']['acc_ft_mean']:>24.4f}" for m in METHODS))
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
