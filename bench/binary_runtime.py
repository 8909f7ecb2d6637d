"""lowbit's bit-packed binary runtime (XNOR-popcount, numba) against torch fp32 (oneDNN), side by side.

    python -m bench.binary_runtime                 # full: layers, MNIST BNN MLP (width 1024, 2 epochs), VGG-Small
    python -m bench.binary_runtime --quick         # a few minutes: fewer repeats, a small MLP, VGG-Small x0.5

Rows (``bench/results/binary_runtime.json``, ``.png``):

    layer/...    one binary layer as the runtime runs it (packed bits in, taps gathered per tile, XNOR-popcount GEMM,
                 fused integer threshold, packed bits out) against ``F.conv2d`` / ``F.linear`` in fp32 on the same
                 shape; 3x3 convs 128->128 @16x16, 256->256 @8x8, 512->512 @4x4 (stride 1, padding 1) and FC
                 4096x4096, batch 1 and 64; for the FC also onnxruntime's int8 ``MatMulInteger`` when installed
    e2e/mnist... the BNN MLP (``mlp_bnn``, act hardtanh, ste_sign weights and inputs, first input real, BN on the
                 logits), trained on MNIST (resumable run under ``$LOWBIT_RUNS/binary_runtime``): packed runtime vs
                 the torch fp32 model of the same architecture (and the fake-quantized torch BNN); test accuracy of
                 both (predictions must be identical), model bytes
    e2e/vgg...   VGG-Small BNN (random weights, BN statistics from a few batches): timing and bit-exactness only
    e2e/cifar... the CIFAR-10 VGG-Small BNN that ``bench.quant_cifar`` trained (its newest finished run under
                 ``$LOWBIT_RUNS/quant_cifar/vgg_small-bnn``; skipped with a note when there is none): the whole test
                 set through the packed and the torch model (predictions must be identical), and its timing against
                 the float twin of the same width

Timing: the same thread count for numba and torch (``--threads``), medians of ``--repeats`` calls, timed in blocks
that alternate between the contenders over three rounds (so a drifting machine load hits both alike), each block
after a pause and a warm-up call (torch's and numba's OpenMP threads spin after a parallel region and would slow
the other side down: see ``blocked_medians``); wall clock, plus the process CPU time of all threads
(``*_cpu_ms``, ``cpu_time_ratio_*``), which other processes on a busy machine disturb less. The committed results
use the default OpenMP wait policy, what a user gets. ``--omp-passive`` makes both runtimes' threads sleep instead of
spinning after a parallel region: no spin contention, but every parallel region then pays a wake-up (measured here:
a numba ``prange`` launch 18.5 us passive against 3.1 us by default), which slows batch 1 on both sides (the
batch-1 3x3 convs of torch took 1.8 ms instead of 0.9 ms).

End to end, the real-valued first layer runs in torch fp32 in both models (784 x width MACs per image for the MLP,
against 2 width^2 + 10 width in its binary layers), so Amdahl bounds the MLP's speedup by about
(784 + 2 width + 10) / 784 even if the binary layers cost nothing: ~3.6x at width 1024.

Kernel efficiency: binary MACs per cycle per core at the clock ``/proc/cpuinfo`` reports
(the boost clock is unknown, so this is an upper estimate of MACs/cycle), against two ceilings: the popcount
instruction's, ``POPCNT_PER_CYCLE`` x 64 bits per cycle per core, and the measured one of the kernel's own inner
loop (``loop_ceiling``: the 4 x 2 register block on rows of the layer's length that stay in L1, one thread, no
im2col, no epilogue), which is what the GEMM could reach if nothing else cost; fp32's ceiling is 2 FMA x 8 lanes =
16 MACs per cycle (AVX2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench._common import RESULTS, data_dir, runs_dir, write_results
from lowbit.data import load_dataset
from lowbit.models import create_model
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.binary import ClipWeights
from lowbit.runtime.binary import pack_model, popcnt_in_asm
from lowbit.runtime.binary.kernels import _dot4x2, conv_plan, conv_words, tap_sums
from lowbit.runtime.binary.pack import pack_nchw, pack_signs
from lowbit.timing import interleaved_medians
from lowbit.train import TrainConfig, fit, load_checkpoint
from lowbit.train.checkpoint import load_state_into
from lowbit.train.progress import progress

# Assumption for the ceiling: 4 scalar 64-bit POPCNT per cycle per core (AMD Zen 2/3 run POPCNT on all four integer
# ALU pipes). The XOR and the accumulate share those pipes, so a scalar XOR-popcount-add loop tops out near 4/3 words
# = 85 MACs per cycle; LLVM's AVX2 vpshufb popcount (it vectorizes our loops) can go past that. No AVX-512 VPOPCNTDQ.
POPCNT_PER_CYCLE = 4
FP32_MACS_PER_CYCLE = 16  # AVX2: 2 FMA units x 8 float32 lanes
CONVS = ((128, 16), (256, 8), (512, 4))  # (channels, spatial size): 3x3, stride 1, padding 1
FC = 4096
BINARY = {"weight": "ste_sign", "input": "ste_sign"}


def clock_ghz() -> float:
    """The clock /proc/cpuinfo reports (GHz); 0 when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return 0.0


