"""The BNN paper's MNIST MLP: float against binary weights and activations (BNN, BNN+) and DoReFa.

    python -m bench.quant_binary                                  # all methods, width 1024, 20 epochs
    python -m bench.quant_binary --method bnn --width 4096 --epochs 100
    python -m bench.quant_binary --method dorefa --dorefa-bits 1,2,6
    python -m bench.quant_binary --quick                          # smoke run: 20 steps per method

Model: ``mlp_bnn`` (784 -> 3 x width (Linear, BatchNorm1d, activation) -> 10). Quantized variants, via
``lowbit.quant.quantize_``: the weights of every Linear layer (the classifier too) and the inputs of every
Linear layer but the first (the image stays real-valued, as in the paper), plus a BatchNorm1d on the
logits (the paper's MNIST net has one: with binary weights the logits are sums of +-1).

    float     act ReLU, no quantizer
    bnn       weights and inputs ste_sign (sign, STE 1{|x| <= 1}); act hardtanh; latent weights clipped
              to [-1, 1] after every step (ClipWeights)
    bnn_plus  weights swish_sign (alpha * sign, SignSwish STE, beta 5, trainable alpha per output unit),
              inputs swish_sign(scaled=False); no activation module (the STE is the nonlinearity's
              gradient); BnnPlusRegularizer(lam, l1)
    dorefa    weights dorefa_weight(W), inputs dorefa_act(A, grad_bits=G) (G = 32: float gradients); act ReLU
    lab       weights lab (loss-aware binarization, alpha from Adam's second moment), inputs ste_sign; act
              hardtanh; the LossAware callback (which also clips the latent weights to [-1, 1]): LAB against
              BNN on the same W1A1 MLP

All train with Adam, batch 100, a cosine schedule and cross-entropy (the paper: square hinge loss,
AdaMax/Adam with an exponentially decaying rate, shift-based batch norm, far longer training). Runs
resume from ``$LOWBIT_RUNS/quant_binary`` (default ``~/.cache/lowbit/runs``); ``--fresh`` restarts them.
Rows ``mnist_mlp/METHOD`` go to ``bench/results/quant_binary.json`` with the test error next to the
paper's (BNN, Theano, 3 x 4096: 0.96%), the storage at the quantized bit widths and the BOPs of one image
(``lowbit.hw.profile``), and ``bench/results/quant_binary.png`` plots the accuracies;
``bench/results/quant_binary_size_acc.png`` plots accuracy against size for these rows and the CIFAR-10
ones of ``bench.quant_cifar``. ``--quick`` runs go to ``$LOWBIT_RUNS/quant_binary_quick`` and
``bench/results/quant_binary_quick.json`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._common import RESULTS, data_dir, runs_dir, write_results
from lowbit.data import Split, load_dataset
from lowbit.hw import profile
from lowbit.models import create_model
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.binary import BnnPlusRegularizer, ClipWeights
from lowbit.quant.loss_aware import LossAware
from lowbit.train import TrainConfig, fit

METHODS = ("float", "bnn", "bnn_plus", "dorefa", "lab")
PAPER_ERR_PCT = {"bnn": 0.96}  # BNN (Courbariaux et al. 2016, arXiv:1602.02830) Table 1, Theano, MLP 3 x 4096
FIRST = "features.0"  # the first Linear of mlp_bnn: its input (the image) stays real-valued


def _rules(method: str, dorefa_bits: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    if method == "bnn":
        w, a = "ste_sign", "ste_sign"
    elif method == "lab":
        w, a = "lab", "ste_sign"
    elif method == "bnn_plus":
        w, a = "swish_sign", {"name": "swish_sign", "scaled": False}
    else:
        wb, ab, gb = dorefa_bits
        w = {"name": "dorefa_weight", "bits": wb}
        a = {"name": "dorefa_act", "bits": ab, "grad_bits": None if gb >= 32 else gb}
    return {FIRST: {"weight": w}, "*": {"weight": w, "input": a}}


def build(method: str, width: int, dorefa_bits: tuple[int, int, int]) -> nn.Module:
    """The mlp_bnn model of ``method``, quantized, with the BN on the logits for the quantized variants."""
    act = {"float": "relu", "bnn": "hardtanh", "bnn_plus": "hardtanh", "dorefa": "relu", "lab": "hardtanh"}[method]
    model = create_model("mlp_bnn", width=width, act=act)
    if method == "float":
        return model
    report = quantize_(model, QuantConfig(rules=_rules(method, dorefa_bits), keep_first_last=False))
    print(report)
    model.fc = nn.Sequential(model.fc, nn.BatchNorm1d(model.fc.out_features))  # type: ignore[assignment]
    if method == "bnn_plus":
        for i, m in enumerate(model.features):
            if isinstance(m, nn.Hardtanh):
                model.features[i] = nn.Identity()
    return model


def _bits(method: str, dorefa_bits: tuple[int, int, int]) -> str:
    return {"float": "W32A32", "bnn": "W1A1", "bnn_plus": "W1A1", "lab": "W1A1"}.get(
        method, "W{}A{}G{}".format(*dorefa_bits))


def costs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Storage at the quantized bit widths, MACs and BOPs of one input (``lowbit.hw.profile``: weights at
    their quantizer's bit width, biases, norm and quantizer parameters 32-bit; ``input_shape`` None: the
    model's registered one)."""
    stats = profile(model, input_shape)
    return {"size_bytes": round(stats.total_storage_bytes), "float32_bytes": stats.float32_bytes,
            "size_ratio_vs_float32": round(stats.float32_bytes / stats.total_storage_bytes, 2),
            "macs": stats.total_macs, "bops": stats.total_bops, "params": stats.total_params}


