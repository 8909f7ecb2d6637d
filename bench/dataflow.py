"""FINN's SFC / LFC / CNV through lowbit's dataflow estimator: folding tables, FPS against the paper, FPS per budget.

    python -m bench.dataflow            # tables, bench/results/dataflow.json and dataflow.png (a few seconds)
    python -m bench.dataflow --quick    # fewer points on the budget curve

Designs per network (binary weights and activations, CNV's first layer reads the 8-bit image):

    zc706_paper_fps   fold() for the FPS the FINN paper measured on a ZC706 at 200 MHz, in the ZC706's
                      LUT/BRAM: the smallest balanced folding that reaches it (compare fps / latency with the paper)
    zc706_max         fold() for the highest FPS the ZC706 budget allows under lowbit's cost model
    pynq_z1_max       the same for the smaller PYNQ-Z1 (XC7Z020) at 100 MHz
    bnn_pynq          (lfc, cnv) the PE/SIMD FINN's authors published for the PYNQ-Z1 (BNN-PYNQ config.h), 100 MHz

The estimate counts compute cycles only (no stalls, no I/O), so it should sit at or somewhat above a measured
FPS; LUT/BRAM come from an order-of-magnitude cost model (see lowbit.hw.dataflow), not from synthesis.
The PNG plots the FPS that fold() reaches against the LUT budget (BRAM fixed at the ZC706's 1090 BRAM18).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench._common import RESULTS, write_results
from lowbit.hw.dataflow import BNN_PYNQ_FOLDING, PYNQ_Z1, ZC706, Budget, estimate, finn_network, fold

# FINN (Umuroglu et al. 2017, arXiv:1612.07119), ZC706 at 200 MHz, measured. SFC and CNV: the abstract
# (../shared/reference/papers.md, verified); LFC: recalled, not verified against the paper ([R] there).
PAPER = {
    "sfc": {"fps": 12.3e6, "latency_us": 0.31},
    "lfc": {"fps": 1.56e6, "latency_us": None},
    "cnv": {"fps": 21906.0, "latency_us": 283.0},
}
NETS = ("sfc", "lfc", "cnv")


def _row(design: Any, paper: dict[str, Any] | None = None) -> dict[str, Any]:
    row = {
        "fps": design.fps,
        "latency_us": design.latency_us,
        "max_cycles": design.max_cycles,
        "bottleneck": design.bottleneck,
        "lut": design.lut,
        "bram18": design.bram18,
        "fits": design.fits,
        "f_clk_mhz": design.f_clk_mhz,
        "folding_pe_simd": [[f.pe, f.simd] for f in design.foldings],
    }
    if paper:
        row["paper_fps"] = paper["fps"]
        row["fps_ratio_vs_paper"] = design.fps / paper["fps"]
        if paper["latency_us"]:
            row["paper_latency_us"] = paper["latency_us"]
            row["latency_ratio_vs_paper"] = design.latency_us / paper["latency_us"]
    return row


def curve(points: int) -> dict[str, list[tuple[float, float]]]:
    """Per network: (LUT budget, FPS that fold() reaches) with BRAM at the ZC706's, skipping too-small budgets."""
    budgets = np.geomspace(3e3, 4e5, points)
    out: dict[str, list[tuple[float, float]]] = {}
    for net in NETS:
        layers = finn_network(net)
        pts = []
        for luts in budgets:
            try:
                design = fold(layers, math.inf, Budget(luts=float(luts), bram18=ZC706.bram18))
            except ValueError:  # not even the fully folded design fits
                continue
            pts.append((float(luts), design.fps))
        out[net] = pts
    return out


def plot(points: dict[str, list[tuple[float, float]]], path: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for net, color in zip(NETS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        if points[net]:
            x, y = zip(*points[net], strict=True)
            ax.plot(x, y, marker="o", markersize=3, color=color, label=f"{net.upper()} (fold, 200 MHz)")
        ax.axhline(PAPER[net]["fps"], color=color, linestyle="--", linewidth=0.8)
        ax.text(3.2e3, PAPER[net]["fps"], f"FINN {net.upper()}-max, measured", color=color, fontsize=7,
                va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(ZC706.luts, color="grey", linestyle=":", linewidth=0.8)
    ax.text(ZC706.luts, ax.get_ylim()[1] / 2, "ZC706 LUTs ", color="grey", fontsize=7, rotation=90, ha="right",
            va="top")
    ax.set_xlabel("LUT budget (BRAM18 budget 1090, the ZC706's)")
    ax.set_ylabel("frames per second")
    ax.set_title("FINN dataflow estimate: FPS the folding optimizer reaches per LUT budget")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 points on the budget curve instead of 40")
    args = ap.parse_args()
    console = Console(width=140)
    rows: dict[str, dict[str, Any]] = {}
    for net in NETS:
        layers = finn_network(net)
        designs = {
            "zc706_paper_fps": fold(layers, PAPER[net]["fps"], ZC706, f_clk_mhz=200.0),
            "zc706_max": fold(layers, math.inf, ZC706, f_clk_mhz=200.0),
            "pynq_z1_max": fold(layers, math.inf, PYNQ_Z1, f_clk_mhz=100.0),
        }
        if net in BNN_PYNQ_FOLDING:
            designs["bnn_pynq"] = estimate(finn_network(net, padded=True), BNN_PYNQ_FOLDING[net], 100.0, PYNQ_Z1)
        for key, design in designs.items():
            console.print(design.table(f"{net.upper()}: {key}"))
            rows[f"{net}/{key}"] = _row(design, PAPER[net] if key == "zc706_paper_fps" else None)

    summary = Table(title="FINN networks: estimate vs the paper (ZC706, 200 MHz)")
    for col in ("network", "design", "FPS", "paper FPS", "ratio", "latency us", "paper us", "LUT", "BRAM18"):
        summary.add_column(col, justify="right" if col not in ("network", "design") else "left")
    for key, row in rows.items():
        net, design = key.split("/")
        summary.add_row(net, design, f"{row['fps']:,.0f}", f"{row['paper_fps']:,.0f}" if "paper_fps" in row else "",
                        f"{row['fps_ratio_vs_paper']:.3f}" if "fps_ratio_vs_paper" in row else "",
                        f"{row['latency_us']:.3g}", f"{row['paper_latency_us']:g}" if "paper_latency_us" in row else "",
                        f"{row['lut']:,.0f}", str(row["bram18"]))
    console.print(summary)

    points = curve(8 if args.quick else 40)
    for net, pts in points.items():
        rows[f"{net}/fps_vs_lut_budget"] = {"lut_budget": [p[0] for p in pts], "fps": [p[1] for p in pts],
                                            "bram18_budget": ZC706.bram18}
    path = write_results("dataflow", rows)
    png = RESULTS / "dataflow.png"
    plot(points, png)
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
