"""FINN dataflow estimator: published foldings and FPS, the optimizer's guarantees, resource model, errors."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from rich.console import Console
from torch import nn

from lowbit.hw.dataflow import (
    BNN_PYNQ_FOLDING,
    PYNQ_Z1,
    ZC706,
    Budget,
    Folding,
    LayerSpec,
    bram18_count,
    estimate,
    finn_network,
    fold,
    layer_cost,
    layers_from_model,
    print_table,
    weights_fit_on_chip,
)
from lowbit.models import create_model
from lowbit.nn import QuantConv2d
from lowbit.quant import QuantConfig, quantize_
from lowbit.quant.binary import SteSign

# "Ext Latency" (cycles per frame) of every layer, as printed in the comments of Xilinx/BNN-PYNQ
# bnn/src/network/{lfcW1A1,cnvW1A1}/hw/config.h (the Finnthesizer's output for the published folding)
PUBLISHED_CYCLES = {
    "lfc": [416, 512, 512, 512],
    "cnv": [32400, 28224, 20736, 28800, 20736, 18432, 32768, 32768, 8192],
}
# FINN paper (arXiv:1612.07119), ZC706 at 200 MHz, measured: SFC-max 12.3M FPS (0.31 us), CNV-max 21,906 FPS
# (283 us); LFC-max about 1.56M FPS (recalled, ../shared/reference/papers.md marks it [R])
PAPER_FPS = {"sfc": 12.3e6, "lfc": 1.56e6, "cnv": 21906.0}
PAPER_LATENCY_US = {"sfc": 0.31, "cnv": 283.0}
FPS_TOLERANCE = 0.15  # the estimate ignores stalls and I/O, so it may exceed the measured FPS by up to 15%
LATENCY_TOLERANCE = 0.20


@pytest.mark.parametrize("net", ["lfc", "cnv"])
def test_published_bnn_pynq_folding_gives_the_published_cycles(net: str) -> None:
    design = estimate(finn_network(net, padded=True), BNN_PYNQ_FOLDING[net], f_clk_mhz=100.0)
    assert [layer.cycles for layer in design.layers] == PUBLISHED_CYCLES[net]
    assert design.fps == pytest.approx(100e6 / max(PUBLISHED_CYCLES[net]))


@pytest.mark.parametrize("net", ["sfc", "lfc", "cnv"])
def test_paper_fps_is_reached_on_a_zc706_within_tolerance(net: str) -> None:
    design = fold(finn_network(net), target_fps=PAPER_FPS[net], budget=ZC706, f_clk_mhz=200.0)
    assert design.fits and design.meets_target
    assert PAPER_FPS[net] <= design.fps <= (1 + FPS_TOLERANCE) * PAPER_FPS[net]
    assert design.fps == pytest.approx(200e6 / design.max_cycles)
    if net in PAPER_LATENCY_US:
        assert design.latency_us == pytest.approx(PAPER_LATENCY_US[net], rel=LATENCY_TOLERANCE)


def test_network_definitions_match_the_papers_shapes() -> None:
    sfc, lfc, cnv = finn_network("sfc"), finn_network("lfc"), finn_network("cnv")
    assert [(x.rows, x.cols) for x in sfc] == [(256, 784), (256, 256), (256, 256), (10, 256)]
    assert [(x.rows, x.cols) for x in lfc] == [(1024, 784), (1024, 1024), (1024, 1024), (10, 1024)]
    # 32x32 input, 3x3 valid convolutions and two 2x2 pools: 30, 28 | 14 -> 12, 10 | 5 -> 3, 1
    assert [(x.rows, x.cols, x.pixels) for x in cnv[:6]] == [
        (64, 27, 900), (64, 576, 784), (128, 576, 144), (128, 1152, 100), (256, 1152, 9), (256, 2304, 1)]
    assert [(x.rows, x.cols) for x in cnv[6:]] == [(512, 256), (512, 512), (10, 512)]
    assert all(x.out_bits is None for x in (sfc[-1], lfc[-1], cnv[-1]))


@pytest.mark.parametrize("net", ["sfc", "cnv"])
def test_every_cycle_uses_all_pe_simd_lanes(net: str) -> None:
    design = fold(finn_network(net), target_fps=1e5, budget=ZC706)
    for layer in design.layers:
        assert layer.cycles * layer.folding.pe * layer.folding.simd == layer.spec.macs


@pytest.mark.parametrize("budget", [Budget(luts=20_000, bram18=300), PYNQ_Z1, Budget(luts=60_000, bram18=120)])
def test_fold_respects_divisibility_and_the_budget_and_stops_only_when_stuck(budget: Budget) -> None:
    layers = finn_network("cnv")
    design = fold(layers, target_fps=math.inf, budget=budget)
    assert design.lut <= budget.luts and design.bram18 <= budget.bram18
    for layer in design.layers:
        assert layer.spec.rows % layer.folding.pe == 0 and layer.spec.cols % layer.folding.simd == 0
    # it stopped because no step of the bottleneck fits: every larger PE*SIMD of that layer exceeds the budget
    b = next(i for i, x in enumerate(design.layers) if x.spec.name == design.bottleneck)
    spec, now = layers[b], design.layers[b]
    larger = [(p, s) for p in range(1, spec.rows + 1) if spec.rows % p == 0
              for s in range(1, spec.cols + 1) if spec.cols % s == 0 and p * s > now.folding.pe * now.folding.simd]
    for p, s in larger:
        trial = design.foldings
        trial[b] = Folding(p, s)
        assert not estimate(layers, trial, budget=budget).fits


def test_fps_grows_monotonically_with_the_target_on_an_unbounded_budget() -> None:
    layers = finn_network("cnv")
    fps = [fold(layers, target_fps=t).fps for t in (1e2, 1e3, 3e3, 1e4, 3e4, 1e5, 2e5, math.inf)]
    assert all(b >= a for a, b in pairwise(fps))
    assert fps[0] >= 1e2 and fps[4] >= 3e4
    # unbounded: every layer can be fully unfolded, one output pixel per cycle; the largest layer (30x30) sets FPS
    assert fps[-1] == pytest.approx(200e6 / max(x.pixels for x in layers))


def test_bram18_tiling_by_hand_and_capacity() -> None:
    # 512x36, 1Kx18, 2Kx9, 4Kx4, 8Kx2, 16Kx1 are one block each; one bit more in either dimension needs another
    assert [bram18_count(d, w) for d, w in [(512, 36), (1024, 18), (2048, 9), (16384, 1)]] == [1, 1, 1, 1]
    assert bram18_count(513, 36) == 2 and bram18_count(16385, 1) == 2 and bram18_count(512, 37) == 2
    assert bram18_count(2048, 10) == 2  # 2 x (1Kx18), or 2 x (2Kx9)
    assert bram18_count(100, 64) == 2  # shallow and wide: 2 x (512x36)
    for depth, width in [(3, 5), (777, 13), (4096, 100), (20000, 3)]:
        n = bram18_count(depth, width)
        assert n * 18 * 1024 >= depth * width
        assert n >= 1


def test_resources_grow_with_parallelism_and_memories_move_to_lutram_when_shallow() -> None:
    spec = LayerSpec("fc", 256, 256)
    foldings = [Folding(1, 1), Folding(2, 4), Folding(8, 8), Folding(16, 32), Folding(64, 64)]
    costs = [layer_cost(spec, f) for f in foldings]
    assert all(b.lut > a.lut for a, b in pairwise(costs))
    assert costs[0].weight_memory == "bram" and costs[0].mem_depth == 256 * 256
    assert costs[-1].weight_memory == "lutram" and costs[-1].bram18 == 0


def test_weights_fit_on_chip() -> None:
    lfc_bits = 784 * 1024 + 2 * 1024 * 1024 + 1024 * 10
    check = weights_fit_on_chip(finn_network("lfc"), ZC706)
    assert check.weight_bits == lfc_bits and check.fits
    assert check.min_bram18 == math.ceil(lfc_bits / (18 * 1024))
    # a binary VGG-16 classifier (25088 x 4096 + 4096 x 4096 + 4096 x 1000) is ~123 Mbit: not on a ZC706 (~20 Mbit)
    vgg_fc = [LayerSpec("fc6", 4096, 25088), LayerSpec("fc7", 4096, 4096), LayerSpec("fc8", 1000, 4096)]
    assert not weights_fit_on_chip(vgg_fc, ZC706).fits
    assert weights_fit_on_chip(vgg_fc, Budget(bram18=7000)).fits


def test_layers_from_a_quantized_mlp_bnn() -> None:
    model = create_model("mlp_bnn", width=64, depth=2, act="hardtanh")
    quantize_(model, QuantConfig(rules={"features.0": {"weight": "ste_sign"},
                                        "*": {"weight": "ste_sign", "input": "ste_sign"}}, keep_first_last=False))
    specs = layers_from_model(model)
    assert [(s.rows, s.cols, s.pixels) for s in specs] == [(64, 784, 1), (64, 64, 1), (10, 64, 1)]
    assert [(s.w_bits, s.a_bits, s.out_bits) for s in specs] == [(1, 8, 1), (1, 1, 1), (1, 1, None)]


def test_layers_from_a_conv_stack_read_output_pixels() -> None:
    model = nn.Sequential(
        QuantConv2d(3, 16, 3, bias=False, weight_quantizer=SteSign()),  # 12x12 -> 10x10
        nn.BatchNorm2d(16), nn.MaxPool2d(2),  # -> 5x5
        QuantConv2d(16, 32, 3, padding=1, bias=False, weight_quantizer=SteSign(), input_quantizer=SteSign()),
        nn.Flatten(), nn.Linear(32 * 25, 10),
    )
    specs = layers_from_model(model, input_shape=(3, 12, 12))
    assert [(s.rows, s.cols, s.pixels) for s in specs] == [(16, 27, 100), (32, 144, 25), (10, 800, 1)]
    assert [(s.w_bits, s.a_bits) for s in specs] == [(1, 8), (1, 1), (32, 32)]
    assert specs[0].out_bits == 1 and specs[1].out_bits is None  # the float Linear reads 32 bits: no thresholds


def test_layers_from_model_rejects_what_the_mvtu_does_not_cover() -> None:
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 36, 4))
    with pytest.raises(ValueError, match=r"'0'.*groups=8"):
        layers_from_model(depthwise, input_shape=(8, 8, 8))
    conv1d = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 2))
    with pytest.raises(ValueError, match=r"'0' is a Conv1d"):
        layers_from_model(conv1d, input_shape=(4, 8))
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        layers_from_model(nn.Sequential(nn.ReLU()), input_shape=(4,) * 2)


def test_table_lists_every_layer_with_its_folding() -> None:
    design = estimate(finn_network("lfc", padded=True), BNN_PYNQ_FOLDING["lfc"], f_clk_mhz=100.0, budget=PYNQ_Z1)
    console = Console(record=True, width=160)
    print_table(design, title="LFC", console=console)
    text = console.export_text()
    for layer in design.layers:
        line = next(x for x in text.splitlines() if f" {layer.spec.name} " in x)
        fields = [f.strip() for f in line.split("│") if f.strip()]
        assert fields[1:7] == [str(v) for v in (layer.spec.rows, layer.spec.cols, layer.spec.pixels,
                                                 layer.folding.pe, layer.folding.simd, layer.cycles)]
    assert "195K FPS" in text and "fc1" in text.split("bottleneck")[1]


def test_bad_input_errors() -> None:
    layer = LayerSpec("fc0", 256, 784)
    with pytest.raises(ValueError, match=r"PE 3 does not divide rows 256; allowed PE: \[1, 2, 4"):
        estimate([layer], [(3, 1)])
    with pytest.raises(ValueError, match="SIMD 5 does not divide cols 784"):
        estimate([layer], [(1, 5)])
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="rows must be a positive integer"):
            LayerSpec("x", bad, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pixels must be a positive integer"):
        LayerSpec("x", 4, 4, pixels=0)
    with pytest.raises(ValueError, match="PE must be a positive integer"):
        Folding(0, 1)
    with pytest.raises(ValueError, match="one folding per layer"):
        estimate([layer, layer], [(1, 1)])
    with pytest.raises(ValueError, match="at least one layer"):
        fold([], target_fps=1.0)
    with pytest.raises(ValueError, match="target_fps must be a number > 0"):
        fold([layer], target_fps=0)
    with pytest.raises(ValueError, match="f_clk_mhz must be"):
        fold([layer], target_fps=1.0, f_clk_mhz=-1)
    with pytest.raises(ValueError, match="Budget.luts must be"):
        Budget(luts=-1)
    with pytest.raises(ValueError, match=r"too small even for the fully folded design .* needs"):
        fold(finn_network("cnv"), target_fps=1.0, budget=Budget(luts=1_000, bram18=1_000))
    with pytest.raises(ValueError, match="too small even for the fully folded"):
        fold(finn_network("lfc"), target_fps=1.0, budget=Budget(luts=1e6, bram18=10))
    with pytest.raises(KeyError, match="known: sfc, lfc, cnv"):
        finn_network("vgg")
    with pytest.raises(TypeError, match="LayerSpec"):
        estimate([(256, 784)], [(1, 1)])  # type: ignore[list-item]
