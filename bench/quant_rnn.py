"""Alternating multi-bit quantization (Xu et al. 2018) of a character-level LSTM, and the multi-bit
matrix-vector product against torch fp32.

    python -m bench.quant_rnn                      # full: char_lstm 2x512, float 6 epochs, each row +1 epoch
    python -m bench.quant_rnn --init scratch       # quantized rows trained from scratch for --epochs instead
    python -m bench.quant_rnn --only matvec        # only the speed part
    python -m bench.quant_rnn --quick              # a few minutes: a tiny LSTM, a few steps, few repeats

Accuracy rows (``char_lstm/ROW``): ``char_lstm`` (Embedding -> 2 x LSTM(512) -> Linear) on tinyshakespeare (first
90% train, last 10% validation; windows of 128 characters, the state reset per window), validation bits per
character. ``float`` is trained first (Adam 2e-3, cosine, gradient clip 5, batch 32); ``W2A2``, ``W2A3``, ``W3A3``
replace the LSTM by a ``QuantLSTM`` (``quantize_`` rule on ``rnn``) whose four weight matrices are quantized row
by row with ``alternating`` (W bits) and whose inputs and hidden states entering the matmuls are quantized
online with ``alternating`` (A bits), both with 2 alternating cycles as in the paper, and are fine-tuned from
the float model (``--init float``, Adam 1e-3) or trained from scratch (``--init scratch``, the float budget).
The embedding and the softmax layer stay float. ``ptq_val_bpc`` is the float model quantized without
fine-tuning. The paper reports Penn Treebank word-level perplexity (LSTM: FP 89.8, W2A2 95.8, W2A3 91.9,
W3A3 87.9, recalled, not checked against the PDF); we have no PTB here and use tinyshakespeare instead: compare
the direction (W3A3 ~ float, W2A2 worst), not the numbers.

Speed rows (``matvec/W{k}A{k}/MxN/t{threads}``): ``y = W x`` for a float ``W`` (M x N) and ``x`` (N), batch 1.
The quantized product keeps ``W`` as k bit planes per row (``alternating`` offline) with k coefficients per row,
and ``x`` as k bit planes with k coefficients; ``W x = sum_ij alpha_i beta_j (B_i b_j)`` is k x k binary
dot products per row, computed by the binary runtime's XNOR-popcount GEMM kernel (``binary_gemm``'s core
``conv_words`` with the weight-side sums computed once: the k activation planes times the k M weight rows,
``dot = N - 2 popcount(a XOR b)``), then combined with the coefficients (numba). ``kernel_us``: that product
from packed operands; ``e2e_us``: plus the online alternating quantization of ``x`` (2 cycles, numba, this
file) and its bit packing. Against ``torch.mv`` in fp32 (oneDNN/MKL) with the same thread count; medians of
blocks of calls, the blocks of the contenders interleaved (``lowbit.timing.interleaved_medians``). The paper:
~6x at 2 bits, ~3x at 3 bits on CPU (its own kernels; abstract), memory ~16x / ~10.5x.

Duration on 2 cores (estimated: the shared development machine was too loaded to time the full run): the
float model ~1 h (6 epochs of 245 steps of 32 x 128 characters, fused oneDNN LSTM), each quantized row ~20-30 min
per epoch (a plain PyTorch loop over time steps, about 2x the fused layer, plus the online quantization of
every hidden state), the speed part ~5 min: about 2-3 h with the defaults. ``--quick`` took 7 minutes on that
machine (load 5-15 on 2 cores); its accuracy rows are a smoke test (a few steps), not results.

Runs resume from ``$LOWBIT_RUNS/quant_rnn/ROW_SETTINGS`` (default ``~/.cache/lowbit/runs``); ``--fresh``
restarts them. Results: ``bench/results/quant_rnn.json`` and ``.png`` (``quant_rnn_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from functools import partial
from typing import Any

import numba
import numpy as np
import torch
from numba import njit
from torch import nn

from bench._common import RESULTS, data_dir, runs_dir, write_results
from lowbit.data import Split, load_dataset
from lowbit.models import create_model
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.alternating import AlternatingQuant, alternating_quantize, reconstruct
from lowbit.runtime.binary import binary_gemm, pack_bits, words
from lowbit.runtime.binary.kernels import conv_words, tap_sums
from lowbit.timing import interleaved_medians
from lowbit.train import TrainConfig, evaluate, fit

ROWS: dict[str, tuple[int, int] | None] = {"float": None, "W2A2": (2, 2), "W2A3": (2, 3), "W3A3": (3, 3)}
PAPER_PTB_PPL = {"float": 89.8, "W2A2": 95.8, "W2A3": 91.9, "W3A3": 87.9}  # Xu et al. LSTM, PTB (recalled)
PAPER_SPEEDUP = {2: 6.0, 3: 3.0}  # Xu et al. abstract: ~6x (2 bits), ~3x (3 bits) on CPU
ITERS = 2  # alternating cycles, weights and activations (the paper's choice)
QUICK_VAL_CHARS = 16_385
SHAPES = [(1024, 4096), (4096, 1024), (2048, 512)]  # (M, N); 2048 x 512: an LSTM(512)'s 4H x H matrix


# ----------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------


def quantize_lstm(model: nn.Module, wbits: int, abits: int) -> None:
    """Swap ``model.rnn`` for a ``QuantLSTM`` with alternating weights (per row) and online activations."""
    rule = {"weight": {"name": "alternating", "bits": wbits, "iters": ITERS},
            "input": {"name": "alternating", "bits": abits, "iters": ITERS}}
    report = quantize_(model, QuantConfig(rules={"rnn": rule}))
    print(report)


def _train_cfg(epochs: float, lr: float, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch, optimizer="adam", lr=lr, schedule="cosine",
                       grad_clip=5.0, seq_len=args.seq_len, checkpoint_every=args.checkpoint_every,
                       channels_last=False)


def accuracy_rows(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    data = load_dataset("tinyshakespeare", data_dir())
    if args.quick:  # validate on the first 16k characters only (the quantized recurrence is slow to evaluate)
        data = dataclasses.replace(data, test=Split(data.test.x[:QUICK_VAL_CHARS], data.test.y[:QUICK_VAL_CHARS]))
    model_kw = {"hidden": args.hidden, "layers": args.layers, "num_classes": data.num_classes}
    base = runs_dir() / ("quant_rnn_quick" if args.quick else "quant_rnn")
    settings = f"h{args.hidden}x{args.layers}_b{args.batch}_t{args.seq_len}"
    float_cfg = _train_cfg(args.epochs, 2e-3, args)
    q_epochs, q_lr = (args.epochs, 2e-3) if args.init == "scratch" else (args.quant_epochs, 1e-3)
    q_cfg = _train_cfg(q_epochs, q_lr, args)

    runs = {row: base / f"{row}_{settings}_e{args.epochs:g}" for row in ROWS}
    for row in ROWS:
        if row != "float":
            runs[row] = base / f"{row}_{settings}_{args.init}_e{q_epochs:g}"
            if args.init == "float":
                runs[row] = runs[row].with_name(runs[row].name + f"_from_e{args.epochs:g}")
    if args.fresh:
        for r in runs.values():
            shutil.rmtree(r, ignore_errors=True)

    out: dict[str, dict[str, Any]] = {}
    torch.manual_seed(0)
    float_model = create_model("char_lstm", **model_kw)
    init_state = copy.deepcopy(float_model.state_dict())  # the scratch rows start from the same initialization
    float_res = None
    for row, bits in ROWS.items():
        if row not in args.rows:
            continue
        t0 = time.perf_counter()
        ptq = None
        if bits is None:
            model, cfg = float_model, float_cfg
        else:
            if float_res is None and args.init == "float":  # the trained float model (resumes, or loads a done run)
                float_res = fit(float_model, data, float_cfg, run_dir=runs["float"], resume=True)
            model = copy.deepcopy(float_model)
            if args.init == "scratch":
                model.load_state_dict(init_state)
            quantize_lstm(model, *bits)
            if args.init == "float":  # post-training quantization: the float weights, no fine-tuning
                ptq = evaluate(model, data.loader("test", 256, seq_len=args.seq_len))["bpc"]
            cfg = q_cfg
        res = fit(model, data, cfg, run_dir=runs[row], resume=True)
        if bits is None:
            float_res = res
        minutes = sum(h["epoch_seconds"] for h in res.history) / 60
        steps = res.history[-1]["step"] if res.history else 0
        out[f"char_lstm/{row}"] = {
            "bits": "W32A32" if bits is None else f"W{bits[0]}A{bits[1]}",
            "val_bpc": round(res.final["test_bpc"], 4),
            "val_loss_nats": round(res.final["test_loss"], 4),
            "val_acc_pct": round(res.final["test_acc"], 2),
            "ptq_val_bpc": None if ptq is None else round(ptq, 4),
            "init": "float" if bits is not None and args.init == "float" else "random",
            "epochs": cfg.epochs, "steps": steps, "train_minutes": round(minutes, 2),
            "seconds_per_step": round(60 * minutes / max(1, steps), 3),
            "wall_minutes_this_call": round((time.perf_counter() - t0) / 60, 2),
            "hidden": args.hidden, "layers": args.layers, "params": sum(p.numel() for p in model.parameters()),
            "paper_ptb_test_ppl": PAPER_PTB_PPL[row], "train": cfg.model_dump(mode="json"),
        }
        print(f"{row}: val bpc {res.final['test_bpc']:.4f}")
        write_results(args.results, {f"char_lstm/{row}": out[f"char_lstm/{row}"]})
    fl = out.get("char_lstm/float", {}).get("val_bpc")
    if fl is None and float_res is not None:
        fl = round(float_res.final["test_bpc"], 4)
    for r in out.values():
        r["delta_bpc_vs_float"] = None if fl is None else round(r["val_bpc"] - fl, 4)
    return out


# ----------------------------------------------------------------------------------------------------
# speed: the multi-bit matrix-vector product
# ----------------------------------------------------------------------------------------------------


@njit(cache=True)
def _solve_spd(g: np.ndarray, c: np.ndarray, prev: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Cholesky solve of the k x k normal equations; a (numerically) singular system keeps ``prev``."""
    k = g.shape[0]
    lo = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1):
            s = g[i, j]
            for p in range(j):
                s -= lo[i, p] * lo[j, p]
            if i == j:
                if s <= 1e-9 * g[i, i]:
                    return prev.copy()
                lo[i, i] = np.sqrt(s)
            else:
                lo[i, j] = s / lo[j, j]
    y = np.zeros(k)
    for i in range(k):
        s = c[i]
        for p in range(i):
            s -= lo[i, p] * y[p]
        y[i] = s / lo[i, i]
    x = np.zeros(k)
    for i in range(k - 1, -1, -1):
        s = y[i]
        for p in range(i + 1, k):
            s -= lo[p, i] * x[p]
        x[i] = s / lo[i, i]
    return x


