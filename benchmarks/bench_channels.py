"""Structured channel pruning of a CNN (``sparse_kernels.structured.prune_channels``): accuracy
on scikit-learn's digits and CPU inference time of the smaller model.

Accuracy: the residual CNN of ``cnn_pruning_digits.py`` (stem, three blocks of two 3x3
convolutions with ``--channels`` channels), trained ``--epochs`` epochs per seed. Each block's
inner channels (conv1's outputs = conv2's inputs; the residual stream keeps its width) are cut by
25 / 50 / 75% with each criterion (magnitude, activation, wanda; and wanda with
``scope="global"``: one ranking over the three blocks; 256 training images as calibration),
then the test accuracy is taken before and after ``--ft-epochs`` epochs of fine-tuning (Adam, lr 1e-3); the dense model fine-tuned as long is the control.

Speed: the same architecture with 64 channels on 32x32 inputs, batch 32, float32, dense against
each cut: under ``torch.inference_mode``, three rounds, each timing every model in turn (3
warm-up calls, then the median of ``--repeats`` calls); the median of the three rounds; torch's
default threads.

Writes ``bench_channels.json`` into ``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/bench_channels.py        # about two minutes on 2 cores
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
from sparse_kernels.structured import prune_channels  # noqa: E402

CUTS = [0.25, 0.5, 0.75]
CRITERIA = ["magnitude", "activation", "wanda", "wanda/global"]  # /global: prune_channels(scope="global")


def time_forward(models: dict, x, repeats: int, rounds: int = 3) -> dict:
    """Median ms per model: each round times every model in turn (3 warm-up calls, then
    ``repeats`` calls, their median); the result is the median over ``rounds`` rounds."""
    per_round = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, m in models.items():
                for _ in range(3):
                    m(x)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m(x)
                    times.append(time.perf_counter() - t0)
                per_round[k].append(statistics.median(times))
    return {k: statistics.median(v) for k, v in per_round.items()}


@torch.no_grad()
def dead_channels(model, images) -> list[int]:
    """Per block: the inner channels (conv1's outputs after the ReLU) that are zero on every
    training image: a cut removes these first whatever the criterion."""
    dead, hooks = [], []
    for b in model.blocks:
        hooks.append(b.conv2.register_forward_pre_hook(
            lambda m, a: dead.append(int((a[0].amax((0, 2, 3)) <= 0).sum()))))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return dead


def main():
    args = digits_args(__doc__, **{"--repeats": (int, 30)}).parse_args()

    t_start = time.perf_counter()
    # speed first, in a fresh process state (after the training loops below the same models timed
    # erratically here: the dense one slower, the 25% cut twice as fast as its FLOPs allow)
    # 64 channels, 32x32 inputs, batch 32
    torch.manual_seed(0)
    big = ResCNN(64).eval()
    x = torch.randn(32, 1, 32, 32)
    models = {"dense": big}
    for cut in CUTS:
        m = copy.deepcopy(big)
        prune_channels(m, cut)
        models[f"cut {cut}"] = m
    with torch.no_grad():
        ref = big(x)
        assert all(m(x).shape == ref.shape for m in models.values())
    times = time_forward(models, x, args.repeats)
    speed = {k: dict(ms=1e3 * t, speedup=times["dense"] / t, params=sum(p.numel() for p in models[k].parameters()))
             for k, t in times.items()}
    data = load_data()
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = ResCNN(args.channels)
        train(dense, data, args.epochs, seed)
        more = copy.deepcopy(dense)  # the control: the dense model fine-tuned as long as the pruned ones
        train(more, data, args.ft_epochs, 1000 + seed, lr=1e-3)
        rows.append(dict(seed=seed, criterion="dense", cut=0.0, accuracy=accuracy(dense, data),
                         accuracy_ft=accuracy(more, data), params=sum(p.numel() for p in dense.parameters()),
                         dead_channels=dead_channels(dense, data[0])))
        calib = data[0][torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(100 + seed))[:args.calib]]
        for cut in CUTS:
            for label in CRITERIA:
                criterion, _, scope = label.partition("/")
                model = copy.deepcopy(dense)
                report = prune_channels(model, cut, calibration=None if criterion == "magnitude" else calib,
                                        criterion=criterion, batch_size=64, scope=scope or "chain")
                acc = accuracy(model, data)
                train(model, data, args.ft_epochs, 1000 + seed, lr=1e-3)
                rows.append(dict(seed=seed, criterion=label, cut=cut, accuracy=acc, accuracy_ft=accuracy(model, data),
                                 params=report.params_after, chains=len(report.chains),
                                 kept=[r["kept"] for r in report.chains.values()]))

    summary = {}
    for r in rows:
        summary.setdefault(f"{r['criterion']} {r['cut']}", []).append(r)
    dead = [r["dead_channels"] for r in rows if r["criterion"] == "dense"]
    summary = {k: dict(acc_mean=statistics.mean(r["accuracy"] for r in v),
                       acc_ft_mean=statistics.mean(r["accuracy_ft"] for r in v),
                       params=v[0]["params"]) for k, v in summary.items()}

    secs = time.perf_counter() - t_start

    path = write_json(args, "bench_channels.json", secs, summary=summary, speed=speed, dead_channels=dead, rows=rows)

    print(f"dense: {summary['dense 0.0']['acc_mean']:.4f} test accuracy ({summary['dense 0.0']['acc_ft_mean']:.4f} "
          f"after the same fine-tuning), {summary['dense 0.0']['params']} params (mean of {args.seeds} seeds)")
    print(f"inner channels never active on the training images (per seed, per block, of {args.channels}): {dead}")
    print(f"{'cut':>5} " + " ".join(f"{c:>22}" for c in CRITERIA) + "   (accuracy: one-shot -> fine-tuned)")
    for cut in CUTS:
        cells = [f"{summary[f'{c} {cut}']['acc_mean']:.4f} -> {summary[f'{c} {cut}']['acc_ft_mean']:.4f}"
                 for c in CRITERIA]
        print(f"{cut:>5} " + " ".join(f"{c:>22}" for c in cells))
    print("forward, 64 channels, 32x32, batch 32, fp32: " + "; ".join(
        f"{k} {v['ms']:.2f} ms ({v['speedup']:.2f}x, {v['params']} params)" for k, v in speed.items()))
    print(f"{secs:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
