"""Lottery tickets on scikit-learn's digits: ticket vs random re-init vs one-shot pruning.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, ships with scikit-learn, no download),
pixels / 16, a fixed stratified 80/20 train/test split. Model: LeNet-300-100-like MLP
64-300-100-10 with ReLU. Training per round: Adam, lr 1.2e-3, batch 60, ``--epochs`` epochs;
the accuracy is the test accuracy at the end of training (no early stopping).

Curves, each averaged over ``--seeds`` seeds (the seed sets the initialisation and batch order):

* ``ticket``: iterative magnitude pruning, ``--rate`` of the remaining hidden-layer weights per
  round (the output layer at half the rate, as in Frankle & Carbin), survivors rewound to
  initialisation (``--rewind-step 0``) or to step k, then retrained;
* ``reinit``: the ticket's masks, weights freshly re-sampled from the init distribution, trained;
* ``oneshot``: the dense trained network pruned once straight to the round's sparsity, rewound
  like the ticket, retrained.

Writes ``lottery_ticket.json`` (every run, plus the environment) and ``lottery_ticket.png`` into
``--out`` (default benchmarks/results/cpu). Usage::

    PYTHONPATH=$PWD python benchmarks/lottery_ticket.py            # 20 rounds, 3 seeds, ~3-4 min on 2 cores
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
from sparse_kernels.lottery import LotteryTicket  # noqa: E402
from sparse_kernels.info import cpu_name  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cnn_pruning_digits import accuracy, train as digits_train  # noqa: E402


def load_data(split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=split_seed, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(xtr / 16.0, torch.float32), t(ytr, torch.long), t(xte / 16.0, torch.float32), t(yte, torch.long)


def lenet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, ticket, data, epochs, seed, batch=60, lr=1.2e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ticket.attach(opt)
    digits_train(model, data, epochs, seed, batch=batch, opt=opt, on_step=ticket.step)
    return accuracy(model, data)


def new_ticket(model, args):
    return LotteryTicket(model, rate=args.rate, rates={"4": args.rate / 2}, rewind_step=args.rewind_step)


def run_seed(seed, data, args):
    rows = []
    model = lenet(seed)
    ticket = new_ticket(model, args)
    dense_acc = train(model, ticket, data, args.epochs, seed)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows.append(dict(seed=seed, curve="dense", round=0, remaining=1.0, acc=dense_acc))
    for r in range(1, args.rounds + 1):
        # ticket: prune the previous round's trained weights, rewind, retrain
        ticket.prune()
        ticket.rewind()
        masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
        remaining = ticket.fraction_remaining()
        acc = train(model, ticket, data, args.epochs, seed)
        rows.append(dict(seed=seed, curve="ticket", round=r, remaining=remaining, acc=acc))
        # random re-init: the same masks on a fresh draw of weights
        ctrl = lenet(seed)
        ct = new_ticket(ctrl, args)
        ct.pruner.prune(0.0)  # creates the mask buffers
        ctrl.load_state_dict({**ctrl.state_dict(), **masks})
        ct.reinit(seed=10_000 + 97 * seed + r)
        rows.append(dict(seed=seed, curve="reinit", round=r, remaining=ct.fraction_remaining(),
                         acc=train(ctrl, ct, data, args.epochs, seed)))
        # one-shot: the dense trained network pruned straight to this sparsity, rewound, retrained
        one = lenet(seed)
        ot = new_ticket(one, args)
        ot.rewind_state = ticket.rewind_state
        one.load_state_dict(dense_state)
        ot.prune(rounds=r)
        ot.rewind()
        rows.append(dict(seed=seed, curve="oneshot", round=r, remaining=ot.fraction_remaining(),
                         acc=train(one, ot, data, args.epochs, seed)))
        print(f"seed {seed} round {r:2d} remaining {remaining:6.3f}  " + "  ".join(
            f"{c} {x['acc']:.4f}" for c in ("ticket", "reinit", "oneshot") for x in rows[-3:] if x["curve"] == c),
            flush=True)
    return rows


def summarize(rows):
    out = {}
    for curve in ("dense", "ticket", "reinit", "oneshot"):
        by_round = {}
        for r in rows:
            if r["curve"] == curve:
                by_round.setdefault(r["round"], []).append(r)
        out[curve] = [dict(round=k, remaining=statistics.mean(x["remaining"] for x in v),
                           acc_mean=statistics.mean(x["acc"] for x in v),
                           acc_std=statistics.pstdev(x["acc"] for x in v), n=len(v))
                      for k, v in sorted(by_round.items())]
    return out


def plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = summary["dense"][0]
    for curve, style in (("ticket", "o-"), ("reinit", "s--"), ("oneshot", "^-.")):
        pts = summary[curve]
        xs = [1.0] + [p["remaining"] for p in pts]
        ys = [dense["acc_mean"]] + [p["acc_mean"] for p in pts]
        es = [dense["acc_std"]] + [p["acc_std"] for p in pts]
        ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, label=curve, markersize=4)
    ax.set_xscale("log")
    ticks = [1.0] + [p["remaining"] for p in summary["ticket"]][1::2]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{100 * t:.3g}%" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rewind-step", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    t0 = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(seed, data, args)
    secs = time.perf_counter() - t0
    summary = summarize(rows)
    import sklearn

    env = dict(device=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               sklearn=sklearn.__version__, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               seconds=round(secs, 1), load_avg_1_5_15min=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lottery_ticket.json"), "w") as f:
        json.dump(dict(env=env, config=vars(args), summary=summary, rows=rows), f, indent=1)
    title = (f"digits, 64-300-100-10, rate {args.rate}/round, {args.epochs} epochs, rewind step "
             f"{args.rewind_step}, mean±std of {args.seeds} seeds")
    plot(summary, os.path.join(args.out, "lottery_ticket.png"), title)
    print(f"{'remaining':>9} {'ticket':>14} {'reinit':>14} {'oneshot':>14}")
    for t, r, o in zip(summary["ticket"], summary["reinit"], summary["oneshot"]):
        print(f"{t['remaining']:9.3f} " + " ".join(f"{x['acc_mean']:.4f}±{x['acc_std']:.4f}" for x in (t, r, o)))
    print(f"dense {summary['dense'][0]['acc_mean']:.4f}; {secs:.0f} s; wrote {args.out}/lottery_ticket.{{json,png}}")


if __name__ == "__main__":
    main()