def blocked_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, wall clock under the function's name and the process's CPU time (all threads)
    under ``NAME/cpu``: 3 rounds, each a block of
    ``repeats / 3`` calls of every function in turn, the order rotated per round, after a 0.2 s pause and one
    untimed call per block (:func:`lowbit.timing.interleaved_medians`). Blocks and pauses, not single calls in
    turn: torch's and numba's idle OpenMP threads spin-wait after a parallel region and would slow the other
    side down (measured here: 0.07 ms -> 40 ms for the batch-1 FC on 2 cores)."""
    med = interleaved_medians(fns, rounds=3, block=max(1, -(-repeats // 3)), warmup=0, block_warmup=1, pause_s=0.2,
                              rotate=True, clocks={"wall": time.perf_counter, "cpu": time.process_time})
    return {**med["wall"], **{f"{k}/cpu": v for k, v in med["cpu"].items()}}


def _pm1(*shape: int) -> torch.Tensor:
    return torch.where(torch.randn(*shape) < 0, -1.0, 1.0)


def ort_int8_matmul(batch: int, k: int, n: int, threads: int) -> Callable[[], object] | None:
    """An onnxruntime session running ``MatMulInteger`` (uint8 [B, K] x int8 [K, N] -> int32), or None."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "fc_int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [batch, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [batch, n])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    a = rng.integers(0, 256, (batch, k), dtype=np.uint8)
    return lambda: sess.run(None, {"A": a})


@numba.njit(cache=True)
def _spin(a: np.ndarray, b: np.ndarray, reps: int) -> int:  # pragma: no cover - compiled
    total = np.uint64(0)
    for _ in range(reps):
        s = _dot4x2(a[0], a[1], a[2], a[3], b[0], b[1], a.shape[1])
        total += s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]
        a[0, 0] ^= total & np.uint64(1)  # a data dependence, so the loop cannot be hoisted
    return int(total)


