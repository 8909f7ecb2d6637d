"""CIFAR-10 rows of the binary/ternary benchmark: ResNet-20 fine-tuned from lowbit's float baseline with each
method, and the BNN paper's VGG-like net trained from scratch, W1A1 against its float twin.

    python -m bench.quant_cifar                                  # every row: ResNet-20 3 epochs each, VGG 10
    python -m bench.quant_cifar --methods ttq laq_ternary --epochs 10
    python -m bench.quant_cifar --methods none --vgg-epochs 20   # only the VGG pair
    python -m bench.quant_cifar --quick                          # smoke run: a few steps per row

ResNet-20 rows start from ``bench/checkpoints/resnet20.safetensors`` (``--checkpoint``; a training
checkpoint such as ``bench/checkpoints/partial/resnet20.last.safetensors`` works too). Every Conv2d/Linear but
the first conv and the classifier is quantized (``quantize_``'s ``keep_first_last`` default: those two stay
float, as in TTQ, DoReFa and XNOR-Net). All rows fine-tune with Adam (the loss-aware methods need its second
moment; the trained TTQ scales and BNN+ alphas get gradients summed over a layer or channel, which Adam's
normalization keeps to the scale of the step),
a cosine schedule, no weight decay, batch 128 with crop+flip, the learning rate of each method's table entry
(``--lr`` overrides it for all). The rows:

    float         the baseline checkpoint itself, evaluated (not fine-tuned): the reference of the targets
    float_ft      (not run by default) the baseline fine-tuned with the same budget: a control
    ttq           W2A32  weights ttq (W_p, W_n trained, threshold 0.05 max|w|)
    twn           W2A32  weights twn (0.7 mean|w|, alpha fitted)
    dorefa_w1a32  W1A32  weights dorefa_weight(1): sign(w) E|w|
    dorefa_w2a2   W2A2   weights dorefa_weight(2), inputs dorefa_act(2) (clip to [0, 1])
    dorefa_w1a2   W1A2   weights dorefa_weight(1), inputs dorefa_act(2)
    bnn           W1A1   weights and inputs ste_sign; ReLU -> Hardtanh; ClipWeights
    bnn_plus      W1A1   weights swish_sign (trained alpha), inputs swish_sign(scaled=False); ReLU -> Identity;
                         BnnPlusRegularizer(--lam, l1)
    lab           W1A32  weights lab + LossAware
    laq_ternary   W2A32  weights laq_ternary + LossAware
    laq_3bit      W3A32  weights laq_linear(3) + LossAware

Binary activations after a ReLU would all be +1 (sign(0) = +1), so the W1A1 rows swap the ReLUs: BNN's
Hardtanh (whose derivative is the STE), or none for BNN+ (its SignSwish gradient is the nonlinearity's).
Targets (issue 4): TTQ within 1.0 point of the float baseline (paper: 8.23% -> 8.87% error), ternary and 3-bit
LAQ within 1.5 points; the binary rows are reported as they come, with their budget.

VGG-like (``vgg_small``, width ``--vgg-width`` (default 0.25: 32/64/128 channels instead of 128/256/512) and
the BNN paper's two hidden FC layers of 1024): the float twin (ReLU) and the BNN (every layer W1A1 with
ste_sign but the first conv's input, which stays real-valued; Hardtanh; a BatchNorm on the logits;
ClipWeights), both from scratch with Adam, cosine, batch 128, ``--vgg-epochs`` (the paper trains for hundreds of
epochs with batch 50 and the square hinge loss; here cross-entropy).

Rows ``resnet20/METHOD`` (``resnet20/METHOD-eE`` for a run of ``--epochs E`` other than the default 3; from another
``--checkpoint``, the checkpoint file's stem replaces ``resnet20``, e.g. ``resnet20-e80/ttq-e12``) and
``vgg_small/{float,bnn}`` go to ``bench/results/quant_cifar.json`` (quick runs:
``quant_cifar_quick.json``) with test accuracy, storage at the quantized bit widths and BOPs
(``lowbit.hw.profile``: weights at their bit width, everything else 32-bit), and the budget. Runs are
resumable under ``$LOWBIT_RUNS/quant_cifar/`` (``--fresh`` restarts them). ``bench/results/
quant_binary_size_acc.png`` plots accuracy against size for these rows and the MNIST ones.

Time on a quiet 2-core machine: a float ResNet-20 epoch is about 2.5-3 minutes and the QAT rows cost 1.0-1.7x
that per step (``bench.qat_step_cost``), so the ten ResNet-20 rows at 3 epochs take about 2 hours; the VGG pair at
width 0.25 (about ResNet-20's cost per step) and 10 epochs about 1 hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from bench.quant_binary import costs, plot_size_acc
from lowbit.data import Dataset, Split, load_dataset
from lowbit.models import create_model
from lowbit.quant import QuantConfig, QuantReport, quantize_
from lowbit.quant.binary import BnnPlusRegularizer, ClipWeights
from lowbit.quant.loss_aware import LossAware
from lowbit.train import TrainConfig, evaluate, fit, load_checkpoint, load_model

Act = Literal["relu", "hardtanh", "identity"]
Spec = str | dict[str, Any] | None


@dataclass(frozen=True)
class Method:
    """One quantized row: the quantizers of every layer but the first and last, what the ReLUs become, the
    training callbacks and the Adam learning rate of its fine-tuning."""

    bits: str
    weight: Spec
    input: Spec = None
    act: Act = "relu"
    lr: float = 5e-4
    callbacks: tuple[str, ...] = ()  # "clip", "bnn_plus", "loss_aware"
    max_drop_points: float | None = None  # the target: at most this many points below the float baseline
    paper: dict[str, Any] = field(default_factory=dict)


RESNET20: dict[str, Method] = {
    "float_ft": Method("W32A32", None, lr=2e-4),
    "ttq": Method("W2A32", "ttq", max_drop_points=1.0,
                  paper={"paper_float_err_pct": 8.23, "paper_err_pct": 8.87, "paper": "TTQ, arXiv:1612.01064"}),
    "twn": Method("W2A32", "twn"),
    "dorefa_w1a32": Method("W1A32", {"name": "dorefa_weight", "bits": 1}, lr=1e-3),
    "dorefa_w2a2": Method("W2A2", {"name": "dorefa_weight", "bits": 2}, {"name": "dorefa_act", "bits": 2}),
    "dorefa_w1a2": Method("W1A2", {"name": "dorefa_weight", "bits": 1}, {"name": "dorefa_act", "bits": 2}, lr=1e-3),
    "bnn": Method("W1A1", "ste_sign", "ste_sign", act="hardtanh", lr=1e-3, callbacks=("clip",)),
    "bnn_plus": Method("W1A1", "swish_sign", {"name": "swish_sign", "scaled": False}, act="identity", lr=1e-3,
                       callbacks=("bnn_plus",)),
    "lab": Method("W1A32", "lab", lr=1e-3, callbacks=("loss_aware",)),
    "laq_ternary": Method("W2A32", "laq_ternary", callbacks=("loss_aware",), max_drop_points=1.5),
    "laq_3bit": Method("W3A32", {"name": "laq_linear", "bits": 3}, callbacks=("loss_aware",), max_drop_points=1.5),
}
DEFAULT_METHODS = [m for m in RESNET20 if m != "float_ft"]
DEFAULT_EPOCHS = 3.0  # the table's fine-tuning budget per ResNet-20 row


def swap_activations(model: nn.Module, act: Act) -> int:
    """Replace every ``nn.ReLU`` of ``model`` by ``nn.Hardtanh`` or ``nn.Identity`` (``act="relu"``: nothing);
    returns how many modules were replaced (a module used twice, as ResNet's block ReLU, counts once)."""
    if act == "relu":
        return 0
    make = {"hardtanh": nn.Hardtanh, "identity": nn.Identity}[act]
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, make())
                n += 1
    return n


