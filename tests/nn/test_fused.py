"""Fused conv + BN (+ReLU): the paper's batch-norm folding in training and inference, checked against plain
torch conv -> BatchNorm2d -> ReLU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.fused import ConvBnAct2d, LinearAct, fold_bn_into_conv


def _pair(bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_into_conv_equals_conv_then_bn(bias: bool) -> None:
    conv, bn = _pair(bias)
    bn.eval()
    x = torch.randn(4, 3, 8, 8)
    w, b = fold_bn_into_conv(conv.weight, conv.bias, bn)
    assert torch.allclose(F.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_equals_batch_norm_with_batch_statistics(bias: bool) -> None:
    conv, bn = _pair(bias)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = ConvBnAct2d(conv, bn, act="relu").train()
    x = torch.randn(8, 3, 6, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = fused(x)
    y_ref = F.relu(ref_bn.train()(ref_conv(xr)))
    assert torch.allclose(y, y_ref, atol=1e-4)  # the running-statistics correction makes it exact
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-4)
    assert torch.allclose(conv.weight.grad, ref_conv.weight.grad, atol=1e-3)
    assert torch.allclose(bn.weight.grad, ref_bn.weight.grad, atol=1e-3)


def test_eval_and_frozen_use_running_statistics() -> None:
    conv, bn = _pair()
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU6()).eval()
    fused = ConvBnAct2d(conv, bn, act="relu6")
    x = 3 * torch.randn(4, 3, 6, 6)
    assert torch.allclose(fused.eval()(x), ref(x), atol=1e-5)
    fused.train()
    fused.freeze_bn()
    before = bn.running_mean.clone()
    assert torch.allclose(fused(x), ref(x), atol=1e-5)
    assert torch.equal(bn.running_mean, before)  # frozen: no more updates


def test_weight_quantizer_sees_the_folded_weight() -> None:
    conv, bn = _pair()
    fused = ConvBnAct2d(conv, bn, weight_quantizer="int8_weight").eval()
    x = torch.randn(2, 3, 5, 5)
    w, b = fold_bn_into_conv(conv.weight, conv.bias, bn)
    s = w.detach().abs().amax((1, 2, 3)) / 127
    wq = torch.round(w / s[:, None, None, None]).clamp(-127, 127) * s[:, None, None, None]
    assert torch.allclose(fused(x), F.conv2d(x, wq, b, padding=1), atol=1e-5)
    assert torch.allclose(fused.weight_quantizer.scale, s)


def test_gamma_zero_channel_gives_beta() -> None:
    conv, bn = _pair()
    with torch.no_grad():
        bn.weight[2] = 0.0
    fused = ConvBnAct2d(conv, bn).train()
    y = fused(torch.randn(4, 3, 5, 5))
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, 2], torch.full_like(y[:, 2], float(bn.bias[2].detach())), atol=1e-6)


def test_linear_act_is_relu_of_linear() -> None:
    fc = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    assert torch.equal(LinearAct(fc, "relu")(x), F.relu(fc(x)))
    assert torch.equal(LinearAct(fc, "relu6")(x * 10), F.relu6(fc(x * 10)))


def test_bad_inputs_are_clear_errors() -> None:
    conv, bn = _pair()
    with pytest.raises(ValueError, match="act must be None, 'relu' or 'relu6'"):
        ConvBnAct2d(conv, bn, act="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="6 output channels"):
        ConvBnAct2d(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        ConvBnAct2d(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="takes an nn.Conv2d"):
        ConvBnAct2d(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without running statistics"):
        ConvBnAct2d(conv, nn.BatchNorm2d(6, track_running_stats=False))