def loop_ceiling(words_per_row: int, ghz: float, macs: float = 4e8) -> float:
    """Binary MACs per cycle of the GEMM's inner loop alone (4 pixel rows x 2 weight rows of ``words_per_row``
    words, in L1), on one thread: the best of 5 runs of ``macs`` MACs."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, (4, words_per_row), dtype=np.uint64)
    b = rng.integers(0, 2**63, (2, words_per_row), dtype=np.uint64)
    reps = max(1, int(macs / (8 * 64 * words_per_row)))
    _spin(a, b, 1)
    best = min(_timed(lambda: _spin(a, b, reps)) for _ in range(5))
    return reps * 8 * 64 * words_per_row / best / (ghz * 1e9)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def layer_rows(threads: int, repeats: int, ghz: float) -> dict[str, dict[str, Any]]:
    jobs: list[tuple[str, int, int, int]] = []  # (kind, channels, size, batch)
    for b in (1, 64):
        jobs += [("conv", c, s, b) for c, s in CONVS]
        jobs.append(("fc", FC, 1, b))
    rows: dict[str, dict[str, Any]] = {}
    ceilings: dict[int, float] = {}  # words per row -> the inner loop's MACs per cycle
    with progress(len(jobs), "layers", "shape") as advance:
        for kind, c, s, b in jobs:
            if kind == "conv":
                name, pad, macs = f"layer/conv3x3_{c}to{c}_{s}x{s}/b{b}", 1, b * s * s * c * c * 9
                xs, ws = _pm1(b, c, s, s), _pm1(c, c, 3, 3)
                xw, ww = pack_nchw(xs), pack_signs(ws.permute(0, 2, 3, 1))
                torch_fn: Callable[[], object] = lambda xs=xs, ws=ws: F.conv2d(xs, ws, padding=1)  # noqa: E731
            else:
                name, pad, macs = f"layer/fc{c}x{c}/b{b}", 0, b * c * c
                xs, ws = _pm1(b, c), _pm1(c, c)
                xw, ww = pack_signs(xs)[:, None, None, :], pack_signs(ws)[:, None, None, :]
                torch_fn = lambda xs=xs, ws=ws: F.linear(xs, ws)  # noqa: E731
            wsum, t = tap_sums(ww, c), np.zeros(c, np.int64)
            # the border table and popcount limits are per layer and input size: a packed model computes them once
            plan = conv_plan(ww, wsum, t, c, xw.shape[1], xw.shape[2], 1, pad)
            fns: dict[str, Callable[[], object]] = {
                "binary": lambda xw=xw, ww=ww, wsum=wsum, t=t, c=c, pad=pad, plan=plan: conv_words(
                    xw, ww, wsum, t, c, 1, pad, plan),
                "torch": torch_fn}
            ort_fn = ort_int8_matmul(b, c, c, threads) if kind == "fc" else None
            if ort_fn is not None:
                fns["ort_int8"] = ort_fn
            med = blocked_medians(fns, repeats if b == 1 else max(3, repeats // 3))
            tb, tt = med["binary"], med["torch"]
            row: dict[str, Any] = {
                "binary_ms": round(1e3 * tb, 4), "torch_fp32_ms": round(1e3 * tt, 4),
                "speedup_vs_torch_fp32": round(tt / tb, 2), "binary_gmac_per_s": round(macs / tb / 1e9, 1),
                "torch_fp32_gmac_per_s": round(macs / tt / 1e9, 1), "batch": b, "macs": macs, "threads": threads,
                "binary_cpu_ms": round(1e3 * med["binary/cpu"], 4),
                "torch_fp32_cpu_ms": round(1e3 * med["torch/cpu"], 4),
                "cpu_time_ratio_torch_over_binary": round(med["torch/cpu"] / max(med["binary/cpu"], 1e-9), 2)}
            if ghz:
                per_cycle = macs / tb / (ghz * 1e9) / threads
                row["binary_macs_per_cycle_per_core"] = round(per_cycle, 1)
                row["popcount_ceiling_fraction"] = round(per_cycle / (64 * POPCNT_PER_CYCLE), 3)
                k_words = int(np.prod(ww.shape[1:]))
                if k_words not in ceilings:
                    ceilings[k_words] = loop_ceiling(k_words, ghz)
                row["loop_ceiling_macs_per_cycle_per_core"] = round(ceilings[k_words], 1)
                row["loop_ceiling_fraction"] = round(per_cycle / ceilings[k_words], 3)
                row["torch_fp32_macs_per_cycle_per_core"] = round(macs / tt / (ghz * 1e9) / threads, 2)
            if "ort_int8" in med:
                row["ort_int8_ms"] = round(1e3 * med["ort_int8"], 4)
                row["speedup_vs_ort_int8"] = round(med["ort_int8"] / tb, 2)
            rows[name] = row
            advance(status=name)
    return rows


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------


def _hardtanh(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU):
                setattr(m, name, nn.Hardtanh())
    return model


def mlp_bnn(width: int) -> nn.Module:
    """The BNN MLP of bench.quant_binary's ``bnn`` method: ste_sign weights everywhere, ste_sign inputs but the
    first layer's, hardtanh, a BatchNorm1d on the logits."""
    model = create_model("mlp_bnn", width=width, act="hardtanh")
    quantize_(model, QuantConfig(rules={"features.0": {"weight": "ste_sign"}, "*": BINARY}, keep_first_last=False))
    model.fc = nn.Sequential(model.fc, nn.BatchNorm1d(model.fc.out_features))  # type: ignore[assignment]
    return model


