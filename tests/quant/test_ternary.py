"""TWN and TTQ: thresholds, scales and gradients checked against the papers' formulas computed here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.quant import get_quantizer
from lowbit.quant.ternary import TTQ, TWN, straight_through, ttq_quantize, twn_fit, twn_quantize

# ---------------------------------------------------------------- TWN


def test_twn_threshold_and_scale_by_hand() -> None:
    w = torch.tensor([0.9, -0.1, 0.3, -0.6, 0.05, 0.0, -1.2, 0.25])
    mean_abs = (0.9 + 0.1 + 0.3 + 0.6 + 0.05 + 0.0 + 1.2 + 0.25) / 8  # 0.425
    delta = 0.7 * mean_abs  # 0.2975: keeps 0.9, 0.3, -0.6, -1.2
    alpha = (0.9 + 0.3 + 0.6 + 1.2) / 4  # 0.75
    d, a = twn_fit(w)
    assert d.item() == pytest.approx(delta) and a.item() == pytest.approx(alpha)
    q = TWN()
    out = q(w)
    expected = torch.tensor([alpha, 0, alpha, -alpha, 0, 0, -alpha, 0])
    torch.testing.assert_close(out, expected)
    assert q.scale.item() == pytest.approx(alpha)
    torch.testing.assert_close(q.levels(), torch.tensor([-alpha, 0.0, alpha]))


def test_twn_output_takes_exactly_three_values() -> None:
    w = torch.randn(64, 32)
    q = TWN()
    out = q(w)
    alpha = q.scale
    assert sorted(out.unique().tolist()) == pytest.approx([-alpha.item(), 0.0, alpha.item()])
    # the independent definition: alpha = mean |w| over |w| > 0.7 mean |w|
    mask = w.abs() > 0.7 * w.abs().mean()
    assert alpha.item() == pytest.approx(w.abs()[mask].mean().item(), rel=1e-6)
    torch.testing.assert_close(out, alpha * torch.sign(w) * mask)


def test_twn_per_channel_fits_each_output_channel() -> None:
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)  # very different channel scales
    q = TWN(per_channel=True)
    out = q(w)
    assert q.scale.shape == (6,) and q.levels() is None
    for c in range(6):
        wc = w[c]
        mask = wc.abs() > 0.7 * wc.abs().mean()
        alpha = wc.abs()[mask].mean()
        torch.testing.assert_close(q.scale[c], alpha)
        torch.testing.assert_close(out[c], alpha * torch.sign(wc) * mask)
        assert len(out[c].unique()) <= 3


def test_twn_gradient_is_straight_through() -> None:
    w = torch.randn(10, 7, requires_grad=True)
    g = torch.randn(10, 7)
    (TWN()(w) * g).sum().backward()
    torch.testing.assert_close(w.grad, g)
    w2 = w.detach().clone().requires_grad_()
    (twn_quantize(w2, per_channel=True) * g).sum().backward()
    torch.testing.assert_close(w2.grad, g)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=40))
def test_twn_outputs_lie_in_its_levels(values: list[float]) -> None:
    w = torch.tensor(values)
    q = TWN()
    out = q(w)
    levels = q.levels()
    assert torch.isin(out, levels).all()
    assert out.shape == w.shape and out.dtype == w.dtype


def test_straight_through_returns_q_exactly() -> None:
    x = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    q = torch.tensor([1 / 3, 0.0, -1 / 3])
    y = straight_through(x, q)
    assert torch.equal(y, q)  # bit-exact values, unlike x + (q - x).detach()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


# ---------------------------------------------------------------- TTQ


def _ttq_regions(w: torch.Tensor, t: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w_tilde = w / w.abs().max()  # the paper normalizes the latent weights to [-1, 1]
    delta = t * w_tilde.abs().max()
    pos, neg = w_tilde > delta, w_tilde < -delta
    return pos, neg, ~(pos | neg)


def test_ttq_forward_threshold_on_normalized_weights() -> None:
    w = torch.tensor([-2.0, -0.11, -0.09, 0.0, 0.09, 0.11, 1.0])  # max|w| = 2: delta = 0.1 in w units
    q = TTQ(init=1.0)
    with torch.no_grad():
        q.w_p.fill_(1.5)
        q.w_n.fill_(0.5)
    torch.testing.assert_close(q(w).detach(), torch.tensor([-0.5, -0.5, 0.0, 0.0, 0.0, 1.5, 1.5]))
    torch.testing.assert_close(q.levels(), torch.tensor([-0.5, 0.0, 1.5]))
    w = torch.randn(40, 30)
    out = q(w).detach()
    pos, neg, zero = _ttq_regions(w)
    assert set(out.unique().tolist()) == {-0.5, 0.0, 1.5}
    assert (out[pos] == 1.5).all() and (out[neg] == -0.5).all() and (out[zero] == 0).all()


def test_ttq_gradients_match_the_papers_formulas() -> None:
    w = torch.randn(20, 16, requires_grad=True)
    q = TTQ(init=1.0)
    with torch.no_grad():
        q.w_p.fill_(0.7)
        q.w_n.fill_(1.3)
    g = torch.randn(20, 16)  # upstream gradient dL/dw^t
    (q(w) * g).sum().backward()
    pos, neg, zero = _ttq_regions(w.detach())
    # dL/dW_p = sum over I_p of dL/dw^t; dL/dW_n = sum over I_n with the chain-rule sign (w^t = -W_n there)
    assert q.w_p.grad.item() == pytest.approx(g[pos].sum().item(), rel=1e-5, abs=1e-5)
    assert q.w_n.grad.item() == pytest.approx(-g[neg].sum().item(), rel=1e-5, abs=1e-5)
    # latent weights: W_p * g on I_p, 1 * g on I_z, W_n * g on I_n
    expected = torch.zeros_like(g)
    expected[pos], expected[zero], expected[neg] = 0.7 * g[pos], g[zero], 1.3 * g[neg]
    torch.testing.assert_close(w.grad, expected)


def test_ttq_scale_gradients_agree_with_autograd_of_the_forward() -> None:
    w = torch.randn(50)
    w_p, w_n = torch.tensor(0.8, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    g = torch.randn(50)
    (ttq_quantize(w, w_p, w_n) * g).sum().backward()
    pos, neg, _ = _ttq_regions(w)
    a_p, a_n = torch.tensor(0.8, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    ((a_p * pos - a_n * neg) * g).sum().backward()  # the same forward, differentiated by autograd
    torch.testing.assert_close(w_p.grad, a_p.grad)
    torch.testing.assert_close(w_n.grad, a_n.grad)


def test_ttq_trains_its_scales_towards_the_target() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(200))
    q = TTQ(init=1.0)
    pos, neg, _ = _ttq_regions(w.detach())
    target = 2.0 * pos - 0.5 * neg  # W_p should grow to 2, W_n shrink to 0.5
    opt = torch.optim.SGD([*q.parameters(), w], lr=1e-3)
    start = (q.w_p.item(), q.w_n.item())
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(q(w), target, reduction="sum").backward()
        opt.step()
    assert q.w_p.item() > start[0] and q.w_n.item() < start[1]  # both moved, each the right way
    assert abs(q.w_p.item() - 2.0) < abs(start[0] - 2.0) and abs(q.w_n.item() - 0.5) < abs(start[1] - 0.5)


def test_ttq_default_init_is_the_region_means_at_first_forward() -> None:
    w = torch.randn(30, 30)
    q = TTQ()
    assert not bool(q.initialized)
    q(w)
    pos, neg, _ = _ttq_regions(w)
    assert q.w_p.item() == pytest.approx(w[pos].mean().item(), rel=1e-6)
    assert q.w_n.item() == pytest.approx(-w[neg].mean().item(), rel=1e-6)
    w_p = q.w_p.item()
    q(w * 10)  # initialized once only
    assert q.w_p.item() == w_p
    fresh = TTQ()
    fresh.load_state_dict(q.state_dict())  # the flag travels with the state: no re-initialization
    torch.testing.assert_close(fresh(w), q(w))


def test_registry_arguments_and_repr() -> None:
    twn, ttq = get_quantizer("twn"), get_quantizer({"name": "ttq", "threshold": 0.1, "init": 1.0})
    assert isinstance(twn, TWN) and isinstance(ttq, TTQ)
    assert twn.bit_width == 2 and ttq.bit_width == 2 and ttq.threshold == 0.1
    assert "per_channel=False" in repr(twn) and "threshold=0.1" in repr(ttq)
    assert twn.scale is None and twn.levels() is None  # nothing fitted yet
    with pytest.raises(ValueError, match="threshold"):
        TTQ(threshold=1.5)
    with pytest.raises(ValueError, match="init"):
        TTQ(init=0.0)


def test_all_zero_weights_stay_zero() -> None:
    w = torch.zeros(4, 4)
    assert torch.equal(TWN()(w), w) and torch.equal(TWN(per_channel=True)(w), w)
    assert torch.equal(TTQ()(w).detach(), w)


# ---------------------------------------------------------------- end to end


class _TernaryLinear(nn.Module):
    """A linear layer whose weight goes through ``weight_quantizer`` (independent of lowbit.nn)."""

    def __init__(self, n_in: int, n_out: int, quantizer: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.weight_quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


@pytest.mark.parametrize("name", ["twn", "ttq"])
def test_ternary_mlp_learns_digits(name: str) -> None:
    from lowbit.data import load_dataset
    from lowbit.train import TrainConfig, fit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), _TernaryLinear(64, 64, get_quantizer(name)), nn.ReLU(),
                          _TernaryLinear(64, 10, get_quantizer(name)))
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=1e-2, channels_last=False, checkpoint_every=0)
    res = fit(model, load_dataset("digits"), cfg, show_progress=False)
    assert res.final["test_acc"] > 80.0
    for layer in (model[1], model[3]):
        assert len(layer.weight_quantizer(layer.weight).unique()) <= 3
