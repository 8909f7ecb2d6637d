"""Integer-arithmetic-only int8 inference (Jacob et al. 2018, arXiv:1712.05877): accuracy, speed, size.

    python -m bench.int8                         # LeNet-5 (MNIST), ResNet-20 and MobileNet v2 (CIFAR-10)
    python -m bench.int8 --models resnet20 --resnet20-checkpoint bench/checkpoints/resnet20.safetensors
    python -m bench.int8 --train-mobilenet 30    # train a MobileNet v2 CIFAR baseline first (hours on 2 cores)
    python -m bench.int8 --quick                 # LeNet-5 only, tiny budgets (a few minutes)
    python -m bench.int8 --models resnet20 --rounding-study   # interpreter vs onnxruntime for each rounding

Per model, all in one run, on the same machine and threads (``--threads``, default 2):

- accuracy on the real test set: float (torch), PTQ (``prepare_ptq`` + ``calibrate`` on ``--calib-batches``
  training batches + ``convert``), QAT (``prepare_qat``, ``--qat-epochs`` of ``lowbit.train.fit``); int8
  accuracies are measured with onnxruntime running the exported QDQ file (and with lowbit's integer model);
- the integer reference interpreter against onnxruntime (graph optimization level pinned to "extended"):
  the share of test images whose outputs all lie within 1 output step (LSB) and whose argmax is the same;
  and the interpreter against lowbit's integer-mode torch model (bit-exact, on a subset);
- latency, median of repeated runs, batch 1 and 64: onnxruntime int8 (lowbit's file) vs onnxruntime fp32
  (the float model exported by torch.onnx) vs torch fp32 (eager, BN unfolded, as users run it); if int8 is
  slower than fp32 at batch 1 the row says so (``int8_slower_at_b1``: keep that model float for batch 1);
- file sizes: float32 ONNX vs int8 ONNX;
- onnxruntime's own ``quantize_static`` on the same float ONNX and calibration batches: with its default
  settings, and with QDQ, uint8 activations, int8 weights, per tensor; accuracy, latency and how many
  convolutions / matrix products stay float in its optimized graph.

CPU note: on x86 without VNNI (AVX2 only, e.g. this project's AMD EPYC machines) onnxruntime's u8s8 kernels
saturate int16 pair sums, so 8-bit weights give results that differ from the integer model; ``--weight-bits
auto`` (default) then uses 7-bit weights ([-63, 63], onnxruntime's "reduce_range") and says so. Requantization
rounding defaults to ``fp32``: lowbit's integers reproduce onnxruntime's float32 requantization (the float32
multiplier ``fl(fl(S_in S_w) / S_out)``, the product rounded to float32, then to an integer, half to even) and
the interpreter is bit-exact with it; ``single`` (one rounding of the exact fixed-point product) differs from it
by one step where the float32 product lands on the other side of a half, and such steps add up through deep
networks; ``--rounding gemmlowp`` is the paper's double-rounding arithmetic. ``--rounding-study`` lowers the
QAT model with each of the three and compares the interpreter with onnxruntime (rows ``NAME/rounding_R``).

MobileNet v2 has no CIFAR baseline checkpoint: without ``--train-mobilenet`` its row has latency and size
only, measured with random weights (stated in the row). Its CIFAR variant keeps 32x32 maps through the first
expansions (88M MACs against ResNet-20's 41M): a training step measured 6.1x ResNet-20's at width 1.0 and about
2x at ``--mobilenet-width 0.5`` (one thread), so 30 epochs at width 1.0 are about 11 hours on 2 cores. A width
other than 1.0 is its own row, ``mobilenet_v2_wALPHA``.
ResNet-20 needs ``--resnet20-checkpoint`` (default ``bench/checkpoints/resnet20.safetensors``); a missing file
skips the model with a message.

Writes ``bench/results/int8.json`` (rows of other models kept) and ``int8.png``, drawn from every row of the file
(``int8_quick.*`` with ``--quick``); ``--replot`` only redraws the PNG.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench._common import CHECKPOINTS, RESULTS, data_dir, runs_dir, write_results
from lowbit.data import load_dataset
from lowbit.export import export
from lowbit.export.onnx_qdq import cpu_has_vnni, integer_kernel_report, session_options
from lowbit.export.profile import profile_onnx
from lowbit.graph import Int8Config, QATSchedule, calibrate, convert, prepare_ptq, prepare_qat
from lowbit.graph.lower import output_qparams
from lowbit.models import create_model
from lowbit.quant.affine import ROUNDINGS
from lowbit.runtime.integer import run_integer
from lowbit.timing import interleaved_medians
from lowbit.train import TrainConfig, fit, load_checkpoint, load_model

TARGET_PTQ_POINTS, TARGET_QAT_POINTS, TARGET_SPEEDUP_B64 = 1.5, 0.5, 2.0
DATASET = {"lenet5": "mnist", "resnet20": "cifar10", "mobilenet_v2": "cifar10"}


# ------------------------------------------------------------------------------------------ onnxruntime


def session(path: Path, threads: int, level: str = "all") -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(level, threads), providers=["CPUExecutionProvider"])


def ort_predict(sess: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def latencies(float_model: nn.Module, fp32_onnx: Path, int8_onnx: dict[str, Path], shape: tuple[int, ...],
              threads: int, runs: int, budget_s: float) -> dict[str, dict[int, float]]:
    """Median ms per batch of torch fp32, onnxruntime fp32 and each int8 file, at batch 1 and 64, all
    contenders interleaved (:func:`lowbit.timing.interleaved_medians`, 5 rounds, each a block of ``runs / 5`` calls
    that stops early once it has used its share of ``budget_s`` per contender)."""
    torch.set_num_threads(threads)
    out: dict[str, dict[int, float]] = {"torch_fp32": {}, "ort_fp32": {}, **{k: {} for k in int8_onnx}}
    sessions = {"ort_fp32": session(fp32_onnx, threads), **{k: session(p, threads) for k, p in int8_onnx.items()}}
    for b in (1, 64):
        x = torch.randn(b, *shape)
        xn = x.numpy()

        def torch_run() -> None:
            with torch.inference_mode():
                float_model(x)  # noqa: B023

        fns = {"torch_fp32": torch_run,
               **{k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: xn})) for k, s in sessions.items()}}  # noqa: B023
        med = interleaved_medians(fns, rounds=5, block=max(2, runs // 5), budget_s=budget_s * len(fns))["wall"]
        for k, seconds in med.items():
            out[k][b] = round(1e3 * seconds, 4)
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over fixed batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.it = name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x}


def ort_quantize_static(fp32: Path, out: Path, batches: list[np.ndarray], settings: str) -> Path:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    name = onnx.load(str(fp32)).graph.input[0].name
    kwargs: dict[str, Any] = {}
    if settings == "u8s8_per_tensor":
        kwargs = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                      per_channel=False)
    quantize_static(str(fp32), str(out), _Reader(name, batches), **kwargs)
    return out


# ---------------------------------------------------------------------------------------------- models


def load_float(name: str, args: argparse.Namespace) -> tuple[nn.Module | None, str]:
    if name == "lenet5":
        model, _ = load_model(CHECKPOINTS / "lenet5.safetensors")
        return model.eval(), "bench/checkpoints/lenet5.safetensors"
    if name == "resnet20":
        path = Path(args.resnet20_checkpoint)
        if not path.is_file():
            print(f"resnet20: skipped: no checkpoint at {path} (train it with `python -m bench.train_baselines "
                  "resnet20`, or pass --resnet20-checkpoint)")
            return None, ""
        model, _ = load_model(path)
        return model.eval(), str(path)
    width = args.mobilenet_width
    model = create_model("mobilenet_v2", width_mult=width)
    if not args.train_mobilenet:
        return model.eval(), (f"random weights, width {width:g} (no CIFAR-10 baseline; --train-mobilenet EPOCHS "
                              "trains one)")
    # one run per width and length: a resumed run must have the same settings
    run = runs_dir() / "int8" / f"mobilenet_v2_w{width:g}_e{args.train_mobilenet:g}"
    cfg = TrainConfig(epochs=args.train_mobilenet, lr=0.05, weight_decay=4e-5, batch_size=128)
    fit(model, load_dataset("cifar10", data_dir()), cfg, run_dir=run, resume=True)
    return model.eval(), f"trained here: width {width:g}, {args.train_mobilenet:g} epochs ({run})"


def test_arrays(data: Any, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in data.loader("test", 500):
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


def acc(pred: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((pred.argmax(1) == y).mean()), 2)


def row_name(name: str, args: argparse.Namespace) -> str:
    """The results row of model ``name``: a MobileNet v2 of another width is another model."""
    return f"{name}_w{args.mobilenet_width:g}" if name == "mobilenet_v2" and args.mobilenet_width != 1 else name


def calibration_batches(data: Any, args: argparse.Namespace) -> list[np.ndarray]:
    """The first ``--calib-batches`` training batches of 128 (fixed order, no augmentation)."""
    loader = data.loader("train", 128, shuffle=True, augment=False, seed=0)
    return [x.numpy() for _, x in zip(range(args.calib_batches), (b for b, _ in loader), strict=False)]


def weight_bits(args: argparse.Namespace) -> int:
    """``--weight-bits``; ``auto``: 8 with VNNI, else 7 (onnxruntime's int16 pair sums saturate without it)."""
    return (8 if cpu_has_vnni() else 7) if args.weight_bits == "auto" else int(args.weight_bits)


def train_qat(name: str, model: nn.Module, source: str, data: Any, calib: list[np.ndarray], cfg: Int8Config,
              args: argparse.Namespace) -> nn.Module:
    """QAT of ``args.qat_epochs`` from the float ``model``; resumable, and a finished run is reused: its run
    directory is keyed by everything that shapes the QAT model (not the rounding, which only lowering uses)."""
    qat = prepare_qat(model, cfg)
    calibrate(qat, [torch.from_numpy(c) for c in calib[:8]], min(8, len(calib)))
    tcfg = TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, batch_size=128, weight_decay=args.qat_wd,
                       channels_last=False, checkpoint_every=100)
    steps = max(1, round(tcfg.epochs * math.ceil(len(data.train) / tcfg.batch_size)))
    base = (load_checkpoint(source).meta["sha256"][:8] if Path(source).is_file()
            else hashlib.sha256(source.encode()).hexdigest()[:8])  # a baseline trained here: its settings
    run = (runs_dir() / "int8" / f"{name}_qat" / f"w{cfg.weight_bits}-{args.calibration}{len(calib)}-"
           f"e{args.qat_epochs:g}-lr{args.qat_lr:g}-wd{args.qat_wd:g}-base{base}")
    fit(qat, data, tcfg, run_dir=run, resume=True, callbacks=[QATSchedule(steps, 0.5, 0.75)])
    return qat


