"""QIL: transformer values and gradients against the paper's formulas evaluated by hand, levels, the
initialization, learning of c/d/gamma, progressive bit reduction and a digits run through ``quantize_``."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import lowbit.quant.qil as qil_module
from lowbit.quant import QuantConfig, get_quantizer, quantize_
from lowbit.quant.qil import (
    QILAct,
    QILWeight,
    fit_clip,
    qil_act_quantize,
    qil_act_transform,
    qil_discretize,
    qil_weight_transform,
)


def _set(q: QILWeight | QILAct, c: float, d: float, gamma: float | None = None, unit: float = 1.0) -> None:
    """Interval center c and half-width d in the units of the data (stored as c/unit, d/unit)."""
    with torch.no_grad():
        q.unit.fill_(unit)
        q.c.fill_(c / unit)
        q.d.fill_(d / unit)
        if gamma is not None:
            q.gamma.fill_(gamma)
        q.initialized.fill_(True)


# ------------------------------------------------------------------------------------- forward values


def test_weight_transform_by_hand() -> None:
    # c = 0.5, d = 0.25: prune |w| < 0.25, clip |w| > 0.75; alpha = 2, beta = -0.5; gamma = 2
    w = torch.tensor([0.1, -0.2, 0.6, -0.6, 0.8, -3.0, 0.0])
    t = qil_weight_transform(w, torch.tensor(0.5), torch.tensor(0.25), torch.tensor(2.0))
    u = 2 * 0.6 - 0.5  # 0.7
    torch.testing.assert_close(t, torch.tensor([0.0, 0.0, u**2, -(u**2), 1.0, -1.0, 0.0]))


def test_weight_quantizer_levels_by_hand() -> None:
    q = QILWeight(bits=4)  # q = 2^3 - 1 = 7 steps per unit, 15 levels
    _set(q, 0.5, 0.25, 2.0)
    out = q(torch.tensor([0.6, -0.6, 0.3, 5.0, 0.01]))
    # 0.6 -> 0.49 -> round(3.43) / 7 = 3/7; 0.3 -> u = 0.1, 0.01 -> round(0.07) = 0
    torch.testing.assert_close(out, torch.tensor([3 / 7, -3 / 7, 0.0, 1.0, 0.0]))


def test_act_transform_by_hand() -> None:
    # c = 1, d = 0.5: interval [0.5, 1.5], alpha = 1, beta = -0.5
    x = torch.tensor([-2.0, 0.2, 0.5, 1.2, 1.5, 4.0])
    torch.testing.assert_close(qil_act_transform(x, torch.tensor(1.0), torch.tensor(0.5)),
                               torch.tensor([0.0, 0.0, 0.0, 0.7, 1.0, 1.0]))
    q = QILAct(bits=2)  # levels 0, 1/3, 2/3, 1
    _set(q, 1.0, 0.5)
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 2 / 3, 1.0, 1.0]))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_weight_levels_sign_kept_and_count(bits: int) -> None:
    q = QILWeight(bits=bits)
    w = torch.randn(64, 32)
    out = q(w).detach()
    steps = 2 ** (bits - 1) - 1
    expected = torch.arange(-steps, steps + 1) / steps  # the paper's q_D = 2^(N-1) - 1, symmetric
    torch.testing.assert_close(q.levels(), expected)
    assert out.unique().numel() <= 2**bits - 1
    assert torch.isin(out, expected).all()
    assert torch.all(out * w >= 0)  # the sign is kept (or the weight is pruned to 0)
    if bits == 2:
        torch.testing.assert_close(q.levels(), torch.tensor([-1.0, 0.0, 1.0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_act_levels_and_count(bits: int) -> None:
    q = QILAct(bits=bits)
    x = torch.relu(torch.randn(8, 4, 6, 6)) * 3
    out = q(x).detach()
    expected = torch.arange(2**bits) / (2**bits - 1)
    torch.testing.assert_close(q.levels(), expected)
    assert torch.isin(out, expected).all() and out.unique().numel() <= 2**bits
    assert out.min() >= 0 and out.max() <= 1


def test_discretizer_is_round_with_identity_gradient() -> None:
    v = torch.linspace(-1, 1, 201, requires_grad=True)
    out = qil_discretize(v, 3)
    ref = torch.tensor([round(float(x) * 3) / 3 for x in v.detach()])  # Python's round is half-to-even too
    torch.testing.assert_close(out.detach(), ref)
    g = torch.randn(201)
    out.backward(g)
    assert torch.equal(v.grad, g)


# ------------------------------------------------------------------------------------------ gradients


def _weight_grads(w: float, c: float, d: float, gamma: float) -> tuple[float, float, float, float]:
    q = QILWeight(bits=8)
    _set(q, c, d, gamma)
    x = torch.tensor([w], requires_grad=True)
    q(x).sum().backward()  # dL/dout = 1: the gradients are the transformer's partial derivatives (STE)
    return x.grad.item(), q.c.grad.item(), q.d.grad.item(), q.gamma.grad.item()


def test_weight_gradients_inside_the_interval_by_hand() -> None:
    # c = 0.5, d = 0.25, gamma = 2, w = 0.6: alpha = 2, u = 0.7
    # dT/dw = gamma alpha u^(gamma-1) = 2 * 2 * 0.7 = 2.8
    # dT/dc = gamma u^(gamma-1) * (-0.5/d) = 1.4 * -2 = -2.8
    # dT/dd = gamma u^(gamma-1) * 0.5 (c - |w|)/d^2 = 1.4 * 0.5 * (-0.1) / 0.0625 = -1.12
    # dT/dgamma = u^gamma ln u = 0.49 ln 0.7
    gw, gc, gd, gg = _weight_grads(0.6, 0.5, 0.25, 2.0)
    assert gw == pytest.approx(2.8, rel=1e-5)
    assert gc == pytest.approx(-2.8, rel=1e-5)
    assert gd == pytest.approx(-1.12, rel=1e-5)
    assert gg == pytest.approx(0.49 * math.log(0.7), rel=1e-5)
    # a negative weight: T = -u^gamma, so c, d and gamma get the opposite sign, w the same (odd function)
    gw, gc, gd, gg = _weight_grads(-0.6, 0.5, 0.25, 2.0)
    assert (gw, gc, gd, gg) == pytest.approx((2.8, 2.8, 1.12, -0.49 * math.log(0.7)), rel=1e-5)


def test_weight_gradients_with_gamma_one_are_linear() -> None:
    # gamma = 1: dT/dw = alpha = 0.5/d = 1.25; dT/dc = -1.25; dT/dd = 0.5 (c - w) / d^2 = 0.5 * 0.3 / 0.16
    gw, gc, gd, gg = _weight_grads(0.3, 0.6, 0.4, 1.0)
    u = 0.5 / 0.4 * 0.3 + 0.5 - 0.5 * 0.6 / 0.4  # 0.125
    assert (gw, gc, gd) == pytest.approx((1.25, -1.25, 0.5 * 0.3 / 0.16), rel=1e-5)
    assert gg == pytest.approx(u * math.log(u), rel=1e-5)


@pytest.mark.parametrize("w", [0.1, -0.2, 0.9, -5.0])
def test_pruned_and_clipped_weights_pass_no_gradient(w: float) -> None:
    assert _weight_grads(w, 0.5, 0.25, 2.0) == (0.0, 0.0, 0.0, 0.0)


def test_act_gradients_by_hand() -> None:
    q = QILAct(bits=8)
    _set(q, 1.0, 0.5)
    x = torch.tensor([1.2, 0.2, 4.0], requires_grad=True)  # inside, pruned, clipped
    q(x).backward(torch.tensor([1.0, 1.0, 1.0]))
    # inside: dT/dx = alpha = 0.5/d = 1; dT/dc = -0.5/d = -1; dT/dd = 0.5 (c - x)/d^2 = 0.5 * -0.2 / 0.25 = -0.4
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 0.0, 0.0]))
    assert float(q.c.grad) == pytest.approx(-1.0, rel=1e-5)
    assert float(q.d.grad) == pytest.approx(-0.4, rel=1e-5)
    assert not hasattr(q, "gamma")  # activations: gamma = 1, not learned


def test_stored_parameters_are_in_units_of_unit() -> None:
    # the same real interval (c = 0.5, d = 0.25) stored with unit = 0.1: c = 5, d = 2.5; same output, and by the
    # chain rule the stored parameters get unit times the real gradients (-2.8 and -1.12, see above)
    q = QILWeight(bits=8)
    _set(q, 0.5, 0.25, 2.0, unit=0.1)
    assert q.c.item() == pytest.approx(5.0) and q.interval == pytest.approx((0.25, 0.75))
    x = torch.tensor([0.6], requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert out.item() == pytest.approx(round(0.49 * 127) / 127)
    assert q.c.grad.item() == pytest.approx(0.1 * -2.8, rel=1e-5)
    assert q.d.grad.item() == pytest.approx(0.1 * -1.12, rel=1e-5)
    assert x.grad.item() == pytest.approx(2.8, rel=1e-5)


def test_gradients_match_finite_differences_of_the_transformer() -> None:
    w = (torch.randn(40, dtype=torch.float64) * 0.5).requires_grad_()
    c = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    # away from the interval's ends, where the transformer is not differentiable
    with torch.no_grad():
        ends = torch.tensor([0.1, 0.7], dtype=torch.float64)
        w.copy_(torch.where((w.abs()[:, None] - ends).abs().min(1).values < 1e-3, w + 0.01, w))
    assert torch.autograd.gradcheck(qil_weight_transform, (w, c, d, g))


def test_fused_activation_quantizer_matches_the_composed_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64) * 2).to(memory_format=torch.channels_last)
    upstream = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda x, c, d: qil_act_quantize(x, c, d, 7),
               lambda x, c, d: qil_discretize(qil_act_transform(x, c, d), 7)):  # autograd through torch ops
        xi = x.clone().requires_grad_()
        c = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
        d = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)  # |d| is used: the sign flips d's gradient
        out = fn(xi, c, d)
        out.backward(upstream)
        grads.append((out.detach(), xi.grad, c.grad, d.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert grads[0][0].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- initialization


def test_fit_clip_on_a_gaussian_finds_the_lloyd_max_ternary_quantizer() -> None:
    # 3 levels 0, +-b with thresholds +-b/2 (2-bit QIL weights): for N(0, 1) the MSE-optimal (Lloyd-Max)
    # quantizer has b = 1.224 (threshold 0.612), a known value independent of this code
    w = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    b = float(fit_clip(w.abs(), q=1))
    assert b == pytest.approx(1.224, rel=0.04)


def test_fit_clip_is_no_worse_than_other_clips() -> None:
    x = torch.relu(torch.randn(5000)) ** 2  # skewed
    b = float(fit_clip(x, q=3))

    def err(clip: float) -> float:
        return float(((torch.round((x / clip).clamp(max=1) * 3) / 3 * clip - x) ** 2).mean())

    for other in [0.5 * b, 0.8 * b, 0.95 * b, 1.05 * b, 1.3 * b, float(x.max())]:
        assert err(b) <= err(other) + 1e-9
    assert float(fit_clip(torch.zeros(10), q=3)) == 0.0


def test_weight_init_from_sets_an_unpruned_interval_and_gamma_one() -> None:
    w = torch.randn(16, 8, 3, 3) * 0.1
    q = QILWeight(bits=3)
    with torch.no_grad():
        q.gamma.fill_(3.0)
    q.init_from(w)
    lo, hi = q.interval
    assert lo == pytest.approx(0.0, abs=1e-7) and q.c.item() == q.d.item() == 0.5
    assert hi == pytest.approx(float(fit_clip(w.abs(), 3)), rel=1e-6) and 0 < hi <= float(w.abs().max())
    assert q.gamma.item() == 1.0 and bool(q.initialized)


def test_act_interval_comes_from_the_first_batch_only() -> None:
    q = QILAct(bits=2)
    first = torch.relu(torch.randn(4, 3, 8, 8))
    q(first)
    b = float(fit_clip(first, 3))
    assert q.interval == pytest.approx((0.0, b), abs=1e-6) and q.unit.item() == pytest.approx(b)
    q(first * 10)  # later batches do not re-initialize (c, d are learned from then on)
    assert q.interval == pytest.approx((0.0, b), abs=1e-6)


def test_quantize_initializes_weight_intervals_before_any_optimizer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_(model, QuantConfig(rules={"*": {"weight": {"name": "qil_weight", "bits": 3}}}))
    q = model[1].weight_quantizer
    assert isinstance(q, QILWeight) and bool(q.initialized)
    assert q.interval[1] == pytest.approx(float(fit_clip(model[1].weight.abs(), 3)), rel=1e-6)


def test_all_zero_data_leaves_the_quantizer_uninitialized_until_real_data() -> None:
    q = QILAct(bits=2)
    assert torch.equal(q(torch.zeros(10)), torch.zeros(10))
    assert not bool(q.initialized)
    q(torch.tensor([0.0, 3.0]))
    assert bool(q.initialized) and q.interval[1] > 0


# ------------------------------------------------------------------------------------------- learning


def test_c_d_gamma_receive_gradients_and_move() -> None:
    from lowbit.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(16, 4), {"name": "qil_weight", "bits": 3}, {"name": "qil_act", "bits": 3})
    x = torch.relu(torch.randn(64, 16))
    target = torch.randn(64, 4)
    layer(x)  # the activation interval is set by the first batch
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    before = {n: p.item() for n, p in [("wc", wq.c), ("wd", wq.d), ("wg", wq.gamma), ("ac", aq.c), ("ad", aq.d)]}
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        for p in (wq.c, wq.d, wq.gamma, aq.c, aq.d):
            assert p.grad is not None and torch.isfinite(p.grad)
        opt.step()
    after = {n: p.item() for n, p in [("wc", wq.c), ("wd", wq.d), ("wg", wq.gamma), ("ac", aq.c), ("ad", aq.d)]}
    assert all(after[k] != before[k] for k in before), (before, after)


def test_learn_gamma_false_keeps_gamma_at_one() -> None:
    q = QILWeight(bits=3, learn_gamma=False)
    w = torch.randn(8, 4, requires_grad=True)
    q(w).sum().backward()
    assert q.gamma.grad is None and q.gamma.item() == 1.0 and w.grad is not None


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def test_quantized_mlp_learns_digits() -> None:
    from lowbit.data import load_dataset
    from lowbit.train import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    model = _digits_mlp()
    rule = {"weight": {"name": "qil_weight", "bits": 2}, "input": {"name": "qil_act", "bits": 2}}
    report = quantize_(model, QuantConfig(rules={"*": rule}))
    assert report.quantized == ["4", "7"]  # first and last Linear stay float
    data = load_dataset("digits")
    before = evaluate(model, data.loader("train", 256))["loss"]
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, channels_last=False, checkpoint_every=0)
    res = fit(model, data, cfg, show_progress=False)
    after = evaluate(model, data.loader("train", 256))["loss"]
    assert after < 0.5 * before  # measured 2.6 -> 0.04 (seeds 0, 1)
    assert res.final["test_acc"] > 90.0  # measured 96.7-99.0%
    q = model[4].weight_quantizer
    assert torch.isin(q(model[4].weight).detach(), torch.tensor([-1.0, 0.0, 1.0])).all()


def test_progressive_fine_tuning_state_loads_into_fewer_bits() -> None:
    torch.manual_seed(0)
    four = _digits_mlp()
    quantize_(four, QuantConfig(rules={"*": {"weight": {"name": "qil_weight", "bits": 4},
                                             "input": {"name": "qil_act", "bits": 4}}}))
    four(torch.randn(16, 1, 8, 8))  # activation intervals set
    with torch.no_grad():
        four[4].weight_quantizer.c.add_(0.01)  # "learned"
    three = _digits_mlp()
    quantize_(three, QuantConfig(rules={"*": {"weight": {"name": "qil_weight", "bits": 3},
                                              "input": {"name": "qil_act", "bits": 3}}}))
    three.load_state_dict(four.state_dict())  # strict: the state of QIL does not depend on the bit width
    for name in ("4", "7"):
        old, new = getattr(four, name), getattr(three, name)
        assert new.weight_quantizer.c.item() == old.weight_quantizer.c.item()
        assert new.weight_quantizer.interval == old.weight_quantizer.interval
        assert new.input_quantizer.d.item() == old.input_quantizer.d.item() and bool(new.input_quantizer.initialized)
    out = three[4].weight_quantizer(three[4].weight).detach()
    assert torch.isin(out, torch.arange(-3, 4) / 3).all()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bits", [0, 1, 17, 2.0, "4", True, None])
def test_weight_bits_out_of_range(bits: object) -> None:
    with pytest.raises(ValueError, match=r"QIL weight bits must be an int in \[2, 16\]"):
        QILWeight(bits=bits)  # type: ignore[arg-type]


def test_one_bit_weights_point_to_binary_quantizers() -> None:
    with pytest.raises(ValueError, match="binary quantizer"):
        get_quantizer({"name": "qil_weight", "bits": 1})


@pytest.mark.parametrize("bits", [0, 17, 1.5, "2"])
def test_act_bits_out_of_range(bits: object) -> None:
    with pytest.raises(ValueError, match=r"QIL activation bits must be an int in \[1, 16\]"):
        QILAct(bits=bits)  # type: ignore[arg-type]


def test_non_finite_first_tensor_is_refused_and_nan_later_stays_nan() -> None:
    x = torch.rand(10)
    x[3] = float("nan")
    for q in (QILWeight(), QILAct()):
        with pytest.raises(ValueError, match="NaN or infinite"):
            q(x)
        q(torch.rand(10))  # initialized now
        assert torch.isnan(q(x)[3]) and torch.isfinite(q(x)[torch.arange(10) != 3]).all()


def test_bad_discretizer_steps() -> None:
    with pytest.raises(ValueError, match="q must be an int >= 1"):
        qil_discretize(torch.zeros(3), 0)


def test_docstring_examples() -> None:
    res = doctest.testmod(qil_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0


def test_a_saved_quantized_model_reloads_with_its_intervals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lowbit.models import create_model
    from lowbit.train import load_model, save_model

    torch.manual_seed(0)
    model = create_model("lenet5")
    rule = {"weight": {"name": "qil_weight", "bits": 3}, "input": {"name": "qil_act", "bits": 3}}
    quantize_(model, QuantConfig(rules={"*": rule}))
    model(torch.randn(8, 1, 28, 28))  # training mode: the activation intervals are set
    with torch.no_grad():
        model.conv2.weight_quantizer.gamma.fill_(1.3)
    path = save_model(tmp_path / "m.safetensors", model)
    loaded, _ = load_model(path)  # rebuilds lenet5, replays quantize_, loads the state
    assert loaded.conv2.weight_quantizer.gamma.item() == pytest.approx(1.3)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
