"""The helpers of the quantization benchmarks (bench.quant_binary, bench.quant_cifar, bench.qat_step_cost)."""

from __future__ import annotations

import re

import pytest
import torch
from bench.qat_step_cost import make_step
from bench.quant_binary import costs, plot_size_acc, size_acc_points
from bench.quant_cifar import (
    RESNET20,
    build_vgg,
    make_callbacks,
    quantize_model,
    recalibrate_bn,
    row_prefix,
    swap_activations,
)
from torch import nn

from lowbit.data import Dataset, Split
from lowbit.models import create_model
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quant.binary import BnnPlusRegularizer, ClipWeights
from lowbit.quant.loss_aware import LossAware


def _bits(spec: str) -> tuple[int, int]:
    w, a = re.fullmatch(r"W(\d+)A(\d+)", spec).groups()  # type: ignore[union-attr]
    return int(w), int(a)


def test_swap_activations_replaces_every_relu() -> None:
    model = create_model("resnet20")
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert swap_activations(model, "hardtanh") == relus == 10  # the stem's and one per block (used twice)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Hardtanh) for m in model.modules()) == relus
    assert swap_activations(create_model("resnet20"), "relu") == 0


@pytest.mark.parametrize("name", list(RESNET20))
def test_resnet_methods_quantize_all_but_first_and_last(name: str) -> None:
    method = RESNET20[name]
    model = create_model("resnet20")
    report = quantize_model(model, method)
    wbits, abits = _bits(method.bits)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[0][0] == "conv1" and type(convs[0][1]) is nn.Conv2d  # the stem stays float
    assert type(model.fc) is nn.Linear  # and the classifier
    if report is None:  # the float control
        assert (wbits, abits) == (32, 32)
        return
    assert set(report.kept_float) == {"conv1", "fc"}
    for _, m in convs[1:]:
        assert isinstance(m, QuantConv2d)
        assert m.weight_quantizer.bit_width == wbits  # the table's "bits" says what the quantizers are
        assert (m.input_quantizer.bit_width if m.input_quantizer is not None else 32) == abits


@pytest.mark.parametrize("name", [n for n, m in RESNET20.items() if m.bits.endswith("A1")])
def test_binary_activations_see_both_signs(name: str) -> None:
    """After a ReLU every binary activation would be +1: the W1A1 rows must feed signed values."""
    model = create_model("resnet20")
    quantize_model(model, RESNET20[name])
    outs: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.input_quantizer.register_forward_hook(lambda mod, args, out: outs.append(out))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(outs) == 18
    for out in outs:
        assert set(out.unique().tolist()) == {-1.0, 1.0}


def test_callbacks_of_the_methods() -> None:
    assert make_callbacks(RESNET20["ttq"]) == []
    assert [type(c) for c in make_callbacks(RESNET20["bnn"])] == [ClipWeights]
    (reg,) = make_callbacks(RESNET20["bnn_plus"], lam=3e-5)
    assert isinstance(reg, BnnPlusRegularizer) and reg.lam == 3e-5
    for name in ("lab", "laq_ternary", "laq_3bit"):
        assert [type(c) for c in make_callbacks(RESNET20[name])] == [LossAware]


def test_costs_counts_weights_at_their_bit_width() -> None:
    model = create_model("resnet20")
    quantize_model(model, RESNET20["ttq"])
    expected = 0.0  # bytes: quantized conv weights at 2 bits, every other parameter at 32
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            quantized = isinstance(module, QuantConv2d) and pname == "weight"
            expected += p.numel() * (2 if quantized else 32) / 8
    got = costs(model)
    assert got["size_bytes"] == round(expected)
    assert got["float32_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert got["bops"] < got["macs"] * 32 * 32  # the quantized layers count 2 x 32 bit operations per MAC


def test_vgg_bnn_is_w1a1_but_the_image() -> None:
    model = build_vgg(binary=True, width=0.125, fc_hidden=(16,))
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(layers) == 6 + 2  # six convs, the hidden FC and the classifier: all binarized
    assert layers[0].input_quantizer is None and layers[0].weight_quantizer.bit_width == 1
    for m in layers[1:]:
        assert m.weight_quantizer.bit_width == 1 and m.input_quantizer.bit_width == 1
    assert isinstance(model.classifier[-1][1], nn.BatchNorm1d)  # a BN on the binary logits
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    twin = build_vgg(binary=False, width=0.125, fc_hidden=(16,))
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in twin.modules())


def test_make_step_trains_and_runs_the_callbacks() -> None:
    events: list[str] = []

    class Recorder:
        def on_fit_start(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
            events.append("start")

        def extra_loss(self, model: nn.Module) -> torch.Tensor:
            events.append("loss")
            return model.weight.sum() * 0

        def after_step(self, model: nn.Module, step: int) -> None:
            events.append(f"after{step}")

    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    step = make_step(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), [Recorder()])
    step()
    step()
    assert events == ["start", "loss", "after1", "loss", "after2"]
    assert not torch.equal(model.weight, before)