def ort_integers(sess: Any, x: np.ndarray, qp: Any) -> np.ndarray:
    """onnxruntime's dequantized outputs for ``x`` back as the integers of the output's ``qp``."""
    return np.rint(ort_predict(sess, x) / np.float32(qp.scale)).astype(np.int64) + qp.zero_point


def rounding_study(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    """The QAT model lowered with every requantization rounding: the integer interpreter against onnxruntime
    (pinned "extended") on the match images. The ONNX file is the same for all three; only lowbit's arithmetic
    differs."""
    model, source = load_float(name, args)
    if model is None or source.startswith("random") or not args.qat_epochs:
        raise SystemExit(f"--rounding-study {name}: needs trained weights and --qat-epochs > 0")
    data = load_dataset(DATASET[name], data_dir())
    x_test, y_test = test_arrays(data, args.limit)
    n = len(x_test) if args.match_images is None else min(args.match_images, len(x_test))
    calib, wbits = calibration_batches(data, args), weight_bits(args)
    rows = {}
    for rounding in ROUNDINGS:
        cfg = Int8Config(weight_bits=wbits, rounding=rounding, calibration=args.calibration)
        gm = convert(train_qat(name, copy.deepcopy(model), source, data, calib, cfg, args))
        path = export(gm, tmp / f"{name}_{rounding}.onnx", format="onnx-qdq", example=torch.zeros(1, *data.input_shape))
        ints = run_integer(gm, x_test[:n], dequantize=False, batch_size=250).astype(np.int64)
        ort_ints = ort_integers(session(path, args.threads, level="extended"), x_test[:n], output_qparams(gm)[0])
        diff = np.abs(ort_ints - ints).max(1)
        rows[f"{row_name(name, args)}/rounding_{rounding}"] = {
            "weights": source, "rounding": rounding, "weight_bits": wbits, "match_images": n,
            "ort_exact_pct": round(100.0 * float((diff == 0).mean()), 3),
            "ort_within_1lsb_pct": round(100.0 * float((diff <= 1).mean()), 3),
            "ort_argmax_same_pct": round(100.0 * float((ort_ints.argmax(1) == ints.argmax(1)).mean()), 3),
            "ort_max_lsb_diff": int(diff.max()), "interp_test_acc_pct": acc(ints, y_test[:n])}
        print(f"{name} rounding {rounding:8s}: {rows[f'{row_name(name, args)}/rounding_{rounding}']}")
    return rows


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    model, source = load_float(name, args)
    if model is None:
        return {}
    row_key = row_name(name, args)
    random_weights = source.startswith("random")
    data = load_dataset(DATASET[name], data_dir())
    shape = tuple(data.input_shape)
    calib, wbits = calibration_batches(data, args), weight_bits(args)
    cfg = Int8Config(weight_bits=wbits, rounding=args.rounding, calibration=args.calibration)
    x_test, y_test = test_arrays(data, args.limit)
    row: dict[str, Any] = {"weights": source, "dataset": data.name, "test_images": int(len(y_test)),
                           "weight_bits": wbits, "rounding": args.rounding, "calibration": args.calibration,
                           "calib_batches": len(calib), "cpu_has_vnni": cpu_has_vnni()}
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)

    with torch.no_grad():
        row["float_test_acc_pct"] = acc(np.concatenate([model(torch.from_numpy(x_test[i:i + 500])).numpy()
                                                        for i in range(0, len(x_test), 500)]), y_test)
    # PTQ
    ptq = prepare_ptq(model, cfg)
    calibrate(ptq, [torch.from_numpy(c) for c in calib], len(calib), show_progress=True)
    ptq_int = convert(ptq)
    example = torch.zeros(1, *shape)
    ptq_path = export(ptq_int, tmp / f"{name}_ptq.onnx", format="onnx-qdq", example=example)
    row["ptq_test_acc_pct"] = acc(ort_predict(session(ptq_path, args.threads), x_test), y_test)
    best_int, best_path, best = ptq_int, ptq_path, "ptq"
    # QAT
    if args.qat_epochs > 0 and not random_weights:
        qat_int = convert(train_qat(name, model, source, data, calib, cfg, args))
        qat_path = export(qat_int, tmp / f"{name}_qat.onnx", format="onnx-qdq", example=example)
        row["qat_test_acc_pct"] = acc(ort_predict(session(qat_path, args.threads), x_test), y_test)
        row["qat_epochs"] = args.qat_epochs
        if row["qat_test_acc_pct"] >= row["ptq_test_acc_pct"]:
            best_int, best_path, best = qat_int, qat_path, "qat"
    row["exported"] = best
    if not random_weights:
        row["ptq_delta_points"] = round(row["float_test_acc_pct"] - row["ptq_test_acc_pct"], 2)
        row["meets_ptq_target"] = row["ptq_delta_points"] <= TARGET_PTQ_POINTS
        if "qat_test_acc_pct" in row:
            row["qat_delta_points"] = round(row["float_test_acc_pct"] - row["qat_test_acc_pct"], 2)
            row["meets_qat_target"] = row["qat_delta_points"] <= TARGET_QAT_POINTS
    # integer interpreter vs onnxruntime (pinned "extended") and vs lowbit's integer-mode torch model
    n_match = len(x_test) if args.match_images is None else min(args.match_images, len(x_test))
    if random_weights:
        n_match = min(n_match, 500)  # the interpreter is a reference, not fast: enough to compare random nets
    xm = x_test[:n_match]
    ints = run_integer(best_int, xm, dequantize=False, batch_size=250).astype(np.int64)
    qp = output_qparams(best_int)[0]
    ort_ints = ort_integers(session(best_path, args.threads, level="extended"), xm, qp)
    diff = np.abs(ort_ints - ints).max(1)
    row["match_images"] = n_match
    row["ort_within_1lsb_pct"] = round(100.0 * float((diff <= 1).mean()), 3)
    row["ort_argmax_same_pct"] = round(100.0 * float((ort_ints.argmax(1) == ints.argmax(1)).mean()), 3)
    row["ort_within_1lsb_and_argmax_pct"] = round(
        100.0 * float(((diff <= 1) & (ort_ints.argmax(1) == ints.argmax(1))).mean()), 3)
    row["ort_max_lsb_diff"] = int(diff.max())
    row["interp_test_acc_pct_on_match_images"] = acc(ints, y_test[:n_match])
    sub = torch.from_numpy(x_test[:64])
    with torch.no_grad():
        row["interp_bit_exact_with_torch_integer_mode"] = bool(
            np.array_equal(run_integer(best_int, sub), best_int(sub).numpy()))
    # float ONNX, onnxruntime's quantize_static, kernels, sizes, latency
    fp32 = tmp / f"{name}_fp32.onnx"
    torch.onnx.export(model, (example,), str(fp32), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    rep = integer_kernel_report(best_path)
    row["ort_integer_kernels"], row["ort_float_kernels"] = rep["integer"], rep["float"]
    row["size_bytes_onnx_fp32"] = fp32.stat().st_size
    row["size_bytes_onnx_int8"] = best_path.stat().st_size
    row["size_ratio"] = round(row["size_bytes_onnx_fp32"] / row["size_bytes_onnx_int8"], 2)
    files = {"lowbit_int8": best_path}
    rows: dict[str, dict[str, Any]] = {}
    for settings in ("default", "u8s8_per_tensor"):
        path = ort_quantize_static(fp32, tmp / f"{name}_ort_{settings}.onnx", calib, settings)
        r = integer_kernel_report(path)
        files[f"ort_{settings}"] = path
        rows[f"{row_key}/ort_quantize_static_{settings}"] = {
            "settings": "onnxruntime defaults (QDQ, int8 activations, int8 weights, per tensor)"
            if settings == "default" else "QDQ, uint8 activations, int8 weights, per tensor",
            "float_convs_left": r["float"], "integer_kernels": r["integer"], "optimized_ops": r["ops"],
            "test_acc_pct": None if random_weights else acc(ort_predict(session(path, args.threads), x_test), y_test),
            "size_bytes": path.stat().st_size}
    load = os.getloadavg()[0]
    row["load_average_1min"] = round(load, 2)
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete for the CPU, "
              "latencies (torch's most: its threads wait for each other) are unreliable; rerun on a quiet machine")
    lat = latencies(model, fp32, files, shape, args.threads, args.runs, args.budget)
    for b in (1, 64):
        row[f"latency_ms_b{b}_torch_fp32"] = lat["torch_fp32"][b]
        row[f"latency_ms_b{b}_ort_fp32"] = lat["ort_fp32"][b]
        row[f"latency_ms_b{b}_ort_int8"] = lat["lowbit_int8"][b]
        row[f"speedup_b{b}_int8_vs_ort_fp32"] = round(lat["ort_fp32"][b] / lat["lowbit_int8"][b], 2)
        row[f"speedup_b{b}_int8_vs_torch_fp32"] = round(lat["torch_fp32"][b] / lat["lowbit_int8"][b], 2)
        for settings in ("default", "u8s8_per_tensor"):
            r = rows[f"{row_key}/ort_quantize_static_{settings}"]
            r[f"latency_ms_b{b}"] = lat[f"ort_{settings}"][b]
            r[f"speedup_b{b}_vs_ort_fp32"] = round(lat["ort_fp32"][b] / lat[f"ort_{settings}"][b], 2)
    row["int8_slower_at_b1"] = row["speedup_b1_int8_vs_ort_fp32"] < 1.0
    row["meets_speed_target_b64"] = row["speedup_b64_int8_vs_ort_fp32"] >= TARGET_SPEEDUP_B64
    best_ort = rows[f"{row_key}/ort_quantize_static_u8s8_per_tensor"]
    row["as_fast_as_ort_best_b64"] = lat["lowbit_int8"][64] <= best_ort["latency_ms_b64"] * 1.05
    if not random_weights and "qat_test_acc_pct" in row:
        row["qat_beats_ort_ptq"] = row["qat_test_acc_pct"] > max(
            r["test_acc_pct"] for r in rows.values())
    # where the time goes at batch 64 (onnxruntime's profiler): the op types of both files, the dearest int8 nodes
    for key, path in (("int8", best_path), ("fp32", fp32)):
        prof = profile_onnx(path, batch=64, threads=args.threads, runs=10, warmup=3)
        row[f"profile_b64_{key}"] = {"kernel_ms": prof["kernel_ms"], "by_op": {
            op: {"count": o["count"], "share_pct": o["share_pct"]} for op, o in list(prof["by_op"].items())[:6]},
            "dearest_nodes": [[r["name"], r["op"], r["share_pct"]] for r in prof["nodes"][:3]]}
    row["threads"] = args.threads
    row["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return {row_key: row, **rows}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results if "/" not in m]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.2
    for i, (label, key) in enumerate((("torch fp32", "torch_fp32"), ("ort fp32", "ort_fp32"),
                                      ("ort int8 (lowbit)", "ort_int8"))):
        for j, b in enumerate((1, 64)):
            ax = axes[j]
            vals = [results[m][f"latency_ms_b{b}_ort_fp32"] / results[m][f"latency_ms_b{b}_{key}"] for m in models]
            ax.bar(np.arange(len(models)) + i * width, vals, width, label=label)
    for j, b in enumerate((1, 64)):
        ax = axes[j]
        for k, (settings, label) in enumerate((("default", "ort quantize_static default"),
                                               ("u8s8_per_tensor", "ort quantize_static u8s8"))):
            vals = [results.get(f"{m}/ort_quantize_static_{settings}", {}).get(f"speedup_b{b}_vs_ort_fp32", 0)
                    for m in models]
            ax.bar(np.arange(len(models)) + (3 + k) * width, vals, width, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        labels = [m + ("\n(random weights)" if results[m]["weights"].startswith("random") else "") for m in models]
        ax.set_xticks(np.arange(len(models)) + 2 * width, labels, fontsize=8)
        ax.set_ylabel("speed vs onnxruntime fp32 (x)")
        ax.set_title(f"batch {b}, {results[models[0]]['threads']} threads")
    axes[0].legend(fontsize=7)
    fig.suptitle("int8 (Jacob et al. 2018) on this CPU: higher is faster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, choices=list(DATASET))
    ap.add_argument("--quick", action="store_true", help="LeNet-5 only, tiny budgets")
    ap.add_argument("--resnet20-checkpoint", default=str(CHECKPOINTS / "resnet20.safetensors"))
    ap.add_argument("--train-mobilenet", type=float, default=0, metavar="EPOCHS")
    ap.add_argument("--mobilenet-width", type=float, default=1.0, metavar="ALPHA",
                    help="MobileNet v2 width multiplier (a training step costs 6x ResNet-20's at 1.0, 2x at 0.5)")
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--calibration", choices=["minmax", "percentile", "mse"], default="minmax")
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-lr", type=float, default=0.005)
    ap.add_argument("--qat-wd", type=float, default=5e-4)
    ap.add_argument("--weight-bits", choices=["auto", "7", "8"], default="auto")
    ap.add_argument("--rounding", choices=list(ROUNDINGS), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="test images (default: the whole test set)")
    ap.add_argument("--match-images", type=int, default=None, help="images for the interpreter/ORT match")
    ap.add_argument("--runs", type=int, default=50, help="latency repetitions (median)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per latency measurement at most")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the results file")
    ap.add_argument("--rounding-study", action="store_true", help="only lower the QAT model with each rounding "
                    "and compare the integer interpreter with onnxruntime (rows NAME/rounding_R)")
    args = ap.parse_args()
    names = args.models or ["lenet5", "resnet20", "mobilenet_v2"]
    out_name = "int8"
    if args.quick:
        names, out_name = ["lenet5"], "int8_quick"
        args.calib_batches, args.qat_epochs, args.limit = 8, 0.2, args.limit or 2000
        args.match_images, args.runs, args.budget = args.match_images or 1000, 20, 2.0
    path = RESULTS / f"{out_name}.json"
    if args.replot:
        if not path.exists():
            ap.error(f"--replot: no {path} to draw; run the benchmark first")
        plot(json.loads(path.read_text())["results"], path.with_suffix(".png"))
        print(f"redrew {path.with_suffix('.png')}")
        return
    measured = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows = (rounding_study if args.rounding_study else run_model)(name, args, Path(tmp))
            if rows:
                measured = True
                write_results(out_name, rows)
                if not args.rounding_study:
                    _print(row_name(name, args), rows)
    if measured:  # every model of the file, also those measured by an earlier run
        plot(json.loads(path.read_text())["results"], path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")


def _print(name: str, rows: dict[str, dict[str, Any]]) -> None:
    r = rows[name]
    print(f"\n{name} ({r['weights']}; weights {r['weight_bits']}-bit, rounding {r['rounding']})")
    print(f"  accuracy %: float {r['float_test_acc_pct']}  PTQ {r['ptq_test_acc_pct']}  "
          f"QAT {r.get('qat_test_acc_pct')}")
    print(f"  interpreter vs onnxruntime: within 1 LSB {r['ort_within_1lsb_pct']}%, argmax same "
          f"{r['ort_argmax_same_pct']}% ({r['match_images']} images); bit-exact with torch integer mode: "
          f"{r['interp_bit_exact_with_torch_integer_mode']}")
    print(f"  onnxruntime kernels: {r['ort_integer_kernels']} integer, {r['ort_float_kernels']} float; size "
          f"{r['size_bytes_onnx_fp32']:,} -> {r['size_bytes_onnx_int8']:,} bytes ({r['size_ratio']}x)")
    head = f"  {'ms/batch':<34}{'b1':>10}{'b64':>10}"
    print(head)
    for label, key in (("torch fp32", "torch_fp32"), ("onnxruntime fp32", "ort_fp32"),
                       ("onnxruntime int8 (lowbit)", "ort_int8")):
        print(f"  {label:<34}{r[f'latency_ms_b1_{key}']:>10.3f}{r[f'latency_ms_b64_{key}']:>10.2f}")
    for k, v in rows.items():
        if k != name:
            print(f"  {k.split('/')[1]:<34}{v['latency_ms_b1']:>10.3f}{v['latency_ms_b64']:>10.2f}   acc "
                  f"{v['test_acc_pct']}%, float convs left {v['float_convs_left']}")
    if "profile_b64_int8" in r:
        print("  the dearest int8 nodes at b64 (onnxruntime's profiler): " + ", ".join(
            f"{n} ({op}) {share:.1f}%" for n, op, share in r["profile_b64_int8"]["dearest_nodes"]))


if __name__ == "__main__":
    main()
