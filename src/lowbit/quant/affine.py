"""Affine (uniform, zero-point) quantization and the fixed-point arithmetic of integer-only inference.

    r = S (q - Z)                     S > 0 a real scale, Z an integer in [qmin, qmax], so that r = 0 is exact
    q = clamp(round(r / S) + Z, qmin, qmax)                          round half to even, as ONNX QuantizeLinear

The range ``[lo, hi]`` that an observer (:mod:`lowbit.quant.observers`) reports is first widened to hold 0;
then asymmetric: ``S = (hi - lo) / (qmax - qmin)``, ``Z = qmin - round(lo / S)``; symmetric:
``S = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, ``Z = round((qmin + qmax) / 2)`` (0 for signed types).
A range of exactly 0 (a constant-zero tensor) gets ``S = 1``; a scale that would underflow is raised to
``MIN_SCALE`` (2^-23, float32 machine epsilon), so no scale is ever 0, subnormal, inf or NaN.

Fake quantization (training): ``y = S (clamp(round(x / S) + Z, qmin, qmax) - Z)``; gradient ``dy/dx = 1``
inside the representable range ``[S (qmin - Z), S (qmax - Z)]`` and 0 outside (the clipped straight-through
estimator of the paper, Section 3.1). Scales and zero points come from observers, not gradients.

Requantization (inference, paper Section 2.2): an int32 accumulator ``acc`` with real scale ``S1 S2`` is
brought to the output scale ``S3`` by the real multiplier ``M = S1 S2 / S3``, represented as
``M = M0 * 2^-n`` with ``M0`` an int32 in ``[2^30, 2^31)``; ``acc * M`` is computed as gemmlowp does:
``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0), n - 31)`` (a saturating left shift first
when ``n < 31``, i.e. ``M >= 1``), or, with ``rounding="single"``, one rounding of the 64-bit product
``acc M0`` (no double rounding), or, with ``rounding="fp32"``, the float32 arithmetic of runtimes that requantize
in float (onnxruntime's MLAS), reproduced exactly with integers (see :func:`multiply_by_quantized_multiplier`).
The torch functions here work on int64 tensors holding int32 values; :mod:`lowbit.runtime.integer` has the
numpy twin used by the integer interpreter.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowbit.quant.base import Quantizer, register_quantizer
from lowbit.quant.observers import LazyShapeMixin, Observer, ObserverSpec, get_observer

__all__ = [
    "MIN_SCALE", "ROUNDINGS", "INT32_MIN", "INT32_MAX", "qrange", "choose_qparams", "fake_quantize", "quantize",
    "dequantize",
    "quantize_multiplier", "float32_multiplier", "saturating_rounding_doubling_high_mul", "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier", "AffineQuantizer", "Int8WeightQuantizer", "Uint8ActQuantizer",
    "Int8ActQuantizer",
]

ROUNDINGS = ("gemmlowp", "single", "fp32")  # requantization rounding, see multiply_by_quantized_multiplier
MIN_SCALE = 2.0**-23  # float32 machine epsilon: the smallest scale, so 1 / S stays finite in float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """The integer range ``[qmin, qmax]`` of a ``bits``-bit type; ``narrow_range`` drops the most negative
    value of a signed type (int8: ``[-127, 127]``, so that the range is symmetric around 0).

    Example:
        >>> qrange(8, signed=True, narrow_range=True), qrange(8, signed=False)
        ((-127, 127), (0, 255))
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow_range), 2 ** (bits - 1) - 1
    if narrow_range:
        raise ValueError("narrow_range applies to signed types (it drops their most negative value)")
    return 0, 2**bits - 1


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                   min_scale: float = MIN_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map the real range ``[lo, hi]`` (widened to hold 0)
    onto ``[qmin, qmax]``; elementwise for per-channel ranges. See the module docstring for the formulas.

    Example:
        >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, symmetric=False)
        >>> round(float(s), 6), int(z)
        (0.015686, 64)
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("a quantization range must be finite (was the observer given NaN or inf?)")
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2)
        degenerate = amax == 0
    else:
        scale = (hi - lo) / (qmax - qmin)
        degenerate = hi == lo
    scale = torch.where(degenerate, torch.ones_like(scale), scale.clamp_min(min_scale))
    if symmetric:
        zp = torch.full_like(scale, round((qmin + qmax) / 2))
    else:
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale.float(), zp.to(torch.int32)


