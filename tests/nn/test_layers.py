"""Quantized drop-in layers: bit-identical to the float layers without quantizers, from_float, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _quantizers import SIGN, Pact, Sign  # test-only quantizers (tests/_quantizers.py)
from lowbit.hw import profile
from lowbit.nn import QuantAct, QuantConv2d, QuantLinear


def test_constructor_matches_the_float_layer_init() -> None:
    torch.manual_seed(3)
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    torch.manual_seed(3)
    q = QuantConv2d(3, 8, 3, stride=2, padding=1, bias=False)
    assert isinstance(q, nn.Conv2d) and q.bias is None
    assert torch.equal(q.weight, ref.weight)
    torch.manual_seed(3)
    ref_fc, q_fc = nn.Linear(7, 5), None
    torch.manual_seed(3)
    q_fc = QuantLinear(7, 5)
    assert torch.equal(q_fc.weight, ref_fc.weight) and torch.equal(q_fc.bias, ref_fc.bias)


@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": 2, "padding": 2, "dilation": 2, "bias": False},
    {"padding": "same", "padding_mode": "reflect"},
    {"groups": 4, "padding": 1, "padding_mode": "circular"},
])
def test_conv_without_quantizers_is_bit_identical(kwargs: dict) -> None:
    conv = nn.Conv2d(4, 8, 3, **kwargs)
    q = QuantConv2d.from_float(conv)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    y_ref, y = conv(x), q(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, gx_ref)


def test_linear_without_quantizers_is_bit_identical_on_any_leading_dims() -> None:
    fc = nn.Linear(6, 3)
    q = QuantLinear.from_float(fc)
    for shape in [(6,), (4, 6), (2, 5, 6)]:
        x = torch.randn(shape)
        assert torch.equal(q(x), fc(x))


def test_from_float_shares_parameters_and_keeps_the_training_flag() -> None:
    fc = nn.Linear(6, 3).eval()
    q = QuantLinear.from_float(fc, weight_quantizer=Sign())
    assert q.weight is fc.weight and q.bias is fc.bias and not q.training
    assert q.weight.device == fc.weight.device and q.weight.dtype == fc.weight.dtype
    conv = nn.Conv2d(2, 4, 3, bias=False)
    qc = QuantConv2d.from_float(conv, input_quantizer=Sign())
    assert qc.bias is None and qc.weight is conv.weight and qc.training


def test_from_float_moves_quantizers_to_the_weight_dtype() -> None:
    fc = nn.Linear(4, 2).double()
    q = QuantLinear.from_float(fc, input_quantizer=Pact(3))
    assert q.input_quantizer.alpha.dtype == torch.float64
    assert q(torch.rand(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_from_float_rejects_subclasses_and_parametrized_layers() -> None:
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="takes an nn.Linear, got MyLinear"):
        QuantLinear.from_float(MyLinear(3, 2))
    with pytest.raises(TypeError, match="takes an nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(3, 2))  # type: ignore[arg-type]

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    fc = nn.Linear(3, 2)
    torch.nn.utils.parametrize.register_parametrization(fc, "weight", Double())
    with pytest.raises(ValueError, match="parametrized"):
        QuantLinear.from_float(fc)


def test_forward_applies_input_then_weight_quantizer() -> None:
    fc = nn.Linear(8, 4)
    q = QuantLinear.from_float(fc, weight_quantizer=Sign(), input_quantizer=Pact(2, alpha=1.5))
    x = torch.randn(5, 8)
    expected = F.linear(Pact(2, alpha=1.5)(x), torch.where(fc.weight == 0, 1.0, fc.weight.sign()), fc.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    qc = QuantConv2d.from_float(conv, weight_quantizer=SIGN)  # a registered name
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(qc(x), F.conv2d(x, conv.weight.sign(), conv.bias, padding=1), atol=1e-5)


def test_gradients_reach_the_latent_weight_and_the_quantizer() -> None:
    q = QuantLinear(8, 4, weight_quantizer=Sign(), input_quantizer=Pact(2))
    with torch.no_grad():
        q.weight.mul_(10)
        q.weight[0, 0] = 0.5  # the only weight inside the hard-tanh window of row 0
        q.weight[0, 1:] = 2.0
    q(torch.rand(16, 8)).sum().backward()
    assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all()
    assert q.weight.grad[0, 0] != 0 and (q.weight.grad[0, 1:] == 0).all()  # |w| > 1: the STE cancels it
    assert q.input_quantizer.alpha.grad is not None


def test_mapping_spec_is_resolved_and_bad_names_are_explained() -> None:
    q = QuantConv2d(2, 2, 1, weight_quantizer={"name": SIGN})
    assert isinstance(q.weight_quantizer, Sign) and q.input_quantizer is None
    with pytest.raises(KeyError, match="unknown quantizer 'no_such_thing'.*test_sign"):
        QuantLinear(2, 2, weight_quantizer="no_such_thing")
    with pytest.raises(TypeError, match="quantizer .test_sign.*unexpected keyword argument .bits."):
        QuantLinear(2, 2, input_quantizer={"name": SIGN, "bits": 3})


def test_state_dict_has_float_keys_plus_quantizer_state_and_round_trips() -> None:
    fc = nn.Linear(6, 3)
    assert set(QuantLinear.from_float(fc).state_dict()) == set(fc.state_dict())
    q = QuantLinear.from_float(fc, weight_quantizer=Sign(), input_quantizer=Pact(3, alpha=2.0))
    assert set(q.state_dict()) == {"weight", "bias", "input_quantizer.alpha"}
    fresh = QuantLinear(6, 3, weight_quantizer=Sign(), input_quantizer=Pact(3))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), q(x)) and fresh.input_quantizer.alpha.item() == 2.0
    plain = QuantLinear(6, 3)  # no quantizers: a float state dict loads strictly
    plain.load_state_dict(fc.state_dict())
    assert torch.equal(plain(x), fc(x))


def test_deepcopy_and_repr_show_bit_widths() -> None:
    q = QuantConv2d(3, 4, 3, weight_quantizer=Sign(), input_quantizer=Pact(4))
    assert "weight_bits=1, input_bits=4" in repr(q)
    assert "weight_bits=float, input_bits=float" in repr(QuantLinear(2, 2))
    c = copy.deepcopy(q)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(c(x), q(x)) and c.weight is not q.weight


def test_quant_act() -> None:
    x = torch.randn(3, 5)
    assert torch.equal(QuantAct()(x), x) and "bits=float" in repr(QuantAct())
    act = QuantAct(SIGN)
    assert set(act(x).unique().tolist()) <= {-1.0, 1.0} and "bits=1" in repr(act)


def test_profile_reads_the_bit_widths_of_quantized_layers() -> None:
    model = nn.Sequential(QuantConv2d(1, 4, 3, weight_quantizer=Sign(), input_quantizer=Pact(2)), nn.Flatten(),
                          QuantLinear(4 * 6 * 6, 10))
    stats = profile(model, (1, 8, 8))
    conv, fc = stats.layers
    assert (conv.weight_bits, conv.act_bits, fc.weight_bits, fc.act_bits) == (1, 2, 32, 32)
    assert conv.bops == conv.macs * 1 * 2 and fc.bops == fc.macs * 32 * 32
    assert conv.params == 4 * 9 + 4 + 1  # the PACT clip counts with its layer, at 32 bits