def quantize_model(model: nn.Module, method: Method) -> QuantReport | None:
    """Swap the activations and quantize every Conv2d/Linear but the first and last (``keep_first_last``)."""
    swap_activations(model, method.act)
    if method.weight is None and method.input is None:
        return None
    return quantize_(model, QuantConfig(rules={"*": {"weight": method.weight, "input": method.input}}))


def make_callbacks(method: Method, lam: float = 1e-6) -> list[object]:
    """Fresh training callbacks of ``method`` (``lam``: the BNN+ regularizer's strength)."""
    table: dict[str, Callable[[], object]] = {
        "clip": ClipWeights, "bnn_plus": lambda: BnnPlusRegularizer(lam=lam, kind="l1"), "loss_aware": LossAware}
    return [table[c]() for c in method.callbacks]


def load_baseline(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The float ResNet-20 of a model or training checkpoint, and that checkpoint's metadata."""
    model, ckpt = load_model(path)
    if getattr(model, "lowbit_transforms", None):
        raise ValueError(f"{path} holds an already transformed model ({model.lowbit_transforms}); "
                         "give the float baseline")
    return model, ckpt.meta


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, batches: int, batch_size: int = 128) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches`` training batches
    (no augmentation), with the weights as they are; returns how many BatchNorm layers were reset.

    After a few steps of fine-tuning the running statistics still mix the float model's with the quantized
    one's (momentum 0.1: 0.9^8 = 43% of the old ones after 8 steps), which can put the eval-mode accuracy near
    chance although the batch-statistics accuracy is fine; ``--quick`` runs use this before evaluating."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches seen
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(data.loader("train", batch_size, shuffle=True, augment=False).batches(0)):
        if i == batches:
            break
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)


