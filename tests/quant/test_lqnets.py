"""LQ-Nets: levels and nearest-level quantization against a brute force over all codes, the QEM step against
numpy's least squares, the error reduction of QEM, straight-through gradients, and a digits run."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.quant.lqnets as lq_module
from lowbit.quant import QuantConfig, get_quantizer, quantize_
from lowbit.quant.lqnets import LQNetsAct, LQNetsWeight, code_matrix, init_basis, lq_levels, lq_quantize, qem_step


def _all_levels(v: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every code e (rows) and its level v^T e, by itertools: the reference for the code under test."""
    codes = np.array(list(itertools.product([-1, 1] if signed else [0, 1], repeat=len(v))), dtype=np.float64)
    return codes, codes @ v


def _brute_quantize(x: np.ndarray, v: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest level of each value of ``x`` (1-D) and its code, by comparing with all 2^K levels."""
    codes, levels = _all_levels(v, signed)
    idx = np.abs(x[:, None] - levels[None, :]).argmin(1)
    return levels[idx], codes[idx]


def _error(x: torch.Tensor, v: torch.Tensor, signed: bool) -> float:
    """Squared quantization error, per row when v is (C, K), computed by brute force."""
    xs = x.double().numpy().reshape(v.shape[0], -1) if v.dim() == 2 else x.double().numpy().reshape(1, -1)
    vs = v.double().numpy().reshape(xs.shape[0], -1)
    return float(sum(((row - _brute_quantize(row, vr, signed)[0]) ** 2).sum() for row, vr in zip(xs, vs, strict=True)))


# --------------------------------------------------------------------------------------- levels, codes


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_code_matrix_holds_every_code_once(k: int, signed: bool) -> None:
    e = code_matrix(k, signed)
    assert e.shape == (2**k, k)
    ref = {tuple(c) for c in itertools.product([-1.0, 1.0] if signed else [0.0, 1.0], repeat=k)}
    assert {tuple(row.tolist()) for row in e} == ref


@pytest.mark.parametrize("signed", [True, False])
def test_levels_are_the_sorted_code_combinations(signed: bool) -> None:
    v = torch.tensor([[0.3, 1.1, -0.4], [2.0, 0.1, 0.7]])
    levels, order = lq_levels(v, signed)
    e = code_matrix(3, signed)
    for c in range(2):
        ref = np.sort(_all_levels(v[c].double().numpy(), signed)[1])
        np.testing.assert_allclose(levels[c].numpy(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e[order[c]] @ v[c], levels[c])  # order gives each level's code


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_quantize_is_the_nearest_level(k: int, signed: bool) -> None:
    g = torch.Generator().manual_seed(k)
    v = torch.rand(4, k, generator=g) + 0.1
    x = torch.randn(4, 50, generator=g) * 3
    q = lq_quantize(x, v, signed)
    for c in range(4):
        ref, _ = _brute_quantize(x[c].double().numpy(), v[c].double().numpy(), signed)
        np.testing.assert_allclose(q[c].numpy(), ref, rtol=1e-6, atol=1e-6)
        assert q[c].unique().numel() <= 2**k


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_weight_outputs_per_channel_take_at_most_2_to_the_k_values(k: int) -> None:
    q = LQNetsWeight(bits=k)
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2, 8).view(8, 1, 1, 1)
    for mode in (True, False):
        out = q.train(mode)(w).detach()
        levels = q.channel_levels()
        assert levels is not None and levels.shape == (8, 2**k) and q.levels() is None
        for c in range(8):
            assert out[c].unique().numel() <= 2**k
            assert torch.isin(out[c], levels[c]).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_act_outputs_take_at_most_2_to_the_k_values(k: int) -> None:
    q = LQNetsAct(bits=k)
    x = torch.relu(torch.randn(8, 4, 6, 6)) * 2
    for mode in (True, False):
        out = q.train(mode)(x).detach()
        assert out.unique().numel() <= 2**k
        assert torch.isin(out, q.levels()).all()
    assert q.levels().numel() == 2**k


# ----------------------------------------------------------------------------------------------- QEM


@pytest.mark.parametrize("signed", [True, False])
def test_qem_step_is_least_squares_for_the_nearest_codes(signed: bool) -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.tensor([[0.2, 0.5], [0.1, 0.9], [0.3, 0.35]])
    x = torch.randn(3, 200, generator=g).abs() if not signed else torch.randn(3, 200, generator=g)
    new = qem_step(x, v, signed, momentum=0.0, ridge=0.0)
    for c in range(3):
        _, codes = _brute_quantize(x[c].double().numpy(), v[c].double().numpy(), signed)  # B^T: (N, K)
        ref, *_ = np.linalg.lstsq(codes, x[c].double().numpy(), rcond=None)  # argmin ||B^T v - x||
        np.testing.assert_allclose(new[c].numpy(), ref, rtol=1e-4, atol=1e-6)


def test_qem_step_moving_average() -> None:
    x = torch.randn(2, 100)
    v = torch.tensor([[0.5, 1.0], [0.2, 0.3]])
    target = qem_step(x, v, True, momentum=0.0)
    torch.testing.assert_close(qem_step(x, v, True, momentum=0.9), 0.9 * v + 0.1 * target)


def test_qem_keeps_a_basis_entry_the_codes_do_not_determine() -> None:
    # activations all at 0: every code is 00, B = 0, and the ridge keeps v instead of a singular solve
    v = torch.tensor([0.7, 1.4])
    torch.testing.assert_close(qem_step(torch.zeros(50), v, False, momentum=0.0), v)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_qem_never_increases_the_quantization_error(signed: bool, momentum: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [0.5]])
    x = x if signed else x.abs() ** 1.5
    v = torch.full((4, 3), 0.05) * torch.tensor([1.0, 1.3, 1.7])  # a poor start
    errors = [_error(x, v, signed)]
    for _ in range(30):
        v = qem_step(x, v, signed, momentum=momentum)
        errors.append(_error(x, v, signed))
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_one_bit_weight_basis_is_the_mean_absolute_value() -> None:
    # K = 1: levels +-v, and the least-squares v for codes sign(w) is mean |w| (XNOR-Net's alpha)
    w = torch.randn(5, 20) * torch.arange(1, 6).view(5, 1)
    q = LQNetsWeight(bits=1)
    q.init_from(w)
    torch.testing.assert_close(q.basis[:, 0], w.abs().mean(1), rtol=1e-5, atol=1e-6)


def test_init_basis_starts_uniform_then_fits() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    torch.testing.assert_close(init_basis(x, 2, signed=True, steps=0), torch.tensor([[1.0, 2.0]]))  # +-1, +-3
    w = torch.randn(6, 100)
    fitted = init_basis(w, 2, signed=True)
    assert _error(w, fitted, True) < _error(w, init_basis(w, 2, signed=True, steps=0), True)


def test_training_forward_updates_the_basis_and_eval_does_not() -> None:
    w = torch.randn(4, 30)
    q = LQNetsWeight(bits=2)
    q.init_from(w * 0.5)  # fitted to other weights: w needs a different basis
    v0 = q.basis.clone()
    q.eval()(w)
    assert torch.equal(q.basis, v0)
    q.train()(w)
    torch.testing.assert_close(q.basis, 0.9 * v0 + 0.1 * qem_step(w, v0, True, momentum=0.0))
    a = LQNetsAct(bits=2)
    a(torch.rand(100))
    b0 = a.basis.clone()
    a.eval()(torch.rand(100) * 5)
    assert torch.equal(a.basis, b0)
    a.train()(torch.rand(100) * 5)
    assert not torch.equal(a.basis, b0)


def test_act_qem_on_a_sample_of_a_large_batch_is_close_to_the_full_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 16, 32, 32, generator=g)) * torch.rand(1, 16, 1, 1, generator=g) * 3  # 1M values
    v = torch.tensor([0.4, 0.8, 1.6])
    q = LQNetsAct(bits=3, momentum=0.0)
    with torch.no_grad():
        q.basis.copy_(v)
        q.initialized.fill_(True)
    q(x)  # one QEM step on at most QEM_SAMPLES values
    full = qem_step(x, v, False, momentum=0.0)  # on all of them
    torch.testing.assert_close(q.basis, full, rtol=0.01, atol=0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])  # K <= 3: counting thresholds; K > 3: binary search
def test_act_quantization_of_a_channels_last_batch_is_the_nearest_level(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.relu(torch.randn(3, 5, 4, 4, generator=g)) * 2
    q = LQNetsAct(bits=k).eval()
    with torch.no_grad():
        q.basis.copy_(torch.rand(k, generator=g) + 0.05)
        q.initialized.fill_(True)
    out = q(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref, _ = _brute_quantize(x.double().flatten().numpy(), q.basis.double().numpy(), signed=False)
    np.testing.assert_allclose(out.flatten().numpy(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q(x), out.contiguous())


# ------------------------------------------------------------------------------------------ gradients


def test_weight_gradient_is_straight_through() -> None:
    w = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(6, 10)
    LQNetsWeight(bits=2)(w).backward(g)
    assert torch.equal(w.grad, g)


def test_act_gradient_is_cut_above_the_largest_level() -> None:
    q = LQNetsAct(bits=2)
    q(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # basis (1, 2): largest level 3
    x = torch.tensor([-0.5, 0.2, 2.9, 3.0, 3.5, 10.0], requires_grad=True)
    q.eval()(x).backward(torch.full((6,), 2.0))
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0]))


def test_basis_is_a_buffer_not_a_parameter() -> None:
    assert list(LQNetsAct().parameters()) == [] and list(LQNetsWeight().parameters()) == []
    assert "basis" in LQNetsAct().state_dict()


# ------------------------------------------------------------------------------------------- learning


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def test_quantized_mlp_learns_digits_and_the_bases_move() -> None:
    from lowbit.data import load_dataset
    from lowbit.train import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    model = _digits_mlp()
    rule = {"weight": {"name": "lqnets_weight", "bits": 2}, "input": {"name": "lqnets_act", "bits": 2}}
    report = quantize_(model, QuantConfig(rules={"*": rule}))
    assert report.quantized == ["4", "7"]
    wq = model[4].weight_quantizer
    assert wq.basis is not None and wq.basis.shape == (64, 2)  # created when the layer was swapped
    data = load_dataset("digits")
    before = evaluate(model, data.loader("train", 256))["loss"]
    w_basis, a_basis = wq.basis.clone(), model[4].input_quantizer.basis.clone()
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, channels_last=False, checkpoint_every=0)
    res = fit(model, data, cfg, show_progress=False)
    after = evaluate(model, data.loader("train", 256))["loss"]
    assert after < 0.5 * before  # measured 2.30 -> 0.05 (seeds 0, 1)
    assert res.final["test_acc"] > 90.0  # measured 97.7-98.7%
    assert not torch.allclose(wq.basis, w_basis) and not torch.allclose(model[4].input_quantizer.basis, a_basis)
    out = wq(model[4].weight).detach()
    assert all(out[c].unique().numel() <= 4 for c in range(64))


def test_a_saved_model_loads_into_a_freshly_quantized_one() -> None:
    torch.manual_seed(0)
    rule = {"weight": {"name": "lqnets_weight", "bits": 3}, "input": {"name": "lqnets_act", "bits": 3}}
    a, b = _digits_mlp(), _digits_mlp()
    quantize_(a, QuantConfig(rules={"*": rule}))
    a(torch.randn(32, 1, 8, 8))
    quantize_(b, QuantConfig(rules={"*": rule}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(b.eval()(x), a.eval()(x))


def test_a_saved_quantized_model_reloads_through_the_checkpoint_replay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lowbit.models import create_model
    from lowbit.train import load_model, save_model

    torch.manual_seed(0)
    model = create_model("lenet5")
    rule = {"weight": {"name": "lqnets_weight", "bits": 2}, "input": {"name": "lqnets_act", "bits": 2}}
    quantize_(model, QuantConfig(rules={"*": rule}))
    for _ in range(3):
        model(torch.randn(8, 1, 28, 28))  # training mode: bases initialized and updated
    path = save_model(tmp_path / "m.safetensors", model)
    loaded, _ = load_model(path)  # rebuilds lenet5, replays quantize_ (new bases), then loads the saved ones
    torch.testing.assert_close(loaded.conv2.weight_quantizer.basis, model.conv2.weight_quantizer.basis)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bits", [0, 9, 2.0, "2", True, None])
def test_bits_out_of_range(bits: object) -> None:
    for cls in (LQNetsWeight, LQNetsAct):
        with pytest.raises(ValueError, match=r"LQ-Nets bits \(the basis size K\) must be an int in \[1, 8\]"):
            cls(bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("momentum", [1.0, -0.1, 2.0])
def test_momentum_out_of_range(momentum: float) -> None:
    with pytest.raises(ValueError, match=r"momentum .* must be in \[0, 1\)"):
        get_quantizer({"name": "lqnets_act", "momentum": momentum})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(value: float) -> None:
    x = torch.randn(4, 6)
    x[1, 2] = value
    for q in (LQNetsWeight(), LQNetsAct()):
        with pytest.raises(ValueError, match="NaN or infinite"):
            q(x)


def test_a_weight_with_other_channels_is_refused() -> None:
    q = LQNetsWeight()
    q(torch.randn(4, 6))
    with pytest.raises(ValueError, match="4 channel bases but got a tensor with 5 output channels"):
        q(torch.randn(5, 6))


def test_docstring_examples() -> None:
    res = doctest.testmod(lq_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 12 and res.failed == 0
