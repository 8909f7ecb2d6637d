"""Preparing (fusion, quantization points), calibrating and lowering models to integer operations."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
from tests.graph._int8_models import int8, small_models
from torch import fx, nn

from lowbit.graph import Int8Config, LoweringError, calibrate, convert, format_graph, prepare_ptq, prepare_qat
from lowbit.graph.lower import input_qparams, output_qparams, remove_identity_pairs
from lowbit.graph.qops import Dequantize, QAdd, QConv2d, QGlobalAvgPool, QLinear, QParams, Quantize, Requantize
from lowbit.nn.fused import ConvBnAct2d

MODELS = small_models()


def _ops(gm: fx.GraphModule) -> list[str]:
    mods = dict(gm.named_modules())
    return [type(mods[n.target]).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def test_prepare_fuses_conv_bn_relu_and_keeps_names() -> None:
    model, _ = MODELS["resnet8"]
    prepared = prepare_qat(model)
    bns = [n for n, m in prepared.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 7 and all(isinstance(prepared.get_submodule(n.rpartition(".")[0]), ConvBnAct2d) for n in bns)
    fused = {n: m for n, m in prepared.named_modules() if isinstance(m, ConvBnAct2d)}
    assert set(fused) == {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                          "layer3.0.conv1", "layer3.0.conv2"}
    assert fused["layer1.0.conv1"].act == "relu" and fused["layer1.0.conv2"].act is None  # relu after the add
    assert all(m.bn is not None for m in fused.values())
    assert prepared.training and not model.training  # a copy: the float model is untouched
    # quantization points: input, each fused layer, each add (after its relu), the pool, fc
    assert len(prepared.act_quant) == 1 + 7 + 3 + 1 + 1


def test_converted_model_matches_the_fake_quant_model() -> None:
    for name, (model, shape) in MODELS.items():
        prepared, q = int8(model, shape)
        x = torch.randn(8, *shape)
        with torch.no_grad():
            fake, real, ref = prepared(x), q(x), model(x)
        lsb = output_qparams(q)[0].scale
        # the float simulation and the integer model differ by rounding only (a few output steps)
        assert (fake - real).abs().max() <= 6 * lsb, name
        assert (fake - ref).abs().max() < 0.25 * ref.abs().max() + 8 * lsb, name


def test_lowered_graph_holds_only_integer_ops_between_quantize_and_dequantize() -> None:
    model, shape = MODELS["resnet8"]
    _, q = int8(model, shape)
    ops = _ops(q)
    assert ops[0] == "Quantize" and ops[-1] == "Dequantize"
    assert ops.count("QConv2d") == 7 and ops.count("QAdd") == 3 and ops.count("QLinear") == 1
    assert ops.count("QGlobalAvgPool") == 1 and "Dequantize" not in ops[:-1]
    mods = dict(q.named_modules())
    conv = mods["layer1.0.conv1"]
    assert conv.weight.dtype == torch.int8 and conv.bias.dtype == torch.int32
    assert int(conv.weight.abs().max()) == 127 and conv.act_min == conv.out.zero_point  # fused relu = clamp
    assert ((conv.m0 >= 2**30) & (conv.m0 < 2**31)).all()
    text = format_graph(q)
    assert "QConv2d" in text and "QAdd" in text and "pad" in text


def test_relu6_and_depthwise_lower_to_clamped_grouped_convs() -> None:
    model, shape = MODELS["mobilenet_v2"]
    _, q = int8(model, shape)
    convs = [m for m in q.modules() if isinstance(m, QConv2d)]
    assert any(c.groups > 1 for c in convs)
    relu6 = [c for c in convs if c.act_max < c.out.qmax]
    for c in relu6:  # the clamp is 6.0 in real terms
        assert abs((c.act_max - c.out.zero_point) * c.out.scale - 6.0) <= c.out.scale
    assert sum(isinstance(m, QAdd) for m in q.modules()) > 0


def test_qparams_of_weights_are_per_channel_int8_and_bias_is_exact_int32() -> None:
    model, shape = MODELS["lenet5"]
    prepared, q = int8(model, shape)
    fc1 = dict(q.named_modules())["fc1"]
    w = model.fc1.weight.detach()
    scale = w.abs().amax(1) / 127
    assert torch.allclose(fc1.w_scale, scale)
    assert torch.equal(fc1.weight, torch.round(w / scale[:, None]).to(torch.int8))
    expected_bias = torch.round(model.fc1.bias.detach().double() / (fc1.inp.scale * scale.double()))
    assert torch.equal(fc1.bias, expected_bias.to(torch.int32))


def test_weight_bits_7_gives_the_reduced_range() -> None:
    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape, Int8Config(weight_bits=7))
    assert max(int(m.weight.abs().max()) for m in q.modules() if isinstance(m, (QConv2d, QLinear))) == 63


def test_remove_identity_pairs_drops_equal_and_requantizes_different() -> None:
    a, b = QParams(0.1, 10, 0, 255), QParams(0.05, 3, 0, 255)
    for out_qp, expect in ((a, []), (b, ["Requantize"])):
        g = fx.Graph()
        x = g.placeholder("x")
        mods = {"dq": Dequantize(a), "q": Quantize(out_qp)}
        g.output(g.call_module("q", (g.call_module("dq", (x,)),)))
        gm = fx.GraphModule(mods, g)
        ints = torch.arange(0, 256, dtype=torch.uint8)
        before = gm(ints)
        assert remove_identity_pairs(gm) == 1
        assert _ops(gm) == expect
        assert torch.equal(gm(ints), before)  # exact: requantizing 8-bit values by 2x rounds like float


def test_fused_and_add_quantization_points_zero_point_is_qmin_after_relu() -> None:
    model, shape = MODELS["resnet8"]
    _, q = int8(model, shape)
    for m in q.modules():
        if isinstance(m, QAdd):
            assert m.out.zero_point == 0 and m.act_min == 0  # relu after the add: the range starts at 0


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.conv(x)))


def test_unsupported_op_is_an_error_naming_module_and_op() -> None:
    with pytest.raises(LoweringError, match=r"cannot run function sigmoid \(node 'sigmoid' in \(top level\)\)"):
        prepare_ptq(_Sigmoid())

    class Gelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    with pytest.raises(LoweringError, match=r"module GELU \(node 'act' in act\)"):
        prepare_qat(Gelu())


def test_untraceable_model_is_a_lowering_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(LoweringError, match="torch.fx cannot trace Branchy"):
        prepare_ptq(Branchy())


def test_calibration_errors_and_convert_before_calibration() -> None:
    model, shape = MODELS["lenet5"]
    prepared = prepare_ptq(model)
    with pytest.raises(ValueError, match="n_batches must be an int >= 1"):
        calibrate(prepared, [torch.randn(2, *shape)], n_batches=0)
    with pytest.raises(ValueError, match="gave no batch"):
        calibrate(prepared, [], n_batches=4)
    with pytest.raises(LoweringError, match="has never seen data: run calibrate"):
        convert(prepared)
    with pytest.raises(TypeError, match="prepare_ptq or prepare_qat"):
        convert(model)
    with pytest.raises(ValueError, match="has no affine quantizers"):
        calibrate(model, [torch.randn(2, *shape)], n_batches=1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate(prepared, [torch.full((2, *shape), float("nan"))], n_batches=1)


def test_constant_input_calibrates_and_runs() -> None:
    model, shape = MODELS["lenet5"]
    prepared = prepare_ptq(model)
    calibrate(prepared, [torch.zeros(4, *shape)], n_batches=1)  # zero range everywhere upstream of biases
    q = convert(prepared)
    qin = input_qparams(q)[0]
    assert qin.scale == 1.0 and qin.zero_point == 0
    out = q(torch.zeros(2, *shape))
    with torch.no_grad():
        assert torch.allclose(out, model(torch.zeros(2, *shape)), atol=2 * output_qparams(q)[0].scale)


def test_bias_that_does_not_fit_int32_is_a_lowering_error() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        net[0].bias.fill_(1e4)
    prepared = prepare_ptq(net)
    calibrate(prepared, [torch.full((2, 3), 1e-30)], n_batches=1)  # an input range that underflows
    with pytest.raises(LoweringError, match="does not fit int32"):
        convert(prepared)


def test_diverged_batch_norm_is_a_lowering_error_naming_the_layer() -> None:
    """A batch norm whose scale blew up after the output range was observed (what a diverged QAT run leaves)
    folds into weights whose requantization multiplier does not fit the fixed-point form: a LoweringError that
    names the layer, not a bare ValueError from the multiplier arithmetic."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    prepared = prepare_ptq(net)
    calibrate(prepared, [torch.randn(4, 1, 6, 6)], n_batches=1)
    fused = next(m for m in prepared.modules() if hasattr(m, "bn") and m.bn is not None)
    with torch.no_grad():
        fused.bn.weight[1] = 1e12
    with pytest.raises(LoweringError, match=r"multiplier S_in S_w / S_out of channel 1 is .* diverged"):
        convert(prepared)


