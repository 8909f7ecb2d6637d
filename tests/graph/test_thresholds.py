"""BN + sign as thresholds: the float64 form, and the exact integer / float32 forms checked against PyTorch's BN."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import lowbit.graph.thresholds as thresholds_mod
from lowbit.graph.thresholds import apply_thresholds, bn_sign_thresholds, float_thresholds, integer_thresholds


def _torch_sign_bn(bn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """PyTorch's eval-mode sign(BN(z)) for z [M, C], in the BN's own layout (sign(0) = +1)."""
    bn = bn.eval()
    with torch.no_grad():
        y = bn(z if isinstance(bn, nn.BatchNorm1d) else z[:, :, None, None]).reshape(z.shape)
    return torch.where(y < 0, -1.0, 1.0)


def _random_bn(kind: type[nn.Module], c: int, seed: int, integer_means: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = kind(c)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.weight[: c // 4] *= -1  # some negative gammas for sure
        bn.weight[c // 4] = 0.0  # a constant channel
        bn.bias.copy_(torch.randn(c, generator=g))
        mean = torch.randn(c, generator=g) * 20
        bn.running_mean.copy_(mean.round() if integer_means else mean)
        bn.running_var.copy_(torch.rand(c, generator=g) * 40 + 1e-3)
        if integer_means:
            bn.bias.zero_()  # BN(acc) = 0 exactly at acc = mean: the sign(0) = +1 tie
    return bn.eval()


def test_doctests() -> None:
    assert doctest.testmod(thresholds_mod).failed == 0


def test_real_thresholds_follow_the_formula() -> None:
    bn = _random_bn(nn.BatchNorm1d, 16, 0).double()
    th = bn_sign_thresholds(bn)
    w, b, m, v = bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var
    expect = m - b * torch.sqrt(v + bn.eps) / w  # the zero of gamma (z - mu) / sd + beta
    normal = w != 0
    assert torch.allclose(th.threshold[normal], expect[normal].double(), rtol=1e-12, atol=1e-9)
    assert torch.equal(th.flip, w < 0)
    assert th.constant.tolist() == [0 if wi != 0 else (1 if bi >= 0 else -1) for wi, bi in zip(w, b, strict=True)]


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d])
@pytest.mark.parametrize("integer_means", [False, True])
def test_integer_thresholds_match_torch_on_every_integer(kind: type[nn.Module], integer_means: bool) -> None:
    k = 300
    bn = _random_bn(kind, 96, 1, integer_means)
    t, flip = integer_thresholds(bn_sign_thresholds(bn), -k, k)
    acc = torch.arange(-k, k + 1, dtype=torch.float32)[:, None].expand(-1, 96).contiguous()
    assert torch.equal(apply_thresholds(acc, t, flip), _torch_sign_bn(bn, acc))
    assert torch.equal(flip, bn.weight.detach() < 0)


def test_integer_thresholds_near_float32_rounding() -> None:
    """Thresholds a hair from an integer, where float32 and float64 disagree on which side the integer is."""
    c = 512
    bn = nn.BatchNorm1d(c).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_var.fill_(1.0 - bn.eps)  # sd = 1 (up to rounding)
        bn.weight.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        bn.weight[::2] *= -1
        base = torch.randint(-1000, 1000, (c,), generator=g).float()
        bn.running_mean.copy_(base + (torch.rand(c, generator=g) - 0.5) * 2e-4)  # within ~1e-4 of an integer
        bn.bias.copy_((torch.rand(c, generator=g) - 0.5) * 1e-6)
    t, flip = integer_thresholds(bn_sign_thresholds(bn), -2048, 2048)
    acc = torch.arange(-2048, 2049, dtype=torch.float32)[:, None].expand(-1, c).contiguous()
    assert torch.equal(apply_thresholds(acc, t, flip), _torch_sign_bn(bn, acc))


def test_bias_and_scale_before_the_bn() -> None:
    bn = _random_bn(nn.BatchNorm1d, 32, 4)
    g = torch.Generator().manual_seed(5)
    bias, scale = torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.05
    scale[:5] *= -1  # a negative scale flips the direction once more
    th = bn_sign_thresholds(bn, bias=bias, scale=scale)
    assert torch.equal(th.flip, (bn.weight.detach() * scale) < 0)
    k = 200
    t, flip = integer_thresholds(th, -k, k)
    acc = torch.arange(-k, k + 1, dtype=torch.float32)[:, None].expand(-1, 32)
    ref = _torch_sign_bn(bn, acc * scale + bias)
    assert torch.equal(apply_thresholds(acc, t, flip), ref)


def test_out_of_range_thresholds_mean_constant_on_the_range() -> None:
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1000.0, -1000.0]))  # +1 from 1000 (never in [-10, 10]); always
    t, flip = integer_thresholds(bn_sign_thresholds(bn), -10, 10)
    assert t.tolist() == [11, -10] and not flip.any()


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d])
def test_float_thresholds_are_exact_in_float32(kind: type[nn.Module]) -> None:
    c = 64
    bn = _random_bn(kind, c, 6)
    t, flip = float_thresholds(bn_sign_thresholds(bn))
    assert t.dtype == torch.float32
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2000, c, generator=g) * 40
    finite = torch.isfinite(t)
    edge = torch.where(finite, t, torch.zeros(c))
    up = torch.nextafter(edge, torch.tensor(float("inf")))
    down = torch.nextafter(edge, torch.tensor(float("-inf")))
    x = torch.cat([x, edge[None], up[None], down[None]])  # the float32 neighbours of every threshold
    assert torch.equal(apply_thresholds(x, t, flip), _torch_sign_bn(bn, x))
    # and the threshold is where the output changes: +1 at t, -1 one ulp outside (normal channels)
    normal = finite & (bn_sign_thresholds(bn).constant == 0)
    at, out = _torch_sign_bn(bn, edge[None])[0], _torch_sign_bn(bn, torch.where(flip, up, down)[None])[0]
    assert (at[normal] == 1).all() and (out[normal] == -1).all()


def test_constant_channel_threshold() -> None:
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([0.5, -0.5]))
    th = bn_sign_thresholds(bn)
    assert th.constant.tolist() == [1, -1]
    t, flip = integer_thresholds(th, -5, 5)
    assert t.tolist() == [-5, 6]


def test_errors() -> None:
    with pytest.raises(TypeError, match="BatchNorm1d or nn.BatchNorm2d"):
        bn_sign_thresholds(nn.LayerNorm(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="track_running_stats"):
        bn_sign_thresholds(nn.BatchNorm1d(3, track_running_stats=False))
    bad = nn.BatchNorm1d(3)
    with torch.no_grad():
        bad.running_mean[0] = float("nan")
    with pytest.raises(ValueError, match="running_mean holds NaN"):
        bn_sign_thresholds(bad)
    with pytest.raises(ValueError, match="one value per channel"):
        bn_sign_thresholds(nn.BatchNorm1d(3), bias=torch.zeros(4))
    th = bn_sign_thresholds(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="lo <= hi"):
        integer_thresholds(th, 5, -5)
    with pytest.raises(ValueError, match="2\\^24"):
        integer_thresholds(th, -(2**25), 0)
