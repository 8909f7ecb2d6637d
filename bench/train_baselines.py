"""Train lowbit's float baselines, the starting point of every compression method.

    python -m bench.train_baselines                 # all of them
    python -m bench.train_baselines lenet5 resnet20 # some
    python -m bench.train_baselines resnet20 --epochs 80   # a longer run, kept beside the recipe's (resnet20-e80)

Each run checkpoints under ``$LOWBIT_RUNS`` (default ``~/.cache/lowbit/runs``) and resumes when
started again. ``--snapshot`` copies an unfinished run's last checkpoint to
``bench/checkpoints/partial/NAME.last.safetensors`` so that it can be committed and resumed on another
machine: a run directory without a checkpoint starts from that snapshot when one exists. Final weights
go to ``bench/checkpoints/NAME.safetensors`` (committed) and the test accuracies (final and per epoch) to
``bench/results/baselines.json``, drawn against the targets in ``baselines.png``. Starting a finished run
again only re-reads it (seconds) and brings its row up to date; the committed checkpoint is rewritten only if
its weights differ. ``--epochs E`` overrides the recipe's length; such a run is a different model, named
``NAME-eE`` everywhere (run directory, snapshot, checkpoint, results row), so the recipe's baseline and
everything measured from it stay as they are.

Targets (issue #2): LeNet-300-100 >= 98.2%, LeNet-5 >= 99.1% on MNIST; ResNet-20 >= 89.0% on the
JPEG copy of CIFAR-10 (the paper: 91.25% on the lossless set with 64k iterations = 164 epochs).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from lowbit.data import load_dataset
from lowbit.models import create_model, model_entry
from lowbit.train import TrainConfig, fit, load_checkpoint

# Budgets chosen for a 2-core CPU: MNIST nets in minutes, ResNet-20 in about 1.5 hours.
RECIPES: dict[str, TrainConfig] = {
    "lenet300_100": TrainConfig(epochs=30, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine"),
    "lenet5": TrainConfig(epochs=20, batch_size=128, lr=0.05, weight_decay=5e-4, schedule="cosine"),
    "resnet20": TrainConfig(epochs=30, batch_size=128, lr=0.1, nesterov=True, weight_decay=5e-4,
                            schedule="cosine", warmup_epochs=1),
}
TARGET_ACC = {"lenet300_100": 98.2, "lenet5": 99.1, "resnet20": 89.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {list(RECIPES)} (default: all)")
    ap.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs (the run, checkpoint "
                    "and results row are then named NAME-eEPOCHS)")
    ap.add_argument("--snapshot", action="store_true", help="only copy unfinished runs' last checkpoints into "
                    "bench/checkpoints/partial/ (to commit them), then stop")
    args = ap.parse_args()
    unknown = set(args.models) - set(RECIPES)
    if unknown:
        ap.error(f"no baseline recipe for {sorted(unknown)}; choose from {list(RECIPES)}")
    rows = {}
    for name in args.models or list(RECIPES):
        cfg, arch = RECIPES[name], name
        if args.epochs is not None and args.epochs != cfg.epochs:
            cfg = TrainConfig.model_validate({**cfg.model_dump(), "epochs": args.epochs})  # validated: epochs > 0
            name = f"{arch}-e{args.epochs:g}"
        data = load_dataset(model_entry(arch).dataset, data_dir())
        torch.manual_seed(cfg.seed)  # the initialization is part of the recipe
        model = create_model(arch)
        run = runs_dir() / "baselines" / name
        partial = CHECKPOINTS / "partial" / f"{name}.last.safetensors"
        if args.snapshot:
            if (run / "last.safetensors").exists() and not (run / "model.safetensors").exists():
                partial.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / "last.safetensors", partial)
                print(f"{name}: unfinished run copied to {partial}")
            continue
        if partial.exists() and not (run / "last.safetensors").exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(partial, run / "last.safetensors")  # resume where another machine stopped
        res = fit(model, data, cfg, run_dir=run, resume=True)
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        publish(run / "model.safetensors", CHECKPOINTS / f"{name}.safetensors")
        partial.unlink(missing_ok=True)  # finished: the snapshot has served
        rows[name] = {
            "dataset": data.name, "test_acc_pct": round(res.final["test_acc"], 2),
            "target_acc_pct": TARGET_ACC[arch], "meets_target": res.final["test_acc"] >= TARGET_ACC[arch],
            "epochs": cfg.epochs, "params": sum(p.numel() for p in model.parameters()),
            "train": cfg.model_dump(mode="json"), "checkpoint": f"bench/checkpoints/{name}.safetensors",
            "minutes": round(sum(h["epoch_seconds"] for h in res.history) / 60, 1),
            "test_acc_by_epoch": [[h["epoch"], round(h["test_acc"], 2)] for h in res.history if "test_acc" in h],
        }
        print(f"{name:14s} {data.name:8s} test acc {res.final['test_acc']:.2f}% (target {TARGET_ACC[arch]}%)")
        write_results("baselines", {name: rows[name]})
    if rows:
        plot()


def publish(model_file: Path, dest: Path) -> bool:
    """Copy a finished run's ``model_file`` to ``dest`` unless ``dest`` already holds the same weights (its
    metadata may differ: a later lowbit writes more of it); True if ``dest`` was written. A committed
    checkpoint thus changes only when its model does."""
    if dest.exists() and load_checkpoint(dest).meta["sha256"] == load_checkpoint(model_file).meta["sha256"]:
        return False
    shutil.copyfile(model_file, dest)
    return True


def plot() -> None:
    """Test accuracy per epoch of every baseline row, one panel per dataset, with the targets dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    rows = json.loads((RESULTS / "baselines.json").read_text())["results"]
    curves = {k: v for k, v in rows.items() if v.get("test_acc_by_epoch")}
    datasets = sorted({v["dataset"] for v in curves.values()})
    if not datasets:
        return
    fig = Figure(figsize=(5.5 * len(datasets), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, ds in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        targets = {}
        for name, v in curves.items():
            if v["dataset"] != ds:
                continue
            ep, acc = zip(*v["test_acc_by_epoch"], strict=True)  # x: the share of the schedule, so that
            ax.plot([e / v["epochs"] for e in ep], acc, label=f"{name} ({v['epochs']:g} epochs): "  # cosine runs
                    f"{v['test_acc_pct']:.2f}%")  # of different lengths line up
            targets.setdefault(v["target_acc_pct"], []).append(name.split("-e")[0])
        for t, names in targets.items():
            ax.axhline(t, color="black", linestyle="--", linewidth=0.8)
            ax.text(1.0, t, f"target {'/'.join(sorted(set(names)))} {t:g}%", ha="right", va="bottom",
                    fontsize=7)
        lo = min(targets) - 3 * (100 - min(targets))
        ax.set_ylim(lo, min(100.0, max(targets) + (100 - max(targets)) / 2))
        ax.set_xlabel("epoch / epochs of the run (cosine learning rate)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"float baselines on {ds}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "baselines.png", format="png")


if __name__ == "__main__":
    main()
