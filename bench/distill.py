"""Distillation on CIFAR-10: FSP (Yim et al. 2017) and quantized distillation (Polino et al. 2018).

    python -m bench.distill                      # both parts, the full budget (hours: see below)
    python -m bench.distill --part fsp           # or: --part quant (needs the fsp part's float student)
    python -m bench.distill --teacher resnet56   # train a ResNet-56 teacher here first (resumable)
    python -m bench.distill --quick              # a few minutes: 2,000 training images, 1-2 epochs per row

Teacher: the ResNet-20 baseline (bench/checkpoints/resnet20.safetensors, from bench.train_baselines, or another
one with ``--teacher-checkpoint``) by default, or a ResNet-32/56 trained here with ``--teacher resnet32|resnet56``
(baseline recipe, ``--teacher-epochs``). Student: ResNet-8, the paper's student: lowbit's CIFAR ResNet with depth 8
(``resnet8`` in the zoo, one basic block per stage), same stage widths 16/32/64 as every teacher, so the FSP
matrices pair stage by stage.

(a) FSP, all at the same budget of ``--epochs`` training epochs (default 30):
    * ``fsp/resnet8_alone``: the student on the labels alone (cross-entropy);
    * ``fsp/resnet8_fsp``: stage 1, ``--fsp-epochs`` (default 5) of the FSP loss only (pairs: the input and
      output of layer1, layer2, layer3; a stage's input is average-pooled 2x where it downsamples), then
      stage 2, the rest of the epochs on the labels alone;
    * ``fsp/resnet8_fsp_full``: the paper's protocol, where stage 1 comes on top of the normal training: the
      same stage-1 weights, then all ``--epochs`` on the labels, the schedule of ``resnet8_alone``;
    * ``fsp/resnet8_kd``: Hinton KD (T = 4, alpha = 0.9) for all epochs, for reference.
    The paper (CIFAR-10, ResNet-26 teacher -> ResNet-8): student 87.91%, FSP 88.70%.
(b) Quantized distillation, from the float ResNet-8 of (a), weights at 4 and 2 bits (bucketed uniform
    quantizer, buckets of 256; the first conv and the classifier stay float, activations float, as the paper),
    ``--quant-epochs`` (default 10) each:
    * ``quant/wK_ptq``: quantized, no training;
    * ``quant/wK_finetune``: quantized and fine-tuned on the labels, no teacher;
    * ``quant/wK_distill``: quantized distillation (distillation loss on the quantized student, T = 4,
      alpha = 0.7, gradients to the float shadow weights);
    * ``quant/w2_diffquant``: differentiable quantization: 4 learned points per layer, only the points train
      (``--diffquant-epochs``, default 2) on the distillation loss; weights as the float student's.

Every row trains in ``runs_dir()/distill/ROW`` (``$LOWBIT_RUNS``, default ``~/.cache/lowbit/runs``) and resumes
when started again; finished rows only re-evaluate. ``teacher.json`` there records the teacher's weights: a
run with another teacher stops instead of mixing results. Writes bench/results/distill.json and distill.png
(``--quick``: distill_quick.json / .png, runs in ``runs_dir()/distill-quick``).

Run time on 2 cores, measured as ratios to a float ResNet-20 training epoch (~3 min on CIFAR-10 on an idle
machine; the baseline run here took 6 min/epoch on a shared one): a ResNet-8 training step costs ~0.36 of a
ResNet-20 one and the ResNet-20 teacher's forward ~0.25, so a ResNet-8 epoch takes ~1.1 min alone and ~1.9 min
with the teacher. Default budget with the ResNet-20 baseline as teacher: (a) about 2.7 hours, (b) about 1.1
hours, about 3.8 hours in all (twice that on a busy machine). A ResNet-56 teacher adds ~4.5 hours of training
(30 epochs) and makes every distilled epoch ~2 min longer.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from lowbit.data import Dataset, Split, load_dataset
from lowbit.distill import (
    FSPDistillation,
    KnowledgeDistillation,
    fsp_loss,
    fsp_matrices,
    fsp_train,
    quantize_bucketed_,
    train_points_only,
)
from lowbit.models import create_model
from lowbit.train import FitResult, TrainConfig, evaluate, fit, load_model
from lowbit.train.checkpoint import load_checkpoint, load_state_into, tensors_digest

TEMPERATURE, ALPHA_KD, ALPHA_QUANT = 4.0, 0.9, 0.7
BUCKET = 256
TEACHER_CFG = TrainConfig(epochs=30, batch_size=128, lr=0.1, nesterov=True, weight_decay=5e-4, schedule="cosine",
                          warmup_epochs=1)  # bench.train_baselines' ResNet-20 recipe


def _student() -> nn.Module:
    torch.manual_seed(0)  # every student starts from the same initialization
    return create_model("resnet8")


def _float_cfg(epochs: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=128, lr=0.1, nesterov=True, weight_decay=5e-4, schedule="cosine",
                       warmup_epochs=min(1.0, epochs / 5))


def _finetune_cfg(epochs: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=128, lr=0.01, weight_decay=5e-4, schedule="cosine")


def _minutes(*results: FitResult) -> float:
    return round(sum(h["epoch_seconds"] for r in results for h in r.history) / 60, 1)


def _teacher(args: argparse.Namespace, data: Dataset, root: Path) -> tuple[nn.Module, str]:
    if args.teacher != "baseline":
        torch.manual_seed(TEACHER_CFG.seed)
        model = create_model(args.teacher)
        cfg = TEACHER_CFG.model_copy(update={"epochs": args.teacher_epochs})
        fit(model, data, cfg, root / f"teacher_{args.teacher}", resume=True)
        return model.eval(), args.teacher
    final = Path(args.teacher_checkpoint)
    if final.exists():
        return load_model(final)[0].eval(), f"{final.name.removesuffix('.safetensors')} (baseline)"
    if final != CHECKPOINTS / "resnet20.safetensors":
        raise SystemExit(f"--teacher-checkpoint {final} does not exist")
    partial = CHECKPOINTS / "partial" / "resnet20.last.safetensors"
    if args.quick and partial.exists():
        print(f"note: {final} does not exist yet; --quick uses the unfinished snapshot {partial}")
        return load_model(partial)[0].eval(), "resnet20 (unfinished baseline snapshot)"
    raise SystemExit(f"{final} does not exist: run `python -m bench.train_baselines resnet20` first, or train a "
                     "teacher here with --teacher resnet32 (or resnet56)")


def _same_teacher(root: Path, teacher: nn.Module, name: str) -> None:
    """Resumed rows must come from the same teacher: its weights' digest is kept in ``root/teacher.json``."""
    digest = tensors_digest(teacher.state_dict())[:16]
    record = root / "teacher.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old["digest"] != digest:
            raise SystemExit(f"the runs in {root} were made with another teacher ({old['name']}, weights "
                             f"{old['digest']}; now {name}, {digest}): remove that directory to start over, or "
                             "point $LOWBIT_RUNS elsewhere")
    else:
        root.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"name": name, "digest": digest}) + "\n")


