"""What quantization-aware training costs: one QAT training step against one float step on ResNet-20.

    python -m bench.qat_step_cost                       # every method, 20 timed steps each after 3 warm-up
    python -m bench.qat_step_cost --methods ttq lab --steps 40
    python -m bench.qat_step_cost --profile laq_3bit    # also print torch.profiler's table of one QAT step
    python -m bench.qat_step_cost --quick               # 3 timed steps each

A step is what ``lowbit.train.fit`` does per batch: forward, cross-entropy (+ the callbacks' extra loss),
backward, Adam step, the callbacks' ``after_step`` (weight clipping, LossAware's refit). Both models are the
same ResNet-20 initialization on a batch of 128 CIFAR-shaped images (random values: the cost does not depend
on them), channels-last as ``fit`` trains, the same optimizer (Adam), in one process with the same threads.
The float and QAT steps alternate (float, QAT, float, QAT, ...), so that a slow phase of the machine hits
both, and each side reports its median; ``ratio`` = median QAT / median float wall time (issue 4's target: <= 2);
``cpu_time_ratio`` is the same with the process's CPU time, less disturbed by other load on the machine. The W1A1
rows replace ResNet-20's ReLUs (Hardtanh for BNN, none for BNN+); for them a third step, the float model with the
same activations, is interleaved too (``ratio_vs_float_same_act``): without ReLU, whose backward restores the
channels-last layout of the gradient that the global average pool's backward returns contiguous, PyTorch's
BatchNorm backward takes its slower mixed-layout path, a cost of the activation swap, not of the quantizers.
The quantized models are those of ``bench.quant_cifar`` (first and last layer float). Results go to
``bench/results/qat_step_cost.json`` (not in ``--quick`` runs).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench._common import write_results
from bench.quant_cifar import RESNET20, make_callbacks, quantize_model, swap_activations
from lowbit.models import create_model
from lowbit.timing import interleaved_medians

TARGET_RATIO = 2.0


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, callbacks: Sequence[object] = (),
              lr: float = 1e-3) -> Callable[[], None]:
    """One training step of ``model`` on ``(x, y)`` with Adam and ``callbacks``, as ``lowbit.train.fit`` runs it."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for cb in callbacks:
        if hasattr(cb, "on_fit_start"):
            cb.on_fit_start(model, opt)
    extra = [cb.extra_loss for cb in callbacks if hasattr(cb, "extra_loss")]
    after = [cb.after_step for cb in callbacks if hasattr(cb, "after_step")]
    model.train()
    count = [0]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        for fn in extra:
            term = fn(model)
            if term is not None:
                loss = loss + term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count[0] += 1
        for fn in after:
            fn(model, count[0])

    return step


def build_steps(method: str, channels_last: bool = True, batch: int = 128) -> dict[str, Callable[[], None]]:
    """Training steps of ResNet-20 from one initialization on one batch: ``float`` (the ReLU baseline), ``qat``
    (quantized for ``method``) and, for a method that swaps the ReLUs (the W1A1 rows), ``float_act``: the float
    model with the same activations, which isolates the cost of the quantizers from that of the swap."""
    torch.manual_seed(0)
    base = create_model("resnet20")
    spec = RESNET20[method]
    models = {"float": base, "qat": copy.deepcopy(base)}
    quantize_model(models["qat"], spec)
    if spec.act != "relu":
        models["float_act"] = copy.deepcopy(base)
        swap_activations(models["float_act"], spec.act)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    for m in models.values():
        m.to(memory_format=fmt)
    return {k: make_step(m, x, y, make_callbacks(spec) if k == "qat" else ()) for k, m in models.items()}


def profile_step(step: Callable[[], None], rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = [m for m in RESNET20 if m != "float_ft"]
    ap.add_argument("--methods", nargs="+", choices=methods, default=methods)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each side per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", nargs="*", default=[], metavar="METHOD",
                    help="print torch.profiler's per-op table of one QAT step of these methods")
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up; prints, writes no results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup = 3, 1
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'method':14s} {'float ms':>9s} {'QAT ms':>9s} {'ratio':>6s} {'(CPU)':>6s} {'vs float, same act':>6s}")
    for method in args.methods:
        steps = build_steps(method)
        med = interleaved_medians(steps, rounds=args.steps, warmup=args.warmup,
                                  clocks={"wall": time.perf_counter, "cpu": time.process_time})
        wall, cpu = med["wall"], med["cpu"]
        ratio = wall["qat"] / wall["float"]
        row = rows[method] = {
            "bits": RESNET20[method].bits, "float_step_ms": round(1e3 * wall["float"], 1),
            "qat_step_ms": round(1e3 * wall["qat"], 1), "ratio": round(ratio, 3),
            "cpu_time_ratio": round(cpu["qat"] / cpu["float"], 3),
            "meets_target": ratio <= TARGET_RATIO, "target_ratio": TARGET_RATIO}
        if "float_act" in steps:
            row.update({"activation": RESNET20[method].act, "float_same_act_step_ms": round(1e3 * wall["float_act"], 1),
                        "ratio_vs_float_same_act": round(wall["qat"] / wall["float_act"], 3),
                        "cpu_time_ratio_vs_float_same_act": round(cpu["qat"] / cpu["float_act"], 3)})
        row.update({"steps": args.steps, "warmup": args.warmup, "batch": 128, "threads": torch.get_num_threads(),
                    "compared_against": "the float ResNet-20 step (torch fp32, oneDNN), same process, interleaved"})
        same = f"{row['ratio_vs_float_same_act']:6.2f}" if "float_act" in steps else "     -"
        print(f"{method:14s} {row['float_step_ms']:9.1f} {row['qat_step_ms']:9.1f} {ratio:6.2f} "
              f"{row['cpu_time_ratio']:6.2f} {same}")
        if method in args.profile:
            print(profile_step(steps["qat"]))
    if not args.quick:
        print(f"wrote {write_results('qat_step_cost', rows)}")


if __name__ == "__main__":
    main()
