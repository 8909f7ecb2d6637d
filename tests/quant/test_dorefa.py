"""DoReFa-Net: k-bit weights and activations with straight-through gradients, stochastic G-bit gradients."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.quant.dorefa as dorefa_module
from lowbit.quant import get_quantizer
from lowbit.quant.dorefa import (
    DorefaAct,
    DorefaGrad,
    DorefaWeight,
    dorefa_act,
    dorefa_grad,
    dorefa_weight,
    quantize_grad,
    quantize_k,
)


def _levels(k: int) -> torch.Tensor:
    return torch.arange(2**k) / (2**k - 1)


# ------------------------------------------------------------------------------------------ quantize_k


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_quantize_k_levels_and_identity_gradient(k: int) -> None:
    r = torch.linspace(0, 1, 1001, requires_grad=True)
    q = quantize_k(r, k)
    torch.testing.assert_close(q.detach().unique(), _levels(k))
    n = 2**k - 1
    assert torch.all((q.detach() - r.detach()).abs() <= 0.5 / n + 1e-6)  # nearest level
    g = torch.randn(r.shape)
    q.backward(g)
    torch.testing.assert_close(r.grad, g)  # n / n, up to float rounding
    with pytest.raises(ValueError, match="bits"):
        quantize_k(r, 0)


# --------------------------------------------------------------------------------------------- weights


def test_one_bit_weights_are_sign_times_mean_abs_with_identity_gradient() -> None:
    w = torch.randn(8, 5, requires_grad=True)
    y = dorefa_weight(w, 1)
    e = w.detach().abs().mean()  # over the whole tensor, not per channel
    assert torch.equal(y.detach(), torch.where(w.detach() >= 0, e, -e))
    g = torch.randn(8, 5)
    y.backward(g)
    assert torch.equal(w.grad, g * e)  # d(sign(w) E)/dw = E * 1 (STE), E a constant
    q = DorefaWeight(bits=1)
    q(w)
    torch.testing.assert_close(q.scale, e)
    assert q.levels() is None and q.bit_width == 1


@pytest.mark.parametrize("k", [2, 3])
def test_k_bit_weight_levels(k: int) -> None:
    w = torch.randn(64, 32) * 2
    y = dorefa_weight(w, k)
    expected = 2 * _levels(k) - 1  # k = 2: -1, -1/3, 1/3, 1
    torch.testing.assert_close(y.unique(), expected)
    torch.testing.assert_close(DorefaWeight(bits=k).levels(), expected)
    if k == 2:
        torch.testing.assert_close(expected, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    t = torch.tanh(w)  # the formula written out, rounding with an independent nearest-level search
    x = t / (2 * t.abs().max()) + 0.5
    nearest = _levels(k)[(x[..., None] - _levels(k)).abs().argmin(-1)]
    torch.testing.assert_close(y, 2 * nearest - 1)
    assert y.flatten()[w.abs().argmax()].abs() == 1  # the largest |w| maps to +-1


def test_k_bit_weight_gradient_is_straight_through_the_rounding_only() -> None:
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 4, dtype=torch.float64)
    dorefa_weight(w, 2).backward(g)
    w2 = w.detach().clone().requires_grad_()
    t = torch.tanh(w2)
    (2 * (t / (2 * t.abs().max()) + 0.5) - 1).backward(g)  # the same map without the rounding
    torch.testing.assert_close(w.grad, w2.grad)


def test_all_zero_weights_stay_finite() -> None:
    for k in (1, 2, 4):
        assert torch.isfinite(dorefa_weight(torch.zeros(3, 3), k)).all()


@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40), st.integers(2, 5))
@settings(max_examples=50, deadline=None)
def test_weight_outputs_are_levels(values: list[float], k: int) -> None:
    y = dorefa_weight(torch.tensor(values), k)
    levels = DorefaWeight(bits=k).levels()
    assert torch.all((y[:, None] - levels).abs().min(1).values < 1e-5)


# ----------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_activation_levels_clip_and_gradient(k: int) -> None:
    x = torch.linspace(-1, 2, 3001, requires_grad=True)
    y = dorefa_act(x, k)
    torch.testing.assert_close(y.detach().unique(), _levels(k))  # k/(2^k - 1) levels, i = 0..2^k - 1
    q = DorefaAct(bits=k)
    torch.testing.assert_close(q.levels(), _levels(k))
    torch.testing.assert_close(q.scale, torch.tensor(1 / (2**k - 1)))
    assert int(q.zero_point) == 0 and q.bit_width == k
    assert torch.all(y.detach()[x.detach() < 0] == 0) and torch.all(y.detach()[x.detach() > 1] == 1)
    y.sum().backward()
    assert torch.equal(x.grad, ((x.detach() >= 0) & (x.detach() <= 1)).float())


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gradient_quantizer_is_unbiased(bits: int) -> None:
    torch.manual_seed(1)
    g = torch.tensor([0.9, -0.35, 0.1, 0.0, -0.02, 0.6, -1.2, 0.45])  # one sample, max |g| = 1.2
    draws = 20000
    q = quantize_grad(g.expand(draws, -1).contiguous(), bits)  # every row: an independent quantization of g
    n = 2**bits - 1
    # per element the error is at most one step (2 max / n) and has mean 0: 5 sigma of the mean, sigma <= step/2
    margin = 5 * (2 * 1.2 / n) / 2 / draws**0.5
    assert torch.all((q.mean(0) - g).abs() <= margin), (q.mean(0), g)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gradient_quantizer_takes_at_most_2_to_the_g_levels_per_sample(bits: int) -> None:
    torch.manual_seed(2)
    g = torch.randn(5, 3, 8, 8) * torch.tensor([1e-3, 1.0, 10.0, 0.5, 2.0]).view(5, 1, 1, 1)  # scales differ
    q = quantize_grad(g, bits)
    n = 2**bits - 1
    for s in range(5):
        m = g[s].abs().max()
        values = q[s].unique()
        assert len(values) <= 2**bits
        i = (values / (2 * m) + 0.5) * n  # before rescaling: integers 0..n
        torch.testing.assert_close(i, i.round(), atol=1e-4, rtol=0)
        assert i.min() >= -1e-4 and i.max() <= n + 1e-4
    assert torch.equal(quantize_grad(torch.zeros(2, 4), bits), torch.zeros(2, 4))


def test_dorefa_grad_is_identity_forward_and_quantizes_backward() -> None:
    x = torch.randn(4, 10, requires_grad=True)
    y = dorefa_grad(x, 3)
    assert torch.equal(y, x)
    g = torch.randn(4, 10)
    torch.manual_seed(7)
    y.backward(g)
    torch.manual_seed(7)
    assert torch.equal(x.grad, quantize_grad(g, 3))  # the same draws from torch's RNG
    q = get_quantizer({"name": "dorefa_grad", "grad_bits": 3})
    assert isinstance(q, DorefaGrad) and q.bit_width == 32 and q.grad_bits == 3 and q.levels() is None
    assert "grad_bits=3" in repr(q)


def test_dorefa_act_with_grad_bits() -> None:
    x = torch.randn(6, 20, requires_grad=True)
    q = DorefaAct(bits=2, grad_bits=2)
    y = q(x)
    assert torch.equal(y, dorefa_act(x.detach(), 2))
    g = torch.randn(6, 20)
    torch.manual_seed(3)
    y.backward(g)
    inside = ((x.detach() >= 0) & (x.detach() <= 1)).float()
    torch.manual_seed(3)
    assert torch.equal(x.grad, quantize_grad(g * inside, 2))  # the clip's mask first, then quantized
    assert "grad_bits=2" in repr(q)


# ---------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name,cls,bits", [("dorefa_weight", DorefaWeight, 1), ("dorefa_act", DorefaAct, 2),
                                           ("dorefa_grad", DorefaGrad, 32)])
def test_registered_with_the_contract(name: str, cls: type, bits: int) -> None:
    q = get_quantizer(name)
    assert type(q) is cls and q.bit_width == bits and isinstance(q.bit_width, int)
    x = torch.randn(4, 5)
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert f"bit_width={bits}" in repr(q)
    assert type(get_quantizer({"name": "dorefa_weight", "bits": 3})) is DorefaWeight
    with pytest.raises(ValueError, match="bits"):
        DorefaWeight(bits=0)
    with pytest.raises(ValueError, match="grad_bits"):
        DorefaAct(bits=2, grad_bits=33)


def test_docstring_examples_run() -> None:
    res = doctest.testmod(dorefa_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 10 and res.failed == 0
