"""FINN's dataflow architecture as a cost model: folding (PE x SIMD per layer), cycles, FPS, LUTs and BRAM.

In FINN every layer is its own matrix-vector-threshold unit (MVTU) and the layers run as a pipeline. A layer is
a weight matrix of ``rows`` (output channels / neurons, FINN's MatH) x ``cols`` (``K*K*in_channels`` /
in_features, MatW) applied to ``pixels`` input vectors per frame (the output pixels of a convolution, 1 for a
fully connected layer). With ``PE`` processing elements (each computing one row at a time) of ``SIMD`` lanes
(each consuming ``SIMD`` columns per cycle):

    cycles  = (rows / PE) * (cols / SIMD) * pixels           PE | rows and SIMD | cols
    FPS     = f_clk / max over layers of cycles              (the slowest layer sets the pipeline's rate)
    latency ~ sum over layers of cycles / f_clk              (each layer holds one frame; an upper estimate)

Weights live next to their PE: each PE has a memory of depth ``(rows/PE) * (cols/SIMD)`` words of
``SIMD * w_bits`` bits. A memory no deeper than ``CostModel.lutram_max_depth`` goes to LUTs (a LUT6 holds 64 x 1
bit), a deeper one to BRAM18 blocks (18 Kbit each, aspect ratios 16K x 1, 8K x 2, 4K x 4, 2K x 9, 1K x 18,
512 x 36; a memory takes the cheapest tiling). Thresholds (``2^out_bits - 1`` per row, ``acc_bits`` each) sit in
LUTs. Compute LUTs per PE: ``SIMD * w_bits * a_bits * lut_per_lane_bit`` for the products and the adder tree
(for 1 bit: XNOR + popcount) plus ``acc_bits * (1 + thresholds) * lut_per_acc_bit`` for the accumulator and
comparators. The constants of :class:`CostModel` are order-of-magnitude figures for LUT-based arithmetic on
7-series FPGAs, *not* fitted to synthesis results: use the LUT/BRAM columns to compare foldings, not to
promise a place-and-route result. Pooling, sliding-window units and FIFOs are not modelled (beyond a fixed
``lut_per_layer``); wide layers that FINN would map to DSPs are costed in LUTs like the others.

The on-chip-memory question of Yonekawa & Nakahara (all weights in BRAM, no DRAM traffic) is
:func:`weights_fit_on_chip`; the folding of a design is checked against a :class:`Budget` (``estimate``'s
``fits``). :func:`fold` is the folding optimizer: starting from the fully folded design (PE = SIMD = 1
everywhere) it repeatedly gives the bottleneck layer the smallest increase of PE * SIMD that lowers its cycles
and fits the budget, until the target FPS is reached, the budget allows no step, or the bottleneck is fully
unfolded. Since cycles depend only on PE * SIMD, among the splits of one product it takes the cheapest (fewest
BRAM18, then LUTs).

Networks: :func:`finn_network` gives FINN's SFC / LFC (3 x 256 / 3 x 1024 fully connected on 28x28
binarized MNIST) and CNV (BinaryNet-style 2x64C3 - MP - 2x128C3 - MP - 2x256C3 - 2x512FC - 10 on 32x32
CIFAR-10, no padding, 8-bit input); :data:`BNN_PYNQ_FOLDING` the PE/SIMD that FINN's authors published for
them in the BNN-PYNQ repository (``lfcW1A1`` / ``cnvW1A1`` ``hw/config.h``); :func:`layers_from_model` reads the
layers of a lowbit model.

Example:
    >>> layers = finn_network("sfc")
    >>> design = fold(layers, target_fps=1e6, budget=ZC706)
    >>> design.fps >= 1e6 and design.fits
    True
    >>> print_table(design)  # doctest: +SKIP

References:
    Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
    arXiv:1612.07119.
    Blott et al., "FINN-R: An End-to-End Deep-Learning Framework for Fast Exploration of Quantized Neural
    Networks", arXiv:1809.04570 (the resource cost functions).
    Yonekawa & Nakahara, "On-Chip Memory Based Binarized Convolutional Deep Neural Network Applying Batch
    Normalization Free Technique on an FPGA", IPDPSW 2017 (doi:10.1109/IPDPSW.2017.95).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

__all__ = [
    "BNN_PYNQ_FOLDING",
    "BRAM18_BITS",
    "BRAM18_SHAPES",
    "PYNQ_Z1",
    "ZC706",
    "Budget",
    "CostModel",
    "DataflowEstimate",
    "Folding",
    "LayerEstimate",
    "LayerSpec",
    "OnChipCheck",
    "bram18_count",
    "estimate",
    "finn_network",
    "fold",
    "layer_cost",
    "layer_cycles",
    "layers_from_model",
    "print_table",
    "weights_fit_on_chip",
]

BRAM18_BITS = 18 * 1024  # one RAMB18: 18 Kbit (16 Kbit data + 2 Kbit parity, usable in the x9/x18/x36 modes)
# (depth, width) of a RAMB18 in simple dual-port mode (7-series / UltraScale)
BRAM18_SHAPES: tuple[tuple[int, int], ...] = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
_LUT_BITS = 64  # a LUT6 as distributed ROM/RAM: 64 x 1 bit


@dataclass(frozen=True)
class LayerSpec:
    """One MVTU: a ``rows x cols`` weight matrix applied to ``pixels`` vectors per frame.

    Attributes:
        name: for tables and errors.
        rows: output channels / neurons (FINN's MatH).
        cols: ``K*K*in_channels`` for a convolution, ``in_features`` for a linear layer (MatW).
        pixels: output pixels per frame (``OFM_dim^2``), 1 for a fully connected layer.
        w_bits: weight bits (1: binary).
        a_bits: input activation bits (1: binary).
        out_bits: bits of the output activation, i.e. ``2^out_bits - 1`` thresholds per row; ``None`` when the
            layer has no threshold stage (the last layer, which outputs its accumulators).
    """

    name: str
    rows: int
    cols: int
    pixels: int = 1
    w_bits: int = 1
    a_bits: int = 1
    out_bits: int | None = 1

    def __post_init__(self) -> None:
        for attr in ("rows", "cols", "pixels", "w_bits", "a_bits"):
            _check_positive_int(f"layer {self.name!r}: {attr}", getattr(self, attr))
        if self.out_bits is not None:
            _check_positive_int(f"layer {self.name!r}: out_bits", self.out_bits)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per frame."""
        return self.rows * self.cols * self.pixels

    @property
    def weight_bits(self) -> int:
        """Bits of the weight matrix."""
        return self.rows * self.cols * self.w_bits

    @property
    def thresholds(self) -> int:
        """Thresholds per row: ``2^out_bits - 1`` (1 for a sign), 0 without a threshold stage."""
        return 0 if self.out_bits is None else 2**self.out_bits - 1

    @property
    def acc_bits(self) -> int:
        """Accumulator width: ``ceil(log2(cols + 1))`` for a popcount (1-bit weights and inputs), else enough
        for ``cols`` signed products of ``w_bits x a_bits`` bits."""
        if self.w_bits == 1 and self.a_bits == 1:
            return max(1, math.ceil(math.log2(self.cols + 1)))
        return math.ceil(math.log2(self.cols)) + self.w_bits + self.a_bits


@dataclass(frozen=True)
class Folding:
    """Parallelism of one MVTU: ``pe`` rows at a time, ``simd`` columns per cycle in each PE."""

    pe: int
    simd: int

    def __post_init__(self) -> None:
        _check_positive_int("PE", self.pe)
        _check_positive_int("SIMD", self.simd)


@dataclass(frozen=True)
class Budget:
    """FPGA resources a design may use; ``inf`` means unbounded. BRAM is counted in RAMB18 halves (a RAMB36 is 2)."""

    luts: float = math.inf
    bram18: float = math.inf
    name: str = ""

    def __post_init__(self) -> None:
        for attr in ("luts", "bram18"):
            v = getattr(self, attr)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"Budget.{attr} must be a number >= 0 (inf for no limit), got {v!r}")


