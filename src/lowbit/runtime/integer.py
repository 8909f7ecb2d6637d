"""The integer reference interpreter: runs a lowered int8 model with integer arithmetic only.

    from lowbit.runtime.integer import run_integer
    logits = run_integer(int_model, x)                 # numpy float32, the dequantized outputs
    q = run_integer(int_model, x, dequantize=False)    # the integer outputs (uint8/int8)

The model is a ``torch.fx`` graph from :func:`lowbit.graph.lower.convert`; the interpreter reads each
operation's integer parameters (int8 weights, int32 biases, fixed-point multipliers ``M0``, shifts ``n``,
zero points, clamps) and computes with numpy integers only:

- convolution / linear: ``(q - Z_in)`` as int16 times int8 weights widened to int16, summed in int32 (a numba
  kernel; im2col + GEMM for dense convolutions, a direct loop for grouped / depthwise ones), plus the int32
  bias;
- requantization: ``Z_out + RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0), n - 31)`` with
  gemmlowp's rounding (half away from zero, truncating division), or one rounding of the product
  (``"single"``), or float32's roundings emulated with integers (``"fp32"``: bit-exact with runtimes that
  requantize in float32, as onnxruntime does), saturated to the output clamp: numpy int64
  functions (:func:`srdhm`, :func:`rounding_divide_by_pot`, :func:`multiply_by_quantized_multiplier`), and
  a compiled per-channel kernel doing the same for convolutions and linear layers;
- additions (rescaled to a common scale, as ``lowbit.graph.qops.QAdd``), global average pooling (an int32
  sum, requantized), max pooling, padding with the zero point, reshapes and slices on integers.

The only float operations are the model's boundary: ``Quantize`` of the float input (float32 division, round
half to even, as ONNX ``QuantizeLinear``) and ``Dequantize`` of the outputs. The result is bit-exact with the
torch forward of the lowered model (its "integer mode"); this module shares no arithmetic code with it.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (Section 2; gemmlowp's fixed-point primitives).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import fx, nn

from lowbit.graph.qops import (
    ADD_LEFT_SHIFT,
    Dequantize,
    QAdd,
    QClamp,
    QConv2d,
    QGlobalAvgPool,
    QLinear,
    QMaxPool2d,
    QPad,
    Quantize,
    Requantize,
)

__all__ = ["run_integer", "srdhm", "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "IntegerInterpreter"]

_INT32_MIN, _INT32_MAX = np.int64(-(2**31)), np.int64(2**31 - 1)


# ------------------------------------------------------------------------------- fixed-point (numpy int64)


def srdhm(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values (computed in int64).

    Example:
        >>> srdhm(np.array([3, -3]), 2**30)
        array([ 2, -2])
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    s = ab + np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    q = np.where(s >= 0, s >> 31, -((-s) >> 31))  # C division: truncate toward zero
    return np.where((a == _INT32_MIN) & (b == _INT32_MIN), _INT32_MAX, q)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero.

    Example:
        >>> rounding_divide_by_pot(np.array([5, -5, 6, -6]), 2)
        array([ 1, -1,  2, -2])
    """
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(acc: np.ndarray, m0: np.ndarray | int, n: np.ndarray | int,
                                     rounding: str = "gemmlowp") -> np.ndarray:
    """``acc * M0 * 2^-n``. ``"gemmlowp"``: a saturating left shift by ``31 - n`` when ``n < 31``, then ``srdhm``
    and a rounding right shift by ``n - 31``. ``"single"``: ``acc M0`` (exact in int64) shifted right by ``n``
    with one rounding, half away from zero, saturated to int32. ``"fp32"`` (``M0`` a 24-bit significand): IEEE
    float32's ``round(float32(acc) * M)``, each rounding (to 24 significant bits, then to an integer) half to
    even, with integers only.

    Example:
        >>> multiply_by_quantized_multiplier(np.array([10, -10]), 1288490189, 32)   # M = 0.3
        array([ 3, -3])
    """
    acc = np.asarray(acc, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    if rounding == "fp32":
        prod = _to_float32(_to_float32(acc) * np.asarray(m0, dtype=np.int64))
        mag = _shift_half_even(np.abs(prod), np.maximum(n, 0)) << np.maximum(-n, 0)
        return np.clip(np.where(prod < 0, -mag, mag), _INT32_MIN, _INT32_MAX)
    if rounding == "single":
        prod = acc * np.asarray(m0, dtype=np.int64)
        half = np.where(n > 0, np.int64(1) << np.maximum(n - 1, 0), 0)
        mag = (np.abs(prod) + half) >> n
        return np.clip(np.where(prod < 0, -mag, mag), _INT32_MIN, _INT32_MAX)
    if rounding != "gemmlowp":
        raise ValueError(f"rounding must be 'gemmlowp', 'single' or 'fp32', got {rounding!r}")
    left = np.maximum(31 - n, 0)
    right = np.maximum(n - 31, 0)
    shifted = np.clip(acc << left, _INT32_MIN, _INT32_MAX)
    return rounding_divide_by_pot(srdhm(shifted, m0), right)


def _shift_half_even(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``x / 2^s`` rounded half to even (``x >= 0``, ``0 <= s <= 62``)."""
    q = x >> s
    rem, half = x - (q << s), (np.int64(1) << s) >> 1
    return q + ((rem > half) | ((rem == half) & (s > 0) & (q & 1 == 1)))


def _to_float32(x: np.ndarray) -> np.ndarray:
    """The integers ``x`` rounded to 24 significant bits, half to even (the values of ``float32(x)``)."""
    mag = np.abs(x)
    top = np.zeros_like(mag)  # the index of the highest set bit, by binary search
    for s in (32, 16, 8, 4, 2, 1):
        top += s * ((mag >> (top + s)) > 0)
    drop = np.maximum(top + 1 - 24, 0)
    mag = _shift_half_even(mag, drop) << drop
    return np.where(x < 0, -mag, mag)


# --------------------------------------------------------------------------------------- numba kernels
_MODE = {"gemmlowp": 0, "single": 1, "fp32": 2}  # the kernels' rounding argument


@numba.njit(cache=True, nogil=True)
def _gemm_i16(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # pragma: no cover (compiled)
    """(M, K) int16 x (N, K) int16 -> (M, N) int32, accumulating in int32."""
    m, k = a.shape
    n = b.shape[0]
    out = np.empty((m, n), np.int32)
    for i in range(m):
        for j in range(n):
            acc = np.int32(0)
            for t in range(k):
                acc += np.int32(a[i, t]) * np.int32(b[j, t])
            out[i, j] = acc
    return out


@numba.njit(cache=True, nogil=True)
def _im2col(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int) -> np.ndarray:  # pragma: no cover
    """Padded (N, H, W, C) int16 -> (N*OH*OW, kh*kw*C) rows of the windows, in (kh, kw, C) order."""
    n_img, _, _, c_n = x.shape
    cols = np.empty((n_img * oh * ow, kh * kw * c_n), np.int16)
    r = 0
    for n in range(n_img):
        for i in range(oh):
            for j in range(ow):
                t = 0
                for u in range(kh):
                    for v in range(kw):
                        src = x[n, i * sh + u, j * sw + v]
                        for c in range(c_n):  # contiguous on both sides
                            cols[r, t + c] = src[c]
                        t += c_n
                r += 1
    return cols


@numba.njit(cache=True, nogil=True)
def _add_kernel(qa: np.ndarray, qb: np.ndarray, za: int, zb: int, m0a: int, na: int, m0b: int, nb: int, m0o: int,
                no: int, zo: int, lo: int, hi: int, left: int, mode: int) -> np.ndarray:  # pragma: no cover
    """QAdd on flat arrays: both inputs rescaled to a common scale (shifted left by ``left``), summed, requantized."""
    out = np.empty(qa.shape, np.int32)
    for i in range(qa.size):
        a = _mbqm_scalar((np.int64(qa[i]) - za) << left, m0a, na, mode)
        b = _mbqm_scalar((np.int64(qb[i]) - zb) << left, m0b, nb, mode)
        y = _mbqm_scalar(a + b, m0o, no, mode) + zo
        out[i] = min(max(y, lo), hi)
    return out


@numba.njit(cache=True, nogil=True)
def _conv_grouped(x: np.ndarray, w: np.ndarray, stride_h: int, stride_w: int, dil_h: int, dil_w: int,
                  groups: int, oh: int, ow: int) -> np.ndarray:  # pragma: no cover (compiled)
    """Direct grouped convolution of a padded (N, C, H, W) int16 input, int16 weights, int32 sums."""
    n_img, _, _, _ = x.shape
    o_ch, cg, kh, kw = w.shape
    og = o_ch // groups
    out = np.empty((n_img, o_ch, oh, ow), np.int32)
    for n in range(n_img):
        for o in range(o_ch):
            g = o // og
            for i in range(oh):
                for j in range(ow):
                    acc = np.int32(0)
                    for c in range(cg):
                        ci = g * cg + c
                        for u in range(kh):
                            for v in range(kw):
                                acc += np.int32(x[n, ci, i * stride_h + u * dil_h, j * stride_w + v * dil_w]) \
                                    * np.int32(w[o, c, u, v])
                    out[n, o, i, j] = acc
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_half_even_scalar(x: np.int64, s: np.int64) -> np.int64:  # pragma: no cover (compiled)
    q = x >> s
    rem = x - (q << s)
    half = (np.int64(1) << s) >> 1
    return q + (1 if rem > half or (rem == half and s > 0 and (q & 1) == 1) else 0)


@numba.njit(cache=True, nogil=True)
def _to_float32_scalar(x: np.int64) -> np.int64:  # pragma: no cover (compiled)
    mag = abs(x)
    top = np.int64(0)  # the index of the highest set bit, by binary search
    for s in (32, 16, 8, 4, 2, 1):
        if (mag >> (top + s)) > 0:
            top += s
    drop = max(top + 1 - 24, 0)
    mag = _shift_half_even_scalar(mag, drop) << drop
    return -mag if x < 0 else mag


@numba.njit(cache=True, nogil=True)
def _mbqm_scalar(x: np.int64, m0: np.int64, n: np.int64, mode: int) -> np.int64:  # pragma: no cover (compiled)
    """multiply_by_quantized_multiplier for one int32 value (int64 arithmetic), as the numpy version; ``mode``
    0 gemmlowp, 1 single, 2 fp32."""
    if mode == 2:
        prod = _to_float32_scalar(_to_float32_scalar(x) * m0)
        mag = _shift_half_even_scalar(abs(prod), max(n, 0)) << max(-n, 0)
        r = -mag if prod < 0 else mag
        return min(max(r, -2147483648), 2147483647)
    if mode == 1:
        prod = x * m0
        half = (np.int64(1) << (n - 1)) if n > 0 else np.int64(0)
        mag = (abs(prod) + half) >> n
        r = -mag if prod < 0 else mag
        return min(max(r, -2147483648), 2147483647)
    if n < 31:
        x = x << (31 - n)
        x = min(max(x, -2147483648), 2147483647)
    right = n - 31 if n > 31 else 0
    ab = x * m0
    s = ab + (1073741824 if ab >= 0 else 1 - 1073741824)
    high = s >> 31 if s >= 0 else -((-s) >> 31)
    if x == -2147483648 and m0 == -2147483648:
        high = 2147483647
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if remainder > threshold else 0)


@numba.njit(cache=True, nogil=True)
def _requant_kernel(acc: np.ndarray, bias: np.ndarray, m0: np.ndarray, n: np.ndarray, zero_point: int,
                    lo: int, hi: int, mode: int) -> np.ndarray:  # pragma: no cover (compiled)
    """(A, C, B) int32 accumulators + per-channel int32 bias -> clamp(Z + (acc + b) M_c, lo, hi) as int32."""
    a_n, c_n, b_n = acc.shape
    out = np.empty(acc.shape, np.int32)
    for a in range(a_n):
        for c in range(c_n):
            for b in range(b_n):
                y = _mbqm_scalar(np.int64(acc[a, c, b]) + bias[c], m0[c], n[c], mode) + zero_point
                out[a, c, b] = min(max(y, lo), hi)
    return out


def _requant_channels(acc: np.ndarray, op: QConv2d | QLinear, axis: int) -> np.ndarray:
    """The compiled requantization of ``acc`` (channels along ``axis``), bit-identical to the numpy one."""
    shape = acc.shape
    a = int(np.prod(shape[:axis], dtype=np.int64))
    acc3 = np.ascontiguousarray(acc, dtype=np.int32).reshape(a, shape[axis], -1)
    vec = lambda t: np.ascontiguousarray(t.cpu().numpy(), dtype=np.int64)  # noqa: E731
    out = _requant_kernel(acc3, vec(op.bias), vec(op.m0), vec(op.shift), op.out.zero_point, op.act_min, op.act_max,
                          _MODE[op.rounding])
    return out.reshape(shape).astype(op.out.np_dtype)


# ------------------------------------------------------------------------------------------- the ops


def _requant(acc: np.ndarray, m0: Any, n: Any, zero_point: int, lo: int, hi: int, dtype: type,
             rounding: str) -> np.ndarray:
    return np.clip(multiply_by_quantized_multiplier(acc, m0, n, rounding) + zero_point, lo, hi).astype(dtype)


def _conv(op: QConv2d, q: np.ndarray) -> np.ndarray:
    x = q.astype(np.int16) - np.int16(op.inp.zero_point)  # (N, C, H, W); |q - Z| <= 255 fits int16
    ph, pw = op.padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # real 0 is (q - Z) = 0
    w = op.weight.cpu().numpy().astype(np.int16)
    o_ch, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = op.stride, op.dilation
    n, c, h, wd = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (wd - dw * (kw - 1) - 1) // sw + 1
    if op.groups == 1 and dh == dw == 1:
        cols = _im2col(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), kh, kw, sh, sw, oh, ow)  # (N*OH*OW, kh*kw*C)
        acc = _gemm_i16(cols, np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o_ch, -1)))  # (N*OH*OW, O)
        out = _requant_channels(acc, op, axis=1).reshape(n, oh, ow, o_ch)
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    acc = _conv_grouped(np.ascontiguousarray(x), w, sh, sw, dh, dw, op.groups, oh, ow)
    return _requant_channels(acc, op, axis=1)


def _linear(op: QLinear, q: np.ndarray) -> np.ndarray:
    x = q.astype(np.int16) - np.int16(op.inp.zero_point)
    lead = x.shape[:-1]
    acc = _gemm_i16(np.ascontiguousarray(x.reshape(-1, x.shape[-1])), op.weight.cpu().numpy().astype(np.int16))
    return _requant_channels(acc, op, axis=1).reshape(*lead, -1)


def _add(op: QAdd, qa: np.ndarray, qb: np.ndarray) -> np.ndarray:
    if qa.shape == qb.shape:  # the compiled path (same arithmetic as below, elementwise)
        out = _add_kernel(np.ascontiguousarray(qa).reshape(-1), np.ascontiguousarray(qb).reshape(-1),
                          op.a.zero_point, op.b.zero_point, int(op.m0_a), int(op.shift_a), int(op.m0_b),
                          int(op.shift_b), int(op.m0_out), int(op.shift_out), op.out.zero_point, op.act_min,
                          op.act_max, ADD_LEFT_SHIFT, _MODE[op.rounding])
        return out.reshape(qa.shape).astype(op.out.np_dtype)
    a = multiply_by_quantized_multiplier((qa.astype(np.int64) - op.a.zero_point) << ADD_LEFT_SHIFT,
                                         int(op.m0_a), int(op.shift_a), op.rounding)
    b = multiply_by_quantized_multiplier((qb.astype(np.int64) - op.b.zero_point) << ADD_LEFT_SHIFT,
                                         int(op.m0_b), int(op.shift_b), op.rounding)
    return _requant(a + b, int(op.m0_out), int(op.shift_out), op.out.zero_point, op.act_min, op.act_max,
                    op.out.np_dtype, op.rounding)


def _global_pool(op: QGlobalAvgPool, q: np.ndarray) -> np.ndarray:
    acc = (q.astype(np.int32) - np.int32(op.inp.zero_point)).sum(axis=(2, 3), keepdims=True, dtype=np.int64)
    m0, n = op.multiplier(q.shape[2] * q.shape[3])
    return _requant(acc, m0, n, op.out.zero_point, op.out.qmin, op.out.qmax, op.out.np_dtype, op.rounding)


def _max_pool(op: QMaxPool2d, q: np.ndarray) -> np.ndarray:
    if op.ceil_mode or op.dilation != (1, 1):
        raise NotImplementedError("the integer interpreter's max pool has no ceil_mode or dilation")
    (kh, kw), (sh, sw), (ph, pw) = op.kernel_size, op.stride, op.padding
    lowest = np.iinfo(q.dtype).min
    x = np.pad(q, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=lowest) if ph or pw else q
    oh = (x.shape[2] - kh) // sh + 1
    ow = (x.shape[3] - kw) // sw + 1
    out = None
    for u in range(kh):  # one strided view per kernel offset: fast where a windowed reduce is not
        for v in range(kw):
            part = x[:, :, u: u + (oh - 1) * sh + 1: sh, v: v + (ow - 1) * sw + 1: sw]
            out = part.copy() if out is None else np.maximum(out, part)
    return out


def _quantize(op: Quantize, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("the input of an integer model contains NaN")
    q = np.rint(x / np.float32(op.out.scale)) + op.out.zero_point  # rint: round half to even
    return np.clip(q, op.out.qmin, op.out.qmax).astype(op.out.np_dtype)


def _dequantize(op: Dequantize, q: np.ndarray) -> np.ndarray:
    return (q.astype(np.int32) - op.inp.zero_point).astype(np.float32) * np.float32(op.inp.scale)


def _requantize(op: Requantize, q: np.ndarray) -> np.ndarray:
    return _requant(q.astype(np.int64) - op.inp.zero_point, int(op.m0), int(op.shift), op.out.zero_point,
                    op.out.qmin, op.out.qmax, op.out.np_dtype, op.rounding)


def _pad(op: QPad, q: np.ndarray) -> np.ndarray:
    pad = list(op.pad) + [0] * (2 * q.ndim - len(op.pad))
    widths = [(pad[2 * i], pad[2 * i + 1]) for i in range(q.ndim)][::-1]  # F.pad lists the last dim first
    return np.pad(q, widths, constant_values=op.qp.zero_point)


_MODULE_OPS: dict[type[nn.Module], Callable[..., np.ndarray]] = {
    QConv2d: _conv, QLinear: _linear, QAdd: _add, QGlobalAvgPool: _global_pool, QMaxPool2d: _max_pool,
    Quantize: _quantize, Dequantize: _dequantize, Requantize: _requantize, QPad: _pad,
    QClamp: lambda op, q: np.clip(q, op.lo, op.hi).astype(q.dtype),
}


def _flatten(x: np.ndarray, start_dim: int = 0, end_dim: int = -1) -> np.ndarray:
    end = end_dim % x.ndim
    start = start_dim % x.ndim
    return x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])


def _shape_args(args: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


_METHODS: dict[str, Callable[..., Any]] = {
    "flatten": _flatten,
    "reshape": lambda x, *s: x.reshape(_shape_args(s)),
    "view": lambda x, *s: x.reshape(_shape_args(s)),
    "size": lambda x, dim=None: tuple(x.shape) if dim is None else x.shape[dim],
    "contiguous": lambda x: np.ascontiguousarray(x),
    "squeeze": lambda x, dim=None: np.squeeze(x, axis=dim),
    "unsqueeze": lambda x, dim: np.expand_dims(x, dim),
}
_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    torch.flatten: _flatten,
    torch.reshape: lambda x, shape: x.reshape(tuple(shape)),
    torch.squeeze: lambda x, dim=None: np.squeeze(x, axis=dim),
    torch.unsqueeze: lambda x, dim: np.expand_dims(x, dim),
    operator.getitem: lambda x, idx: x[idx],
}


class IntegerInterpreter:
    """Runs a lowered model (``lowbit.graph.lower.convert``) node by node with numpy integers.

    Args:
        model: the lowered ``GraphModule``.

    Example:
        >>> interp = IntegerInterpreter(int_model)          # doctest: +SKIP
        >>> ints = interp.run(x, dequantize=False)           # doctest: +SKIP
    """

    def __init__(self, model: fx.GraphModule) -> None:
        if not isinstance(model, fx.GraphModule) or not getattr(model, "lowbit_int8", {}).get("lowered"):
            raise TypeError("the integer interpreter runs models from lowbit.graph.lower.convert; got "
                            f"{type(model).__name__}")
        self.model = model
        self.modules = dict(model.named_modules())
        for node in model.graph.nodes:  # refuse anything that is not integer arithmetic before running
            self._check(node)

    def _check(self, node: fx.Node) -> None:
        if node.op == "call_module" and type(self.modules[node.target]) not in _MODULE_OPS:
            raise TypeError(f"integer interpreter: node {node.name} runs {type(self.modules[node.target]).__name__}, "
                            "which is not an integer operation")
        if node.op == "call_method" and node.target not in _METHODS:
            raise TypeError(f"integer interpreter: no integer form of method .{node.target}() (node {node.name})")
        if node.op == "call_function" and node.target not in _FUNCTIONS:
            raise TypeError(f"integer interpreter: no integer form of {getattr(node.target, '__name__', node.target)} "
                            f"(node {node.name})")
        if node.op == "get_attr":
            raise TypeError(f"integer interpreter: constant {node.target} is not supported")

    def run(self, *inputs: np.ndarray | torch.Tensor, dequantize: bool = True) -> Any:
        """Outputs for ``inputs`` (numpy or torch, float): float32 arrays, or with ``dequantize=False`` the
        integers before the final ``Dequantize`` (a single array for a single output)."""
        env: dict[fx.Node, Any] = {}
        feed = iter(inputs)
        out: Any = None
        for node in self.model.graph.nodes:
            fetch = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
            args = fx.node.map_aggregate(node.args, fetch)
            kwargs = fx.node.map_aggregate(node.kwargs, fetch)
            if node.op == "placeholder":
                try:
                    x = next(feed)
                except StopIteration:
                    raise ValueError(f"the model takes more inputs than the {len(inputs)} given") from None
                env[node] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            elif node.op == "call_module":
                module = self.modules[node.target]
                if isinstance(module, Dequantize) and not dequantize:
                    env[node] = args[0]
                else:
                    env[node] = _MODULE_OPS[type(module)](module, *args, **kwargs)
            elif node.op == "call_method":
                env[node] = _METHODS[node.target](*args, **kwargs)
            elif node.op == "call_function":
                env[node] = _FUNCTIONS[node.target](*args, **kwargs)
            elif node.op == "output":
                out = args[0]
        return out


def run_integer(model: fx.GraphModule, *inputs: np.ndarray | torch.Tensor, dequantize: bool = True,
                batch_size: int | None = None) -> Any:
    """Run a lowered int8 model with integer arithmetic only (see the module docstring).

    Args:
        model: a model from :func:`lowbit.graph.lower.convert`.
        inputs: the float inputs (numpy arrays or tensors).
        dequantize: return float32 outputs (default) or the output integers.
        batch_size: run a single-input model in chunks of this many samples (bounds memory).

    Returns:
        The model's output(s) as numpy arrays.

    Raises:
        TypeError: ``model`` is not a lowered model, or holds an operation with no integer form.

    Example:
        >>> from lowbit.graph import convert, prepare_ptq, calibrate          # doctest: +SKIP
        >>> y = run_integer(convert(calibrated), x)                         # doctest: +SKIP

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """
    interp = IntegerInterpreter(model)
    if batch_size is None or len(inputs) != 1:
        return interp.run(*inputs, dequantize=dequantize)
    x = inputs[0]
    parts = [interp.run(x[i:i + batch_size], dequantize=dequantize) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)
