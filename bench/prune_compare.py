"""Pruning schedules at an equal budget on LeNet-300-100 / MNIST, and the per-layer sensitivity scan.

    python -m bench.prune_compare [--epochs 9]

From lowbit's baseline (bench/checkpoints/lenet300_100.safetensors), every method reaches the same
per-layer sparsity (fc1 95%, fc2 91%, fc3 70%: 94.5% of all weights) with the same number of training epochs:

* one-shot: prune once, retrain for all epochs;
* iterative (Han et al. 2015): 3 prune-retrain cycles on a cubic ramp, epochs split evenly;
* AGP (Zhu & Gupta 2017, arXiv:1710.01878): sparsity raised every 50 steps over the first 2/3 of training;
* DeepTwist (Lee et al. 2018, arXiv:1810.09760): full-precision training, weights magnitude-pruned every
  S_D = 200 steps and once at the end (no retraining after the last distortion).

Writes bench/results/prune_compare.json, prune_compare.png and prune_sensitivity.png.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench._common import CHECKPOINTS, RESULTS, write_results
from lowbit.data import load_dataset
from lowbit.prune import (
    DeepTwist,
    GradualPruning,
    MaskCallback,
    PruneConfig,
    iterative_prune,
    plot_sensitivity,
    prune_,
    sensitivity,
)
from lowbit.train import TrainConfig, evaluate, fit, load_model

RULES = {"fc1": 0.95, "fc2": 0.91, "fc3": 0.70}


def _sparsity(model: torch.nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=9, help="training budget of every method (a multiple of 3)")
    args = ap.parse_args()
    data = load_dataset("mnist")
    test = data.loader("test", 1000)
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, weight_decay=5e-4)
    steps = math.ceil(len(data.train) / cfg.batch_size) * args.epochs
    base = lambda: load_model(CHECKPOINTS / "lenet300_100.safetensors")[0]  # noqa: E731
    acc = lambda m: evaluate(m, test)["acc"]  # noqa: E731
    target = PruneConfig(rules=RULES)
    rows: dict[str, dict[str, float]] = {}

    baseline = base()
    rows["baseline (dense)"] = {"test_acc_pct": acc(baseline), "sparsity_pct": 0.0, "epochs": 0}

    model = base()
    prune_(model, target)
    rows["one-shot, no retraining"] = {"test_acc_pct": acc(model), "sparsity_pct": 100 * _sparsity(model), "epochs": 0}
    fit(model, data, cfg, callbacks=[MaskCallback()])
    rows["one-shot + retrain"] = {"test_acc_pct": acc(model), "sparsity_pct": 100 * _sparsity(model)}

    model = base()
    cycle_cfg = cfg.model_copy(update={"epochs": args.epochs / 3})
    iterative_prune(model, target, lambda m: fit(m, data, cycle_cfg, callbacks=[MaskCallback()]), cycles=3)
    rows["iterative, 3 cycles"] = {"test_acc_pct": acc(model), "sparsity_pct": 100 * _sparsity(model)}

    model = base()
    every = 50
    agp = GradualPruning(target, every=every, n_updates=max(1, (2 * steps // 3) // every))
    fit(model, data, cfg, callbacks=[agp, MaskCallback()])
    rows["AGP (gradual)"] = {"test_acc_pct": acc(model), "sparsity_pct": 100 * _sparsity(model)}

    model = base()
    twist = DeepTwist(target, distortion_steps=200, total_steps=steps)
    fit(model, data, cfg, callbacks=[twist])
    rows["DeepTwist (S_D=200)"] = {"test_acc_pct": acc(model), "sparsity_pct": 100 * _sparsity(model)}

    for row in rows.values():
        row.setdefault("epochs", args.epochs)
        row["test_acc_pct"] = round(row["test_acc_pct"], 2)
        row["sparsity_pct"] = round(row["sparsity_pct"], 2)
    print(f"{'method':28s} {'test acc':>9s} {'sparsity':>9s} {'epochs':>6s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['test_acc_pct']:8.2f}% {row['sparsity_pct']:8.2f}% {row['epochs']:6d}")

    table = sensitivity(baseline, acc, ratios=(0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99))
    plot_sensitivity(table, RESULTS / "prune_sensitivity.png")
    _plot(rows)
    scan = {f"sensitivity {layer} (alone, no retraining)": {f"test_acc_pct_at_sparsity_{r:g}": round(v, 2)
                                                             for r, v in by_ratio.items()}
            for layer, by_ratio in table.as_dict().items()}
    write_results("prune_compare", {**rows, **scan}, merge=False)


def _plot(rows: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bars = ax.barh(names, [rows[n]["test_acc_pct"] for n in names])
    for b, n in zip(bars, names, strict=True):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {rows[n]['test_acc_pct']:.2f}%", va="center")
    lo = min(r["test_acc_pct"] for r in rows.values())
    ax.set_xlim(max(0.0, lo - 1.0), 100)
    sparsity = max(r["sparsity_pct"] for r in rows.values())
    ax.set_xlabel(f"MNIST test accuracy (%), LeNet-300-100 at {sparsity:.1f}% sparsity, equal epochs")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "prune_compare.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
