"""The integer reference interpreter: bit-exact with the lowered model's torch forward, its fixed-point
primitives equal to exact Python references and to the torch implementation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from tests.graph._int8_models import int8, small_models

from lowbit.graph import Int8Config
from lowbit.quant import affine
from lowbit.runtime import integer as rt
from lowbit.runtime.integer import IntegerInterpreter, run_integer

MODELS = small_models()


def _round_half_away(q: Fraction) -> int:
    return int(math.floor(abs(q) + Fraction(1, 2))) * (1 if q >= 0 else -1)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single", "fp32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_interpreter_is_bit_exact_with_the_integer_mode_model(name: str, rounding: str) -> None:
    model, shape = MODELS[name]
    _, q = int8(model, shape, Int8Config(rounding=rounding))
    x = 1.5 * torch.randn(6, *shape)
    with torch.no_grad():
        torch_out = q(x).numpy()
    ints = run_integer(q, x, dequantize=False)
    assert ints.dtype == np.uint8
    assert np.array_equal(run_integer(q, x), torch_out)  # float outputs: identical bits
    assert np.array_equal(run_integer(q, x, batch_size=4), torch_out)


def test_roundings_differ_only_near_halves() -> None:
    model, shape = MODELS["resnet8"]
    x = torch.randn(8, *shape)
    a = run_integer(int8(model, shape, Int8Config(rounding="gemmlowp"))[1], x, dequantize=False).astype(int)
    b = run_integer(int8(model, shape, Int8Config(rounding="single"))[1], x, dequantize=False).astype(int)
    assert np.abs(a - b).max() <= 4 and (a == b).mean() > 0.5


def test_numpy_fixed_point_equals_torch_and_exact_reference() -> None:
    rng = np.random.default_rng(0)
    acc = np.concatenate([rng.integers(-(2**31), 2**31 - 1, 2000), [0, 1, -1, 2**31 - 1, -(2**31)]])
    for m in (0.7, 0.0123, 3.0e-6, 1.75, 200.0):
        m0, n = affine.quantize_multiplier(m)
        for rounding in ("gemmlowp", "single"):
            ref = affine.multiply_by_quantized_multiplier(torch.tensor(acc), m0, n, rounding).numpy()
            assert np.array_equal(rt.multiply_by_quantized_multiplier(acc, m0, n, rounding), ref)
        small = acc[np.abs(acc) < 2**20]
        exact = [_round_half_away(Fraction(int(a) * int(m0), 2 ** int(n))) for a in small[:200]]
        assert rt.multiply_by_quantized_multiplier(small[:200], m0, n, "single").tolist() == exact


def test_fp32_rounding_equals_float32_arithmetic_in_torch_numpy_and_the_compiled_kernel() -> None:
    rng = np.random.default_rng(3)
    acc = np.concatenate([rng.integers(-(2**31), 2**31 - 1, 5000), rng.integers(-(2**25), 2**25, 5000),
                          rng.integers(-3000, 3000, 5000), [0, 1, -1, 2**31 - 1, -(2**31), 2**24 + 1, -(2**24) - 3]])
    mults = np.float32([0.7, 0.0123, 3.0e-6, 1.75, 200.0, 2.0**-30, 1 / 3])
    mults = np.append(mults, np.float32(0.1) * np.float32(0.02) / np.float32(0.3))
    for m in mults:
        m0, n = affine.float32_multiplier(m)
        assert m0 < 2**24 and m0 * 2.0 ** -int(n) == float(m)  # the float32 value exactly
        # IEEE float32: acc rounded to float32, the product rounded to float32, then to an integer (half to even)
        ref = np.rint(np.float64(acc.astype(np.float32) * m)).clip(-(2**31), 2**31 - 1).astype(np.int64)
        assert np.array_equal(rt.multiply_by_quantized_multiplier(acc, m0, n, "fp32"), ref), m
        assert np.array_equal(affine.multiply_by_quantized_multiplier(torch.tensor(acc), m0, n, "fp32").numpy(), ref)
        kernel = rt._requant_kernel(acc.astype(np.int32).reshape(1, 1, -1), np.zeros(1, np.int64), np.array([m0]),
                                    np.array([n]), 0, -(2**31), 2**31 - 1, rt._MODE["fp32"])
        assert np.array_equal(kernel.reshape(-1), ref)


def test_compiled_requantization_kernel_equals_numpy_functions() -> None:
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**24), 2**24, (3, 4, 50)).astype(np.int32)
    bias = rng.integers(-(2**20), 2**20, 4).astype(np.int64)
    m0, n = affine.quantize_multiplier(np.array([0.002, 0.7, 1.3, 1e-5]))
    for rounding in ("gemmlowp", "single"):
        got = rt._requant_kernel(acc, bias, m0.astype(np.int64), n.astype(np.int64), 7, 0, 255, rt._MODE[rounding])
        ref = np.clip(rt.multiply_by_quantized_multiplier(acc.astype(np.int64) + bias[None, :, None],
                                                          m0[None, :, None], n[None, :, None], rounding) + 7, 0, 255)
        assert np.array_equal(got, ref)


def test_gemm_and_direct_conv_kernels_equal_exact_float64() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(-255, 256, (37, 29)).astype(np.int16)
    b = rng.integers(-127, 128, (11, 29)).astype(np.int16)
    assert np.array_equal(rt._gemm_i16(a, b), a.astype(np.int64) @ b.astype(np.int64).T)
    x = rng.integers(-255, 256, (2, 4, 7, 7)).astype(np.int16)
    w = rng.integers(-127, 128, (6, 2, 3, 3)).astype(np.int16)
    got = rt._conv_grouped(x, w, 2, 1, 1, 2, 2, 3, 3)  # stride (2, 1), dilation (1, 2), groups 2
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=(2, 1),
                                     dilation=(1, 2), groups=2)
    assert np.array_equal(got, ref.numpy().astype(np.int64))


def test_non_integer_models_are_refused() -> None:
    model, shape = MODELS["lenet5"]
    prepared, q = int8(model, shape)
    with pytest.raises(TypeError, match="runs models from lowbit.graph.lower.convert"):
        IntegerInterpreter(prepared)
    q.add_module("extra", torch.nn.Sigmoid())
    node = next(n for n in q.graph.nodes if n.op == "output")
    with q.graph.inserting_before(node):
        s = q.graph.call_module("extra", (node.args[0],))
    node.args = (s,)
    q.recompile()
    with pytest.raises(TypeError, match="runs Sigmoid, which is not an integer operation"):
        IntegerInterpreter(q)


def test_nan_input_is_an_error() -> None:
    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape)
    with pytest.raises(ValueError, match="NaN"):
        run_integer(q, np.full((1, *shape), np.nan, np.float32))
