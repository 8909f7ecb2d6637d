"""Multi-bit quantization of ResNet-20 on CIFAR-10: QIL and LQ-Nets against DoReFa, all from the float baseline.

    python -m bench.quant_multibit                                  # 3 methods x 4 settings + float, 10 epochs
    python -m bench.quant_multibit --method qil lqnets --bits W2A2 --epochs 5
    python -m bench.quant_multibit --progressive                    # also QIL 4 -> 3 -> 2 bits (the paper's way)
    python -m bench.quant_multibit --quick                          # smoke run: 20 steps on a subset, not a result
    python -m bench.quant_multibit --time-steps 5                   # QAT vs float step cost, full-run estimate
    python -m bench.quant_multibit --bits W2A2 --epochs 10 --results quant_multibit_w2a2_e10  # its own table

Cost: a QAT step measured 1.1-1.9x a float step on 2 cores (LQ-Nets W3A3/W4A4 the dearest, W2A32 rows the
cheapest), so the default run (12 quantized rows + float, 10 epochs each, a float epoch ~3 min) takes about
9.5 hours, and ``--progressive`` adds about 1 hour; every row resumes where it stopped.

Every run starts from the float checkpoint (``--checkpoint``, default ``bench/checkpoints/resnet20.safetensors``,
written by ``python -m bench.train_baselines resnet20``), quantizes every convolution but the first, and the
classifier stays float too (``quantize_``'s ``keep_first_last``), then fine-tunes with the same budget for every
method: SGD (Nesterov, momentum 0.9), ``--lr`` with a cosine decay, weight decay 5e-4, batch 128, ``--epochs``.

    qil     weights qil_weight(N): learned interval c, d and gamma per layer, 2^N - 1 levels in [-1, 1];
            inputs qil_act(N): learned interval, 2^N levels in [0, 1]
    lqnets  weights lqnets_weight(K): a learned basis per output channel, levels v^T e, e in {-1, 1}^K;
            inputs lqnets_act(K): one basis per layer, e in {0, 1}^K; bases fitted by QEM (moving average)
    dorefa  weights dorefa_weight(N) (tanh, normalized to [-1, 1]); inputs dorefa_act(N) (clip to [0, 1])
    float   the float model fine-tuned with the same budget (does more training alone help?)

Settings: W4A4, W3A3, W2A2 and W2A32 (A32: float inputs). The float checkpoint is also evaluated as is
(row ``resnet20/float_checkpoint``). Targets (issue #5): W4A4 within 1 point of the float checkpoint, W2A2
within 4 points, and QIL and LQ-Nets above DoReFa at W2A2. The LQ-Nets paper's ResNet-20 numbers (float 92.1:
2/32 91.8, 3/3 91.6, 2/2 90.2) are listed beside ours; they trained far longer on the lossless CIFAR-10.

``--progressive`` adds the QIL paper's procedure: W3A3 fine-tuned from the trained W4A4 model (intervals
included) and W2A2 from that W3A3 model, each with the same budget (rows ``resnet20/qil_progressive/...``).

Runs resume from ``$LOWBIT_RUNS/quant_multibit/ROW/BUDGET`` (default ``~/.cache/lowbit/runs``; BUDGET names the
epochs, the learning rate and the float checkpoint's digest, so another baseline starts new runs); ``--fresh``
restarts them. Rows record their budget; the table, the targets and the plot use the rows of the last run's.
Results: ``bench/results/quant_multibit.json`` and ``quant_multibit.png`` (accuracy per setting and method);
``--quick`` writes ``quant_multibit_quick.*`` instead and keeps its runs apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from lowbit.data import Dataset, Split, load_dataset
from lowbit.quant import QuantConfig, quantize_
from lowbit.train import TrainConfig, evaluate, fit, load_checkpoint, load_model
from lowbit.train.checkpoint import load_state_into

METHODS = ("qil", "lqnets", "dorefa", "float")
SETTINGS = ("W4A4", "W3A3", "W2A2", "W2A32")
QUANTIZERS = {  # method -> (weight quantizer name, input quantizer name)
    "qil": ("qil_weight", "qil_act"), "lqnets": ("lqnets_weight", "lqnets_act"),
    "dorefa": ("dorefa_weight", "dorefa_act"),
}
# Zhang et al., "LQ-Nets", arXiv:1807.10029, CIFAR-10 ResNet-20 (float 92.1); W4A4 not reported
PAPER_LQNETS = {"W2A32": 91.8, "W3A3": 91.6, "W2A2": 90.2}
PAPER_LQNETS_FLOAT = 92.1
MAX_DROP = {"W4A4": 1.0, "W2A2": 4.0}  # points below the float checkpoint (issue #5)
QUICK_STEPS, QUICK_TRAIN, QUICK_TEST = 20, 20 * 128, 500


def parse_setting(text: str) -> tuple[int, int]:
    """``"W2A4"`` -> (2, 4); A32 means float inputs."""
    t = text.upper()
    if not (t.startswith("W") and "A" in t):
        raise ValueError(f"a setting is W<bits>A<bits>, e.g. W2A2 or W2A32, got {text!r}")
    w, a = t[1:].split("A", 1)
    return int(w), int(a)


def rules(method: str, setting: str) -> dict[str, dict[str, Any]]:
    """The ``quantize_`` rule of ``method`` at ``setting`` for every Conv2d/Linear (first and last stay float)."""
    w_bits, a_bits = parse_setting(setting)
    w_name, a_name = QUANTIZERS[method]
    rule: dict[str, Any] = {"weight": {"name": w_name, "bits": w_bits}}
    if a_bits < 32:
        rule["input"] = {"name": a_name, "bits": a_bits}
    return {"*": rule}


def build(method: str, setting: str | None, checkpoint: Path) -> nn.Module:
    model, _ = load_model(checkpoint)
    if method != "float" and setting is not None:
        report = quantize_(model, QuantConfig(rules=rules(method, setting)))
        print(f"{method} {setting}: {len(report.quantized)} layers quantized, kept float: {report.kept_float}")
    return model


def subset(data: Dataset, n_train: int, n_test: int) -> Dataset:
    """``n_train`` / ``n_test`` images of each split drawn at random with a fixed seed (``--quick``): the
    CIFAR-10 copy is ordered by class, so the first images would all be airplanes."""
    g = torch.Generator().manual_seed(0)

    def cut(s: Split, n: int) -> Split:
        idx = torch.randperm(len(s), generator=g)[:n].sort().values
        return Split(s.x[idx], s.y[idx])

    return dataclasses.replace(data, train=cut(data.train, n_train), test=cut(data.test, n_test))


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, schedule="cosine", checkpoint_every=100 if args.quick else 200)


def run_row(key: str, model: nn.Module, data: Dataset, cfg: TrainConfig, run: Path, fresh: bool) -> dict[str, Any]:
    if fresh and run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    res = fit(model, data, cfg, run_dir=run, resume=True)
    steps = res.history[-1]["step"] if res.history else 0
    train_s = sum(h["epoch_seconds"] for h in res.history)
    return {"test_acc_pct": round(res.final["test_acc"], 2), "epochs": cfg.epochs, "steps": steps,
            "train_minutes": round(train_s / 60, 2), "seconds_per_step": round(train_s / max(1, steps), 3),
            "wall_minutes_this_call": round((time.perf_counter() - t0) / 60, 2), "run_dir": str(run),
            "learned": learned_state(model)}


def time_steps(methods: list[str], settings: list[str], checkpoint: Path, steps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU time of one training step (batch 128, channels-last, SGD) of each quantized model
    against the float one, alternating float and QAT steps so that a busy phase of the machine hits both."""
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def stepper(model: nn.Module) -> Any:
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step() -> tuple[float, float]:
            w, c = time.perf_counter(), time.process_time()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - w, time.process_time() - c
        step()  # warm-up (and the lazy initialization of the activation quantizers)
        return step

    float_step = stepper(build("float", None, checkpoint))
    out: dict[str, dict[str, float]] = {}
    for setting in settings:
        for method in [m for m in methods if m != "float"]:
            qat_step = stepper(build(method, setting, checkpoint))
            f_times, q_times = [], []
            for _ in range(steps):
                f_times.append(float_step())
                q_times.append(qat_step())
            med = lambda ts, i: sorted(t[i] for t in ts)[len(ts) // 2]  # noqa: E731
            out[f"resnet20/{method}/{setting}"] = {
                "float_step_s": round(med(f_times, 0), 3), "qat_step_s": round(med(q_times, 0), 3),
                "ratio": round(med(q_times, 0) / med(f_times, 0), 2),
                "cpu_time_ratio": round(med(q_times, 1) / med(f_times, 1), 2)}
            print(f"{method:7s} {setting:6s} step {out[f'resnet20/{method}/{setting}']}", flush=True)
    return out


def learned_state(model: nn.Module) -> dict[str, Any]:
    """What the quantizers learned, per layer: QIL's intervals [c - d, c + d] (and gamma), LQ-Nets' largest
    level (weights: the mean over output channels)."""
    from lowbit.quant.lqnets import LQNetsAct, LQNetsWeight
    from lowbit.quant.qil import QILAct, QILWeight

    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        for side in ("weight_quantizer", "input_quantizer"):
            q = getattr(m, side, None)
            if isinstance(q, (QILWeight, QILAct)):
                lo, hi = q.interval
                entry = [round(lo, 4), round(hi, 4)] + ([round(q.gamma.item(), 3)] if isinstance(q, QILWeight) else [])
            elif isinstance(q, LQNetsWeight) and q.channel_levels() is not None:
                entry = round(float(q.channel_levels()[:, -1].mean()), 4)
            elif isinstance(q, LQNetsAct) and q.levels() is not None:
                entry = round(float(q.levels()[-1]), 4)
            else:
                continue
            out[f"{name}.{side.split('_')[0]}"] = entry
    return out


def plot(path: Path, rows: dict[str, dict[str, Any]], title: str) -> None:
    """Test accuracy per setting, one line per method; the float checkpoint as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(SETTINGS)))
    styles = {"qil": ("tab:blue", "o"), "qil_progressive": ("tab:cyan", "s"), "lqnets": ("tab:green", "^"),
              "dorefa": ("tab:red", "v")}
    accs: list[float] = []
    for method, (color, marker) in styles.items():
        pts = [(i, rows[f"resnet20/{method}/{s}"]["test_acc_pct"]) for i, s in enumerate(SETTINGS)
               if f"resnet20/{method}/{s}" in rows]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=color, marker=marker, label=method)
            accs += [a for _, a in pts]
    paper = [(i, PAPER_LQNETS[s]) for i, s in enumerate(SETTINGS) if s in PAPER_LQNETS]
    ax.plot(*zip(*paper, strict=True), color="tab:green", marker="^", linestyle="none", markerfacecolor="none",
            label=f"LQ-Nets paper (float {PAPER_LQNETS_FLOAT})")
    accs += [a for _, a in paper]
    for key, style, label in (("resnet20/float_checkpoint", "--", "float checkpoint"),
                              ("resnet20/float", ":", "float, fine-tuned same budget")):
        if key in rows:
            ax.axhline(rows[key]["test_acc_pct"], color="grey", linestyle=style, linewidth=1, label=label)
            accs.append(rows[key]["test_acc_pct"])
    ax.set_xticks(xs, list(SETTINGS))
    ax.set_ylim(max(0.0, min(accs) - 3) if accs else 0, min(100.0, max(accs) + 1.5) if accs else 100)
    ax.set_xlabel("bits (weights / activations)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")


def same_budget(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of the ``float_checkpoint`` row's budget (the last run's: epochs, learning rate and float
    checkpoint): the results file keeps rows of earlier runs, which must not be compared with them."""
    budget = rows.get("resnet20/float_checkpoint", {}).get("budget")
    return {k: r for k, r in rows.items() if r.get("budget") == budget}


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, from the rows present (None where a row is missing or has another budget than the
    ``float_checkpoint`` row)."""
    rows = same_budget(rows)
    fp = rows.get("resnet20/float_checkpoint", {}).get("test_acc_pct")
    acc = lambda m, s: rows.get(f"resnet20/{m}/{s}", {}).get("test_acc_pct")  # noqa: E731
    out: dict[str, Any] = {}
    for method in ("qil", "lqnets"):
        for s, drop in MAX_DROP.items():
            a = acc(method, s)
            out[f"{method}_{s}_within_{drop:g}_points"] = None if a is None or fp is None else fp - a <= drop
        a, d = acc(method, "W2A2"), acc("dorefa", "W2A2")
        out[f"{method}_beats_dorefa_W2A2"] = None if a is None or d is None else a > d
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--bits", nargs="+", choices=SETTINGS, default=list(SETTINGS), metavar="SETTING",
                    help=f"any of {', '.join(SETTINGS)}")
    ap.add_argument("--epochs", type=float, default=10.0, help="fine-tuning budget of every run")
    ap.add_argument("--lr", type=float, default=0.01, help="initial learning rate (cosine decay)")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINTS / "resnet20.safetensors",
                    help="the float ResNet-20 to start from")
    ap.add_argument("--progressive", action="store_true", help="also QIL W4A4 -> W3A3 -> W2A2 (needs qil W4A4)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_STEPS} steps on {QUICK_TRAIN} training / {QUICK_TEST} test images (a smoke test)")
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="only time N training steps of each model against the float one, estimate the full "
                         "run's duration from --float-epoch-minutes, and stop")
    ap.add_argument("--float-epoch-minutes", type=float, default=3.0,
                    help="a float ResNet-20 epoch on this machine (for --time-steps' estimate)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="discard saved runs of the same rows and restart them")
    ap.add_argument("--results", default="quant_multibit", metavar="NAME",
                    help="write bench/results/NAME.json and NAME.png (default quant_multibit): another budget's table "
                         "beside the main one, e.g. --bits W2A2 --epochs 10 --results quant_multibit_w2a2_e10")
    args = ap.parse_args()
    if not re.fullmatch(r"quant_multibit[a-z0-9_]*", args.results) or args.results.endswith("_quick"):
        ap.error(f"--results {args.results!r}: a name quant_multibit[_a-z0-9]* (letters, digits, underscores; not "
                 "ending in _quick, which --quick uses)")
    if not args.checkpoint.is_file():
        ap.error(f"no float checkpoint at {args.checkpoint}: train it with `python -m bench.train_baselines resnet20` "
                 "or pass --checkpoint PATH")
    if args.progressive and "qil" not in args.method:
        ap.error("--progressive starts from the qil W4A4 run: include qil in --method")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.time_steps:
        timed = time_steps(args.method, args.bits, args.checkpoint, args.time_steps)
        # an epoch of every run: training at the measured ratio, plus a test-set pass (about 1/15 of an epoch)
        per_epoch = {k: args.float_epoch_minutes * r["cpu_time_ratio"] * (1 + 1 / 15) for k, r in timed.items()}
        total = args.epochs * (sum(per_epoch.values()) + ("float" in args.method) * args.float_epoch_minutes * 16 / 15)
        print(f"estimated full run ({args.epochs:g} epochs per row, {len(per_epoch)} quantized rows"
              f"{' + float' if 'float' in args.method else ''}): {total / 60:.1f} hours at "
              f"{args.float_epoch_minutes:g} min per float epoch")
        return
    data = load_dataset("cifar10", data_dir())
    name, root = args.results, runs_dir() / "quant_multibit"  # runs are keyed by budget: tables share them
    if args.quick:
        data = subset(data, QUICK_TRAIN, QUICK_TEST)
        args.epochs = QUICK_STEPS * 128 / QUICK_TRAIN
        name, root = "quant_multibit_quick", root / "quick"
        args.fresh = True  # a smoke run checks today's code: never resume one written by older code
    cfg = train_config(args)
    base_id = load_checkpoint(args.checkpoint).meta["sha256"][:8]  # a new baseline never resumes an old run
    budget = f"e{cfg.epochs:g}_lr{cfg.lr:g}_base{base_id}"
    results_path = RESULTS / f"{name}.json"

    rows: dict[str, dict[str, Any]] = {}

    def record(key: str, row: dict[str, Any]) -> None:
        rows[key] = row = {**row, "budget": budget}  # epochs, learning rate and float checkpoint of the row
        write_results(name, {key: row})

    t0 = time.perf_counter()
    fp = evaluate(load_model(args.checkpoint)[0], data.loader("test", 256))["acc"]
    record("resnet20/float_checkpoint", {"test_acc_pct": round(fp, 2), "checkpoint": str(args.checkpoint),
                                         "eval_seconds": round(time.perf_counter() - t0, 1)})
    print(f"float checkpoint: {fp:.2f}%")
    if "float" in args.method:
        row = run_row("resnet20/float", build("float", None, args.checkpoint), data, cfg, root / "float" / budget,
                      args.fresh)
        record("resnet20/float", {"weight_bits": 32, "act_bits": 32, **row, "delta_vs_float_points":
                                  round(row["test_acc_pct"] - fp, 2), "train": cfg.model_dump(mode="json")})
    for setting in args.bits:
        w_bits, a_bits = parse_setting(setting)
        for method in [m for m in args.method if m != "float"]:
            key = f"resnet20/{method}/{setting}"
            torch.manual_seed(cfg.seed)
            row = run_row(key, build(method, setting, args.checkpoint), data, cfg,
                          root / f"{method}_{setting}" / budget, args.fresh)
            record(key, {"weight_bits": w_bits, "act_bits": a_bits, **row,
                         "delta_vs_float_points": round(row["test_acc_pct"] - fp, 2),
                         "paper_test_acc_pct": PAPER_LQNETS.get(setting) if method == "lqnets" else None,
                         "quantizers": rules(method, setting)["*"], "train": cfg.model_dump(mode="json")})
    if args.progressive:
        start = root / f"qil_W4A4/{budget}/model.safetensors"
        for setting in ("W3A3", "W2A2"):
            if not start.is_file():
                raise SystemExit(f"--progressive needs the finished qil W4A4 run ({start}); run --bits W4A4 first")
            key = f"resnet20/qil_progressive/{setting}"
            model = build("qil", setting, args.checkpoint)
            load_state_into(model, load_checkpoint(start).group("model"), where=str(start))  # c, d, gamma included
            run = root / f"qil_progressive_{setting}" / budget
            row = run_row(key, model, data, cfg, run, args.fresh)
            record(key, {"weight_bits": parse_setting(setting)[0], "act_bits": parse_setting(setting)[1], **row,
                         "delta_vs_float_points": round(row["test_acc_pct"] - fp, 2), "started_from": str(start),
                         "train": cfg.model_dump(mode="json")})
            start = run / "model.safetensors"

    all_rows = json.loads(results_path.read_text())["results"]
    record("resnet20/targets", targets(all_rows))
    stored = json.loads(results_path.read_text())["results"]
    all_rows = same_budget(stored)
    length = f"{QUICK_STEPS} steps" if args.quick else f"{cfg.epochs:g} epochs"
    print(f"\nResNet-20, CIFAR-10, {length} from the float checkpoint ({fp:.2f}%)"
          + (" -- QUICK: a smoke run on a subset, not a result" if args.quick else ""))
    print(f"{'row':34s} {'test acc %':>10s} {'vs float':>9s} {'paper':>6s} {'s/step':>7s} {'minutes':>8s}")
    for key, r in all_rows.items():
        if "test_acc_pct" not in r:
            continue
        paper = f"{r['paper_test_acc_pct']:.1f}" if r.get("paper_test_acc_pct") else "-"
        delta = f"{r['delta_vs_float_points']:+.2f}" if "delta_vs_float_points" in r else "-"
        sps = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        mins = f"{r['train_minutes']:.1f}" if "train_minutes" in r else "-"
        print(f"{key:34s} {r['test_acc_pct']:10.2f} {delta:>9s} {paper:>6s} {sps:>7s} {mins:>8s}")
    print("targets:", json.dumps(all_rows["resnet20/targets"]))
    if len(all_rows) < len(stored):
        print(f"({len(stored) - len(all_rows)} rows of {results_path.name} have another budget than {budget} and are "
              "left out of this table, the targets and the plot)")
    png = RESULTS / f"{name}.png"
    plot(png, all_rows, f"ResNet-20 / CIFAR-10, {length} of QAT from float"
         + (" (QUICK smoke run)" if args.quick else ""))
    print(f"wrote {results_path} and {png}")


if __name__ == "__main__":
    main()
