"""The integer operations of a lowered model (``lowbit.graph.lower.convert``): each one a small module.

A lowered model is a ``torch.fx.GraphModule`` whose tensors between ``Quantize`` and ``Dequantize`` are
integers (uint8 or int8 activations, int8 weights, int32 biases) with a scale and zero point known per
tensor. Every operation here has

- its parameters as integers (weights, biases, fixed-point multipliers ``M0``, shifts ``n``, zero points,
  output clamps), which :mod:`lowbit.runtime.integer` reads to run the model with numpy integer
  arithmetic, and the float scales that :mod:`lowbit.export.onnx_qdq` writes to ONNX;
- a torch ``forward`` on the same integers ("integer mode"): the accumulations are exact (float64 holds every
  integer sum of int8 x uint8 products below 2^53) and the requantization is the fixed-point arithmetic of
  :mod:`lowbit.quant.affine`, so the lowered model's output is, bit for bit, the integer interpreter's.

Residual additions (``QAdd``) rescale both inputs to a common scale with int32 arithmetic and requantize
the sum, as gemmlowp/TFLite do (inputs shifted left by 20 bits, each multiplied by ``S_in / (2 max S)``,
the sum by ``2 max S / (2^20 S_out)``), so two tensors of different scales add without floats.

Every requantizing op has a ``rounding``: ``"gemmlowp"`` (the paper's SaturatingRoundingDoublingHighMul +
RoundingDivideByPOT), ``"single"`` (one rounding of the 64-bit product) or ``"fp32"``: convolutions and linear
layers requantize as float32 does, with the float32 multiplier ``fl(fl(S_in S_w) / S_out)`` that onnxruntime
computes (bit-exact with its QLinearConv / QGemm), the other ops as ``"single"``; see
:func:`lowbit.quant.affine.multiply_by_quantized_multiplier`.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (Section 2: integer-only arithmetic; Section 2.4: fused layers, additions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.affine import ROUNDINGS, float32_multiplier, multiply_by_quantized_multiplier, quantize_multiplier

__all__ = [
    "QParams", "Quantize", "Dequantize", "Requantize", "QConv2d", "QLinear", "QAdd", "QGlobalAvgPool",
    "QMaxPool2d", "QClamp", "QPad", "ADD_LEFT_SHIFT", "QOPS",
]

ADD_LEFT_SHIFT = 20  # QAdd: headroom bits of the rescaled inputs (as TFLite's quantized ADD)


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of an activation: ``r = scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"a scale must be finite and > 0, got {self.scale!r}")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero point {self.zero_point} outside [{self.qmin}, {self.qmax}]")

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def dtype(self) -> torch.dtype:
        if self.qmin >= 0 and self.qmax <= 255:
            return torch.uint8
        if self.qmin >= -128 and self.qmax <= 127:
            return torch.int8
        return torch.int32

    @property
    def np_dtype(self) -> type:
        return {torch.uint8: np.uint8, torch.int8: np.int8, torch.int32: np.int32}[self.dtype]

    def __str__(self) -> str:
        kind = {torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32"}[self.dtype]
        return f"{kind}(s={self.scale:.4g}, z={self.zero_point})"


def _check_rounding(rounding: str, weighted: bool = False) -> str:
    """The rounding an op computes with: ``"fp32"`` is float32's only for convolutions and linear layers."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return "single" if rounding == "fp32" and not weighted else rounding


def _mult(m: np.ndarray | float) -> tuple[torch.Tensor, torch.Tensor]:
    m0, n = quantize_multiplier(m)
    return torch.as_tensor(m0, dtype=torch.int64), torch.as_tensor(n, dtype=torch.int64)


def _requant(acc: torch.Tensor, m0: torch.Tensor, n: torch.Tensor, out: QParams, lo: int, hi: int,
             rounding: str) -> torch.Tensor:
    """``clamp(Z_out + acc * M, lo, hi)`` as ``out``'s integer dtype (acc: int64 holding int32 values)."""
    y = multiply_by_quantized_multiplier(acc, m0, n, rounding) + out.zero_point
    return y.clamp(lo, hi).to(out.dtype)


