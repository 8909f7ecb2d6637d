"""Bit packing against plain PyTorch: bit positions, round trips, padding bits, layouts, errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import lowbit.runtime.binary.pack as pack_mod
from lowbit.runtime.binary.pack import (
    pack_bits,
    pack_nchw,
    pack_signs,
    unpack_bits,
    unpack_nhwc,
    unpack_signs,
    words,
)


def test_doctests() -> None:
    assert doctest.testmod(pack_mod).failed == 0


@pytest.mark.parametrize("k", [1, 7, 63, 64, 65, 128, 130, 300])
def test_bit_positions_and_round_trip(k: int) -> None:
    x = torch.randn(5, k)
    x[0, 0] = 0.0  # sign(0) = +1
    w = pack_signs(x)
    assert w.dtype == np.uint64 and w.shape == (5, words(k))
    for j in (0, k // 2, k - 1):  # element j sits at word j // 64, bit j % 64
        bit = (w[:, j // 64] >> np.uint64(j % 64)) & np.uint64(1)
        assert bit.tolist() == (x[:, j] >= 0).long().tolist()
    rem = k % 64
    if rem:  # the padding bits of the last word are zero
        assert not (w[:, -1] >> np.uint64(rem)).any()
    assert torch.equal(unpack_signs(w, k), torch.where(x < 0, -1.0, 1.0))


def test_pack_along_an_axis() -> None:
    x = torch.randn(3, 70, 4)
    w = pack_signs(x, axis=1)
    assert w.shape == (3, 4, 2)
    assert torch.equal(unpack_signs(w, 70, axis=1), torch.where(x < 0, -1.0, 1.0))


def test_pack_bits_0_1() -> None:
    b = torch.randint(0, 2, (4, 100))
    assert np.array_equal(pack_bits(b), pack_signs(2 * b - 1))
    assert np.array_equal(unpack_bits(pack_bits(b), 100), b.numpy())
    assert np.array_equal(pack_bits(b.bool().numpy()), pack_bits(b))


def test_nchw_nhwc_round_trip() -> None:
    x = torch.randn(2, 65, 3, 5)
    w = pack_nchw(x)
    assert w.shape == (2, 3, 5, 2)
    assert torch.equal(unpack_nhwc(w, 65), torch.where(x < 0, -1.0, 1.0))
    assert pack_nchw(torch.randn(4, 10)).shape == (4, 1, 1, 1)


def test_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        pack_bits(np.array([0, 2]))
    with pytest.raises(ValueError, match="need 2 words"):
        unpack_bits(np.zeros((3, 1), np.uint64), 70)
    with pytest.raises(TypeError, match="uint64"):
        unpack_bits(np.zeros((3, 2), np.int64), 70)
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        pack_signs([1.0, -1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, C\]"):
        pack_nchw(torch.ones(2, 3, 4))