def _shape_for(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-channel parameter ``t`` (C,) reshaped to broadcast along ``axis`` of ``x``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: ``S (clamp(round(x / S) + Z, qmin, qmax) - Z)``. Backward: ``g`` inside the range, else 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.round(x / scale) + zp
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return g * inside.to(g.dtype), None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x``: the float tensor holding exactly the values ``S (q - Z)``.

    Forward: ``S (clamp(round(x / S) + Z, qmin, qmax) - Z)``, per tensor or per channel along ``axis``.
    Gradient: ``dL/dx = dL/dy`` where ``round(x / S) + Z`` lies in ``[qmin, qmax]``, else 0 (clipped STE).
    A NaN in ``x`` stays NaN.

    Args:
        x: the tensor.
        scale: float scale(s), 0-dim or one per channel.
        zero_point: integer zero point(s), same shape as ``scale``.
        qmin, qmax: the integer range.
        axis: the channel dimension of ``x`` for per-channel parameters.

    Example:
        >>> fake_quantize(torch.tensor([-0.3, 0.26, 9.0]), torch.tensor(0.1), torch.tensor(3), 0, 15)
        tensor([-0.3000,  0.3000,  1.2000])

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3.1, equation 12).
    """
    s = _shape_for(scale.to(x.dtype), x, axis)
    z = _shape_for(zero_point.to(x.dtype), x, axis)
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The integers ``q = clamp(round(x / S) + Z, qmin, qmax)`` as ``dtype`` (round half to even).

    Example:
        >>> quantize(torch.tensor([-0.3, 0.26, 9.0]), torch.tensor(0.1), torch.tensor(3), 0, 15)
        tensor([ 0,  6, 15], dtype=torch.int32)
    """
    if torch.isnan(x).any():
        raise ValueError("cannot quantize NaN to an integer")
    s = _shape_for(scale.to(torch.float32), x, axis)
    z = _shape_for(zero_point.to(torch.float32), x, axis)
    return (torch.round(x.float() / s) + z).clamp(qmin, qmax).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    """The real values ``S (q - Z)`` (float32).

    Example:
        >>> dequantize(torch.tensor([0, 6, 15]), torch.tensor(0.5), torch.tensor(3))
        tensor([-1.5000,  1.5000,  6.0000])
    """
    s = _shape_for(scale.to(torch.float32), q, axis)
    z = _shape_for(zero_point.to(torch.int32), q, axis)
    return (q.to(torch.int32) - z).to(torch.float32) * s


# ----------------------------------------------------------------------------- fixed-point requantization


def quantize_multiplier(m: Any) -> tuple[np.ndarray, np.ndarray]:
    """Represent real multipliers ``M`` as ``M0 * 2^-n`` with ``M0`` an int32 in ``[2^30, 2^31)``.

    ``n`` is at most 62; a multiplier below ``2^-32`` (for which ``acc * M`` rounds to 0 for every int32
    ``acc``) is represented as ``M0 = 0, n = 31``. Elementwise over arrays; float64 arithmetic, so the
    torch model and the numpy interpreter derive identical integers.

    Args:
        m: one or more real multipliers, each ``0 <= M < 2^31``.

    Returns:
        ``(M0, n)`` as int64 numpy arrays of ``m``'s shape.

    Example:
        >>> quantize_multiplier(0.75)   # 0.75 = 1610612736 * 2^-31
        (array(1610612736), array(31))

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 2.2, equation 6).
    """
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m >= 2.0**31):
        raise ValueError(f"requantization multipliers must be finite and in [0, 2^31), got {m.min()}..{m.max()}")
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    m0 = np.round(frac * 2.0**31).astype(np.int64)
    carry = m0 == 2**31  # frac rounded up to 1.0
    m0 = np.where(carry, m0 // 2, m0)
    exp = exp.astype(np.int64) + carry
    n = 31 - exp
    zero = (m == 0) | (n > 62)
    return np.where(zero, 0, m0), np.where(zero, 31, n)


def float32_multiplier(m: Any) -> tuple[np.ndarray, np.ndarray]:
    """Represent float32 multipliers ``M`` exactly as ``M0 * 2^-n``, ``M0`` their 24-bit significand (for
    ``rounding="fp32"``: the multiplier is the float32 number a float runtime multiplies by). A multiplier below
    ``2^-38`` (the product rounds to 0 for every int32 ``acc``) is ``M0 = 0, n = 31``.

    Example:
        >>> float32_multiplier(0.75)   # 0.75 = 12582912 * 2^-24
        (array(12582912), array(24))
    """
    m = np.asarray(m, dtype=np.float32)
    if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m >= 2.0**31):
        raise ValueError(f"requantization multipliers must be finite and in [0, 2^31), got {m.min()}..{m.max()}")
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1) with 24 significant bits
    m0 = (frac.astype(np.float64) * 2.0**24).astype(np.int64)  # exact
    n = 24 - exp.astype(np.int64)
    zero = (m == 0) | (n > 62)
    return np.where(zero, 0, m0), np.where(zero, 31, n)


