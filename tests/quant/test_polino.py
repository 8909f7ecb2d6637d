"""Polino et al.'s bucketed quantizers: uniform levels (deterministic or stochastic) and learned points."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.quant.polino as polino_module
from lowbit.nn import QuantConv2d
from lowbit.quant import get_quantizer
from lowbit.quant.polino import BucketedPoints, BucketedUniform, bucketed_points, bucketed_uniform, bucketize_tensor


def _buckets_np(x: torch.Tensor, size: int) -> list[np.ndarray]:
    flat = x.detach().double().numpy().reshape(-1)
    return [flat[i:i + size] for i in range(0, flat.size, size)]


def _uniform_reference(x: torch.Tensor, bits: int, size: int) -> np.ndarray:
    """The formula written out bucket by bucket in float64 numpy, nearest level by explicit search."""
    out = []
    s = 2**bits
    for b in _buckets_np(x, size):
        lo, hi = b.min(), b.max()
        levels = lo + (hi - lo) * np.arange(s) / (s - 1) if hi > lo else np.array([lo])
        out.append(levels[np.abs(b[:, None] - levels[None, :]).argmin(1)])
    return np.concatenate(out).reshape(tuple(x.shape))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [7, 64, 256])
def test_uniform_matches_a_bucket_by_bucket_reference(bits: int, size: int) -> None:
    x = torch.randn(10, 3, 3, 3)  # 270 values: the last bucket is partial for every size
    y = bucketed_uniform(x, bits, size)
    np.testing.assert_allclose(y.numpy(), _uniform_reference(x, bits, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_each_bucket_has_at_most_two_to_the_bits_levels_and_keeps_its_extremes(bits: int) -> None:
    x = torch.randn(3000) * torch.linspace(0.1, 5, 3000)
    size = 256
    y = bucketed_uniform(x, bits, size)
    for xb, yb in zip(_buckets_np(x, size), _buckets_np(y, size), strict=True):
        assert np.unique(yb).size <= 2**bits
        assert yb.min() == pytest.approx(xb.min(), abs=1e-6) and yb.max() == pytest.approx(xb.max(), abs=1e-5)
        assert np.abs(yb - xb).max() <= (xb.max() - xb.min()) / (2 * (2**bits - 1)) + 1e-5  # nearest level


def test_whole_tensor_bucket_and_constant_buckets() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(bucketed_uniform(x, 1, None), torch.tensor([[0.0, 0, 0, 5], [5, 5, 5, 5]]))
    torch.testing.assert_close(bucketed_uniform(x, 2, 4), x)  # 4 levels fit each row; a constant row stays
    u, beta, alpha = bucketize_tensor(x, 4)
    torch.testing.assert_close(beta.flatten(), torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(alpha.flatten(), torch.tensor([3.0, 1.0]))  # constant bucket: alpha = 1


def test_straight_through_gradient() -> None:
    x = torch.randn(5, 40, requires_grad=True)
    g = torch.randn(5, 40)
    bucketed_uniform(x, 2, 16).backward(g)
    assert torch.equal(x.grad, g)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbouring_level() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 64) * 3
    x[0, 0], x[0, 1] = 0.0, 3.0  # bucket range [0, 3], 2 bits: levels 0, 1, 2, 3
    draws = torch.stack([bucketed_uniform(x, 2, None, stochastic=True) for _ in range(2000)])
    assert torch.all((draws == torch.floor(x)) | (draws == torch.ceil(x)))  # the two neighbouring levels
    torch.testing.assert_close(draws.mean(0), x, atol=0.05, rtol=0)  # sd of the mean <= 0.5/sqrt(2000) = 0.011
    gen = torch.Generator().manual_seed(3)
    a = bucketed_uniform(x, 2, None, stochastic=True, generator=gen)
    b = bucketed_uniform(x, 2, None, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_the_module_rounds_stochastically_only_in_training_mode_and_records_scale() -> None:
    q = BucketedUniform(bits=2, bucket_size=32, stochastic=True)
    x = torch.rand(4, 32) * 3
    q.eval()
    assert torch.equal(q(x), bucketed_uniform(x, 2, 32))
    torch.testing.assert_close(q.scale, (x.amax(1) - x.amin(1)) / 3)
    torch.testing.assert_close(q.offset, x.amin(1))
    q.train()
    torch.manual_seed(1)
    outs = {tuple(q(x).flatten().tolist()) for _ in range(5)}
    assert len(outs) > 1  # stochastic in training mode
    assert q.levels() is None and q.bit_width == 2


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_points_at_the_uniform_levels_equal_the_uniform_quantizer(bits: int) -> None:
    x = torch.randn(6, 50)
    q = BucketedPoints(bits=bits, bucket_size=64)
    torch.testing.assert_close(q(x), bucketed_uniform(x, bits, 64))


def test_points_gradient_is_the_sum_of_alpha_times_the_incoming_gradient_per_assigned_point() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, requires_grad=True)
    points = torch.tensor([0.0, 0.3, 0.45, 1.0], requires_grad=True)
    g = torch.randn(3, 40)
    y = bucketed_points(x, points, bucket_size=32)
    y.backward(g)
    expected = np.zeros(4)
    out = []
    for xb, gb in zip(_buckets_np(x, 32), _buckets_np(g, 32), strict=True):
        lo, alpha = xb.min(), xb.max() - xb.min()
        idx = np.abs(((xb - lo) / alpha)[:, None] - points.detach().numpy()[None, :]).argmin(1)
        out.append(lo + alpha * points.detach().numpy()[idx])
        np.add.at(expected, idx, alpha * gb)
    np.testing.assert_allclose(y.detach().numpy().reshape(-1), np.concatenate(out), atol=1e-5)
    np.testing.assert_allclose(points.grad.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(x.grad, g)  # straight through to the weights


def test_unsorted_points_snap_to_the_nearest() -> None:
    points = torch.tensor([1.0, 0.0, 0.6])
    y = bucketed_points(torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]), points, bucket_size=None)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.6, 1.0, 1.0]))


def test_quantile_init_places_points_at_quantiles_of_the_normalized_weight() -> None:
    w = torch.randn(64, 32) ** 3  # heavy tails: quantiles differ from the uniform levels
    q = BucketedPoints(bits=2, bucket_size=256, init="quantile")
    q.init_from(w)
    u = np.concatenate([(b - b.min()) / (b.max() - b.min()) for b in _buckets_np(w, 256)])
    np.testing.assert_allclose(q.points.detach().numpy(), np.quantile(u, [0.125, 0.375, 0.625, 0.875]), atol=1e-5)
    untouched = BucketedPoints(bits=2)
    untouched.init_from(w)  # uniform init ignores the weight
    torch.testing.assert_close(untouched.points.detach(), torch.linspace(0, 1, 4))


def test_quantized_layer_uses_the_bucketed_weight() -> None:
    conv = nn.Conv2d(3, 8, 3)
    q = QuantConv2d.from_float(conv, {"name": "bucketed_uniform", "bits": 2, "bucket_size": 27})
    x = torch.randn(2, 3, 6, 6)
    expected = torch.nn.functional.conv2d(x, bucketed_uniform(conv.weight.detach(), 2, 27), conv.bias)
    torch.testing.assert_close(q(x), expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, "bits must be an int in"), ({"bits": 17}, "bits must be an int in"),
    ({"bits": True}, "bits must be an int in"), ({"bucket_size": 0}, "bucket_size must be a positive int"),
    ({"bucket_size": 2.5}, "bucket_size must be a positive int"),
])
def test_bad_arguments_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_quantizer({"name": "bucketed_uniform", **kwargs})
    with pytest.raises(ValueError, match=match):
        get_quantizer({"name": "bucketed_points", **kwargs})


def test_bad_points_and_init_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="init must be 'uniform' or 'quantile'"):
        BucketedPoints(init="kmeans")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bucketed_points(torch.randn(4), torch.zeros(2, 2))


def test_doctests() -> None:
    res = doctest.testmod(polino_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
