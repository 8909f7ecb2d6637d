"""pack_model: the packed BNN equals the eval-mode PyTorch model (binary activations bit for bit, same logits and
predictions), on a digits-trained BNN MLP and a small VGG BNN with non-trivial BN statistics and negative gammas."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import lowbit.runtime.binary.model as model_mod
from lowbit.data import load_dataset
from lowbit.models import create_model
from lowbit.models.vgg import VGGSmall
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quant import QuantConfig, quantize_
from lowbit.runtime.binary import PackedModel, UnsupportedModelError, pack_model

BINARY = {"weight": "ste_sign", "input": "ste_sign"}


def _quantize(model: nn.Module, first: str, **extra: dict) -> nn.Module:
    quantize_(model, QuantConfig(rules={first: {"weight": "ste_sign"}, **extra, "*": BINARY}, keep_first_last=False))
    return model


def _negate_some_gammas(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight[::3] *= -1  # 'less or equal' thresholds
                m.weight[1] = 0.0  # a constant channel


def _input_signs(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """The output of every input quantizer (the +-1 input of each binary layer), by layer name."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        q = getattr(m, "input_quantizer", None)
        if q is not None:
            handles.append(q.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.clone())))
    return seen, handles


def _assert_same(model: nn.Module, packed: PackedModel, x: torch.Tensor) -> None:
    seen, handles = _input_signs(model)
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    trace: dict[str, torch.Tensor] = {}
    out = packed.forward(x, trace=trace)
    assert set(trace) == set(seen) and len(trace) == len(packed.binary_layers)
    for name in trace:  # the binary part, bit for bit
        assert torch.equal(trace[name], seen[name]), name
    assert torch.equal(out, ref)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def _digits_x(split: object) -> torch.Tensor:
    return (split.x.float() / 255 - 0.30) / 0.38  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def digits_bnn() -> tuple[nn.Module, torch.Tensor]:
    """mlp_bnn 64 -> 100 -> 100 -> 10 (+ BN on the logits), 60 Adam steps on digits; then some gammas negated."""
    torch.manual_seed(0)
    model = _quantize(create_model("mlp_bnn", in_chans=1, input_size=8, width=100, depth=2, act="hardtanh"),
                      "features.0")
    model.fc = nn.Sequential(model.fc, nn.BatchNorm1d(10))  # type: ignore[assignment]
    ds = load_dataset("digits")
    x, y = _digits_x(ds.train), ds.train.y
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(_digits_x(ds.test)).argmax(1) == ds.test.y).float().mean()
    assert acc > 0.5  # it did learn: the tests compare a real model, not noise
    _negate_some_gammas(model)
    return model.eval(), _digits_x(ds.test)


def test_doctests() -> None:
    assert doctest.testmod(model_mod).failed == 0


