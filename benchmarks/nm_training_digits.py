"""2:4 training of a CNN on scikit-learn's digits: SR-STE / STE from scratch and during
fine-tuning, against one-shot pruning plus masked fine-tuning, with the dense model as control.

Model and data as ``cnn_pruning_digits.py`` (residual CNN, 32 channels; the six block
convolutions are the 2:4 layers, the stem and head stay dense). Per seed:

* ``dense``: trained ``--epochs`` epochs (Adam, lr 3e-3);
* ``sr-ste scratch`` / ``ste scratch``: the same training from the same initialisation with
  ``NMSparseTraining(model, "2:4", optimizer=opt, decay=2e-4 | 0)`` on the block convolutions,
  one Adam for the whole run, then ``finalize``; the fraction of mask entries that change during
  the last epoch is recorded;
* ``one-shot + ft``: the dense model pruned 2:4 by magnitude, then ``--ft-epochs`` epochs with the
  mask fixed (``mask_zeros_`` + ``MaskedTraining``, lr 1e-3);
* ``sr-ste ft``: the dense model fine-tuned ``--ft-epochs`` epochs under SR-STE (Adam, lr 1e-3), then
  ``finalize``;
* ``dense ft``: the dense model trained ``--ft-epochs`` more epochs (lr 1e-3), the control for the
  two fine-tuned rows.

Writes ``nm_training_digits.json`` into ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/nm_training_digits.py      # 5 seeds, about a minute and a half on 2 cores
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cnn_pruning_digits import digits_args, ResCNN, accuracy, load_data, train, write_json  # noqa: E402
from sparse_kernels.pruning import prune  # noqa: E402
from sparse_kernels.training import NMSparseTraining, mask_zeros_  # noqa: E402

ROWS = ["dense", "sr-ste scratch", "ste scratch", "dense ft", "one-shot + ft", "sr-ste ft"]
# the block convolutions: the layers prune(..., blocks=model.blocks) takes
BLOCK_CONVS = [f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)]


def nm_24(model) -> bool:
    for b in model.blocks:
        for conv in (b.conv1, b.conv2):
            g = conv.weight.detach().permute(0, 2, 3, 1).reshape(-1, 4)
            if int((g != 0).sum(1).max()) > 2:
                return False
    return True


def main():
    args = digits_args(__doc__, seeds=5, **{"--decay": (float, 2e-4)}).parse_args()

    t0 = time.perf_counter()
    data = load_data()
    rows = []

    def record(seed, kind, model, flips=None):
        is_24 = None if kind.startswith("dense") else nm_24(model)  # dense rows: not checked
        rows.append(dict(seed=seed, kind=kind, accuracy=accuracy(model, data), is_24=is_24, final_flips=flips))

    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = ResCNN(args.channels)
        dense = copy.deepcopy(init)
        train(dense, data, args.epochs, seed)
        record(seed, "dense", dense)
        for kind, decay in (("sr-ste scratch", args.decay), ("ste scratch", 0.0)):
            m = copy.deepcopy(init)
            opt = torch.optim.Adam(m.parameters(), lr=3e-3)  # one optimizer for the whole run
            nm = NMSparseTraining(m, "2:4", optimizer=opt, decay=decay, include=BLOCK_CONVS)
            train(m, data, args.epochs, seed, opt=opt,  # mask entries that change in the last epoch
                  on_epoch=lambda e, nm=nm: nm.flips() if e == args.epochs - 1 else None)
            flips = nm.flips()
            nm.finalize()
            record(seed, kind, m, flips)
        m = copy.deepcopy(dense)
        train(m, data, args.ft_epochs, 1000 + seed, lr=1e-3)
        record(seed, "dense ft", m)
        m = copy.deepcopy(dense)
        prune(m, "magnitude", "2:4", blocks=list(m.blocks), progress=False)
        mask_zeros_(m)
        train(m, data, args.ft_epochs, 1000 + seed, lr=1e-3, masked=True)
        record(seed, "one-shot + ft", m)
        m = copy.deepcopy(dense)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        nm = NMSparseTraining(m, "2:4", optimizer=opt, decay=args.decay, include=BLOCK_CONVS)
        train(m, data, args.ft_epochs, 1000 + seed, opt=opt)
        nm.finalize()
        record(seed, "sr-ste ft", m)
    secs = time.perf_counter() - t0

    summary = {}
    for kind in ROWS:
        rs = [r for r in rows if r["kind"] == kind]
        summary[kind] = dict(acc_mean=statistics.mean(r["accuracy"] for r in rs),
                             acc_min=min(r["accuracy"] for r in rs), acc_max=max(r["accuracy"] for r in rs),
                             all_24=None if rs[0]["is_24"] is None else all(r["is_24"] for r in rs),
                             last_epoch_flips=(statistics.mean(r["final_flips"] for r in rs)
                                               if rs[0]["final_flips"] is not None else None))
    path = write_json(args, "nm_training_digits.json", secs, summary=summary, rows=rows)
    print(f"{'':16} {'accuracy (mean [min-max])':>28} {'2:4':>5} {'mask flips, last epoch':>24}")
    for kind, s in summary.items():
        fl = "" if s["last_epoch_flips"] is None else f"{s['last_epoch_flips']:.4f}"
        print(f"{kind:16} {s['acc_mean']:.4f} [{s['acc_min']:.3f}-{s['acc_max']:.3f}]{'':>7} "
              f"{({True: 'yes', False: 'NO', None: '-'})[s['all_24']]:>5} {fl:>24}")
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