def test_size_acc_points_groups_rows_and_skips_rows_without_size(tmp_path) -> None:  # noqa: ANN001
    mnist = {"mnist_mlp/float": {"bits": "W32A32", "size_bytes": 4000, "test_acc_pct": 98.5},
             "mnist_mlp/bnn": {"bits": "W1A1", "size_bytes": 200, "test_acc_pct": 97.0},
             "mnist_mlp/old": {"bits": "W1A1", "test_acc_pct": 90.0}}
    cifar = {"vgg_small/bnn": {"bits": "W1A1", "size_bytes": 10, "test_acc_pct": 70.0},
             "resnet20/ttq": {"bits": "W2A32", "size_bytes": 90, "test_acc_pct": 88.0},
             "resnet20-e80/ttq": {"bits": "W2A32", "size_bytes": 90, "test_acc_pct": 89.0},
             "other/x": {"bits": "W1A1", "size_bytes": 1, "test_acc_pct": 1.0}}
    points = size_acc_points(mnist, cifar)
    assert list(points) == ["mnist_mlp", "resnet20", "vgg_small", "resnet20-e80"]  # another baseline: own panel
    assert points["mnist_mlp"] == [("float W32A32", 4000.0, 98.5), ("bnn W1A1", 200.0, 97.0)]
    assert points["resnet20"] == [("ttq W2A32", 90.0, 88.0)]
    assert points["resnet20-e80"] == [("ttq W2A32", 90.0, 89.0)]
    import json

    for name, rows in (("m.json", mnist), ("c.json", cifar)):
        (tmp_path / name).write_text(json.dumps({"results": rows}))
    png = tmp_path / "out.png"
    plot_size_acc(png, tmp_path / "m.json", tmp_path / "c.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_size_acc(tmp_path / "none.png", tmp_path / "missing1.json", tmp_path / "missing2.json")
    assert not (tmp_path / "none.png").exists()  # nothing to plot: no file


def test_recalibrate_bn_sets_the_plain_average_of_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 3, 3), dtype=torch.uint8, generator=g)
    data = Dataset("toy", Split(x, torch.zeros(40, dtype=torch.long)), Split(x[:4], torch.zeros(4, dtype=torch.long)),
                   num_classes=2, input_shape=(1, 3, 3), mean=(0.5,), std=(0.25,))
    conv = nn.Conv2d(1, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(2, momentum=0.3)).eval()
    model[1].running_mean.fill_(5.0)  # stale statistics
    assert recalibrate_bn(model, data, batches=3, batch_size=8) == 1
    batches = list(data.loader("train", 8, shuffle=True, augment=False).batches(0))[:3]
    batches = [xb for xb, _ in batches]
    with torch.no_grad():
        outs = [conv(xb) for xb in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.3 and not model.training  # restored


def test_multibit_targets_compare_only_rows_of_the_float_checkpoints_budget() -> None:
    from bench.quant_multibit import targets

    new, old = "e3_lr0.01_baseAAAA", "e3_lr0.01_baseBBBB"
    rows = {
        "resnet20/float_checkpoint": {"test_acc_pct": 89.0, "budget": new},
        "resnet20/qil/W4A4": {"test_acc_pct": 88.5, "budget": new},  # within 1 point
        "resnet20/qil/W2A2": {"test_acc_pct": 80.0, "budget": new},  # 9 points down
        "resnet20/lqnets/W4A4": {"test_acc_pct": 88.9, "budget": old},  # another baseline: not comparable
        "resnet20/dorefa/W2A2": {"test_acc_pct": 79.0, "budget": new},
        "resnet20/lqnets/W2A2": {"test_acc_pct": 88.0},  # written before rows had budgets
    }
    t = targets(rows)
    assert t["qil_W4A4_within_1_points"] is True
    assert t["qil_W2A2_within_4_points"] is False
    assert t["qil_beats_dorefa_W2A2"] is True
    assert t["lqnets_W4A4_within_1_points"] is None
    assert t["lqnets_W2A2_within_4_points"] is None and t["lqnets_beats_dorefa_W2A2"] is None


def test_rows_from_another_baseline_are_named_after_its_checkpoint() -> None:
    from pathlib import Path

    assert row_prefix(Path("bench/checkpoints/resnet20.safetensors")) == "resnet20"  # the recipe's baseline
    assert row_prefix(Path("/x/resnet20-e80.safetensors")) == "resnet20-e80"
    assert row_prefix(Path("bench/checkpoints/partial/resnet20.last.safetensors")) == "resnet20.last"
    assert row_prefix(Path("/tmp/mine.safetensors")) == "resnet20(mine)"