def _as_long(v: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.int64, device=like.device)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a b / 2^31)`` for int32 ``a``, ``b``.

    Rounds half away from zero (a nudge of ``+-2^30`` then division truncating toward zero); the one
    overflowing case ``a = b = -2^31`` saturates to ``2^31 - 1``. Inputs and result are int64 tensors
    holding int32 values.

    Example:
        >>> saturating_rounding_doubling_high_mul(torch.tensor([3, -3]), 2**30)  # 1.5 -> 2, -1.5 -> -2
        tensor([ 2, -2])
    """
    a64, b64 = a.to(torch.int64), _as_long(b, a)
    ab = a64 * b64
    nudge = torch.where(ab >= 0, _as_long(1 << 30, a), _as_long(1 - (1 << 30), a))
    out = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return torch.where(overflow, _as_long(INT32_MAX, a), out)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero (0 <= exponent <= 31).

    Example:
        >>> rounding_divide_by_pot(torch.tensor([5, -5, 6, -6]), 2)   # 1.25, -1.25, 1.5, -1.5
        tensor([ 1, -1,  2, -2])
    """
    x = x.to(torch.int64)
    e = _as_long(exponent, x)
    mask = (_as_long(1, x) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(acc: torch.Tensor, m0: Any, n: Any, rounding: str = "gemmlowp") -> torch.Tensor:
    """``acc * M0 * 2^-n`` rounded to an integer with int32/int64 arithmetic; elementwise, with per-channel
    ``m0``/``n`` broadcast against ``acc`` (int32 values in int64 tensors).

    ``rounding="gemmlowp"`` (the paper's): ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0),
    n - 31)``, after a saturating left shift by ``31 - n`` when ``n < 31`` (``M >= 1``). It rounds twice (to
    ``2^(n-31)`` units, then to units), so a value just below ``k + 1/2`` can come out as ``k + 1``.
    ``rounding="single"``: one rounding of the exact 64-bit product, ``round(acc M0 / 2^n)`` half away from
    zero, saturated to int32 (TFLite's ``TFLITE_SINGLE_ROUNDING``); it equals ``round(acc M)`` up to ties, as
    runtimes that requantize in float compute it. ``rounding="fp32"`` (``M0``, ``n`` from
    :func:`float32_multiplier`): what a runtime computing ``round(float32(acc) * M)`` in IEEE float32 gets, as
    onnxruntime's MLAS requantizes: ``acc`` rounded to float32, the product rounded to float32 (24 significant
    bits, half to even), then to an integer half to even; all in integers, so it is bit-exact with that runtime.

    Example:
        >>> m0, n = quantize_multiplier(0.3)
        >>> multiply_by_quantized_multiplier(torch.tensor([10, -10, 5]), m0, n)   # 3, -3, 1.5 -> 2
        tensor([ 3, -3,  2])
    """
    acc = acc.to(torch.int64)
    n_t = _as_long(n, acc)
    m0_t = _as_long(m0, acc)
    if rounding == "single":
        prod = acc * m0_t  # |acc| < 2^31, M0 < 2^31: exact in int64
        half = (_as_long(1, acc) << (n_t - 1).clamp(min=0)) * (n_t > 0)
        mag = (prod.abs() + half) >> n_t
        return torch.where(prod < 0, -mag, mag).clamp(INT32_MIN, INT32_MAX)
    if rounding == "fp32":
        prod = _to_float32(_to_float32(acc) * m0_t)  # M0 < 2^24: the product is exact in int64 before rounding
        mag = _shift_half_even(prod.abs(), n_t.clamp(min=0)) << (-n_t).clamp(min=0)
        return torch.where(prod < 0, -mag, mag).clamp(INT32_MIN, INT32_MAX)
    if rounding != "gemmlowp":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    left = torch.clamp(31 - n_t, min=0)
    right = torch.clamp(n_t - 31, min=0)
    shifted = (acc * (_as_long(1, acc) << left)).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0_t), right)