def test_digits_mlp_is_bit_exact(digits_bnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x_test = digits_bnn
    packed = pack_model(model)
    assert packed.binary_layers == ["features.3", "fc.0"]
    _assert_same(model, packed, x_test)  # the whole test split (300)
    _assert_same(model, packed, x_test[:1])  # batch 1


def test_packed_model_is_a_snapshot(digits_bnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x_test = digits_bnn
    packed = pack_model(model)
    before = packed(x_test[:20])
    with torch.no_grad():
        saved = model.features[3].weight.clone()
        model.features[3].weight.neg_()
    try:
        assert torch.equal(packed(x_test[:20]), before)
    finally:
        with torch.no_grad():
            model.features[3].weight.copy_(saved)


def test_model_bytes(digits_bnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, _ = digits_bnn
    nb = pack_model(model).nbytes()
    # first layer 100 x 64 signs (1 word per row), binary 100 x 100 (2 words), 10 x 100 (2 words)
    assert nb["binary_weight_bytes"] == 8 * (100 * 1 + 100 * 2 + 10 * 2)
    # float32 thresholds + direction bits after the first layer, int32 thresholds after features.3
    assert nb["threshold_bytes"] == (4 * 100 + 13) + 4 * 100
    # the classifier's bias and the logits' BN (4 float32 vectors + the int64 step counter)
    assert nb["float_bytes"] == 4 * 10 + 4 * 4 * 10 + 8
    assert nb["total_bytes"] == sum(v for k, v in nb.items() if k != "total_bytes")


def _vgg_bnn() -> nn.Module:
    torch.manual_seed(1)
    model = VGGSmall(num_classes=10, in_chans=3, width_mult=0.3, fc_hidden=(50,), input_size=16)  # 38, 77, 154 ch
    for m in list(model.modules()):
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU):
                setattr(m, name, nn.Hardtanh())
    _quantize(model, "features.0.conv")
    model.train()
    with torch.no_grad():  # running statistics far from (0, 1)
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    _negate_some_gammas(model)
    return model.eval()


def test_vgg_bnn_is_bit_exact() -> None:
    model = _vgg_bnn()
    packed = pack_model(model)
    assert len(packed.binary_layers) == 7  # 5 binary convs, the hidden FC, the classifier
    assert sum("bit max-pool" in s.describe() for s in packed.stages) == 3
    _assert_same(model, packed, torch.randn(5, 3, 16, 16))
    _assert_same(model, packed, torch.randn(1, 3, 16, 16))


def test_sign_of_the_raw_input_and_a_linear_with_bias() -> None:
    """A first layer with a binary input (sign of the image itself), a binary linear layer with a bias followed by a
    BN, and no BN between the last two binary layers (the threshold is sign(acc + bias))."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Flatten(), QuantLinear(30, 70, weight_quantizer="ste_sign", input_quantizer="ste_sign"), nn.BatchNorm1d(70),
        QuantLinear(70, 65, weight_quantizer="ste_sign", input_quantizer="ste_sign"), nn.Hardtanh(),
        QuantLinear(65, 4, weight_quantizer="ste_sign", input_quantizer="ste_sign"),
    )
    with torch.no_grad():
        model[3].bias.mul_(20)
        model[2].running_mean.uniform_(-5, 5)
    model.eval()
    _assert_same(model, pack_model(model), torch.randn(9, 5, 6))


def _small_conv_net(**conv_kwargs: object) -> nn.Sequential:
    return nn.Sequential(
        QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quantizer="ste_sign"), nn.BatchNorm2d(8), nn.Hardtanh(),
        QuantConv2d(8, 8, 3, weight_quantizer="ste_sign", input_quantizer="ste_sign", **conv_kwargs),  # type: ignore
    ).eval()


def test_a_fully_convolutional_bnn_on_inputs_of_several_sizes() -> None:
    """The packed layers keep a border table per input size: each size must get its own, and a size seen before
    must give the same result again."""
    torch.manual_seed(3)
    binary = {"weight_quantizer": "ste_sign", "input_quantizer": "ste_sign", "bias": False}
    model = nn.Sequential(
        QuantConv2d(3, 70, 3, padding=1, bias=False, weight_quantizer="ste_sign"), nn.BatchNorm2d(70), nn.Hardtanh(),
        QuantConv2d(70, 66, 3, padding=1, **binary), nn.BatchNorm2d(66), nn.Hardtanh(),  # type: ignore[arg-type]
        QuantConv2d(66, 5, 3, padding=2, stride=2, **binary),  # type: ignore[arg-type]
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 9, 9))  # BN statistics
    _negate_some_gammas(model)
    model.eval()
    packed = pack_model(model)
    for hw in [(9, 9), (5, 12), (3, 3), (9, 9)]:
        _assert_same(model, packed, torch.randn(2, 3, *hw))


def test_narrow_layers_pack_two_taps_per_word() -> None:
    """At most 32 input channels: a conv (5x5 = 25 taps, an odd count) and the linear layer over the flattened
    20-channel map (3 x 3 = 9 positions) pack two taps per word; both must still equal the torch model, with
    padding and a stride."""
    torch.manual_seed(4)
    binary = {"weight_quantizer": "ste_sign", "input_quantizer": "ste_sign"}
    model = nn.Sequential(
        QuantConv2d(3, 17, 3, padding=1, bias=False, weight_quantizer="ste_sign"), nn.BatchNorm2d(17), nn.Hardtanh(),
        QuantConv2d(17, 20, 5, padding=2, stride=2, bias=False, **binary), nn.BatchNorm2d(20),  # type: ignore[arg-type]
        nn.Hardtanh(), nn.Flatten(), QuantLinear(20 * 3 * 3, 6, **binary),  # type: ignore[arg-type]
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 6, 6))
    _negate_some_gammas(model)
    model.eval()
    packed = pack_model(model)
    _assert_same(model, packed, torch.randn(7, 3, 6, 6))
    _assert_same(model, packed, torch.randn(1, 3, 5, 5))


def test_unsupported_models_are_named() -> None:
    relu = _quantize(create_model("mlp_bnn", in_chans=1, input_size=8, width=16, depth=2, act="relu"), "features.0")
    with pytest.raises(UnsupportedModelError, match="'features.2' is a ReLU"):
        pack_model(relu)
    relu_pool = nn.Sequential(QuantConv2d(3, 8, 3, padding=1, weight_quantizer="ste_sign"), nn.BatchNorm2d(8),
                              nn.ReLU(), nn.MaxPool2d(2), *list(_small_conv_net(bias=False))[3:]).eval()
    with pytest.raises(UnsupportedModelError, match="'2' is a ReLU before the sign of '4'"):
        pack_model(relu_pool)
    scaled = _quantize(create_model("mlp_bnn", in_chans=1, input_size=8, width=16, depth=2, act="hardtanh"),
                       "features.0", **{"features.3": {"weight": {"name": "ste_sign", "scaling": "per_channel"},
                                                       "input": "ste_sign"}})
    with pytest.raises(UnsupportedModelError, match="'features.3'.*scale"):
        pack_model(scaled)
    with pytest.raises(UnsupportedModelError, match="'3' is a binary conv with a bias"):
        pack_model(_small_conv_net(bias=True))
    with pytest.raises(UnsupportedModelError, match="breaks the chain"):
        pack_model(_quantize(create_model("resnet20"), "conv1"))
    with pytest.raises(UnsupportedModelError, match="no binary layer"):
        pack_model(create_model("mlp_bnn", width=8, depth=1))
    with pytest.raises(UnsupportedModelError, match="float64"):
        pack_model(_small_conv_net(bias=False).double())
    pool_first = nn.Sequential(*_small_conv_net(bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Hardtanh(),
                               QuantConv2d(8, 4, 1, weight_quantizer="ste_sign", input_quantizer="ste_sign")).eval()
    with pytest.raises(UnsupportedModelError,
                       match="'4' \\(MaxPool2d\\) comes between binary layer '3' and its BatchNorm '5'"):
        pack_model(pool_first)
    with pytest.raises(TypeError, match="nn.Module"):
        pack_model("mlp")  # type: ignore[arg-type]


def test_bad_inputs(digits_bnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x_test = digits_bnn
    packed = pack_model(model)
    x = x_test[:4].clone()
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="the input holds NaN"):
        packed(x)
    with pytest.raises(ValueError, match="the float output before features.1 holds (inf|NaN)"):
        packed(torch.full((2, 1, 8, 8), 3e38))  # finite, but the first layer's sums overflow
    with pytest.raises(TypeError, match="float torch.Tensor"):
        packed(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    conv = pack_model(_small_conv_net(bias=False))
    with pytest.raises(ValueError, match="does not fit a 2x2 input"):
        conv(torch.randn(1, 3, 2, 2))