ZC706 = Budget(luts=218_600, bram18=1_090, name="ZC706 (XC7Z045)")  # 545 RAMB36; the board of the FINN paper
PYNQ_Z1 = Budget(luts=53_200, bram18=280, name="PYNQ-Z1 (XC7Z020)")  # 140 RAMB36; the board of BNN-PYNQ


@dataclass(frozen=True)
class CostModel:
    """Constants of the LUT/BRAM model (see the module docstring); order of magnitude, not synthesis results.

    Attributes:
        lut_per_lane_bit: LUTs per SIMD lane and per product bit (``w_bits * a_bits``): the XNOR/product and
            its share of the adder (popcount) tree.
        lut_per_acc_bit: LUTs per accumulator bit, for the accumulator and for each threshold comparator.
        lut_per_layer: fixed LUTs per layer (control, stream interfaces).
        lutram_max_depth: weight memories no deeper than this are built from LUTs instead of BRAM18.
    """

    lut_per_lane_bit: float = 1.5
    lut_per_acc_bit: float = 1.0
    lut_per_layer: float = 300.0
    lutram_max_depth: int = 64


@dataclass(frozen=True)
class LayerEstimate:
    """Cycles and resources of one layer at one folding; ``mem_depth x mem_width`` is each PE's weight memory."""

    spec: LayerSpec
    folding: Folding
    cycles: int
    lut: float
    bram18: int
    mem_depth: int
    mem_width: int
    weight_memory: str  # "lutram" or "bram"


