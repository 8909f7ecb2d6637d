"""QONNX export, checked by executing the file with the qonnx package's own executor against lowbit in eval mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
qonnx = pytest.importorskip("qonnx")
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.transformation.infer_datatypes import InferDataTypes  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402

from lowbit.export import export  # noqa: E402
from lowbit.models import create_model  # noqa: E402
from lowbit.nn import QuantConv2d, QuantLinear  # noqa: E402
from lowbit.quant import QuantConfig, quantize_  # noqa: E402
from lowbit.quant.affine import Int8WeightQuantizer, Uint8ActQuantizer  # noqa: E402
from lowbit.quant.binary import SteSign, SwishSign  # noqa: E402
from lowbit.quant.dorefa import DorefaAct, DorefaWeight  # noqa: E402
from lowbit.quant.ternary import TTQ, TWN  # noqa: E402

BNN_RULES = {"weight": "ste_sign", "input": "ste_sign"}


def _random_bn_stats(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics and affine parameters, with about half the gammas negative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 4)
                m.running_var.copy_(torch.rand(c, generator=g) * 20 + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.weight[0] = -abs(float(m.weight[0])) - 0.1  # at least one flipped channel
                m.bias.copy_(torch.randn(c, generator=g))


def _mlp_bnn() -> nn.Module:
    """bench/quant_binary.py's "bnn" model: binary weights everywhere, binary inputs but the first layer's,
    a BatchNorm1d on the logits."""
    model = create_model("mlp_bnn", width=64, depth=2, act="hardtanh")
    quantize_(model, QuantConfig(rules={"features.0": {"weight": "ste_sign"}, "*": BNN_RULES}, keep_first_last=False))
    model.fc = nn.Sequential(model.fc, nn.BatchNorm1d(10))  # type: ignore[assignment]
    _random_bn_stats(model)
    return model.eval()


def _vgg_bnn() -> nn.Module:
    """vgg_small at 1/16 width as a BNN: hardtanh activations, the first conv on the real image."""
    model = create_model("vgg_small", width_mult=1 / 16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Hardtanh())
    quantize_(model, QuantConfig(rules={"features.0.conv": {"weight": "ste_sign"}, "*": BNN_RULES},
                                 keep_first_last=False))
    _random_bn_stats(model, seed=2)
    return model.eval()


def _run(path: Path, x: torch.Tensor, full: bool = False) -> dict[str, np.ndarray]:
    mw = ModelWrapper(str(path))
    return execute_onnx(mw, {mw.graph.input[0].name: x.numpy()}, return_full_exec_context=full)


def _output(path: Path, x: torch.Tensor) -> np.ndarray:
    mw = ModelWrapper(str(path))
    return _run(path, x)[mw.graph.output[0].name]


def _nodes(path: Path, op: str) -> list:
    return [n for n in ModelWrapper(str(path)).graph.node if n.op_type == op]


def _attr(node, name: str):  # noqa: ANN001, ANN202
    from onnx import helper

    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _bn_signs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """sign(BN output) (sign(0) = +1) of every batch norm, in execution order: what the consumers binarize."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(torch.where(o < 0, -1.0, 1.0)))
             for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def test_mlp_bnn_matches_lowbit_and_its_binary_activations_are_bit_exact(tmp_path: Path) -> None:
    model = _mlp_bnn()
    x = torch.rand(16, 1, 28, 28)
    path = export(model, tmp_path / "mlp.onnx", format="qonnx", example=x)
    ctx = _run(path, x, full=True)
    mw = ModelWrapper(str(path))
    with torch.no_grad():
        ref = model(x)
    out = ctx[mw.graph.output[0].name]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    assert (out.argmax(1) == ref.argmax(1).numpy()).all()
    mts = _nodes(path, "MultiThreshold")
    signs = _bn_signs(model, x)[:2]  # the two hidden BN + sign; the logits' BN stays a BatchNormalization
    assert len(mts) == 2
    for mt, sign in zip(mts, signs, strict=True):
        np.testing.assert_array_equal(ctx[mt.output[0]], sign.numpy())