def _final_acc(model: nn.Module, data: Dataset, fitted: float, recalib: int) -> float:
    """The test accuracy ``fit`` reported, or the one after :func:`recalibrate_bn` when ``recalib`` > 0."""
    if recalib <= 0:
        return fitted
    recalibrate_bn(model, data, recalib)
    return evaluate(model, data.loader("test", 256))["acc"]


def subset(data: Dataset, test_images: int | None) -> Dataset:
    """``data`` with only the first ``test_images`` test images (quick runs); None: all of them."""
    if test_images is None:
        return data
    return dataclasses.replace(data, test=Split(data.test.x[:test_images], data.test.y[:test_images]))


def _budget(cfg: TrainConfig) -> dict[str, Any]:
    return {"epochs": cfg.epochs, "optimizer": cfg.optimizer, "lr": cfg.lr, "schedule": cfg.schedule,
            "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}


def _run_dir(root: Path, row: str, tag: str, fresh: bool) -> Path:
    run = root / row.replace("/", "-") / tag
    if fresh and run.exists():
        shutil.rmtree(run)
    return run


def _minutes(history: list[dict[str, float]]) -> float:
    return round(sum(h["epoch_seconds"] for h in history) / 60, 2)


def row_prefix(checkpoint: Path) -> str:
    """The rows' name prefix for a float checkpoint: ``resnet20`` for the recipe's baseline, the file's stem for
    another one (``resnet20-e80``), so that rows fine-tuned from different baselines never overwrite or get
    compared with each other."""
    stem = checkpoint.name.removesuffix(".safetensors")
    return stem if stem.startswith("resnet20") else f"resnet20({stem})"


def resnet_rows(args: argparse.Namespace, data: Dataset, root: Path, write: Callable[[dict[str, Any]], None]) -> None:
    """The ResNet-20 rows: the baseline evaluated, then each method fine-tuned from it."""
    ckpt_path = Path(args.checkpoint)
    prefix = row_prefix(ckpt_path)
    base_model, meta = load_baseline(ckpt_path)
    base_id = load_checkpoint(ckpt_path).meta["sha256"][:8]  # a new baseline never resumes an old run
    t0 = time.perf_counter()
    base_acc = evaluate(base_model, data.loader("test", 256))["acc"]
    float_row = {"bits": "W32A32", "test_acc_pct": round(base_acc, 2), "test_err_pct": round(100 - base_acc, 2),
                 **costs(base_model), "epochs": 0, "note": "the float baseline, not fine-tuned",
                 "checkpoint": str(ckpt_path), "checkpoint_kind": meta.get("kind"),
                 "baseline_train": meta.get("train"), "eval_minutes": round((time.perf_counter() - t0) / 60, 2)}
    write({f"{prefix}/float": float_row})
    print(f"float baseline {ckpt_path}: {base_acc:.2f}%")
    for name in args.methods:
        method = RESNET20[name]
        lr = args.lr or method.lr
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=lr, schedule="cosine",
                          checkpoint_every=100)
        model, _ = load_baseline(ckpt_path)
        report = quantize_model(model, method)
        if report is not None:
            print(f"{name}: quantized {len(report.quantized)} of {len(report.layers)} layers "
                  f"(W{report.layers[1].weight_bits}A{report.layers[1].input_bits}), kept float: {report.kept_float}")
        tag = f"e{args.epochs:g}-adam-lr{lr:g}-base{base_id}" + (f"-lam{args.lam:g}" if name == "bnn_plus" else "")
        run = _run_dir(root, f"resnet20/{name}", tag, args.fresh)
        t0 = time.perf_counter()
        res = fit(model, data, cfg, run_dir=run, resume=True, callbacks=make_callbacks(method, args.lam))
        acc = _final_acc(model, data, res.final["test_acc"], args.bn_recalib)
        drop = base_acc - acc
        row = {"bits": method.bits, "test_acc_pct": round(acc, 2), "test_err_pct": round(100 - acc, 2),
               "drop_vs_float_points": round(drop, 2), **costs(model), **_budget(cfg),
               "max_drop_points": method.max_drop_points,
               "meets_target": None if method.max_drop_points is None else bool(drop <= method.max_drop_points),
               "weight": method.weight, "input": method.input, "activation": method.act,
               "callbacks": list(method.callbacks), "lam": args.lam if name == "bnn_plus" else None,
               "kept_float": report.kept_float if report is not None else {},
               "bn_recalibration_batches": args.bn_recalib,
               "minutes": _minutes(res.history), "wall_minutes_this_call": round((time.perf_counter() - t0) / 60, 2),
               "run_dir": str(run), **method.paper}
        # a longer (or shorter) run than the table's budget is a row of its own, beside the default one
        longer = "" if args.quick or args.epochs == DEFAULT_EPOCHS else f"-e{args.epochs:g}"
        write({f"{prefix}/{name}{longer}": row})