def _float_bytes(model: nn.Module) -> int:
    return sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def _time_e2e(name: str, fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    with torch.no_grad():
        return blocked_medians(fns, repeats)


def e2e_mnist(width: int, epochs: float, batches: tuple[int, ...], repeats: int) -> dict[str, dict[str, Any]]:
    data = load_dataset("mnist", data_dir())
    torch.manual_seed(0)
    model = mlp_bnn(width)
    cfg = TrainConfig(epochs=epochs, batch_size=100, optimizer="adam", lr=3e-3, schedule="cosine",
                      channels_last=False, checkpoint_every=200)
    res = fit(model, data, cfg, run_dir=runs_dir() / "binary_runtime" / f"mlp_bnn_w{width}_e{epochs:g}", resume=True,
              callbacks=[ClipWeights()])
    model.eval()
    packed = pack_model(model)
    print(packed)
    # the whole test set through both: identical predictions, equal logits
    correct_t = correct_p = same = 0
    max_diff = 0.0
    n = 0
    with torch.no_grad():
        for x, y in data.loader("test", batch_size=1000):
            lt, lp = model(x), packed(x)
            correct_t += int((lt.argmax(1) == y).sum())
            correct_p += int((lp.argmax(1) == y).sum())
            same += int((lt.argmax(1) == lp.argmax(1)).sum())
            max_diff = max(max_diff, float((lt - lp).abs().max()))
            n += len(y)
    ref = create_model("mlp_bnn", width=width, act="hardtanh")  # torch fp32, the same architecture
    ref.fc = nn.Sequential(ref.fc, nn.BatchNorm1d(10))  # type: ignore[assignment]
    ref.eval()
    nb = packed.nbytes()
    base = {"width": width, "epochs": epochs, "train_test_acc_pct": round(res.final["test_acc"], 2),
            "test_acc_pct_torch": round(100 * correct_t / n, 2), "test_acc_pct_packed": round(100 * correct_p / n, 2),
            "predictions_identical": same == n, "max_abs_logit_diff": max_diff, "packed_bytes": nb["total_bytes"],
            "packed_binary_weight_bytes": nb["binary_weight_bytes"], "packed_threshold_bytes": nb["threshold_bytes"],
            "fp32_bytes": _float_bytes(ref), "size_ratio_vs_fp32": round(_float_bytes(ref) / nb["total_bytes"], 1)}
    print(f"MNIST test accuracy: torch BNN {base['test_acc_pct_torch']:.2f}%, packed "
          f"{base['test_acc_pct_packed']:.2f}%, identical predictions {same}/{n}, max |logit diff| {max_diff:g}")
    rows = {}
    x_all = next(iter(data.loader("test", batch_size=max(batches))))[0]
    for b in batches:
        x = x_all[:b].contiguous()
        fns = {"packed": lambda x=x: packed(x), "torch_fp32": lambda x=x: ref(x),
               "torch_bnn_fakequant": lambda x=x: model(x)}
        med = _time_e2e("mnist", fns, repeats if b == 1 else max(3, repeats // 3))
        rows[f"e2e/mnist_mlp_bnn_w{width}/b{b}"] = {
            **base, "batch": b, "packed_ms": round(1e3 * med["packed"], 3),
            "torch_fp32_ms": round(1e3 * med["torch_fp32"], 3),
            "torch_bnn_fakequant_ms": round(1e3 * med["torch_bnn_fakequant"], 3),
            "speedup_vs_torch_fp32": round(med["torch_fp32"] / med["packed"], 2),
            "cpu_time_ratio_torch_over_packed": round(med["torch_fp32/cpu"] / max(med["packed/cpu"], 1e-9), 2)}
    return rows


def e2e_cifar_bnn(batches: tuple[int, ...], repeats: int) -> dict[str, dict[str, Any]]:
    """The trained CIFAR-10 BNN of bench.quant_cifar, if there is one: test-set identity and timing."""
    from bench.quant_cifar import build_vgg

    found = sorted((runs_dir() / "quant_cifar" / "vgg_small-bnn").glob("*/model.safetensors"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        print("e2e/cifar: skipped, no trained VGG-small BNN (python -m bench.quant_cifar --methods none trains it)")
        return {}
    path = found[-1]
    ckpt = load_checkpoint(path)
    width = float(path.parent.name.split("-")[0].removeprefix("w"))  # the run's tag: w{width}-e{epochs}-...
    model = build_vgg(True, width)
    load_state_into(model, ckpt.group("model"), where=str(path))
    model.eval()
    packed = pack_model(model)
    data = load_dataset("cifar10", data_dir())
    correct_t = correct_p = same = n = 0
    with torch.no_grad():
        for x, y in data.loader("test", batch_size=500):
            pt, pp = model(x).argmax(1), packed(x).argmax(1)
            correct_t += int((pt == y).sum())
            correct_p += int((pp == y).sum())
            same += int((pt == pp).sum())
            n += len(y)
    print(f"CIFAR-10 test accuracy ({path.parent.name}): torch BNN {100 * correct_t / n:.2f}%, packed "
          f"{100 * correct_p / n:.2f}%, identical predictions {same}/{n}")
    ref = build_vgg(False, width).eval()  # its float twin: the same layers with ReLU, torch fp32
    nb = packed.nbytes()
    base = {"run": str(path.parent), "width_mult": width, "test_acc_pct_torch": round(100 * correct_t / n, 2),
            "test_acc_pct_packed": round(100 * correct_p / n, 2), "predictions_identical": same == n,
            "packed_bytes": nb["total_bytes"], "fp32_bytes": _float_bytes(ref),
            "size_ratio_vs_fp32": round(_float_bytes(ref) / nb["total_bytes"], 1)}
    x_all = next(iter(data.loader("test", batch_size=max(batches))))[0]
    return _packed_vs_float(f"e2e/cifar_vgg_small_bnn_x{width:g}", packed, ref, x_all, batches, repeats, base)


def _packed_vs_float(key: str, packed: Callable[[torch.Tensor], torch.Tensor], ref: nn.Module, x_all: torch.Tensor,
                     batches: tuple[int, ...], repeats: int, base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows ``KEY/bB``: the packed model against its torch fp32 twin at each batch size, with ``base`` merged in."""
    rows = {}
    for b in batches:
        x = x_all[:b].contiguous()
        med = _time_e2e(key, {"packed": lambda x=x: packed(x), "torch_fp32": lambda x=x: ref(x)},
                        repeats if b == 1 else max(3, repeats // 5))
        rows[f"{key}/b{b}"] = {
            **base, "batch": b, "packed_ms": round(1e3 * med["packed"], 3),
            "torch_fp32_ms": round(1e3 * med["torch_fp32"], 3),
            "speedup_vs_torch_fp32": round(med["torch_fp32"] / med["packed"], 2),
            "cpu_time_ratio_torch_over_packed": round(med["torch_fp32/cpu"] / max(med["packed/cpu"], 1e-9), 2)}
    return rows


def e2e_vgg(width_mult: float, batches: tuple[int, ...], repeats: int) -> dict[str, dict[str, Any]]:
    torch.manual_seed(0)
    model = _hardtanh(create_model("vgg_small", width_mult=width_mult))
    quantize_(model, QuantConfig(rules={"features.0.conv": {"weight": "ste_sign"}, "*": BINARY}, keep_first_last=False))
    model.train()
    with torch.no_grad():  # BN statistics from a few batches (random weights: timing and exactness only)
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    model.eval()
    packed = pack_model(model)
    x_all = torch.randn(max(batches), 3, 32, 32)
    with torch.no_grad():
        exact = bool(torch.equal(packed(x_all[:16]), model(x_all[:16])))
    ref = create_model("vgg_small", width_mult=width_mult).eval()  # torch fp32, the same architecture (ReLU)
    nb = packed.nbytes()
    base = {"width_mult": width_mult, "bit_exact_logits": exact, "packed_bytes": nb["total_bytes"],
            "fp32_bytes": _float_bytes(ref), "size_ratio_vs_fp32": round(_float_bytes(ref) / nb["total_bytes"], 1),
            "weights": "random (timing only)"}
    return _packed_vs_float(f"e2e/vgg_small_bnn_x{width_mult:g}", packed, ref, x_all, batches, repeats, base)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars: speedup of the packed runtime over torch fp32, per row (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    names = [k for k, r in rows.items() if "speedup_vs_torch_fp32" in r]
    vals = [rows[k]["speedup_vs_torch_fp32"] for k in names]
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:blue" if k.startswith("layer/") else "tab:green" for k in names]
    ax.barh(range(len(names)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [k.split("/", 1)[1] for k in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.set_xlabel("speedup over torch fp32 (oneDNN), same threads (log)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'row':42s} {'binary/packed ms':>16s} {'torch fp32 ms':>14s} {'speedup':>8s} {'MAC/cyc/core':>12s}"
          f" {'of loop ceiling':>15s} {'ort int8 ms':>11s}")
    for k, r in rows.items():
        if "speedup_vs_torch_fp32" not in r:
            continue
        ours = r.get("binary_ms", r.get("packed_ms"))
        mpc = r.get("binary_macs_per_cycle_per_core", "")
        frac = f"{r['loop_ceiling_fraction']:.0%} of {r['loop_ceiling_macs_per_cycle_per_core']:.0f}" \
            if "loop_ceiling_fraction" in r else ""
        ort = r.get("ort_int8_ms", "")
        print(f"{k:42s} {ours:16.3f} {r['torch_fp32_ms']:14.3f} {r['speedup_vs_torch_fp32']:7.1f}x {mpc!s:>12s}"
              f" {frac:>15s} {ort!s:>11s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, MLP width 256 / 0.2 epoch, VGG x0.5")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="numba and torch threads (same)")
    ap.add_argument("--repeats", type=int, default=0, help="timing rounds at batch 1 (0: 30, quick 7)")
    ap.add_argument("--width", type=int, default=0, help="MNIST MLP width (0: 1024, quick 256)")
    ap.add_argument("--epochs", type=float, default=0, help="MNIST MLP training epochs (0: 2, quick 0.2)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["layers", "mnist", "vgg", "cifar"])
    ap.add_argument("--omp-passive", action="store_true",
                    help="rerun with OMP_WAIT_POLICY=PASSIVE (both torch's and numba's OpenMP threads sleep instead of "
                         "spinning after a parallel region; the packed model alternates torch and numba regions)")
    args = ap.parse_args()
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # read when the OpenMP runtimes load: start afresh
        os.execve(sys.executable, [sys.executable, "-m", "bench.binary_runtime", *sys.argv[1:]], env)
    threads = args.threads
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    repeats = args.repeats or (7 if args.quick else 30)
    width = args.width or (256 if args.quick else 1024)
    epochs = args.epochs or (0.2 if args.quick else 2.0)
    ghz = clock_ghz()
    asm = popcnt_in_asm()
    print(f"threads {threads} (numba {numba.get_num_threads()}, torch {torch.get_num_threads()}), clock {ghz:.2f} GHz "
          f"(/proc/cpuinfo), popcount in the XOR-popcount loop's assembly: {asm['popcnt']} popcnt, "
          f"{asm['vpshufb']} vpshufb (AVX2 vectorized)")
    rows: dict[str, dict[str, Any]] = {
        "kernel/asm": {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                       "popcnt_instructions": asm["popcnt"], "vpshufb_instructions": asm["vpshufb"],
                       "clock_ghz_assumed": ghz, "popcnt_per_cycle_assumed": POPCNT_PER_CYCLE,
                       "popcount_ceiling_macs_per_cycle_per_core": 64 * POPCNT_PER_CYCLE,
                       "fp32_ceiling_macs_per_cycle_per_core": FP32_MACS_PER_CYCLE, "threads": threads,
                       "quick": args.quick}}
    if "layers" not in args.skip:
        rows.update(layer_rows(threads, repeats, ghz))
    if "mnist" not in args.skip:
        rows.update(e2e_mnist(width, epochs, (1, 64), repeats))
    if "vgg" not in args.skip:
        rows.update(e2e_vgg(0.5 if args.quick else 1.0, (1, 16) if args.quick else (1, 64), max(3, repeats // 2)))
    if "cifar" not in args.skip and not args.quick:
        rows.update(e2e_cifar_bnn((1, 64), max(3, repeats // 2)))
    print_table(rows)
    path = write_results("binary_runtime", rows, merge=False)
    png = RESULTS / "binary_runtime.png"
    title = f"lowbit packed binary runtime vs torch fp32, {threads} threads" + (" (quick)" if args.quick else "")
    plot(rows, png, title)
    print(f"wrote {path} and {png}")
    print(json.dumps(rows["kernel/asm"]))


if __name__ == "__main__":
    main()