def _shift_half_even(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x / 2^s`` rounded half to even, for ``x >= 0``, ``0 <= s <= 62``."""
    q = x >> s
    rem, half = x - (q << s), (torch.ones_like(x) << s) >> 1
    return q + ((rem > half) | ((rem == half) & (s > 0) & (q & 1 == 1))).to(torch.int64)


def _to_float32(x: torch.Tensor) -> torch.Tensor:
    """The integer ``x`` rounded to 24 significant bits, half to even: the value of ``float32(x)``."""
    mag = x.abs()
    top = torch.zeros_like(mag)  # the index of the highest set bit, by binary search
    for s in (32, 16, 8, 4, 2, 1):
        top = top + s * ((mag >> (top + s)) > 0).to(torch.int64)
    drop = (top + 1 - 24).clamp(min=0)
    mag = _shift_half_even(mag, drop) << drop
    return torch.where(x < 0, -mag, mag)


# ------------------------------------------------------------------------------------------ the quantizer


class AffineQuantizer(LazyShapeMixin, Quantizer):
    """Affine fake quantizer ``y = S (clamp(round(x / S) + Z, qmin, qmax) - Z)`` with observer-driven S, Z.

    Forward: observe ``x`` (see below), then fake-quantize it with the current scale ``S`` and zero point
    ``Z`` (per tensor, or per channel along ``axis``).
    Gradient: clipped straight-through estimator, ``1`` inside the representable range, ``0`` outside.

    When the observer is updated: in training mode (quantization-aware training); on every call when the
    observer does not keep a running range (``minmax`` with ``running=False``: weights, whose range follows
    their current values); during calibration (``calibrating = True``: observe only, the input passes
    through unchanged, as post-training calibration does); and on the first call whatever the mode, so a
    quantizer that has never seen data does not guess. ``observe = False`` freezes the range.

    Args:
        bits: integer width, 2 to 16.
        signed: a signed integer type (int8) or an unsigned one (uint8).
        symmetric: ``Z`` fixed at the middle of the range (0 for signed types).
        narrow_range: drop the most negative value of a signed type (``[-127, 127]``).
        axis: ``None`` for one scale per tensor, or the channel dimension for one per channel.
        observer: the range observer: a name (``minmax``, ``ema``, ``percentile``, ``mse``), a mapping
            ``{"name": ..., **kwargs}`` or an :class:`~lowbit.quant.observers.Observer`.

    Registered as ``affine`` (every option open); ``int8_weight``, ``uint8_act`` and ``int8_act`` are the
    presets of integer-only inference.

    Example:
        >>> q = AffineQuantizer()                       # uint8, asymmetric, per tensor, min-max
        >>> y = q(torch.tensor([-1.0, 0.0, 3.0]))
        >>> int(q.zero_point), bool(y[1] == 0)          # 0 is exact
        (64, True)

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """

    _lazy_buffers = ("_scale", "_zero_point")

    def __init__(self, bits: int = 8, signed: bool = False, symmetric: bool = False, narrow_range: bool = False,
                 axis: int | None = None, observer: ObserverSpec = "minmax") -> None:
        super().__init__()
        self.qmin, self.qmax = qrange(bits, signed, narrow_range)
        self.bits, self.signed, self.symmetric, self.narrow_range = bits, bool(signed), bool(symmetric), narrow_range
        self.axis = axis
        self.observer: Observer = get_observer(observer, axis=axis)
        if self.observer.axis != axis:
            raise ValueError(f"the observer's axis ({self.observer.axis}) differs from the quantizer's ({axis})")
        self.register_buffer("_scale", torch.tensor(1.0))
        self.register_buffer("_zero_point", torch.tensor(self.qmin, dtype=torch.int32))
        self.observe = True          # False: the range is frozen
        self.calibrating = False     # True: observe only, pass the input through
        self._stale = False          # the observer saw data since the scale was computed

    @property
    def bit_width(self) -> int:  # type: ignore[override]
        return self.bits

    @property
    def scale(self) -> torch.Tensor:  # type: ignore[override]
        self._refresh()
        return self._scale

    @property
    def zero_point(self) -> torch.Tensor:  # type: ignore[override]
        self._refresh()
        return self._zero_point

    @property
    def initialized(self) -> bool:
        """Whether the range has been set from data (or loaded from a checkpoint)."""
        return self.observer.initialized

    def _refresh(self) -> None:
        if self._stale:
            lo, hi = self.observer.calculate_range(self.qmin, self.qmax, self.symmetric)
            scale, zp = choose_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
            self._scale, self._zero_point = scale.to(self._scale.device), zp.to(self._scale.device)
            self._stale = False

    def observe_tensor(self, x: torch.Tensor) -> None:
        """Update the observer with ``x`` (the scale is recomputed when next needed)."""
        self.observer(x)
        self._stale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe_tensor(x)
            return x
        running = getattr(self.observer, "running", True)
        if not self.observer.initialized or (self.observe and (self.training or not running)):
            self.observe_tensor(x)
        if not self.observer.initialized:  # an empty tensor: nothing to quantize against
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def quantize(self, x: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """The integers of ``x`` with the current scale and zero point (no observation)."""
        return quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis, dtype)

    def levels(self) -> torch.Tensor | None:
        if self.axis is not None or not self.observer.initialized:
            return None  # per-channel levels differ from channel to channel
        return (torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32) - self.zero_point.float()) * self.scale

    def extra_repr(self) -> str:
        kind = ("int" if self.signed else "uint") + str(self.bits)
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return f"{kind} [{self.qmin}, {self.qmax}], {'symmetric' if self.symmetric else 'asymmetric'}, {where}"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch integer type that holds this quantizer's integers."""
        if self.bits > 8:
            return torch.int32
        return torch.int8 if self.signed else torch.uint8


register_quantizer("affine")(AffineQuantizer)  # every option open; default uint8, asymmetric, per tensor


@register_quantizer("int8_weight")
class Int8WeightQuantizer(AffineQuantizer):
    """int8 weights: symmetric (``Z = 0``), per output channel (axis 0), narrow range ``[-127, 127]``, the
    range following the current weights (min-max of the latest tensor).

    Forward: ``y = S_c clamp(round(w / S_c), -127, 127)``, ``S_c = max|w_c| / 127`` per output channel ``c``.
    Gradient: clipped straight-through estimator (all weights are inside the range: identity).

    Args:
        bits: 8 (``[-127, 127]``); 7 gives ``[-63, 63]`` (the "reduced range" that keeps x86 AVX2 kernels
            without VNNI from saturating int16 pair sums, see :mod:`lowbit.export.onnx_qdq`).
        per_channel: one scale per output channel (default) or one per tensor.
        observer: the range observer (default: min-max of the latest tensor).

    Example:
        >>> q = Int8WeightQuantizer()
        >>> w = torch.tensor([[1.0, -0.5], [0.01, 0.02]])
        >>> (q(w) / q.scale[:, None]).round().tolist()
        [[127.0, -64.0], [64.0, 127.0]]

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877; Krishnamoorthi, "Quantizing deep convolutional networks for efficient
        inference: A whitepaper", arXiv:1806.08342 (per-channel weight scales).
    """

    def __init__(self, bits: int = 8, per_channel: bool = True, observer: ObserverSpec | None = None) -> None:
        super().__init__(bits=bits, signed=True, symmetric=True, narrow_range=True, axis=0 if per_channel else None,
                         observer=observer or {"name": "minmax", "running": False})


@register_quantizer("uint8_act")
class Uint8ActQuantizer(AffineQuantizer):
    """uint8 activations: asymmetric, per tensor, range from an exponential moving average of the min and
    max (quantization-aware training) or from a calibration observer.

    Forward: ``y = S (clamp(round(x / S) + Z, 0, 255) - Z)``. Gradient: clipped straight-through estimator.

    Args:
        bits: integer width (8: ``[0, 255]``).
        observer: the range observer (default ``{"name": "ema", "momentum": 0.01}``).

    Example:
        >>> q = Uint8ActQuantizer()
        >>> y = q(torch.relu(torch.randn(1000)))
        >>> int(q.zero_point)                     # a ReLU output: the range starts at 0, so Z = 0
        0

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3.1).
    """

    def __init__(self, bits: int = 8, observer: ObserverSpec | None = None) -> None:
        super().__init__(bits=bits, signed=False, symmetric=False, axis=None,
                         observer=observer or {"name": "ema", "momentum": 0.01})


@register_quantizer("int8_act")
class Int8ActQuantizer(AffineQuantizer):
    """int8 activations ``[-128, 127]``: asymmetric, per tensor, EMA (or calibration) range.

    Forward: ``y = S (clamp(round(x / S) + Z, -128, 127) - Z)``. Gradient: clipped straight-through estimator.

    Args:
        bits: integer width (8: ``[-128, 127]``).
        observer: the range observer (default ``{"name": "ema", "momentum": 0.01}``).

    Example:
        >>> q = Int8ActQuantizer()
        >>> int(q(torch.tensor([0.0, 1.0])).numel())
        2

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """

    def __init__(self, bits: int = 8, observer: ObserverSpec | None = None) -> None:
        super().__init__(bits=bits, signed=True, symmetric=False, axis=None,
                         observer=observer or {"name": "ema", "momentum": 0.01})

