"""Train lowbit's float baselines, the starting point of every compression method.

    python -m bench.train_baselines                 # all of them
    python -m bench.train_baselines lenet5 resnet20 # some
    python -m bench.train_baselines resnet20 --epochs 80   # a longer run, kept beside the recipe's (resnet20-e80)

Each run checkpoints under ``$LOWBIT_RUNS`` (default ``~/.cache/lowbit/runs``) and resumes when
started again; ``python -m bench.snapshot save baselines`` / ``restore`` carry unfinished runs to another
machine through git. Final weights go to ``bench/checkpoints/NAME.safetensors`` (committed) and the test
accuracies (final and per epoch) to ``bench/results/baselines.json``, drawn against the targets in
``baselines.png``. Starting a finished run again only re-reads it (seconds) and brings its row up to date; the
committed checkpoint is rewritten only if its weights differ. ``--epochs E`` overrides the recipe's length; such
a run is a different model, named ``NAME-eE`` everywhere (run directory, checkpoint, results row), so the recipe's
baseline and everything measured from it stay as they are.

``--restart-from ROW --epochs E [--lr LR]`` is a warm restart (Loshchilov & Hutter's SGDR): a new cosine cycle of
E epochs, peak ``LR`` (default the recipe's), that starts from the finished baseline ROW's committed weights instead
of a fresh initialization. It is named ``ROW-rE`` (e.g. ``resnet20-e80-r40``); its row counts the epochs of both
cycles, and its curve continues ROW's.

``--restart-from ROW --epochs E --lr LR --swa`` is stochastic weight averaging (Izmailov et al., 2018) instead: E
epochs at the constant rate LR from ROW's weights, the model being the mean of the weights at the E epoch ends with
batch-norm statistics re-estimated on the training data. It is named ``ROW-swaE``; its curve shows the iterates,
and its row also records the last iterate's accuracy beside the average's.

Targets (issue #2): LeNet-300-100 >= 98.2%, LeNet-5 >= 99.1% on MNIST; ResNet-20 >= 89.0% on the
JPEG copy of CIFAR-10 (the paper: 91.25% on the lossless set with 64k iterations = 164 epochs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from lowbit.data import load_dataset
from lowbit.models import create_model, model_entry
from lowbit.train import TrainConfig, fit, load_checkpoint
from lowbit.train.checkpoint import load_state_into

# Budgets chosen for a 2-core CPU: MNIST nets in minutes; the 30 ResNet-20 epochs took 3 hours here (baselines.json).
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
    ap.add_argument("--restart-from", metavar="ROW", default=None, help="start from the finished baseline ROW "
                    "of baselines.json (e.g. resnet20-e80) for a new cosine cycle of --epochs (a warm restart)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of a --restart-from cycle "
                    "(default: the recipe's), or the constant one of --swa")
    ap.add_argument("--swa", action="store_true", help="with --restart-from and --lr: average the weights of every "
                    "epoch end of --epochs at the constant rate --lr (stochastic weight averaging)")
    args = ap.parse_args()
    unknown = set(args.models) - set(RECIPES)
    if unknown:
        ap.error(f"no baseline recipe for {sorted(unknown)}; choose from {list(RECIPES)}")
    if args.restart_from is not None and args.swa and args.lr is None:
        ap.error("--swa needs --lr, the constant learning rate of the averaged epochs (Izmailov et al. use 0.01-0.05)")
    parent = None
    if args.restart_from is not None:
        try:
            parent = restart_parent(args.restart_from, args.epochs)
        except ValueError as e:
            ap.error(str(e))
        if args.models not in ([], [parent["arch"]]):
            ap.error(f"--restart-from {args.restart_from} trains {parent['arch']}, not {args.models}")
        args.models = [parent["arch"]]
    elif args.lr is not None or args.swa:
        ap.error("--lr and --swa only apply to a --restart-from run; a baseline's recipe fixes its own training")
    rows = {}
    for name in args.models or list(RECIPES):
        cfg, arch = RECIPES[name], name
        if parent is not None and args.swa:
            cfg = TrainConfig.model_validate({**cfg.model_dump(), "epochs": args.epochs, "lr": args.lr,
                                              "schedule": "constant", "swa_epochs": math.ceil(args.epochs)})
            name = f"{args.restart_from}-swa{args.epochs:g}"
        elif parent is not None:
            cfg = TrainConfig.model_validate({**cfg.model_dump(), "epochs": args.epochs, "lr": args.lr or cfg.lr})
            name = f"{args.restart_from}-r{args.epochs:g}"
        elif args.epochs is not None and args.epochs != cfg.epochs:
            cfg = TrainConfig.model_validate({**cfg.model_dump(), "epochs": args.epochs})  # validated: epochs > 0
            name = f"{arch}-e{args.epochs:g}"
        data = load_dataset(model_entry(arch).dataset, data_dir())
        torch.manual_seed(cfg.seed)  # the initialization is part of the recipe
        model = create_model(arch)
        if parent is not None:  # fit() resuming a started restart replaces these weights with its own
            load_state_into(model, load_checkpoint(parent["path"]).group("model"), str(parent["path"]))
        run = runs_dir() / "baselines" / name
        res = fit(model, data, cfg, run_dir=run, resume=True)
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        publish(run / "model.safetensors", CHECKPOINTS / f"{name}.safetensors")
        before = parent["epochs"] if parent else 0  # epochs of the cycle this run restarts from
        rows[name] = {
            "dataset": data.name, "test_acc_pct": round(res.final["test_acc"], 2),
            "target_acc_pct": TARGET_ACC[arch], "meets_target": res.final["test_acc"] >= TARGET_ACC[arch],
            "epochs": before + cfg.epochs, "params": sum(p.numel() for p in model.parameters()),
            "train": cfg.model_dump(mode="json"), "checkpoint": f"bench/checkpoints/{name}.safetensors",
            "minutes": round(sum(h["epoch_seconds"] for h in res.history) / 60, 1),
            "test_acc_by_epoch": [[before + min(h["epoch"], cfg.epochs), round(h["test_acc"], 2)]
                                  for h in res.history if "test_acc" in h],
        }
        if cfg.swa_epochs:
            rows[name]["swa"] = {"epochs": cfg.swa_epochs, "lr": cfg.lr,
                                 "last_iterate_test_acc_pct": round(res.history[-1]["test_acc"], 2)}
        if parent is not None:
            rows[name]["restart_of"] = {"row": args.restart_from, "epochs": before,
                                        "test_acc_pct": parent["test_acc_pct"], "checkpoint": parent["checkpoint"]}
        print(f"{name:14s} {data.name:8s} test acc {res.final['test_acc']:.2f}% (target {TARGET_ACC[arch]}%)")
        write_results("baselines", {name: rows[name]})
    if rows:
        plot()


def restart_parent(row: str, epochs: float | None) -> dict:
    """The finished baseline ``row`` of baselines.json that a warm restart of ``epochs`` starts from: its
    architecture, epochs, accuracy and committed checkpoint; ValueError saying what is missing."""
    if epochs is None:
        raise ValueError("--restart-from needs --epochs, the length of the new cycle")
    path = RESULTS / "baselines.json"
    rows = json.loads(path.read_text())["results"] if path.exists() else {}
    rows = {k: v for k, v in rows.items() if "checkpoint" in v}  # finished runs
    if row not in rows:
        raise ValueError(f"--restart-from {row!r}: no such finished baseline in {path}; choose from {sorted(rows)}")
    arch = row.split("-")[0]
    if arch not in RECIPES:
        raise ValueError(f"--restart-from {row!r}: {arch!r} has no baseline recipe; choose from {list(RECIPES)}")
    path = CHECKPOINTS.parent.parent / rows[row]["checkpoint"]  # stored relative to the repository
    if not path.is_file():
        raise ValueError(f"--restart-from {row!r}: its checkpoint {path} is missing")
    return {"arch": arch, "epochs": rows[row]["epochs"], "test_acc_pct": rows[row]["test_acc_pct"],
            "checkpoint": rows[row]["checkpoint"], "path": path}


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
            points = v["test_acc_by_epoch"]
            if v.get("restart_of", {}).get("row") in curves:  # a warm restart continues its first cycle's curve
                points = curves[v["restart_of"]["row"]]["test_acc_by_epoch"] + points
            ep, acc = zip(*points, strict=True)  # x: the share of the schedule, so that
            line, = ax.plot([e / v["epochs"] for e in ep], acc, label=f"{name} ({v['epochs']:g} epochs): "  # cosine
                            f"{v['test_acc_pct']:.2f}%")  # runs of different lengths line up
            if "swa" in v:  # the curve shows the iterates; the model is their average, drawn as a star at the end
                ax.plot([1.0], [v["test_acc_pct"]], marker="*", markersize=12, color=line.get_color())
            targets.setdefault(v["target_acc_pct"], []).append(name.split("-")[0])
        for t, names in targets.items():
            ax.axhline(t, color="black", linestyle="--", linewidth=0.8)
            ax.text(1.0, t, f"target {'/'.join(sorted(set(names)))} {t:g}%", ha="right", va="bottom",
                    fontsize=7)
        lo = min(targets) - 3 * (100 - min(targets))
        ax.set_ylim(lo, min(100.0, max(targets) + (100 - max(targets)) / 2))
        ax.set_xlabel("epoch / epochs of the run")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"float baselines on {ds}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "baselines.png", format="png")


if __name__ == "__main__":
    main()
