"""Range observers: min-max, EMA, percentile and MSE, per tensor and per channel, against numpy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lowbit.quant.affine import choose_qparams
from lowbit.quant.observers import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    get_observer,
    observers,
)


def test_minmax_running_and_latest() -> None:
    run, latest = MinMaxObserver(), MinMaxObserver(running=False)
    for x in (torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 0.7])):
        run(x)
        latest(x)
    assert run.calculate_range(0, 255, False) == (torch.tensor(-1.0), torch.tensor(2.0))
    assert latest.calculate_range(0, 255, False) == (torch.tensor(0.5), torch.tensor(0.7))


def test_minmax_per_channel_along_an_axis() -> None:
    x = torch.randn(3, 5, 4)
    obs = MinMaxObserver(axis=1)
    obs(x)
    lo, hi = obs.calculate_range(-127, 127, True)
    assert torch.equal(lo, x.amin((0, 2))) and torch.equal(hi, x.amax((0, 2)))
    with pytest.raises(ValueError, match="saw 5 channels before and 2"):
        obs(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="axis 4 does not exist"):
        MinMaxObserver(axis=4)(x)


def test_ema_follows_the_formula() -> None:
    obs = EMAObserver(momentum=0.1)
    mins, maxs = [-1.0, -3.0, 0.0], [2.0, 5.0, 1.0]
    lo, hi = mins[0], maxs[0]
    for a, b in zip(mins, maxs, strict=True):
        obs(torch.tensor([a, b]))
    for a, b in zip(mins[1:], maxs[1:], strict=True):
        lo, hi = 0.9 * lo + 0.1 * a, 0.9 * hi + 0.1 * b
    got = obs.calculate_range(0, 255, False)
    assert float(got[0]) == pytest.approx(lo) and float(got[1]) == pytest.approx(hi)
    with pytest.raises(ValueError, match="momentum"):
        EMAObserver(momentum=0.0)


def test_percentile_matches_numpy_and_ignores_an_outlier() -> None:
    x = torch.cat([torch.randn(5000), torch.tensor([1e4])])
    obs = PercentileObserver(percentile=99.0, max_samples=1 << 16)
    obs(x[:2000])
    obs(x[2000:])
    lo, hi = obs.calculate_range(0, 255, False)
    ref_lo, ref_hi = np.percentile(x.numpy().astype(np.float64), [1.0, 99.0])
    assert float(lo) == pytest.approx(ref_lo, rel=1e-5) and float(hi) == pytest.approx(ref_hi, rel=1e-5)
    assert float(hi) < 10


def test_percentile_sample_is_bounded_and_spread_over_batches() -> None:
    obs = PercentileObserver(percentile=100.0, max_samples=256)
    for i in range(10):
        obs(torch.full((1000,), float(i)))
    assert obs.sample.shape[1] <= 256
    counts = np.bincount(obs.sample[0].numpy().astype(int), minlength=10)
    assert (counts > 5).all()  # every batch is represented, not only the last ones


def test_mse_picks_the_clipping_with_the_least_error_on_the_grid() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000), torch.tensor([10.0])])  # 4-bit: clipping the outlier pays off
    obs = MSEObserver(grid=20)
    obs(x)
    lo, hi = obs.calculate_range(0, 15, False)

    def err(a: float) -> float:
        s, z = choose_qparams(torch.tensor(float(x.min()) * a), torch.tensor(float(x.max()) * a), 0, 15, False)
        q = torch.clamp(torch.round(x / s) + z, 0, 15)
        return float(((q - z) * s - x).pow(2).mean())

    errors = {i: err(i / 20) for i in range(1, 21)}
    best = min(errors, key=errors.get)  # type: ignore[arg-type]
    assert float(hi) == pytest.approx(float(x.max()) * best / 20, rel=1e-5)
    assert float(hi) < 0.6 * 10 and float(lo) < 0


def test_uninitialized_observer_raises_and_empty_tensor_is_ignored() -> None:
    for name in observers:
        obs = get_observer(name)
        obs(torch.empty(0))
        assert not obs.initialized
        with pytest.raises(ValueError, match="has not seen any data"):
            obs.calculate_range(0, 255, False)


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
def test_nan_and_inf_are_refused(name: str) -> None:
    obs = get_observer(name)
    with pytest.raises(ValueError, match="NaN"):
        obs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="infinite"):
        obs(torch.tensor([1.0, float("inf")]))


def test_per_channel_state_loads_into_a_fresh_observer_and_deepcopies() -> None:
    obs = EMAObserver(axis=0)
    obs(torch.randn(6, 10))
    fresh = EMAObserver(axis=0)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.min_val.shape == (6,)
    assert torch.equal(copy.deepcopy(obs).max_val, obs.max_val)


def test_get_observer_specs_and_errors() -> None:
    assert isinstance(get_observer({"name": "percentile", "percentile": 99.9}), PercentileObserver)
    assert get_observer("minmax", axis=0).axis == 0
    with pytest.raises(ValueError, match="'name' key"):
        get_observer({"percentile": 99.9})
    with pytest.raises(TypeError, match="observer 'ema'"):
        get_observer({"name": "ema", "decay": 0.5})
    with pytest.raises(ValueError, match="percentile must be in"):
        PercentileObserver(percentile=10)
    with pytest.raises(ValueError, match="axis must be None"):
        MinMaxObserver(axis="0")  # type: ignore[arg-type]