def _load_rows(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text())["results"] if path.exists() else {}


def plot(path: Path, results: Path = RESULTS / "quant_binary.json") -> None:
    """Bar chart of the test accuracy of every ``mnist_mlp/*`` row of the results file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    rows = {k.split("/", 1)[1]: v for k, v in _load_rows(results).items() if k.startswith("mnist_mlp/")}
    names = [m for m in METHODS if m in rows]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    accs = [rows[m]["test_acc_pct"] for m in names]
    bars = ax.bar([f"{m}\n{rows[m]['bits']}\n3x{rows[m]['width']}, {rows[m]['epochs']:.3g} ep" for m in names], accs,
                  color=["grey" if m == "float" else "tab:blue" for m in names])
    for bar, acc in zip(bars, accs, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, acc, f"{acc:.2f}", ha="center", va="bottom", fontsize=8)
    paper = 100 - PAPER_ERR_PCT["bnn"]
    ax.axhline(paper, color="tab:red", linestyle="--", linewidth=1)
    ax.text(len(names) - 0.5, paper, f"BNN paper, 3x4096: {paper:.2f}%", color="tab:red", ha="right", va="bottom",
            fontsize=8)
    lo = min([*accs, paper])
    ax.set_ylim(max(0.0, lo - 2), 101)
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("BNN MLP on MNIST: float vs binary / low-bit")
    fig.tight_layout()
    fig.savefig(path, format="png")


GROUPS = {"mnist_mlp": "MNIST, BNN MLP", "resnet20": "CIFAR-10, ResNet-20 (fine-tuned)",
          "vgg_small": "CIFAR-10, VGG-small (from scratch)"}


def size_acc_points(*results: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, float, float]]]:
    """``{group: [(label, size_bytes, test_acc_pct), ...]}`` from results rows named ``GROUP/METHOD`` (groups in
    :data:`GROUPS` order, rows without a size left out); the label is ``METHOD BITS``."""
    points: dict[str, list[tuple[str, float, float]]] = {}
    for rows in results:
        for key, row in rows.items():
            group, _, method = key.partition("/")
            if _group_title(group) and row.get("size_bytes") and row.get("test_acc_pct") is not None:
                points.setdefault(group, []).append((f"{method} {row.get('bits', '')}".strip(),
                                                     float(row["size_bytes"]), float(row["test_acc_pct"])))
    order = [*GROUPS, *sorted(g for g in points if g not in GROUPS)]
    return {g: points[g] for g in order if g in points}


def _group_title(group: str) -> str | None:
    """A panel title for a row group; ``resnet20-e80`` etc. are ResNet-20 rows fine-tuned from another baseline."""
    if group in GROUPS:
        return GROUPS[group]
    return f"CIFAR-10, ResNet-20 (fine-tuned from {group})" if group.startswith("resnet20") else None


def plot_size_acc(path: Path, mnist: Path = RESULTS / "quant_binary.json",
                  cifar: Path = RESULTS / "quant_cifar.json") -> None:
    """Test accuracy against model size (bytes at the quantized bit widths, log scale), one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = size_acc_points(_load_rows(mnist), _load_rows(cifar))
    if not points:
        return
    fig = Figure(figsize=(5 * len(points), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (group, pts) in enumerate(points.items()):
        ax = fig.add_subplot(1, len(points), i + 1)
        markers = "oD^v<>pP*Xh8d"
        for j, (label, size, acc) in enumerate(pts):  # one colour and marker per row, named in the legend:
            is_float = label.startswith("float")  # rows of equal size (W1 methods) would overlap as labels
            ax.scatter(size / 1000, acc, color="grey" if is_float else f"C{j % 10}",
                       marker="s" if is_float else markers[j % len(markers)], s=36, label=f"{label}: {acc:.1f}%")
        ax.legend(fontsize=7, loc="best")
        ref = next((acc for label, _, acc in pts if label.split()[0] == "float"), None)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("model size (KB, weights at their bit width)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_group_title(group), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--width", type=int, default=1024, help="hidden units per layer (paper: 4096)")
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam's initial rate (cosine decay; BNN's Theano run: 3e-3)")
    ap.add_argument("--lam", type=float, default=1e-6, help="BNN+ regularizer strength (l1)")
    ap.add_argument("--dorefa-bits", default="1,2,32", help="W,A,G bits of the dorefa method (G 32: float gradients)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="discard a saved run of the same setting and restart")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps per method, 1000 test images, fresh "
                                                         "runs, results to quant_binary_quick.json")
    args = ap.parse_args()
    dorefa_bits = tuple(int(b) for b in args.dorefa_bits.split(","))
    if len(dorefa_bits) != 3:
        ap.error(f"--dorefa-bits takes W,A,G, got {args.dorefa_bits!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    name, root = "quant_binary", runs_dir() / "quant_binary"
    data = load_dataset("mnist", data_dir())
    if args.quick:
        name, root, args.fresh, args.epochs = "quant_binary_quick", runs_dir() / "quant_binary_quick", True, 20 / 600
        data = dataclasses.replace(data, test=Split(data.test.x[:1000], data.test.y[:1000]))
    cfg = TrainConfig(epochs=args.epochs, batch_size=100, optimizer="adam", lr=args.lr, schedule="cosine",
                      channels_last=False, checkpoint_every=200)
    rows: dict[str, dict[str, Any]] = {}
    for method in args.method:
        torch.manual_seed(cfg.seed)  # the initialization is part of the run
        model = build(method, args.width, dorefa_bits)  # type: ignore[arg-type]
        callbacks: list[object] = []
        if method == "bnn":
            callbacks.append(ClipWeights())
        elif method == "bnn_plus":
            callbacks.append(BnnPlusRegularizer(lam=args.lam, kind="l1"))
        elif method == "lab":
            callbacks.append(LossAware())
        tag = f"{method}_w{args.width}_e{args.epochs:g}_lr{args.lr:g}"
        tag += f"_lam{args.lam:g}" if method == "bnn_plus" else ""
        tag += "_{}-{}-{}".format(*dorefa_bits) if method == "dorefa" else ""
        run = root / tag
        if args.fresh and run.exists():
            shutil.rmtree(run)
        t0 = time.perf_counter()
        res = fit(model, data, cfg, run_dir=run, resume=True, callbacks=callbacks)
        acc = res.final["test_acc"]
        rows[f"mnist_mlp/{method}"] = {
            "bits": _bits(method, dorefa_bits), "width": args.width, "epochs": args.epochs,
            "test_acc_pct": round(acc, 2), "test_err_pct": round(100 - acc, 2),
            "paper_test_err_pct": PAPER_ERR_PCT.get(method),
            "paper_arch": "3x4096" if method in PAPER_ERR_PCT else None,
            **costs(model),
            "minutes": round(sum(h["epoch_seconds"] for h in res.history) / 60, 2),
            "wall_minutes_this_call": round((time.perf_counter() - t0) / 60, 2),
            "lam": args.lam if method == "bnn_plus" else None, "train": cfg.model_dump(mode="json"),
            "test_images": len(data.test),
        }
        write_results(name, {f"mnist_mlp/{method}": rows[f"mnist_mlp/{method}"]})
    print(f"\nMNIST MLP 3x{args.width}, {args.epochs:g} epochs (paper: BNN 3x4096, Theano)")
    print(f"{'method':10s} {'bits':>9s} {'test err %':>11s} {'paper err %':>12s} {'size KB':>8s} {'minutes':>8s}")
    for key, r in rows.items():
        paper = f"{r['paper_test_err_pct']:.2f}" if r["paper_test_err_pct"] is not None else "-"
        print(f"{key.split('/')[1]:10s} {r['bits']:>9s} {r['test_err_pct']:11.2f} {paper:>12s} "
              f"{r['size_bytes'] / 1000:8.1f} {r['minutes']:8.2f}")
    png = RESULTS / f"{name}.png"
    plot(png, RESULTS / f"{name}.json")
    if args.quick:
        print(f"wrote {RESULTS / f'{name}.json'} and {png}")
        return
    plot_size_acc(RESULTS / "quant_binary_size_acc.png")
    print(f"wrote {RESULTS / 'quant_binary.json'}, {png} and {RESULTS / 'quant_binary_size_acc.png'}")


if __name__ == "__main__":
    main()