def test_mlp_bnn_graph_has_finn_style_thresholds_and_bipolar_weights(tmp_path: Path) -> None:
    model = _mlp_bnn()
    path = export(model, tmp_path / "mlp.onnx", format="qonnx", example=torch.rand(1, 1, 28, 28))
    mw = ModelWrapper(str(path))
    mts = _nodes(path, "MultiThreshold")
    for mt in mts:
        assert mt.domain == "qonnx.custom_op.general"
        assert (_attr(mt, "out_dtype"), _attr(mt, "out_scale"), _attr(mt, "out_bias")) == (b"BIPOLAR", 2.0, -1.0)
    # three binary weight matrices, unit scale; the hidden activations need no BipolarQuant (already +-1)
    bq = _nodes(path, "BipolarQuant")
    assert len(bq) == 3 and all(mw.get_initializer(n.input[0]) is not None for n in bq)
    assert all(np.all(mw.get_initializer(n.input[1]) == 1.0) for n in bq)
    assert len(_nodes(path, "BatchNormalization")) == 1
    # the second layer's accumulator is a popcount: integer thresholds within [-65, 65]; the first is real-valued
    t2 = mw.get_initializer(mts[1].input[1])
    assert t2.shape == (64, 1) and np.all(t2 == np.round(t2)) and np.all(np.abs(t2) <= 65)
    # channels with a negative BN scale are multiplied by -1 before the comparison
    for mul, bn in zip(_nodes(path, "Mul"), (model.features[1], model.features[4]), strict=True):
        flip = mw.get_initializer(mul.input[1]).reshape(-1)
        np.testing.assert_array_equal(flip < 0, (bn.weight < 0).numpy())


def test_mlp_bnn_without_lowering_keeps_batch_norm_and_bipolar_quant(tmp_path: Path) -> None:
    model = _mlp_bnn()
    x = torch.rand(8, 1, 28, 28)
    path = export(model, tmp_path / "mlp.onnx", format="qonnx", example=x, lower_thresholds=False)
    assert not _nodes(path, "MultiThreshold")
    assert len(_nodes(path, "BatchNormalization")) == 3
    assert len(_nodes(path, "BipolarQuant")) == 3 + 2  # 3 weights, 2 activations
    with torch.no_grad():
        ref = model(x)
    out = _output(path, x)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    assert (out.argmax(1) == ref.argmax(1).numpy()).all()


def test_vgg_bnn_matches_lowbit_with_pools_between_thresholds(tmp_path: Path) -> None:
    model = _vgg_bnn()
    x = torch.randn(8, 3, 32, 32)
    path = export(model, tmp_path / "vgg.onnx", format="qonnx", example=x)
    ctx = _run(path, x, full=True)
    mw = ModelWrapper(str(path))
    with torch.no_grad():
        ref = model(x)
    out = ctx[mw.graph.output[0].name]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-4)
    assert (out.argmax(1) == ref.argmax(1).numpy()).all()
    mts = _nodes(path, "MultiThreshold")
    signs = _bn_signs(model, x)
    assert len(mts) == 6 == len(signs)
    for mt, sign in zip(mts, signs, strict=True):
        np.testing.assert_array_equal(ctx[mt.output[0]], sign.numpy())
    assert len(_nodes(path, "MaxPool")) == 3 and not _nodes(path, "BatchNormalization")


def test_qonnx_tooling_reads_the_datatypes_finn_needs(tmp_path: Path) -> None:
    path = export(_vgg_bnn(), tmp_path / "vgg.onnx", format="qonnx", example=torch.randn(1, 3, 32, 32))
    mw = ModelWrapper(str(path)).transform(InferShapes()).transform(InferDataTypes())
    for n in mw.graph.node:
        if n.op_type in ("MultiThreshold", "BipolarQuant", "MaxPool"):
            assert mw.get_tensor_datatype(n.output[0]) == DataType["BIPOLAR"], n.name
    # the convolutions after the first see +-1 inputs and +-1 weights: integer accumulators
    convs = [n for n in mw.graph.node if n.op_type == "Conv"]
    assert all(mw.get_tensor_datatype(c.output[0]).is_integer() for c in convs[1:])