@dataclass(frozen=True)
class DataflowEstimate:
    """A folded pipeline: per-layer :class:`LayerEstimate` and the design's FPS, latency and resources."""

    layers: tuple[LayerEstimate, ...]
    f_clk_mhz: float
    budget: Budget = field(default_factory=Budget)
    target_fps: float | None = None

    @property
    def max_cycles(self) -> int:
        return max(layer.cycles for layer in self.layers)

    @property
    def bottleneck(self) -> str:
        """Name of the slowest layer (the first one on a tie)."""
        return max(self.layers, key=lambda layer: layer.cycles).spec.name

    @property
    def fps(self) -> float:
        """Frames per second: ``f_clk / max cycles``."""
        return self.f_clk_mhz * 1e6 / self.max_cycles

    @property
    def latency_us(self) -> float:
        """``sum of cycles / f_clk`` in microseconds (each layer buffering one whole frame)."""
        return sum(layer.cycles for layer in self.layers) / self.f_clk_mhz

    @property
    def lut(self) -> float:
        return sum(layer.lut for layer in self.layers)

    @property
    def bram18(self) -> int:
        return sum(layer.bram18 for layer in self.layers)

    @property
    def fits(self) -> bool:
        """LUTs and BRAM18 within the budget."""
        return self.lut <= self.budget.luts and self.bram18 <= self.budget.bram18

    @property
    def meets_target(self) -> bool:
        return self.target_fps is None or self.fps >= self.target_fps

    @property
    def foldings(self) -> list[Folding]:
        return [layer.folding for layer in self.layers]

    def table(self, title: str = "") -> Table:
        """A rich table: layer, rows, cols, pixels, PE, SIMD, cycles, LUT, BRAM18, weight memory; totals below."""
        t = Table(title=title or None)
        t.add_column("layer")
        for col in ("rows", "cols", "pixels", "PE", "SIMD", "cycles", "LUT", "BRAM18", "weight mem"):
            t.add_column(col, justify="right")
        for layer in self.layers:
            s, f = layer.spec, layer.folding
            mem = f"{layer.mem_depth}x{layer.mem_width} {layer.weight_memory}"
            style = "bold" if s.name == self.bottleneck else None
            t.add_row(s.name, str(s.rows), str(s.cols), str(s.pixels), str(f.pe), str(f.simd), str(layer.cycles),
                      _count(layer.lut), str(layer.bram18), mem, style=style)
        t.add_section()
        t.add_row("total", "", "", "", "", "", str(self.max_cycles) + " max", _count(self.lut), str(self.bram18), "",
                  style="bold")
        budget = self.budget.name or f"{_count(self.budget.luts)} LUT, {self.budget.bram18:g} BRAM18"
        target = "" if self.target_fps is None else f" (target {_count(self.target_fps)})"
        t.caption = (
            f"{_count(self.fps)} FPS{target} at {self.f_clk_mhz:g} MHz, latency {self.latency_us:.3g} us, "
            f"bottleneck {self.bottleneck}; budget {budget}: {'fits' if self.fits else 'DOES NOT FIT'}"
        )
        return t

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with the per-layer folding."""
        return {
            "fps": self.fps,
            "latency_us": self.latency_us,
            "max_cycles": self.max_cycles,
            "lut": self.lut,
            "bram18": self.bram18,
            "fits": self.fits,
            "bottleneck": self.bottleneck,
            "f_clk_mhz": self.f_clk_mhz,
            "layers": [
                {"name": x.spec.name, "rows": x.spec.rows, "cols": x.spec.cols, "pixels": x.spec.pixels,
                 "pe": x.folding.pe, "simd": x.folding.simd, "cycles": x.cycles, "lut": x.lut, "bram18": x.bram18}
                for x in self.layers
            ],
        }


@dataclass(frozen=True)
class OnChipCheck:
    """Do all weights fit in the budget's BRAM? ``min_bram18`` is the lower bound ``ceil(bits / 18 Kbit)``."""

    weight_bits: int
    capacity_bits: float
    min_bram18: int
    fits: bool