@njit(cache=True)
def quantize_vector(
    x: np.ndarray, bits: int, iters: int, planes: np.ndarray, alpha: np.ndarray
) -> None:  # pragma: no cover
    """Online alternating quantization of one float32 vector, written as ``bits`` packed planes (+1 -> bit 1)
    into ``planes`` uint64 [bits, words(n)] and the coefficients into ``alpha`` float64 [bits]: greedy init,
    then ``iters`` cycles of least squares (k x k normal equations) and binary-search-tree code assignment."""
    n = x.shape[0]
    m = 1 << bits
    r = np.empty(n)
    for j in range(n):
        r[j] = x[j]
    codes = np.zeros(n, np.int64)
    for i in range(bits):  # greedy: alpha_i = mean |r|, b_i = sign(r)
        s = 0.0
        for j in range(n):
            s += abs(r[j])
        a = s / n
        alpha[i] = a
        for j in range(n):
            if r[j] >= 0:
                codes[j] |= 1 << i
                r[j] -= a
            else:
                r[j] += a
    sign = np.empty((m, bits))
    for c in range(m):
        for i in range(bits):
            sign[c, i] = 1.0 if (c >> i) & 1 else -1.0
    for _ in range(iters):
        cnt = np.zeros(m)
        tot = np.zeros(m)
        for j in range(n):
            cnt[codes[j]] += 1.0
            tot[codes[j]] += x[j]
        g = np.zeros((bits, bits))
        rhs = np.zeros(bits)
        for c in range(m):
            for i in range(bits):
                rhs[i] += sign[c, i] * tot[c]
                for p in range(bits):
                    g[i, p] += sign[c, i] * sign[c, p] * cnt[c]
        alpha[:] = _solve_spd(g, rhs, alpha)
        values = np.zeros(m)
        for c in range(m):
            for i in range(bits):
                values[c] += sign[c, i] * alpha[i]
        order = np.argsort(values)
        mids = np.empty(m - 1)
        for c in range(m - 1):
            mids[c] = 0.5 * (values[order[c]] + values[order[c + 1]])
        for j in range(n):  # the binary search tree: k comparisons per element
            lo = 0
            half = m >> 1
            while half > 0:
                if x[j] > mids[lo + half - 1]:
                    lo += half
                half >>= 1
            codes[j] = order[lo]
    nw = planes.shape[1]
    for i in range(bits):
        for w in range(nw):
            word = np.uint64(0)
            for b in range(min(64, n - 64 * w)):
                if (codes[64 * w + b] >> i) & 1:
                    word |= np.uint64(1) << np.uint64(b)
            planes[i, w] = word