class _KBitNet(nn.Module):
    """k-bit and scaled-binary layers: DoReFa, TWN, int8, XNOR-Net and BNN+ weights."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = QuantConv2d(3, 8, 3, bias=True, weight_quantizer=DorefaWeight(bits=2))
        self.bn1 = nn.BatchNorm2d(8)
        self.a1 = nn.ReLU()
        self.c2 = QuantConv2d(8, 8, 3, padding=1, bias=False, weight_quantizer=TWN(per_channel=True),
                              input_quantizer=DorefaAct(bits=2))
        self.bn2 = nn.BatchNorm2d(8)
        self.a2 = nn.Hardtanh()
        self.pool = nn.MaxPool2d(2)
        self.c3 = QuantConv2d(8, 16, 3, bias=False, weight_quantizer=Int8WeightQuantizer(),
                              input_quantizer=Uint8ActQuantizer())
        self.flat = nn.Flatten()
        self.f1 = QuantLinear(16 * 2 * 2, 12, weight_quantizer=SteSign(scaling="per_channel"),
                              input_quantizer=SteSign())
        self.f2 = QuantLinear(12, 5, weight_quantizer=SwishSign(), input_quantizer=SwishSign(scaled=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.a2(self.bn2(self.c2(self.a1(self.bn1(self.c1(x)))))))
        return self.f2(self.f1(self.flat(self.c3(x))))


def test_kbit_and_scaled_binary_layers_match_within_float_tolerance(tmp_path: Path) -> None:
    model = _KBitNet()
    _random_bn_stats(model, seed=3)
    model.eval()
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)  # also sets the uint8 activation range (eval: from the first batch, then frozen)
    path = export(model, tmp_path / "kbit.onnx", format="qonnx", example=x)
    with torch.no_grad():
        ref2 = model(x)
    torch.testing.assert_close(ref, ref2)  # exporting changed nothing
    out = _output(path, x)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
    quants = {(int(ModelWrapper(str(path)).get_initializer(q.input[3])), _attr(q, "signed"), _attr(q, "narrow"))
              for q in _nodes(path, "Quant")}
    # dorefa weight (2 bit unsigned), dorefa act (2 bit unsigned), TWN (2 bit signed narrow), int8 weight
    # (signed narrow), uint8 act
    assert quants == {(2, 0, 0), (2, 1, 1), (8, 1, 1), (8, 0, 0)}
    assert len(_nodes(path, "Quant")) == 5
    mw = ModelWrapper(str(path))
    scales = [mw.get_initializer(n.input[1]) for n in _nodes(path, "BipolarQuant")]
    assert any(s.shape == (1, 12) for s in scales)  # XNOR-Net's per-channel alpha, in the (in, out) layout
    assert any(s.shape == (1, 5) for s in scales)  # BNN+'s alpha
    assert not _nodes(path, "MultiThreshold")  # no BN + sign pattern here (f1's input comes from a conv)


def test_export_restores_training_flags_and_parameters(tmp_path: Path) -> None:
    model = _mlp_bnn().train()
    model.features[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export(model, tmp_path / "m.onnx", format="qonnx", example=torch.rand(2, 1, 28, 28))
    assert model.training and not model.features[1].training and model.features[4].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


def test_bad_input_errors(tmp_path: Path) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ValueError, match=r"unsupported module '1' \(Sigmoid\)"):
        export(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), out, format="qonnx", example=torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"unsupported module 'rnn' \(LSTM\)"):
        class _Rnn(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.LSTM(4, 4, batch_first=True)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.rnn(x)[0]
        export(_Rnn(), out, format="qonnx", example=torch.randn(1, 3, 4))
    ttq = nn.Sequential(QuantLinear(4, 4, weight_quantizer=TTQ()))
    ttq[0].weight_quantizer.init_from(ttq[0].weight)
    with pytest.raises(ValueError, match=r"layer '0': weight quantizer TTQ has no QONNX form"):
        export(ttq, out, format="qonnx", example=torch.randn(1, 4))
    scaled_act = nn.Sequential(QuantLinear(4, 4, input_quantizer=SteSign(scaling="per_tensor")))
    with pytest.raises(ValueError, match="computed from the data"):
        export(scaled_act, out, format="qonnx", example=torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"unsupported operation 'add'.*residual"):
        export(_Residual(), out, format="qonnx", example=torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="torch.fx could not trace _Branchy"):
        export(_Branchy(), out, format="qonnx", example=torch.randn(1, 4))
    with pytest.raises(ValueError, match="example must be a float tensor"):
        export(nn.Linear(4, 4), out, format="qonnx", example=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown export format"):
        export(nn.Linear(4, 4), out, format="qonnx2", example=torch.randn(1, 4))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