def test_global_pool_shortcut_and_flatten_nodes() -> None:
    model, shape = MODELS["resnet8"]
    _, q = int8(model, shape)
    targets = [n.target for n in q.graph.nodes if n.op == "call_function"]
    assert operator.getitem in targets  # option-A shortcut subsampling stays an integer slice
    assert any(isinstance(m, QGlobalAvgPool) for m in q.modules())
    assert not any(isinstance(m, Requantize) for m in q.modules())


def test_cli_lower_prints_the_lowered_graph(capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    assert main(["lower", "lenet5", "--print", "--random-calibration", "--calibrate", "1"]) == 0
    text = capsys.readouterr().out
    assert "random N(0, 1) inputs" in text and "lowered to integer operations" in text
    assert text.count("QConv2d(") == 2 and text.count("QLinear(") == 2 and "ConvBnAct2d" in text
    assert main(["lower", "lenet5", "--random-calibration", "--calibrate", "1"]) == 0
    assert "QConv2d x2" in capsys.readouterr().out
    assert main(["lower", "no_such_model"]) == 2


def test_qat_schedule_freezes_batch_norms_then_ranges() -> None:
    from lowbit.graph import QATSchedule

    model, shape = MODELS["resnet8"]
    qat = prepare_qat(model)
    cb = QATSchedule(total_steps=10, freeze_bn_at=0.2, freeze_observers_at=0.5)
    fused = [m for m in qat.modules() if isinstance(m, ConvBnAct2d)]
    acts = [m.quantizer for m in qat.act_quant.values()]
    cb.after_step(qat, 1)
    assert not any(m.bn_frozen for m in fused) and all(q.observe for q in acts)
    cb.after_step(qat, 2)
    assert all(m.bn_frozen for m in fused) and all(q.observe for q in acts)
    cb.after_step(qat, 5)
    assert not any(q.observe for q in acts)
    assert all(m.weight_quantizer.observe for m in fused)  # weights keep following their values
    with pytest.raises(ValueError, match="freeze_bn_at must be a fraction"):
        QATSchedule(10, freeze_bn_at=2.0)


def test_qat_calibration_observes_the_batch_statistics_forward() -> None:
    """QAT trains with batch-statistics batch norm, so its ranges are calibrated under that forward, not under
    running statistics far from it (here a running variance of 100, as in a barely trained model). Under those,
    the ranges were 10x too narrow: most activations clipped once training started, and MobileNet v2's first QAT
    gradients reached 1e13 against 1.8 in float. The running statistics stay as they were."""
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(100.0)
    qat = prepare_qat(copy.deepcopy(net).eval())
    x = torch.randn(16, 3, 6, 6)

    def running() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in qat.state_dict().items() if "running" in k or "num_batches" in k}

    before = running()
    calibrate(qat, [x], n_batches=1)
    assert all(torch.equal(before[k], v) for k, v in running().items())
    q = qat.act_quant["0"].quantizer  # after the first conv + BN + ReLU6
    with torch.no_grad():
        batch_stats_max = float(net.train()[:3](x).max())
    assert float(q.scale) * (q.qmax - int(q.zero_point)) == pytest.approx(batch_stats_max, rel=0.02)