def build_vgg(binary: bool, width: float, fc_hidden: tuple[int, ...] = (1024, 1024)) -> nn.Module:
    """``vgg_small``: float with ReLU, or BNN (W1A1 everywhere, first conv's input real-valued, Hardtanh, BN on
    the logits)."""
    model = create_model("vgg_small", width_mult=width, fc_hidden=fc_hidden)
    if not binary:
        return model
    swap_activations(model, "hardtanh")
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    rules: dict[str, dict[str, Spec]] = {first: {"weight": "ste_sign"},  # the image stays real-valued
                                         "*": {"weight": "ste_sign", "input": "ste_sign"}}
    report = quantize_(model, QuantConfig(rules=rules, keep_first_last=False))
    print(f"vgg_small bnn: quantized {len(report.quantized)} of {len(report.layers)} layers (W1A1, the first conv's "
          "input real-valued)")
    last = model.classifier[-1]
    model.classifier[-1] = nn.Sequential(last, nn.BatchNorm1d(last.out_features))
    return model


def vgg_rows(args: argparse.Namespace, data: Dataset, root: Path, write: Callable[[dict[str, Any]], None]) -> None:
    for name, binary, lr in (("float", False, args.vgg_lr_float), ("bnn", True, args.vgg_lr_bnn)):
        if name not in args.vgg_rows:
            continue
        cfg = TrainConfig(epochs=args.vgg_epochs, batch_size=128, optimizer="adam", lr=lr, schedule="cosine",
                          checkpoint_every=100)
        torch.manual_seed(cfg.seed)  # the initialization is part of the run
        model = build_vgg(binary, args.vgg_width)
        tag = f"w{args.vgg_width:g}-e{args.vgg_epochs:g}-adam-lr{lr:g}"
        run = _run_dir(root, f"vgg_small/{name}", tag, args.fresh)
        t0 = time.perf_counter()
        res = fit(model, data, cfg, run_dir=run, resume=True, callbacks=[ClipWeights()] if binary else [])
        acc = _final_acc(model, data, res.final["test_acc"], args.bn_recalib)
        write({f"vgg_small/{name}": {
            "bits": "W1A1" if binary else "W32A32", "test_acc_pct": round(acc, 2), "test_err_pct": round(100 - acc, 2),
            **costs(model), **_budget(cfg), "width_mult": args.vgg_width, "fc_hidden": [1024, 1024],
            "from_scratch": True, "bn_recalibration_batches": args.bn_recalib, "minutes": _minutes(res.history),
            "wall_minutes_this_call": round((time.perf_counter() - t0) / 60, 2), "run_dir": str(run),
            "paper_err_pct": 11.40 if binary else None,
            "paper": "BNN, arXiv:1602.02830, Table 1 (Theano, full width, 500 epochs)" if binary else None}})


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = f"{'row':22s} {'bits':>6s} {'acc %':>6s} {'drop':>6s} {'size KB':>8s} {'x f32':>6s} {'GBOPs':>8s} " \
           f"{'epochs':>6s} {'lr':>7s} {'min':>6s}"
    print("every trained row: Adam, cosine schedule, batch 128, no weight decay; 'drop': points below the float "
          "baseline; size: weights at their bit width, other parameters 32-bit")
    print(head)
    for key, r in results.items():
        drop = f"{r['drop_vs_float_points']:+.2f}" if r.get("drop_vs_float_points") is not None else "-"
        lr = f"{r['lr']:g}" if r.get("lr") else "-"
        print(f"{key:22s} {r['bits']:>6s} {r['test_acc_pct']:6.2f} {drop:>6s} {r['size_bytes'] / 1000:8.1f} "
              f"{r['size_ratio_vs_float32']:6.1f} {r['bops'] / 1e9:8.2f} {r['epochs']:6.3g} {lr:>7s} "
              f"{r.get('minutes', r.get('eval_minutes', 0)):6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[*RESNET20, "none"],
                    help="ResNet-20 rows to fine-tune ('none': only the VGG pair)")
    ap.add_argument("--checkpoint", default=str(CHECKPOINTS / "resnet20.safetensors"),
                    help="the float ResNet-20 to start from (a model or training checkpoint)")
    ap.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help="fine-tuning epochs per ResNet-20 row "
                    "(rows of another length are named METHOD-eEPOCHS)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate for every row (default: per method)")
    ap.add_argument("--lam", type=float, default=1e-6, help="BNN+ regularizer strength (l1)")
    ap.add_argument("--vgg", action=argparse.BooleanOptionalAction, default=True, help="run the VGG-like pair")
    ap.add_argument("--vgg-width", type=float, default=0.25, help="vgg_small width multiplier (paper: 1)")
    ap.add_argument("--vgg-rows", nargs="+", choices=["float", "bnn"], default=["float", "bnn"],
                    help="which of the VGG pair to run (e.g. one per process, side by side)")
    ap.add_argument("--vgg-epochs", type=float, default=10.0)
    ap.add_argument("--vgg-lr-float", type=float, default=1e-3)
    ap.add_argument("--vgg-lr-bnn", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="discard saved runs of the same settings and restart")
    ap.add_argument("--bn-recalib", type=int, default=0, metavar="BATCHES",
                    help="re-estimate the BatchNorm statistics on this many training batches before the final "
                         "evaluation (default 0: the accuracy fit reports; --quick: 20)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 8 steps per row, BN statistics re-estimated on 20 batches, 1000 test images, "
                         "fresh runs, results to quant_cifar_quick.json")
    args = ap.parse_args()
    args.methods = [m for m in args.methods if m != "none"]
    if args.threads:
        torch.set_num_threads(args.threads)
    name, test_images, root = "quant_cifar", None, runs_dir() / "quant_cifar"
    if args.quick:
        args.epochs = args.vgg_epochs = 8 / 391  # 8 steps of batch 128
        args.fresh, name, test_images, root = True, "quant_cifar_quick", 1000, runs_dir() / "quant_cifar_quick"
        args.bn_recalib = args.bn_recalib or 20
    data = subset(load_dataset("cifar10", data_dir()), test_images)
    written: dict[str, dict[str, Any]] = {}

    def write(rows: dict[str, dict[str, Any]]) -> None:
        rows = {k: {**v, "test_images": len(data.test)} for k, v in rows.items()}
        written.update(rows)
        write_results(name, rows)

    if args.methods:
        resnet_rows(args, data, root, write)
    if args.vgg:
        vgg_rows(args, data, root, write)
    print()
    print_table(written)
    png = RESULTS / ("quant_binary_size_acc.png" if not args.quick else "quant_cifar_quick_size_acc.png")
    plot_size_acc(png, cifar=RESULTS / f"{name}.json")
    print(f"wrote {RESULTS / f'{name}.json'} and {png}")


if __name__ == "__main__":
    main()