def _row(res: FitResult, epochs: float, *more: FitResult, **extra: Any) -> dict[str, Any]:
    return {"test_acc_pct": round(res.final["test_acc"], 2), "epochs": epochs, "minutes": _minutes(*more, res),
            **extra}


def _fsp_probe(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    """The FSP loss between teacher and student on ``x``, both in eval mode."""
    with torch.no_grad():
        return fsp_loss(fsp_matrices(teacher.eval(), x), fsp_matrices(copy.deepcopy(student).eval(), x)).item()


def run_fsp(args: argparse.Namespace, data: Dataset, teacher: nn.Module, root: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    e, e1 = args.epochs, args.fsp_epochs
    student = _student()
    res = fit(student, data, _float_cfg(e), root / "fsp/resnet8_alone", resume=True)
    rows["fsp/resnet8_alone"] = _row(res, e, method="cross-entropy")

    student = _student()
    probe = next(iter(data.loader("test", 500)))[0]  # a fixed batch to measure the FSP loss on
    fsp_before = _fsp_probe(teacher, student, probe)
    stage1 = TrainConfig(epochs=e1, batch_size=128, optimizer="adam", lr=1e-3, schedule="cosine", eval_every=1000)
    first, second = fsp_train(student, FSPDistillation(teacher), data, stage1, _float_cfg(e - e1),
                              root / "fsp/resnet8_fsp", resume=True)
    after_stage1 = create_model("resnet8")
    stage1_file = root / "fsp/resnet8_fsp/fsp/model.safetensors"
    load_state_into(after_stage1, load_checkpoint(stage1_file).group("model"), where=str(stage1_file))
    rows["fsp/resnet8_fsp"] = _row(second, e, first, method=f"FSP {e1} epochs, then cross-entropy {e - e1}",
                                   fsp_loss_before=round(fsp_before, 2),
                                   fsp_loss_after_stage1=round(_fsp_probe(teacher, after_stage1, probe), 2))
    # the paper's protocol: stage 1 comes on top of the student's whole cross-entropy schedule
    res = fit(copy.deepcopy(after_stage1), data, _float_cfg(e), root / "fsp/resnet8_fsp_full", resume=True)
    rows["fsp/resnet8_fsp_full"] = _row(res, e1 + e, first, method=f"the same FSP stage 1, then cross-entropy {e} "
                                        "(the paper's protocol)")

    student = _student()
    res = fit(student, data, _float_cfg(e), root / "fsp/resnet8_kd", resume=True,
              callbacks=[KnowledgeDistillation(teacher, TEMPERATURE, ALPHA_KD)])
    rows["fsp/resnet8_kd"] = _row(res, e, method=f"Hinton KD, T={TEMPERATURE}, alpha={ALPHA_KD}")
    return rows


def _float_student(root: Path) -> nn.Module:
    path = root / "fsp/resnet8_alone" / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: the quant part starts from the float student of the fsp part; "
                         "run --part fsp (or both parts) first")
    model = create_model("resnet8")
    load_state_into(model, load_checkpoint(path).group("model"), where=str(path))
    return model


def run_quant(args: argparse.Namespace, data: Dataset, teacher: nn.Module, root: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    base = _float_student(root)
    test = data.loader("test", 500)
    eq = args.quant_epochs
    for bits in (4, 2):
        info = {"bits": bits, "bucket_size": BUCKET, "first_last": "float"}
        model = copy.deepcopy(base)
        quantize_bucketed_(model, bits, BUCKET)
        rows[f"quant/w{bits}_ptq"] = {"test_acc_pct": round(evaluate(model, test)["acc"], 2), "epochs": 0,
                                      "minutes": 0.0, "method": "quantized, no training", **info}
        res = fit(model, data, _finetune_cfg(eq), root / f"quant/w{bits}_finetune", resume=True)
        rows[f"quant/w{bits}_finetune"] = _row(res, eq, method="quantized, fine-tuned on labels", **info)
        model = copy.deepcopy(base)
        quantize_bucketed_(model, bits, BUCKET)
        res = fit(model, data, _finetune_cfg(eq), root / f"quant/w{bits}_distill", resume=True,
                  callbacks=[KnowledgeDistillation(teacher, TEMPERATURE, ALPHA_QUANT)])
        rows[f"quant/w{bits}_distill"] = _row(res, eq, method=f"quantized distillation, T={TEMPERATURE}, "
                                              f"alpha={ALPHA_QUANT}", **info)
    model = copy.deepcopy(base)
    quantize_bucketed_(model, 2, BUCKET, learned_points=True)
    ed = args.diffquant_epochs
    cfg = TrainConfig(epochs=ed, batch_size=128, optimizer="adam", lr=1e-3, schedule="cosine")
    with train_points_only(model):
        res = fit(model, data, cfg, root / "quant/w2_diffquant", resume=True,
                  callbacks=[KnowledgeDistillation(teacher, TEMPERATURE, ALPHA_QUANT)])
    rows["quant/w2_diffquant"] = _row(res, ed, method="differentiable quantization (points only)", bits=2,
                                      bucket_size=BUCKET, first_last="float")
    return rows


def _targets(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Issue #5's comparisons, for the rows measured so far: FSP (and KD) beat the student alone; the quantized
    students distilled from the teacher beat the same ones fine-tuned without it; differentiable quantization
    beats post-training quantization at 2 bits (the paper's claim). One seed each."""
    acc = {name: r["test_acc_pct"] for name, r in rows.items() if "test_acc_pct" in r}
    pairs = {"fsp_beats_alone": ("fsp/resnet8_fsp", "fsp/resnet8_alone"),
             "fsp_paper_protocol_beats_alone": ("fsp/resnet8_fsp_full", "fsp/resnet8_alone"),
             "kd_beats_alone": ("fsp/resnet8_kd", "fsp/resnet8_alone"),
             "w4_distill_beats_finetune": ("quant/w4_distill", "quant/w4_finetune"),
             "w2_distill_beats_finetune": ("quant/w2_distill", "quant/w2_finetune"),
             "w2_diffquant_beats_ptq": ("quant/w2_diffquant", "quant/w2_ptq")}
    return {k: acc[a] > acc[b] for k, (a, b) in pairs.items() if a in acc and b in acc}


def _plot(rows: dict[str, dict[str, Any]], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    alone = rows.get("fsp/resnet8_alone", {}).get("test_acc_pct")
    for ax, prefix, title in ((axes[0], "fsp/", "(a) ResNet-8 student, float"),
                              (axes[1], "quant/", "(b) quantized ResNet-8 (bucketed weights)")):
        names = [n for n in rows if n.startswith(prefix)]
        accs = [rows[n]["test_acc_pct"] for n in names]
        bars = ax.bar(range(len(names)), accs, color=["#999" if "alone" in n or "finetune" in n or "ptq" in n
                                                      else "#3a7" for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(teacher_acc, color="k", lw=0.8, ls="--", label=f"teacher {teacher_acc:.1f}%")
        if alone is not None:
            ax.axhline(alone, color="#777", lw=0.8, ls=":", label=f"student alone {alone:.1f}%")
        ax.set_xticks(range(len(names)), [n.removeprefix(prefix) for n in names], rotation=30, ha="right",
                      fontsize=8)
        low = min([*accs, teacher_acc]) if accs else 0
        ax.set_ylim(max(0, low - 10), 100)
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "fsp", "quant"], default="all")
    ap.add_argument("--teacher", choices=["baseline", "resnet32", "resnet56"], default="baseline")
    ap.add_argument("--teacher-checkpoint", type=Path, default=CHECKPOINTS / "resnet20.safetensors",
                    help="the baseline teacher's weights (--teacher baseline), e.g. bench/checkpoints/resnet20-e80"
                         ".safetensors")
    ap.add_argument("--teacher-epochs", type=float, default=30, help="when training a teacher here")
    ap.add_argument("--epochs", type=float, default=30, help="(a) training epochs of every student")
    ap.add_argument("--fsp-epochs", type=float, default=5, help="(a) of which FSP stage 1")
    ap.add_argument("--quant-epochs", type=float, default=10, help="(b) epochs of each quantized student")
    ap.add_argument("--diffquant-epochs", type=float, default=2, help="(b) epochs of differentiable quantization")
    ap.add_argument("--quick", action="store_true", help="a few minutes: a 2,000-image subset, tiny budgets")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.fsp_epochs, args.quant_epochs, args.diffquant_epochs = 2, 1, 1, 1
        args.teacher_epochs = min(args.teacher_epochs, 1)
    if not 0 < args.fsp_epochs < args.epochs:
        ap.error(f"--fsp-epochs must be in (0, --epochs = {args.epochs}), got {args.fsp_epochs}")
    data = load_dataset("cifar10", data_dir())
    if args.quick:  # a random subset: the arrays are sorted by class
        g = torch.Generator().manual_seed(0)
        tr, te = torch.randperm(len(data.train), generator=g)[:2000], torch.randperm(len(data.test), generator=g)[:1000]
        data = replace(data, train=Split(data.train.x[tr], data.train.y[tr]),
                       test=Split(data.test.x[te], data.test.y[te]))
    name = "distill_quick" if args.quick else "distill"
    root = runs_dir() / ("distill-quick" if args.quick else "distill")
    if args.quick and root.exists():  # a smoke run checks today's code: never resume one written by older code
        shutil.rmtree(root)
    t0 = time.perf_counter()
    teacher, teacher_name = _teacher(args, data, root)
    _same_teacher(root, teacher, teacher_name)
    teacher_acc = evaluate(teacher, data.loader("test", 500))["acc"]
    rows: dict[str, dict[str, Any]] = {"teacher": {"test_acc_pct": round(teacher_acc, 2), "model": teacher_name,
                                                   "params": sum(p.numel() for p in teacher.parameters())}}
    if args.part in ("all", "fsp"):
        rows.update(run_fsp(args, data, teacher, root))
    if args.part in ("all", "quant"):
        rows.update(run_quant(args, data, teacher, root))
    if args.quick:
        rows["teacher"]["note"] = "quick mode: 2,000 training / 1,000 test images; numbers are not comparable"
    path = write_results(name, rows)
    rows = json.loads(path.read_text())["results"]  # with the rows of earlier --part runs
    rows["targets"] = _targets(rows)
    write_results(name, {"targets": rows["targets"]})
    _plot(rows, teacher_acc, RESULTS / f"{name}.png")
    print(f"\n{'row':22s} {'test acc':>9s} {'epochs':>7s} {'minutes':>8s}  method")
    for row, r in rows.items():
        if row == "targets":
            continue
        print(f"{row:22s} {r['test_acc_pct']:8.2f}% {r.get('epochs', ''):>7} {r.get('minutes', ''):>8}  "
              f"{r.get('method', r.get('model', ''))}")
    print("targets (issue #5):", {k: v for k, v in rows["targets"].items() if isinstance(v, bool)})
    print(f"wrote {path} and {RESULTS / f'{name}.png'} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