@pytest.mark.parametrize("qat", [False, True])
def test_a_prepared_int8_checkpoint_loads_back_to_the_same_integer_model(qat: bool, tmp_path: Path) -> None:
    from lowbit.models import create_model
    from lowbit.train import load_model, save_model

    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    prepared = (prepare_qat if qat else prepare_ptq)(model, Int8Config(weight_bits=7))
    calibrate(prepared, [torch.randn(16, 1, 28, 28) for _ in range(2)], 2)
    path = save_model(tmp_path / "int8.safetensors", prepared)
    loaded, _ = load_model(path)
    assert loaded.training == qat  # a QAT checkpoint comes back ready to train on
    x = torch.randn(8, 1, 28, 28)
    prepared.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), prepared(x))
        assert torch.equal(convert(loaded)(x), convert(prepared)(x))
    with pytest.raises(ValueError, match="lowered int8 model.*save the prepared model"):
        save_model(tmp_path / "lowered.safetensors", convert(prepared))


def test_cli_exports_a_qat_checkpoint_with_its_own_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from lowbit.cli import main
    from lowbit.export.onnx_qdq import integer_kernel_report
    from lowbit.models import create_model
    from lowbit.train import save_model

    prepared = prepare_qat(create_model("lenet5").eval(), Int8Config(weight_bits=7))
    calibrate(prepared, [torch.randn(16, 1, 28, 28)], 1)
    ckpt = save_model(tmp_path / "qat.safetensors", prepared)
    out = tmp_path / "qat.onnx"
    assert main(["export", str(ckpt), "--format", "onnx-qdq", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "already prepared for int8" in text and "speed check skipped" in text
    assert integer_kernel_report(out)["integer"] == 4
