"""The faster quantizer paths introduced for bench.qat_step_cost give exactly what the plain formulas give."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant.binary import hard_sigmoid, ste_sign, stochastic_sign, swish_sign

SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30]


def _reference_sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(+-0) = +1 and NaN kept, written the obvious way."""
    y = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return torch.where(torch.isnan(x), x, y)


def _inputs(dtype: torch.dtype, channels_last: bool, nan: bool) -> torch.Tensor:
    x = torch.randn(4, 6, 5, 5, dtype=dtype)
    special = torch.tensor(SPECIAL, dtype=dtype)
    if not nan:
        special = special[~torch.isnan(special)]
    x.view(-1)[: special.numel()] = special
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("nan", [False, True])
def test_sign_forward_matches_reference(dtype: torch.dtype, channels_last: bool, nan: bool) -> None:
    x = _inputs(dtype, channels_last, nan)
    for y in (ste_sign(x), swish_sign(x)):
        ref = _reference_sign(x)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or x.dim() != 4


def test_sign_inf_minus_inf_sum_still_exact() -> None:
    """+inf and -inf make the sum NaN without any NaN: the slow path must then change nothing."""
    x = torch.tensor([float("inf"), float("-inf"), -2.0, 0.0])
    assert torch.equal(ste_sign(x), torch.tensor([1.0, -1.0, -1.0, 1.0]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_stochastic_sign_matches_reference_draws(channels_last: bool) -> None:
    x = _inputs(torch.float32, channels_last, nan=True)
    y = stochastic_sign(x, generator=torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))  # the same draws
    ref = torch.where(u < hard_sigmoid(x), 1.0, -1.0)
    ref = torch.where(torch.isnan(x), x, ref)
    assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))


def test_ste_sign_gradient_unchanged() -> None:
    x = _inputs(torch.float32, True, nan=False).requires_grad_()
    g = torch.randn(x.shape)
    ste_sign(x).backward(g)
    assert torch.equal(x.grad, g * (x.detach().abs() <= 1.0).float())


def _reference_signswish_grads(x: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The SignSwish derivatives in the direct form (float64): beta (2 - u t)(1 - t^2) / 2 and x (...) / 2."""
    u = beta * x
    t = torch.tanh(u / 2)
    common = (2 - u * t) * (1 - t * t) / 2
    return g * beta * common, (g * x * common).sum()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_swish_sign_gradients_match_the_direct_form(channels_last: bool, trainable: bool) -> None:
    x = _inputs(torch.float32, channels_last, nan=False)
    x = torch.where(torch.isinf(x), x.sign() * 1e30, x)  # at +-inf both forms give inf * 0 = NaN
    x[0, 0, 0, :2] = torch.tensor([40.0, -40.0])  # where cosh overflows
    g = torch.randn(x.shape)
    beta = torch.tensor(3.0, requires_grad=trainable)
    xg = x.clone().requires_grad_()
    swish_sign(xg, beta).backward(g)
    ref_x, ref_beta = _reference_signswish_grads(x.double(), g.double(), beta.detach().double())
    assert torch.isfinite(xg.grad).all()
    torch.testing.assert_close(xg.grad, ref_x.float(), rtol=1e-5, atol=1e-6)
    if trainable:
        torch.testing.assert_close(beta.grad, ref_beta.float(), rtol=1e-4, atol=1e-5)
    else:
        assert beta.grad is None
    g_saved = g.clone()
    assert torch.equal(g, g_saved)  # the upstream gradient is not modified in place


def test_project_to_grid_channels_last_same_values_no_warning() -> None:
    import warnings

    from lowbit.quant.loss_aware import linear_grid, project_to_grid

    u = torch.randn(8, 4, 3, 3) * 1.5
    ref = project_to_grid(u, linear_grid(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the non-contiguous-input warning of bucketize would fail here
        got = project_to_grid(u.contiguous(memory_format=torch.channels_last), linear_grid(3))
    assert torch.equal(got, ref)
    levels = torch.tensor([-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0])  # nearest level, written directly
    assert torch.equal(ref, levels[(u.unsqueeze(-1) - levels).abs().argmin(-1)])


def test_swish_sign_init_scale_again_updates_the_same_parameter() -> None:
    """quantize_ creates alpha (init_from); calling init_scale afterwards used to raise (in-place copy into a
    leaf that requires grad) -- the MNIST benchmark's BNN+ row did exactly that."""
    from torch import nn

    from lowbit.nn import QuantLinear
    from lowbit.quant.binary import SwishSign

    layer = QuantLinear.from_float(nn.Linear(3, 2), weight_quantizer=SwishSign())
    alpha = layer.weight_quantizer.alpha
    with torch.no_grad():
        layer.weight.mul_(2)
    assert layer.weight_quantizer.init_scale(layer.weight) is alpha  # same object: an optimizer still trains it
    torch.testing.assert_close(alpha.detach(), layer.weight.detach().abs().mean(1))
    assert alpha.requires_grad