def _check_positive_int(what: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")


def _count(n: float) -> str:
    if math.isinf(n):
        return "inf"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.4g}"


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def layer_cycles(spec: LayerSpec, folding: Folding) -> int:
    """``(rows / PE) * (cols / SIMD) * pixels``; PE must divide rows and SIMD cols (``ValueError`` listing the
    allowed values otherwise).

    Example:
        >>> layer_cycles(LayerSpec("fc0", rows=1024, cols=832), Folding(pe=32, simd=64))  # BNN-PYNQ LFC L0
        416
    """
    if spec.rows % folding.pe:
        raise ValueError(f"layer {spec.name!r}: PE {folding.pe} does not divide rows {spec.rows}; "
                         f"allowed PE: {_divisors(spec.rows)}")
    if spec.cols % folding.simd:
        raise ValueError(f"layer {spec.name!r}: SIMD {folding.simd} does not divide cols {spec.cols}; "
                         f"allowed SIMD: {_divisors(spec.cols)}")
    return (spec.rows // folding.pe) * (spec.cols // folding.simd) * spec.pixels


def bram18_count(depth: int, width: int) -> int:
    """RAMB18 blocks for one ``depth x width``-bit memory: the cheapest tiling by one aspect ratio of
    :data:`BRAM18_SHAPES` (``min over (d, w) of ceil(depth/d) * ceil(width/w)``).

    Example:
        >>> bram18_count(512, 36), bram18_count(1024, 36), bram18_count(100, 64)
        (1, 2, 2)
    """
    _check_positive_int("memory depth", depth)
    _check_positive_int("memory width", width)
    return min(math.ceil(depth / d) * math.ceil(width / w) for d, w in BRAM18_SHAPES)


def layer_cost(spec: LayerSpec, folding: Folding, cost: CostModel | None = None) -> LayerEstimate:
    """Cycles, LUTs and BRAM18 of one layer at ``folding`` under ``cost`` (see the module docstring)."""
    cost = cost or CostModel()
    cycles = layer_cycles(spec, folding)
    pe, simd = folding.pe, folding.simd
    depth = (spec.rows // pe) * (spec.cols // simd)  # weight words per PE
    width = simd * spec.w_bits
    lut = cost.lut_per_layer
    lut += pe * simd * spec.w_bits * spec.a_bits * cost.lut_per_lane_bit
    lut += pe * spec.acc_bits * (1 + spec.thresholds) * cost.lut_per_acc_bit
    if spec.thresholds:  # threshold memory: rows/PE entries of acc_bits x thresholds per PE, in LUTs
        lut += pe * math.ceil((spec.rows // pe) / _LUT_BITS) * spec.acc_bits * spec.thresholds
    if depth <= cost.lutram_max_depth:
        lut += pe * math.ceil(depth / _LUT_BITS) * width
        bram, kind = 0, "lutram"
    else:
        bram, kind = pe * bram18_count(depth, width), "bram"
    return LayerEstimate(spec, folding, cycles, float(lut), bram, depth, width, kind)


def _check_layers(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    layers = list(layers)
    if not layers:
        raise ValueError("a dataflow design needs at least one layer")
    for layer in layers:
        if not isinstance(layer, LayerSpec):
            raise TypeError(f"layers must be LayerSpec, got {type(layer).__name__}")
    return layers


def _check_clock(f_clk_mhz: float) -> float:
    if not isinstance(f_clk_mhz, (int, float)) or not math.isfinite(f_clk_mhz) or f_clk_mhz <= 0:
        raise ValueError(f"f_clk_mhz must be a finite number > 0, got {f_clk_mhz!r}")
    return float(f_clk_mhz)


def estimate(
    layers: Sequence[LayerSpec],
    foldings: Sequence[Folding | tuple[int, int]],
    f_clk_mhz: float = 200.0,
    budget: Budget | None = None,
    cost: CostModel | None = None,
) -> DataflowEstimate:
    """Cycles, FPS, latency and resources of ``layers`` at the given per-layer ``(PE, SIMD)``.

    Args:
        layers: the MVTUs in pipeline order.
        foldings: one :class:`Folding` or ``(pe, simd)`` per layer.
        f_clk_mhz: clock in MHz (FINN's ZC706 designs: 200).
        budget: resources to check ``fits`` against (default: unbounded).
        cost: the LUT/BRAM constants.

    Returns:
        :class:`DataflowEstimate`.

    Example:
        >>> est = estimate([LayerSpec("fc", 64, 64)], [(8, 16)], f_clk_mhz=100)
        >>> est.max_cycles, est.fps
        (32, 3125000.0)
    """
    layers = _check_layers(layers)
    if len(foldings) != len(layers):
        raise ValueError(f"need one folding per layer: {len(layers)} layers, {len(foldings)} foldings")
    folds = [f if isinstance(f, Folding) else Folding(*f) for f in foldings]
    est = [layer_cost(spec, f, cost) for spec, f in zip(layers, folds, strict=True)]
    return DataflowEstimate(tuple(est), _check_clock(f_clk_mhz), budget or Budget())


def _fits(lut: float, bram: float, budget: Budget) -> bool:
    return lut <= budget.luts and bram <= budget.bram18


def fold(
    layers: Sequence[LayerSpec],
    target_fps: float,
    budget: Budget | None = None,
    f_clk_mhz: float = 200.0,
    cost: CostModel | None = None,
) -> DataflowEstimate:
    """Choose PE/SIMD per layer for ``target_fps`` within ``budget``, balancing the pipeline.

    Greedy, from the fully folded design (PE = SIMD = 1): while the FPS is below the target, the bottleneck
    layer (most cycles; the first on a tie) moves to the smallest PE * SIMD above its current one (cycles
    depend only on the product) whose design still fits the budget, taking the cheapest split of that product
    (fewest BRAM18, then LUTs, then the larger SIMD). It stops at the target, when no step of the bottleneck
    fits, or when the bottleneck is fully unfolded (PE = rows, SIMD = cols). Every layer thus ends at the largest
    cycle count it can have at or below the final bottleneck's, and a higher target only continues the same
    sequence of steps: with an unbounded budget the FPS never decreases as the target grows.

    Args:
        layers: the MVTUs in pipeline order.
        target_fps: frames per second wanted (``math.inf``: as fast as the budget allows).
        budget: resources (default unbounded; :data:`ZC706`, :data:`PYNQ_Z1`).
        f_clk_mhz: clock in MHz.
        cost: the LUT/BRAM constants.

    Returns:
        :class:`DataflowEstimate`; check ``meets_target`` (False when the budget or the network's full
        parallelism stopped it first).

    Raises:
        ValueError: a non-positive target, or a budget that even the fully folded design exceeds.

    Example:
        >>> design = fold(finn_network("lfc"), target_fps=1.5e6, budget=ZC706)
        >>> design.meets_target, design.max_cycles <= 200e6 / 1.5e6
        (True, True)
    """
    layers = _check_layers(layers)
    f_clk = _check_clock(f_clk_mhz)
    if not isinstance(target_fps, (int, float)) or math.isnan(target_fps) or target_fps <= 0:
        raise ValueError(f"target_fps must be a number > 0 (inf: as fast as possible), got {target_fps!r}")
    budget = budget or Budget()
    cost = cost or CostModel()
    current = [layer_cost(spec, Folding(1, 1), cost) for spec in layers]
    lut = sum(x.lut for x in current)
    bram = sum(x.bram18 for x in current)
    if not _fits(lut, bram, budget):
        raise ValueError(
            f"budget {budget.name + ' ' if budget.name else ''}({_count(budget.luts)} LUT, {budget.bram18:g} BRAM18) "
            "is too small even "
            f"for the fully folded design (PE = SIMD = 1 everywhere), which needs {_count(lut)} LUT and "
            f"{bram} BRAM18"
        )
    max_cycles = f_clk * 1e6 / target_fps  # the slowest layer may take at most this many cycles
    products = {}  # per layer: sorted products p * s with their splits
    for i, spec in enumerate(layers):
        splits: dict[int, list[tuple[int, int]]] = {}
        for p in _divisors(spec.rows):
            for s in _divisors(spec.cols):
                splits.setdefault(p * s, []).append((p, s))
        products[i] = sorted(splits.items())
    while True:
        b = max(range(len(layers)), key=lambda i: (current[i].cycles, -i))
        if current[b].cycles <= max_cycles:
            break
        now = current[b].folding.pe * current[b].folding.simd
        step = None
        for product, splits in products[b]:
            if product <= now:
                continue
            options = [layer_cost(layers[b], Folding(p, s), cost) for p, s in splits]
            options.sort(key=lambda x: (x.bram18, x.lut, -x.folding.simd))
            new = options[0]
            if _fits(lut - current[b].lut + new.lut, bram - current[b].bram18 + new.bram18, budget):
                step = new
                break
        if step is None:  # fully unfolded, or no larger product fits the budget
            break
        lut += step.lut - current[b].lut
        bram += step.bram18 - current[b].bram18
        current[b] = step
    return DataflowEstimate(tuple(current), f_clk, budget, float(target_fps))


def weights_fit_on_chip(layers: Sequence[LayerSpec], budget: Budget) -> OnChipCheck:
    """Yonekawa & Nakahara's question: can all weights stay in on-chip BRAM (no DRAM weight traffic)?

    ``fits`` when the weight bits do not exceed ``budget.bram18 * 18 Kbit``; ``min_bram18 = ceil(bits / 18 Kbit)``
    is the lower bound a perfectly packed layout reaches (a folded design needs more: see
    :meth:`DataflowEstimate.bram18`, and small memories may go to LUTs instead).

    Example:
        >>> weights_fit_on_chip(finn_network("lfc"), ZC706).fits
        True
    """
    layers = _check_layers(layers)
    bits = sum(layer.weight_bits for layer in layers)
    capacity = budget.bram18 * BRAM18_BITS
    return OnChipCheck(bits, capacity, math.ceil(bits / BRAM18_BITS), bits <= capacity)


def print_table(design: DataflowEstimate, title: str = "", console: Console | None = None) -> None:
    """Print :meth:`DataflowEstimate.table` (to ``console`` or stdout, at least 120 columns wide)."""
    console = console or Console(width=max(120, Console().width))
    console.print(design.table(title))


# ----------------------------------------------------------------------------------------------------------------
# FINN's networks and the folding published for them


def _mlp(width: int, in_features: int, classes: int) -> list[LayerSpec]:
    return [
        LayerSpec("fc0", width, in_features),
        LayerSpec("fc1", width, width),
        LayerSpec("fc2", width, width),
        LayerSpec("fc3", classes, width, out_bits=None),
    ]


def _cnv(classes: int) -> list[LayerSpec]:
    # 32x32x3 8-bit input; 3x3 convolutions without padding: 30, 28, pool 14, 12, 10, pool 5, 3, 1
    convs = [("conv0", 3, 64, 30), ("conv1", 64, 64, 28), ("conv2", 64, 128, 12), ("conv3", 128, 128, 10),
             ("conv4", 128, 256, 3), ("conv5", 256, 256, 1)]
    layers = [LayerSpec(n, cout, 9 * cin, out * out, a_bits=8 if n == "conv0" else 1) for n, cin, cout, out in convs]
    layers += [LayerSpec("fc0", 512, 256), LayerSpec("fc1", 512, 512), LayerSpec("fc2", classes, 512, out_bits=None)]
    return layers


def finn_network(name: str, padded: bool = False) -> list[LayerSpec]:
    """FINN's benchmark networks as MVTU layer specs (binary weights and activations).

    - ``"sfc"``: 784 -> 256 -> 256 -> 256 -> 10 on binarized 28x28 MNIST;
    - ``"lfc"``: 784 -> 1024 -> 1024 -> 1024 -> 10;
    - ``"cnv"``: 3x3 convolutions without padding, 64, 64, (max-pool), 128, 128, (max-pool), 256, 256, then
      fully connected 512, 512, 10, on 32x32 CIFAR-10 with an 8-bit input to the first layer.

    The last layer of each outputs accumulators (no thresholds). ``padded=True`` gives the matrix sizes of the
    BNN-PYNQ hardware (MNIST input 784 -> 832 = 13 * 64, 10 classes -> 64 rows), which its published folding
    (:data:`BNN_PYNQ_FOLDING`) divides.

    Example:
        >>> [(x.rows, x.cols, x.pixels) for x in finn_network("cnv")[:2]]
        [(64, 27, 900), (64, 576, 784)]

    References:
        Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
        arXiv:1612.07119 (Section 5: SFC, LFC, CNV).
    """
    key = name.lower()
    inputs, classes = (832, 64) if padded else (784, 10)
    if key == "sfc":
        return _mlp(256, inputs, classes)
    if key == "lfc":
        return _mlp(1024, inputs, classes)
    if key == "cnv":
        return _cnv(64 if padded else 10)
    raise KeyError(f"unknown FINN network {name!r}; known: sfc, lfc, cnv")


# (PE, SIMD) per layer of FINN's BNN-PYNQ designs for the PYNQ-Z1 at 100 MHz, from the repository's
# bnn/src/network/{lfcW1A1,cnvW1A1}/hw/config.h (matrices: finn_network(name, padded=True)).
BNN_PYNQ_FOLDING: dict[str, tuple[tuple[int, int], ...]] = {
    "lfc": ((32, 64), (64, 32), (32, 64), (16, 8)),
    "cnv": ((16, 3), (32, 32), (16, 32), (16, 32), (4, 32), (1, 32), (1, 4), (1, 8), (4, 1)),
}


# ----------------------------------------------------------------------------------------------------------------
# layers of a lowbit model


def _quant_bits(module: nn.Module, attr: str, default: int) -> int:
    q = getattr(module, attr, None)
    if q is None:
        return default
    bw = getattr(q, "bit_width", None)
    if bw is None:
        raise TypeError(f"{type(module).__name__}.{attr} ({type(q).__name__}) has no bit_width")
    bw = float(bw.item() if isinstance(bw, torch.Tensor) else bw)
    return max(1, math.ceil(bw - 1e-6))  # ternary: log2(3) = 1.58 bits -> 2


def layers_from_model(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    example: torch.Tensor | None = None,
    input_bits: int = 8,
) -> list[LayerSpec]:
    """The MVTU layers of a model: every ``nn.Conv2d`` and ``nn.Linear`` (lowbit's quantized ones included), in
    the order they run, with their output shapes from one traced forward pass (:func:`lowbit.hw.profile`).

    Bits come from the quantizers (the quantized-layer contract): ``w_bits`` from ``weight_quantizer``,
    ``a_bits`` from ``input_quantizer``; a layer without an input quantizer reads ``input_bits`` if it is the
    first (the image, 8 bits as in FINN's CNV) and 32 otherwise, a layer without a weight quantizer 32. A layer's
    ``out_bits`` is the next layer's ``a_bits`` (``None`` for the last layer, or when the next one reads more than
    16 bits). Norms, activations and pooling are not MVTUs (FINN folds them into thresholds or streams them).

    Args:
        model: the network.
        input_shape: without the batch, as for :func:`lowbit.hw.profile` (default: the model's).
        example: an input to trace with instead (batch 1 preferred).
        input_bits: bits of the first layer's input when it has no input quantizer.

    Raises:
        ValueError: a grouped/depthwise or dilated convolution, or another layer with MACs the MVTU model does
            not cover (recurrent, attention, 1-D/3-D convolutions), named in the message; a model without layers.

    Example:
        >>> from lowbit.models import create_model
        >>> [(x.rows, x.cols) for x in layers_from_model(create_model("mlp_bnn", width=64, depth=2))]
        [(64, 784), (64, 64), (10, 64)]
    """
    from lowbit.hw.counts import profile

    _check_positive_int("input_bits", input_bits)
    stats = profile(model, input_shape=input_shape, example=example)
    specs: list[LayerSpec] = []
    for row in stats.layers:
        module = model.get_submodule(row.name) if row.name else model
        if isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.dilation != (1, 1):
                raise ValueError(f"layer {row.name!r} ({type(module).__name__}): groups={module.groups}, "
                                 f"dilation={module.dilation}; the MVTU model covers dense convolutions "
                                 "(groups=1, dilation=1) only")
            kh, kw = module.kernel_size
            rows, cols = module.out_channels, kh * kw * module.in_channels
            pixels = row.output_shape[-1] * row.output_shape[-2]
        elif isinstance(module, nn.Linear):
            rows, cols = module.out_features, module.in_features
            pixels = math.prod(row.output_shape[1:-1]) if len(row.output_shape) > 2 else 1
        elif row.macs == 0:
            continue  # a module holding parameters but no matrix product (e.g. a scale)
        else:
            raise ValueError(f"layer {row.name!r} is a {type(module).__name__}, which the MVTU model does not cover "
                             "(supported: nn.Conv2d with groups=1, nn.Linear)")
        w_bits = _quant_bits(module, "weight_quantizer", 32)
        a_bits = _quant_bits(module, "input_quantizer", input_bits if not specs else 32)
        specs.append(LayerSpec(row.name, rows, cols, pixels, w_bits, a_bits, out_bits=None))
    if not specs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to map to MVTUs")
    for i in range(len(specs) - 1):
        nxt = specs[i + 1].a_bits
        specs[i] = replace(specs[i], out_bits=nxt if nxt <= 16 else None)
    return specs