@njit(cache=True)
def _combine(acc: np.ndarray, alpha: np.ndarray, beta: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[m] = sum_ij alpha[m, i] beta[j] acc[j, i * M + m]`` (acc: the k_a x (k_w M) binary dot products)."""
    kw = alpha.shape[1]
    m_rows = alpha.shape[0]
    for m in range(m_rows):
        s = 0.0
        for j in range(beta.shape[0]):
            t = 0.0
            for i in range(kw):
                t += alpha[m, i] * acc[j, i * m_rows + m]
            s += beta[j] * t
        out[m] = s


class MultiBitMatVec:
    """A float matrix stored as ``bits`` bit planes per row + coefficients (alternating, offline), multiplied by
    vectors quantized online to ``abits`` planes; the binary dot products run in ``binary_gemm``."""

    def __init__(self, w: torch.Tensor, bits: int, abits: int) -> None:
        self.m, self.n, self.abits = w.shape[0], w.shape[1], abits
        alpha, codes = AlternatingQuant(bits, ITERS).fit(w)  # (M, k), (M, N)
        self.w_quantized = reconstruct(alpha, codes)  # what the planes hold, for the checks
        self.alpha = alpha.double().numpy()
        # weight rows plane-major: row i * M + m holds plane i of row m
        planes = [pack_bits(((codes >> i) & 1).numpy().astype(np.uint8)) for i in range(bits)]
        self.w_planes = np.ascontiguousarray(np.concatenate(planes, axis=0))  # (k M, words(N))
        # binary_gemm recomputes per call what a padded convolution needs from the weights (tap sums, an
        # unpack of every weight bit); a matrix is a 1x1 convolution without padding: compute them once and call
        # the runtime's unchecked core with the same GEMM kernel (checked against binary_gemm in check_matvec)
        self._w4 = self.w_planes[:, None, None, :]
        self._wsum = tap_sums(self._w4, self.n)
        self.x_planes = np.zeros((abits, words(self.n)), np.uint64)
        self.beta = np.zeros(abits)
        self.out = np.empty(self.m)

    @property
    def weight_bytes(self) -> int:
        return self.w_planes.nbytes + self.alpha.astype(np.float32).nbytes  # coefficients stored as float32

    def quantize(self, x: np.ndarray) -> None:
        quantize_vector(x, self.abits, ITERS, self.x_planes, self.beta)

    def product(self) -> np.ndarray:
        acc = conv_words(self.x_planes[:, None, None, :], self._w4, self._wsum, None, self.n, 1, 0)
        acc = acc.reshape(self.abits, -1)  # (k_a, k_w M) int32: binary_gemm(x_planes, w_planes, N)
        _combine(acc, self.alpha, self.beta, self.out)
        return self.out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.quantize(x)
        return self.product()


def check_matvec(mv: MultiBitMatVec, w: torch.Tensor, x: torch.Tensor, abits: int) -> float:
    """The kernel's product against the float product of the dequantized operands; returns the relative
    error of the quantized product against the float one ``W x``."""
    y = mv(x.numpy()).copy()
    acc = binary_gemm(mv.x_planes, mv.w_planes, mv.n)  # the checked runtime entry point
    fast = conv_words(mv.x_planes[:, None, None, :], mv._w4, mv._wsum, None, mv.n, 1, 0).reshape(acc.shape)
    if not np.array_equal(acc, fast):
        raise AssertionError("the runtime's unchecked GEMM core disagrees with binary_gemm")
    wq = mv.w_quantized.double()
    xq_lib = alternating_quantize(x.double()[None], abits, ITERS)[0]
    err_lib = float(((xq_lib - x.double()) ** 2).sum())
    b = torch.from_numpy(np.unpackbits(mv.x_planes.view(np.uint8), bitorder="little")
                         .reshape(abits, -1)[:, : mv.n].astype(np.float64) * 2 - 1)  # (k_a, N) +-1
    xq = (torch.from_numpy(mv.beta)[:, None] * b).sum(0)
    err_numba = float(((xq - x.double()) ** 2).sum())
    if abs(err_numba - err_lib) > 1e-6 * err_lib:  # the numba fit is the library's alternating method
        raise AssertionError(f"online quantization differs from lowbit's alternating: error {err_numba} vs {err_lib}")
    ref = (wq @ xq).numpy()
    if not np.allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()):
        raise AssertionError(f"multi-bit product wrong: max abs diff {np.abs(y - ref).max()}")
    exact = (w.double() @ x.double()).numpy()
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


def matvec_rows(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    for m, n in shapes:
        w = torch.randn(m, n, generator=g) / n**0.5
        x = torch.randn(n, generator=g)
        for bits in (2, 3):
            mv = MultiBitMatVec(w, bits, bits)
            rel = check_matvec(mv, w, x, bits)
            xn = x.numpy()
            for threads in args.threads:
                torch.set_num_threads(threads)
                numba.set_num_threads(threads)
                fns = {"torch_fp32": partial(torch.mv, w, x), "kernel": mv.product, "e2e": partial(mv, xn),
                       "quantize_x": partial(mv.quantize, xn)}
                med = interleaved_medians(fns, rounds=5, block=max(1, args.repeats // 5))["wall"]
                t = {k: 1e6 * v for k, v in med.items()}
                key = f"matvec/W{bits}A{bits}/{m}x{n}/t{threads}"
                out[key] = {
                    "bits": f"W{bits}A{bits}", "shape": [m, n], "threads": threads,
                    "torch_fp32_us": round(t["torch_fp32"], 2), "kernel_us": round(t["kernel"], 2),
                    "e2e_us": round(t["e2e"], 2), "online_quantize_x_us": round(t["quantize_x"], 2),
                    "speedup_kernel_vs_torch_fp32": round(t["torch_fp32"] / t["kernel"], 2),
                    "speedup_e2e_vs_torch_fp32": round(t["torch_fp32"] / t["e2e"], 2),
                    "paper_speedup": PAPER_SPEEDUP[bits],
                    "weight_bytes": mv.weight_bytes, "fp32_weight_bytes": 4 * m * n,
                    "memory_ratio_vs_fp32": round(4 * m * n / mv.weight_bytes, 2),
                    "rel_error_vs_float_product": round(rel, 4), "repeats": args.repeats,
                }
                r = out[key]
                print(f"{key:28s} fp32 {r['torch_fp32_us']:9.1f} us  kernel {r['kernel_us']:8.1f} us "
                      f"({r['speedup_kernel_vs_torch_fp32']:.2f}x)  e2e {r['e2e_us']:8.1f} us "
                      f"({r['speedup_e2e_vs_torch_fp32']:.2f}x)  memory {r['memory_ratio_vs_fp32']:.1f}x")
    return out


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------


def plot(name: str) -> None:
    """Validation bpc per row (left) and the matrix-vector speedups against torch fp32 (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    rows = json.loads((RESULTS / f"{name}.json").read_text())["results"]
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    acc = [(k.split("/", 1)[1], v) for k, v in rows.items() if k.startswith("char_lstm/")]
    acc.sort(key=lambda kv: list(ROWS).index(kv[0]) if kv[0] in ROWS else 99)
    if acc:
        bpc = [v["val_bpc"] for _, v in acc]
        bars = ax1.bar([k for k, _ in acc], bpc, color=["grey" if k == "float" else "tab:blue" for k, _ in acc])
        for bar, v in zip(bars, bpc, strict=True):
            ax1.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ptq = [(k, v["ptq_val_bpc"]) for k, v in acc if v.get("ptq_val_bpc") is not None]
        if ptq:
            ax1.scatter([k for k, _ in ptq], [p for _, p in ptq], marker="x", color="tab:red", zorder=3,
                        label="quantized, no fine-tuning")
            ax1.legend(fontsize=8)
        lo, hi = min(bpc), max([*bpc, *(p for _, p in ptq)])
        ax1.set_ylim(max(0.0, lo - 0.3), hi + 0.15)
        v0 = acc[0][1]
        ax1.set_title(f"char_lstm {v0['layers']}x{v0['hidden']} on tinyshakespeare (lower is better)", fontsize=9)
    ax1.set_ylabel("validation bits per character")
    mv = [v for k, v in rows.items() if k.startswith("matvec/")]
    if mv:
        labels = [f"{v['bits']}\n{v['shape'][0] / 1024:g}Kx{v['shape'][1] / 1024:g}K\n{v['threads']}t" for v in mv]
        xs = np.arange(len(mv))
        ax2.bar(xs - 0.2, [v["speedup_kernel_vs_torch_fp32"] for v in mv], 0.4, label="binary product")
        ax2.bar(xs + 0.2, [v["speedup_e2e_vs_torch_fp32"] for v in mv], 0.4, label="+ online quantization of x")
        for bits, s in PAPER_SPEEDUP.items():
            ax2.axhline(s, color="tab:red" if bits == 2 else "tab:orange", linestyle="--", linewidth=1)
            ax2.text(len(mv) - 0.5, s, f"paper, {bits} bits: ~{s:g}x", ha="right", va="bottom", fontsize=7)
        ax2.axhline(1.0, color="black", linewidth=0.8)
        ax2.set_xticks(xs, labels, fontsize=7)
        ax2.set_ylabel("speedup vs torch fp32 mv")
        ax2.set_title("multi-bit matrix x vector (XNOR-popcount), batch 1", fontsize=9)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", format="png")


def _table(rows: dict[str, dict[str, Any]]) -> None:
    acc = {k: v for k, v in rows.items() if k.startswith("char_lstm/")}
    if acc:
        print(f"\n{'row':8s} {'val bpc':>8s} {'d vs float':>10s} {'no-FT bpc':>9s} {'paper PTB ppl':>13s} {'min':>7s}")
        for k, r in acc.items():
            ptq = f"{r['ptq_val_bpc']:.4f}" if r["ptq_val_bpc"] is not None else "-"
            d = f"{r['delta_bpc_vs_float']:+.4f}" if r.get("delta_bpc_vs_float") is not None else "-"
            print(f"{k.split('/')[1]:8s} {r['val_bpc']:8.4f} {d:>10s} {ptq:>9s} {r['paper_ptb_test_ppl']:13.1f} "
                  f"{r['train_minutes']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("accuracy", "matvec"), help="run one part only")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--init", choices=("float", "scratch"), default="float",
                    help="quantized rows: fine-tuned from the float run (default) or trained from scratch")
    ap.add_argument("--epochs", type=float, default=6.0, help="float training (and --init scratch) epochs")
    ap.add_argument("--quant-epochs", type=float, default=1.0, help="fine-tuning epochs of each quantized row")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the speed rows")
    ap.add_argument("--repeats", type=int, default=300, help="timed rounds per speed row")
    ap.add_argument("--quick", action="store_true", help="a tiny model, a few steps, few repeats (a smoke run)")
    ap.add_argument("--fresh", action="store_true", help="discard saved runs of the same settings and restart")
    args = ap.parse_args()
    args.results = "quant_rnn"
    if args.quick:
        args.results = "quant_rnn_quick"
        args.hidden, args.layers, args.batch, args.seq_len = 32, 2, 16, 64
        args.epochs, args.quant_epochs, args.repeats, args.threads = 0.01, 0.004, 30, [1]
        args.checkpoint_every = 0
        args.fresh = True  # a smoke run checks today's code: never resume one written by older code
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if args.only != "matvec":
        rows.update(accuracy_rows(args))
    if args.only != "accuracy":
        mv = matvec_rows(args)
        rows.update(mv)
    write_results(args.results, rows)
    _table(rows)
    plot(args.results)
    print(f"\nwrote {RESULTS / (args.results + '.json')} and .png in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
