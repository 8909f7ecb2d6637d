"""LAB and LAQ: the d-weighted fits against the papers' formulas, and the LossAware callback against Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant import get_quantizer
from lowbit.quant.loss_aware import (
    LAB,
    LAQLinear,
    LAQLog,
    LAQTernary,
    LossAware,
    LossAwareQuantizer,
    lab_alpha,
    lab_binarize,
    laq_alpha,
    laq_fit,
    laq_ternary_exact_alpha,
    linear_grid,
    log_grid,
    project_to_grid,
)
from lowbit.quant.ternary import TWN


def _werr(w: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> float:
    """The d-weighted squared error the loss-aware methods minimize."""
    return (d * (w - q) ** 2).sum().item()


# ---------------------------------------------------------------- LAB


def test_lab_alpha_is_the_d_weighted_mean_and_mean_abs_for_d_one() -> None:
    w = torch.randn(8, 5)
    d = torch.rand(8, 5) + 0.1
    q = LAB()
    q.d = d
    out = q(w)
    alpha = (d * w.abs()).sum() / d.sum()  # ||d ⊙ w||_1 / ||d||_1
    torch.testing.assert_close(q.alpha, alpha)
    torch.testing.assert_close(out, alpha * torch.where(w >= 0, 1.0, -1.0))
    torch.testing.assert_close(q.levels(), torch.stack([-alpha, alpha]))
    torch.testing.assert_close(lab_binarize(w, d), out)  # the pure function behind the class
    q.d = None  # no Adam state: the plain XNOR fit
    q(w)
    torch.testing.assert_close(q.alpha, w.abs().mean())
    torch.testing.assert_close(lab_alpha(w, torch.ones_like(w)), w.abs().mean())


def test_lab_is_binary_even_at_zero_and_straight_through() -> None:
    w = torch.tensor([0.0, -0.2, 0.4], requires_grad=True)
    out = LAB()(w)
    torch.testing.assert_close(out, torch.tensor([0.2, -0.2, 0.2]))  # sign(0) = +1: never a zero
    g = torch.tensor([1.0, -2.0, 3.0])
    (out * g).sum().backward()
    torch.testing.assert_close(w.grad, g)  # the gradient w.r.t. w_hat goes to w


def test_lab_d_weighted_alpha_beats_mean_abs_in_the_d_norm() -> None:
    w, d = torch.randn(500), torch.rand(500) ** 4 + 1e-3
    b = torch.sign(w)
    plain, aware = w.abs().mean() * b, lab_alpha(w, d) * b
    assert _werr(w, aware, d) <= _werr(w, plain, d)


# ---------------------------------------------------------------- LAQ ternary


def _brute_force_ternary(w: torch.Tensor, d: torch.Tensor) -> float:
    """The exact d-weighted ternary optimum, by trying every support of the k largest |w| (float64)."""
    a, dd = w.abs().double().flatten(), d.double().flatten()
    best = float("inf")
    for k in range(1, a.numel() + 1):
        idx = a.argsort(descending=True)[:k]
        alpha = (dd[idx] * a[idx]).sum() / dd[idx].sum()
        b = torch.zeros_like(a)
        b[idx] = 1
        best = min(best, (dd * (a - alpha * b) ** 2).sum().item())
    return best


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_laq_ternary_alternating_fit_converges_and_beats_twn_in_the_d_norm(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(300, generator=g) * 0.1
    d = torch.rand(300, generator=g) ** 3 + 1e-3  # very uneven curvature
    q = LAQTernary(iters=100)
    q.d = d
    out = q(w)
    alpha = q.alpha
    # a fixed point of the alternation: b = I(|w| > alpha/2) sign(w) and alpha = ||b d w||_1 / ||b d||_1
    b = torch.sign(w) * (w.abs() > alpha / 2)
    torch.testing.assert_close(out, alpha * b)
    torch.testing.assert_close(alpha, (b * d * w).abs().sum() / (b * d).abs().sum())
    assert len(out.unique()) == 3
    twn = TWN()(w)
    assert _werr(w, out, d) <= _werr(w, twn, d) + 1e-9  # the point of loss-awareness
    exact = _brute_force_ternary(w, d)
    assert exact <= _werr(w, out, d) + 1e-6  # alternating: a local solution of the exact problem
    q_exact = LAQTernary(exact=True)
    q_exact.d = d
    assert _werr(w, q_exact(w), d) == pytest.approx(exact, rel=1e-4)
    torch.testing.assert_close(laq_ternary_exact_alpha(w, d), q_exact.alpha)


def test_laq_ternary_few_iterations_reach_the_fixed_point() -> None:
    w, d = torch.randn(1000), torch.rand(1000) + 0.5
    outs = []
    for iters in (10, 50):
        q = LAQTernary(iters=iters)
        q.d = d
        outs.append(q(w))
    torch.testing.assert_close(outs[0], outs[1])  # converged within the default 10 rounds


def test_laq_ternary_with_d_one_starts_from_twn_then_warm_starts() -> None:
    w = torch.tensor([-1.0, -0.2, 0.05, 0.5, 1.5])
    twn_codes = torch.tensor([-1.0, 0.0, 0.0, 1.0, 1.0])  # |w| > 0.7 * 0.65
    assert laq_fit(w, linear_grid(2), None, iters=0, b0=twn_codes).item() == pytest.approx(1.0)  # TWN's alpha
    q = LAQTernary()
    torch.testing.assert_close(q(w), torch.tensor([-1.25, 0.0, 0.0, 0.0, 1.25]))  # then 0.5 <= alpha/2 drops
    q(torch.tensor([-1.0, -0.2, 0.05, 0.6, 1.5]))  # warm: starts from the codes of alpha = 1.25
    assert q.alpha.item() == pytest.approx(1.25)


# ---------------------------------------------------------------- LAQ m-bit


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_laq_linear_levels_and_projection(bits: int) -> None:
    n = 2 ** (bits - 1) - 1
    torch.testing.assert_close(linear_grid(bits), torch.tensor([k / n for k in range(n + 1)]))
    w, d = torch.randn(400) * 0.2, torch.rand(400) + 0.1
    q = LAQLinear(bits=bits, iters=200)  # to the fixed point in one call
    q.d = d
    out = q(w)
    alpha = q.alpha
    levels = q.levels()
    assert q.bit_width == bits and len(levels) == 2**bits - 1
    torch.testing.assert_close(levels, alpha * torch.arange(-n, n + 1) / n)
    torch.testing.assert_close(q.scale, alpha / n)
    # each output is the nearest level to w (the paper's round(clip(w/alpha, -1, 1) n) / n)
    nearest = levels[(w[:, None] - levels[None, :]).abs().argmin(dim=1)]
    torch.testing.assert_close(out, nearest)
    torch.testing.assert_close(out, alpha * torch.round(torch.clamp(w / alpha, -1, 1) * n) / n)
    # alpha is the d-weighted least-squares scale of its own codes
    b = out / alpha
    torch.testing.assert_close(alpha, (b * d * w).abs().sum() / (b * b * d).abs().sum())
    # and the fit is at least as good, in the d-norm, as its start (LAB's alpha on the same grid)
    a0 = lab_alpha(w, d)
    start = a0 * project_to_grid(w / a0, linear_grid(bits))
    assert _werr(w, out, d) <= _werr(w, start, d) + 1e-9


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_laq_log_levels_and_projection(bits: int) -> None:
    n = 2 ** (bits - 1) - 1
    torch.testing.assert_close(log_grid(bits), torch.tensor([0.0] + [2.0**-k for k in range(n - 1, -1, -1)]))
    w, d = torch.randn(400) * 0.2, torch.rand(400) + 0.1
    q = LAQLog(bits=bits, iters=200)
    q.d = d
    out = q(w)
    alpha, levels = q.alpha, q.levels()
    expected = sorted([0.0] + [s * 2.0**-k for k in range(n) for s in (1, -1)])
    torch.testing.assert_close(levels, alpha * torch.tensor(expected))
    assert q.scale is None and q.bit_width == bits
    assert torch.isin(out, levels).all()
    nearest = levels[(w[:, None] - levels[None, :]).abs().argmin(dim=1)]
    torch.testing.assert_close(out, nearest)
    b = out / alpha
    torch.testing.assert_close(alpha, (b * d * w).sum() / (b * b * d).sum())


@pytest.mark.parametrize("cls", [LAQLinear, LAQLog])
def test_laq_multibit_warm_starts_continue_the_alternation(cls: type) -> None:
    w, d = torch.randn(2000) * 0.1, torch.rand(2000) ** 2 + 0.01
    reference = cls(bits=4, iters=500)
    reference.d = d
    ref = reference(w)
    q = cls(bits=4)  # 10 rounds per call
    q.d = d
    errors = [_werr(w, q(w), d) for _ in range(60)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False))  # never worse from call to call
    torch.testing.assert_close(q(w), ref)  # the same fixed point as one long run


def test_project_to_grid_boundaries() -> None:
    grid = log_grid(3)  # [0, 1/4, 1/2, 1]
    u = torch.tensor([0.124, 0.126, 0.374, 0.376, 0.74, 0.76, 5.0, -0.76, -0.1])
    torch.testing.assert_close(project_to_grid(u, grid),
                               torch.tensor([0.0, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0, -1.0, 0.0]))
    b = torch.tensor([1.0, 0.0, -0.5])
    w = torch.tensor([0.8, 0.1, -0.3])
    d = torch.tensor([2.0, 5.0, 1.0])
    assert laq_alpha(w, b, d).item() == pytest.approx((2 * 0.8 + 0.5 * 0.3) / (2 + 0.25))


# ---------------------------------------------------------------- the LossAware callback


class _QLinear(nn.Module):
    """A linear layer whose weight goes through ``weight_quantizer`` (independent of lowbit.nn)."""

    def __init__(self, n_in: int, n_out: int, quantizer: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.weight_quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _mlp(q1: str, q2: str, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), _QLinear(64, hidden, get_quantizer(q1)), nn.ReLU(),
                         _QLinear(hidden, 10, get_quantizer(q2)))


def _expected_d(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    st, group = opt.state[p], opt.param_groups[0]
    t = float(st["step"])
    v_hat = st["exp_avg_sq"] / (1 - group["betas"][1] ** t)
    return v_hat.sqrt() + group["eps"]


@pytest.mark.parametrize("optim", [torch.optim.Adam, torch.optim.AdamW])
def test_loss_aware_sets_d_from_adams_bias_corrected_second_moment(optim: type) -> None:
    torch.manual_seed(0)
    model = _mlp("lab", "laq_ternary", hidden=16)
    with torch.no_grad():
        model[1].weight[0, :4] = torch.tensor([3.0, -2.0, 1.5, -0.5])  # outside [-1, 1]: LAB clips
    opt = optim(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    cb = LossAware()
    cb.on_fit_start(model, opt)
    lab, laq = model[1].weight_quantizer, model[3].weight_quantizer
    assert lab.d is None and laq.d is None  # no Adam state yet: d = 1
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for step in range(1, 4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        cb.after_step(model, step)
        for layer in (model[1], model[3]):
            torch.testing.assert_close(layer.weight_quantizer.d, _expected_d(opt, layer.weight))
        assert model[1].weight.abs().max() <= 1.0 and model[3].weight.abs().max() <= 1.0
        torch.testing.assert_close(lab.alpha, (lab.d * model[1].weight.abs()).sum() / lab.d.sum())
    assert float(opt.state[model[1].weight]["step"]) == 3


def test_loss_aware_attach_hooks_the_optimizer_step() -> None:
    torch.manual_seed(0)
    model = _mlp("laq_linear", "laq_log", hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    handle = LossAware(eps=1e-5).attach(model, opt)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for layer in (model[1], model[3]):
        st = opt.state[layer.weight]
        v_hat = st["max_exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))  # amsgrad: Adam divides by the max
        torch.testing.assert_close(layer.weight_quantizer.d, v_hat.sqrt() + 1e-5)
    handle.remove()


def test_loss_aware_needs_adam() -> None:
    model = _mlp("lab", "lab", hidden=8)
    with pytest.raises(TypeError, match="Adam.*second-moment"):
        LossAware().on_fit_start(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_loss_aware_configuration_errors() -> None:
    plain = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no module"):
        LossAware().on_fit_start(plain, torch.optim.Adam(plain.parameters()))
    shared = LAB()
    a, b = _QLinear(4, 4, shared), _QLinear(4, 4, shared)
    model = nn.Sequential(a, b)
    with pytest.raises(ValueError, match="share one LAB"):
        LossAware().on_fit_start(model, torch.optim.Adam(model.parameters()))
    model = _mlp("lab", "lab", hidden=8)
    with pytest.raises(ValueError, match="does not train"):
        LossAware().on_fit_start(model, torch.optim.Adam([model[3].weight]))
    q = LAB()
    q.d = torch.ones(3)
    with pytest.raises(ValueError, match="one quantizer instance serves one weight"):
        q(torch.ones(4))


def test_eval_uses_the_stored_alpha_and_survives_a_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = _mlp("laq_ternary", "lab", hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cb = LossAware()
    cb.on_fit_start(model, opt)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for step in range(1, 4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        cb.after_step(model, step)
    model.eval()
    out = model(x)
    restored = _mlp("laq_ternary", "lab", hidden=16)
    restored.load_state_dict(model.state_dict())  # alpha travels; d (Adam state) does not
    restored.eval()
    assert restored[1].weight_quantizer.d is None
    torch.testing.assert_close(restored(x), out)
    assert "1.weight_quantizer.alpha" in model.state_dict() and "1.weight_quantizer.d" not in model.state_dict()


def test_registry_bit_widths_and_repr() -> None:
    expected = {"lab": (LAB, 1), "laq_ternary": (LAQTernary, 2), "laq_linear": (LAQLinear, 3), "laq_log": (LAQLog, 3)}
    for name, (cls, bits) in expected.items():
        q = get_quantizer(name)
        assert isinstance(q, cls) and isinstance(q, LossAwareQuantizer) and q.bit_width == bits
        assert isinstance(q.bit_width, int) and f"bit_width={bits}" in repr(q)
        assert q.levels() is None  # nothing fitted yet
    assert get_quantizer({"name": "laq_linear", "bits": 4}).bit_width == 4
    with pytest.raises(ValueError, match="bits"):
        LAQLog(bits=1)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["laq_ternary", "lab"])
def test_loss_aware_mlp_learns_digits(name: str) -> None:
    from lowbit.data import load_dataset
    from lowbit.train import TrainConfig, fit

    torch.manual_seed(0)
    model = _mlp(name, name)
    cb = LossAware()
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=1e-2, channels_last=False, checkpoint_every=0)
    res = fit(model, load_dataset("digits"), cfg, callbacks=[cb], show_progress=False)
    assert res.final["test_acc"] > 80.0
    for layer in (model[1], model[3]):
        q = layer.weight_quantizer
        torch.testing.assert_close(q.d, _expected_d(cb._optimizer, layer.weight))
        assert layer.weight.abs().max() <= 1.0
        assert len(q(layer.weight).unique()) <= (3 if name == "laq_ternary" else 2)


class _Crash:
    """Stops a run at a given step, after the engine's checkpoint at an earlier step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, model: nn.Module, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def test_a_resumed_loss_aware_run_gives_the_uninterrupted_result(tmp_path) -> None:  # noqa: ANN001
    from lowbit.data import load_dataset
    from lowbit.train import TrainConfig, fit

    data = load_dataset("digits")
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-2, channels_last=False, checkpoint_every=10)
    torch.manual_seed(0)
    reference = fit(_mlp("laq_linear", "laq_ternary", 32), data, cfg, callbacks=[LossAware()], show_progress=False)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp("laq_linear", "laq_ternary", 32), data, cfg, run_dir=tmp_path, show_progress=False,
            callbacks=[LossAware(), _Crash(at=13)])  # last checkpoint: step 10, 3 steps lost
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = fit(_mlp("laq_linear", "laq_ternary", 32), data, cfg, run_dir=tmp_path, resume=True,
                  callbacks=[LossAware()], show_progress=False)
    assert resumed.final["test_acc"] == reference.final["test_acc"]
    assert resumed.final["test_loss"] == pytest.approx(reference.final["test_loss"], rel=1e-6)


@pytest.mark.parametrize("cls_name", ["QuantLSTM", "QuantGRU"])
def test_loss_aware_reaches_every_matrix_of_a_recurrent_layer(cls_name: str) -> None:
    from lowbit import nn as lnn

    torch.manual_seed(0)
    rnn = getattr(lnn, cls_name)(6, 8, num_layers=2, batch_first=True, weight_quantizer="laq_ternary")
    opt = torch.optim.Adam(rnn.parameters(), lr=1e-2)
    cb = LossAware()
    cb.on_fit_start(rnn, opt)
    x = torch.randn(3, 5, 6)
    opt.zero_grad()
    rnn(x)[0].square().mean().backward()
    opt.step()
    cb.after_step(rnn, 1)
    names = [n for n in rnn._flat_weights_names if n.startswith("weight_")]
    assert len(names) == 4 and set(rnn.weight_quantizers) == set(names)
    for name in names:  # each matrix has its own d, from Adam's state of that matrix
        torch.testing.assert_close(rnn.weight_quantizers[name].d, _expected_d(opt, getattr(rnn, name)))