def _channel(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over ``(N, C, ...)`` with ``dims`` dimensions."""
    return t.reshape(1, -1, *([1] * (dims - 2)))


class Quantize(nn.Module):
    """float -> integer: ``q = clamp(round(x / S) + Z, qmin, qmax)`` (float32 division, ties to even)."""

    def __init__(self, out: QParams) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise ValueError("the input of an integer model contains NaN")
        q = torch.round(x.float() / torch.tensor(self.out.scale, dtype=torch.float32)) + self.out.zero_point
        return q.clamp(self.out.qmin, self.out.qmax).to(self.out.dtype)

    def extra_repr(self) -> str:
        return f"out={self.out}"


class Dequantize(nn.Module):
    """integer -> float: ``r = S (q - Z)`` (float32)."""

    def __init__(self, inp: QParams) -> None:
        super().__init__()
        self.inp = inp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.int32) - self.inp.zero_point).float() * torch.tensor(self.inp.scale, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"in={self.inp}"


class Requantize(nn.Module):
    """integer -> integer of another scale: ``q' = clamp(Z' + (q - Z) M, qmin', qmax')``, ``M = S / S'``."""

    def __init__(self, inp: QParams, out: QParams, rounding: str = "gemmlowp") -> None:
        super().__init__()
        self.inp, self.out, self.rounding = inp, out, _check_rounding(rounding)
        m0, n = _mult(inp.scale / out.scale)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", n)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _requant(q.to(torch.int64) - self.inp.zero_point, self.m0, self.shift, self.out,
                        self.out.qmin, self.out.qmax, self.rounding)

    def extra_repr(self) -> str:
        return f"in={self.inp}, out={self.out}"


class _QWeighted(nn.Module):
    """Shared by QConv2d and QLinear: int8 weights (zero point 0), int32 bias, per-channel multipliers."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, inp: QParams, out: QParams,
                 act_min: int, act_max: int, rounding: str = "gemmlowp") -> None:
        super().__init__()
        self.rounding = _check_rounding(rounding, weighted=True)
        if weight.dtype != torch.int8 or bias.dtype != torch.int32:
            raise TypeError(f"weights must be int8 and biases int32, got {weight.dtype} and {bias.dtype}")
        if not out.qmin <= act_min <= act_max <= out.qmax:
            raise ValueError(f"output clamp [{act_min}, {act_max}] outside [{out.qmin}, {out.qmax}]")
        self.inp, self.out, self.act_min, self.act_max = inp, out, int(act_min), int(act_max)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("w_scale", w_scale.to(torch.float32))
        if self.rounding == "fp32":  # the float32 multiplier, computed as onnxruntime computes it
            m32 = np.float32(inp.scale) * w_scale.float().numpy() / np.float32(out.scale)
            m0, n = (torch.as_tensor(t, dtype=torch.int64) for t in float32_multiplier(m32))
        else:
            m0, n = _mult(np.float64(inp.scale) * w_scale.double().numpy() / np.float64(out.scale))
        self.register_buffer("m0", m0)
        self.register_buffer("shift", n)

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        acc = torch.round(acc).to(torch.int64) + _channel(self.bias.to(torch.int64), acc.dim())
        return _requant(acc, _channel(self.m0, acc.dim()), _channel(self.shift, acc.dim()), self.out,
                        self.act_min, self.act_max, self.rounding)

    def _centered(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(torch.float64) - self.inp.zero_point  # exact: small integers

    def extra_repr(self) -> str:
        return (f"in={self.inp}, out={self.out}, weight=int8{tuple(self.weight.shape)}, "
                f"clamp=[{self.act_min}, {self.act_max}]")


class QConv2d(_QWeighted):
    """Integer convolution: ``acc = conv(q - Z_in, W_q) + b_q`` (int32), ``q_out = clamp(Z_out + acc M_c)``.

    ``M_c = S_in S_w[c] / S_out`` per output channel as ``M0 2^-n``; the clamp ``[act_min, act_max]`` holds the
    fused ReLU/ReLU6. Zero padding pads ``q - Z_in`` with 0, i.e. ``q`` with ``Z_in`` (real 0).
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, inp: QParams, out: QParams,
                 act_min: int, act_max: int, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, rounding: str = "gemmlowp") -> None:
        super().__init__(weight, w_scale, bias, inp, out, act_min, act_max, rounding)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = F.conv2d(self._centered(q), self.weight.to(torch.float64), None, self.stride, self.padding,
                       self.dilation, self.groups)
        return self._finish(acc)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", stride={self.stride}, padding={self.padding}"
                + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + (f", groups={self.groups}" if self.groups != 1 else ""))


