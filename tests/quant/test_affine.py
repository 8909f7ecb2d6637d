"""Affine quantization (Jacob et al.): scale / zero point, fake quantization + STE, fixed-point requantization.

Fixed-point functions are checked against exact Python integer / rational references written here from
gemmlowp's definitions, not against each other.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lowbit.quant import get_quantizer
from lowbit.quant.affine import (
    INT32_MAX,
    INT32_MIN,
    MIN_SCALE,
    AffineQuantizer,
    Int8WeightQuantizer,
    Uint8ActQuantizer,
    choose_qparams,
    dequantize,
    fake_quantize,
    multiply_by_quantized_multiplier,
    qrange,
    quantize,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

# ----------------------------------------------------------------------------- references (plain Python)


def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    s = ab + nudge
    return int(s / (1 << 31)) if abs(s) < 2**52 else (abs(s) // (1 << 31)) * (1 if s >= 0 else -1)


def ref_rdbpot(x: int, e: int) -> int:
    q = Fraction(x, 2**e)
    floor = math.floor(q)
    frac = q - floor
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and x >= 0):
        return floor + 1
    return floor


def ref_round_half_away(q: Fraction) -> int:
    return int(math.floor(abs(q) + Fraction(1, 2))) * (1 if q >= 0 else -1)


EDGE = [0, 1, -1, 2, -2, 3, -3, 1000, -1000, 2**30, -(2**30), INT32_MAX, INT32_MIN, 123456789, -987654321]


# ----------------------------------------------------------------------------------------- qparams


def test_qrange_types_and_errors() -> None:
    assert qrange(8, signed=True, narrow_range=True) == (-127, 127)
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(7, signed=True, narrow_range=True) == (-63, 63)
    with pytest.raises(ValueError, match="bits must be an int"):
        qrange(1, signed=False)
    with pytest.raises(ValueError, match="narrow_range applies to signed"):
        qrange(8, signed=False, narrow_range=True)


@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.0, 6.0), (-5.0, -1.0), (0.2, 0.7), (-1e-3, 4e3)])
def test_asymmetric_qparams_cover_the_range_and_zero_is_exact(lo: float, hi: float) -> None:
    s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), 0, 255, symmetric=False)
    assert 0 <= int(z) <= 255
    assert float(dequantize(z.reshape(1), s, z)[0]) == 0.0  # r = 0 is the integer z exactly
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    assert float(s) * (0 - int(z)) <= lo0 + float(s) / 2 + 1e-6  # the range's ends are representable
    assert float(s) * (255 - int(z)) >= hi0 - float(s) / 2 - 1e-6
    assert math.isclose(float(s), (hi0 - lo0) / 255, rel_tol=1e-6)


def test_symmetric_qparams_have_zero_point_zero() -> None:
    s, z = choose_qparams(torch.tensor([-2.0, -0.1]), torch.tensor([1.0, 0.5]), -127, 127, symmetric=True)
    assert z.tolist() == [0, 0]
    assert torch.allclose(s, torch.tensor([2.0 / 127, 0.5 / 127]))


def test_constant_zero_range_gets_scale_one_and_tiny_range_is_floored() -> None:
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255, symmetric=False)
    assert float(s) == 1.0 and int(z) == 0
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(1e-35), 0, 255, symmetric=False)  # underflows
    assert float(s) == pytest.approx(MIN_SCALE) and torch.isfinite(1 / s)
    with pytest.raises(ValueError, match="finite"):
        choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 0, 255, symmetric=False)


def test_fake_quantize_matches_manual_formula_and_ste_masks_outside() -> None:
    x = torch.linspace(-3, 5, 101, requires_grad=True)
    s, z = torch.tensor(0.05), torch.tensor(40)
    y = fake_quantize(x, s, z, 0, 255)
    q = torch.clamp(torch.round(x.detach() / 0.05) + 40, 0, 255)
    assert torch.equal(y.detach(), (q - 40) * 0.05)
    y.sum().backward()
    inside = ((torch.round(x.detach() / 0.05) + 40) >= 0) & ((torch.round(x.detach() / 0.05) + 40) <= 255)
    assert torch.equal(x.grad, inside.float())
    assert not inside.all() and inside.any()


def test_per_channel_quantize_dequantize_roundtrip() -> None:
    w = torch.randn(4, 3, 2, 2)
    q = Int8WeightQuantizer()
    out = q(w)
    ints = q.quantize(w, dtype=torch.int8)
    assert ints.dtype == torch.int8 and int(ints.min()) >= -127
    amax = w.abs().amax((1, 2, 3))
    assert torch.allclose(q.scale, amax / 127)
    assert torch.equal(ints.abs().amax((1, 2, 3)), torch.full((4,), 127, dtype=torch.int8))
    assert torch.allclose(dequantize(ints, q.scale, q.zero_point, axis=0), out)
    assert torch.equal(quantize(out, q.scale, q.zero_point, -127, 127, axis=0, dtype=torch.int8), ints)


def test_weight_quantizer_follows_the_current_weight_and_7_bits_is_narrow() -> None:
    q = Int8WeightQuantizer(bits=7)
    q(torch.tensor([[1.0, -1.0]]))
    q.eval()
    q(torch.tensor([[3.0, -1.0]]))  # weights follow their current range, even in eval
    assert torch.allclose(q.scale, torch.tensor([3.0 / 63]))
    assert (q.qmin, q.qmax) == (-63, 63)


def test_activation_quantizer_relu_output_has_zero_point_zero_and_ema_range() -> None:
    q = Uint8ActQuantizer(observer={"name": "ema", "momentum": 0.5})
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    assert int(q.zero_point) == 0 and float(q.scale) == pytest.approx(3.0 / 255)
    q.eval()
    q(torch.tensor([0.0, 100.0]))  # eval: the range is not updated
    assert float(q.scale) == pytest.approx(3.0 / 255)


def test_calibrating_observes_without_quantizing_and_frozen_range_stays() -> None:
    q = AffineQuantizer(observer="minmax")
    q.calibrating = True
    x = torch.tensor([-1.0, 0.123456, 3.0])
    assert torch.equal(q(x), x)
    q.calibrating = False
    q.observe = False
    q.train()
    q(torch.tensor([-100.0, 100.0]))
    assert float(q.scale) == pytest.approx(4.0 / 255)


def test_nan_input_is_refused_by_the_observer_and_kept_when_frozen() -> None:
    q = get_quantizer("uint8_act")
    with pytest.raises(ValueError, match="NaN"):
        q(torch.tensor([1.0, float("nan")]))
    q(torch.tensor([0.0, 1.0]))
    q.eval()
    assert torch.isnan(q(torch.tensor([float("nan")]))).all()


def test_empty_tensor_passes_and_leaves_the_quantizer_uninitialized() -> None:
    q = AffineQuantizer()
    out = q(torch.empty(0, 3))
    assert out.shape == (0, 3) and not q.initialized


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="bits"):
        AffineQuantizer(bits=40)
    with pytest.raises(KeyError, match="unknown observer 'minmx'"):
        AffineQuantizer(observer="minmx")


# ----------------------------------------------------------------------------------- fixed point


def test_quantize_multiplier_represents_m_with_a_31_bit_mantissa() -> None:
    ms = np.array([0.75, 0.3, 1e-3, 2.5e-9, 0.99999999999, 1.0, 3.7, 1e-12])
    m0, n = quantize_multiplier(ms)
    for m, a, b in zip(ms, m0, n, strict=True):
        if m < 2.0**-32:
            assert (a, b) == (0, 31)
            continue
        assert 2**30 <= a < 2**31
        assert abs(a * 2.0 ** -int(b) - m) <= 2.0 ** (-int(b) - 1)  # within half a unit of M0
    with pytest.raises(ValueError, match="multipliers"):
        quantize_multiplier(-0.5)


def test_srdhm_and_rdbpot_match_the_python_reference() -> None:
    rng = np.random.default_rng(0)
    a = np.concatenate([EDGE, rng.integers(INT32_MIN, INT32_MAX, 300, dtype=np.int64)])
    b = np.concatenate([[2**30, INT32_MIN, INT32_MAX, 1, 1518500250], rng.integers(2**30, 2**31, 300)])
    for bv in b:
        got = saturating_rounding_doubling_high_mul(torch.tensor(a), int(bv)).tolist()
        assert got == [ref_srdhm(int(x), int(bv)) for x in a]
    for e in (0, 1, 2, 5, 17, 31):
        got = rounding_divide_by_pot(torch.tensor(a), e).tolist()
        assert got == [ref_rdbpot(int(x), e) for x in a]


@pytest.mark.parametrize("m", [0.3, 0.00421, 0.9999, 1.5, 37.25, 1e-7])
def test_single_rounding_is_round_half_away_of_the_exact_product(m: float) -> None:
    m0, n = quantize_multiplier(m)
    acc = np.concatenate([np.arange(-3000, 3000, 7), [2**24, -(2**24) + 3, 123456789 % 2**20]])
    got = multiply_by_quantized_multiplier(torch.tensor(acc), m0, n, rounding="single").tolist()
    exact = [max(INT32_MIN, min(INT32_MAX, ref_round_half_away(Fraction(int(x) * int(m0), 2 ** int(n)))))
             for x in acc]
    assert got == exact


def test_gemmlowp_rounding_is_srdhm_then_rdbpot_and_at_most_one_off_the_exact_value() -> None:
    m0, n = quantize_multiplier(0.00421)
    acc = np.arange(-20000, 20000, 3)
    got = multiply_by_quantized_multiplier(torch.tensor(acc), m0, n).numpy()
    ref = [ref_rdbpot(ref_srdhm(int(x), int(m0)), int(n) - 31) for x in acc]
    assert got.tolist() == ref
    exact = np.array([ref_round_half_away(Fraction(int(x) * int(m0), 2 ** int(n))) for x in acc])
    assert np.abs(got - exact).max() <= 1  # double rounding: off by one near halves, never more


def test_rounding_name_is_checked() -> None:
    with pytest.raises(ValueError, match="rounding must be one of"):
        multiply_by_quantized_multiplier(torch.tensor([1]), 2**30, 31, rounding="nearest")