class QLinear(_QWeighted):
    """Integer linear layer: ``acc = (q - Z_in) W_q^T + b_q`` (int32), ``q_out = clamp(Z_out + acc M_c)``."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(self._centered(q), self.weight.to(torch.float64)))


class QAdd(nn.Module):
    """Integer addition of two tensors of different scales (see the module docstring), optional ReLU clamp."""

    def __init__(self, a: QParams, b: QParams, out: QParams, act_min: int, act_max: int,
                 rounding: str = "gemmlowp") -> None:
        super().__init__()
        self.a, self.b, self.out, self.act_min, self.act_max = a, b, out, int(act_min), int(act_max)
        self.rounding = _check_rounding(rounding)
        twice_max = 2 * max(a.scale, b.scale)
        for name, m in (("a", a.scale / twice_max), ("b", b.scale / twice_max),
                        ("out", twice_max / ((1 << ADD_LEFT_SHIFT) * out.scale))):
            m0, n = _mult(m)
            self.register_buffer(f"m0_{name}", m0)
            self.register_buffer(f"shift_{name}", n)

    def forward(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        a = multiply_by_quantized_multiplier((qa.to(torch.int64) - self.a.zero_point) << ADD_LEFT_SHIFT,
                                             self.m0_a, self.shift_a, self.rounding)
        b = multiply_by_quantized_multiplier((qb.to(torch.int64) - self.b.zero_point) << ADD_LEFT_SHIFT,
                                             self.m0_b, self.shift_b, self.rounding)
        return _requant(a + b, self.m0_out, self.shift_out, self.out, self.act_min, self.act_max, self.rounding)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, out={self.out}, clamp=[{self.act_min}, {self.act_max}]"


class QGlobalAvgPool(nn.Module):
    """Integer global average pool: ``q_out = clamp(Z_out + sum_hw(q - Z_in) M)``, ``M = S_in / (H W S_out)``.

    ``M`` depends on the input's size and is derived when the size is seen (the same function derives it
    for the interpreter). Output ``(N, C, 1, 1)``.
    """

    def __init__(self, inp: QParams, out: QParams, rounding: str = "gemmlowp") -> None:
        super().__init__()
        self.inp, self.out, self.rounding = inp, out, _check_rounding(rounding)

    def multiplier(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(M0, n)`` for an average over ``count`` values."""
        return quantize_multiplier(np.float64(self.inp.scale) / (count * np.float64(self.out.scale)))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        count = q.shape[2] * q.shape[3]
        acc = (q.to(torch.int64) - self.inp.zero_point).sum((2, 3), keepdim=True)
        m0, n = self.multiplier(count)
        return _requant(acc, torch.as_tensor(m0), torch.as_tensor(n), self.out, self.out.qmin, self.out.qmax,
                        self.rounding)

    def extra_repr(self) -> str:
        return f"in={self.inp}, out={self.out}"


class QMaxPool2d(nn.Module):
    """Max pooling of integers (the scale and zero point are unchanged: max commutes with ``S (q - Z)``)."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], ceil_mode: bool, qp: QParams) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.ceil_mode, self.qp = tuple(dilation), bool(ceil_mode), qp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(q.to(torch.float32), self.kernel_size, self.stride, self.padding, self.dilation,
                         self.ceil_mode)  # float32 holds every 8-bit integer exactly
        return y.to(q.dtype)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, qp={self.qp}"


class QClamp(nn.Module):
    """A ReLU / ReLU6 that does not follow a fused layer: ``clamp(q, lo, hi)`` (``lo = Z``: real 0)."""

    def __init__(self, lo: int, hi: int, qp: QParams) -> None:
        super().__init__()
        self.lo, self.hi, self.qp = int(lo), int(hi), qp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp(self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"[{self.lo}, {self.hi}], qp={self.qp}"


class QPad(nn.Module):
    """Constant zero padding (``F.pad`` spelling of ``pad``) of integers: real 0 is the zero point ``Z``."""

    def __init__(self, pad: tuple[int, ...], qp: QParams) -> None:
        super().__init__()
        if any(p < 0 for p in pad):
            raise ValueError(f"negative padding (cropping) is not supported by the integer lowering: {pad}")
        self.pad, self.qp = tuple(int(p) for p in pad), qp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.pad(q, self.pad, value=self.qp.zero_point)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, value={self.qp.zero_point}"


QOPS = (Quantize, Dequantize, Requantize, QConv2d, QLinear, QAdd, QGlobalAvgPool, QMaxPool2d, QClamp, QPad)
