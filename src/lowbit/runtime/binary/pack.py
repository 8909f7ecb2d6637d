"""Bit packing of +-1 tensors into 64-bit words along the reduction axis.

Encoding: +1 -> bit 1, -1 -> bit 0 (lowbit's sign(0) = +1, so a 0 packs as +1 too). Element ``j`` of the packed
axis goes to word ``j // 64``, bit ``j % 64`` (least significant bit first); a length ``K`` that is not a
multiple of 64 is padded with zero bits up to ``words(K) * 64``. The kernels keep every padding bit zero in
both operands, so ``a XOR b`` is 0 there and ``dot = K - 2 popcount(a XOR b)`` with the true ``K`` needs no mask.

Layouts used by :mod:`lowbit.runtime.binary`:

    activations   [N, H, W, Cw]   NHWC, channels packed (a vector [N, K] is [N, 1, 1, Kw])
    conv weights  [O, KH, KW, Cw] one row of taps per output channel, channels packed
    linear        [O, Kw]

    >>> import torch
    >>> x = torch.tensor([[1.0, -1.0, 0.0, -2.0]])
    >>> w = pack_signs(x)
    >>> w.dtype, w.shape, int(w[0, 0])       # bits 0 and 2 set (+1, +1 at j = 0, 2)
    (dtype('uint64'), (1, 1), 5)
    >>> unpack_signs(w, 4)
    tensor([[ 1., -1.,  1., -1.]])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["WORD_BITS", "words", "pack_bits", "unpack_bits", "pack_signs", "unpack_signs", "pack_nchw",
           "unpack_nhwc"]

WORD_BITS = 64


def words(k: int) -> int:
    """Words needed for ``k`` bits: ``ceil(k / 64)``."""
    return -(-int(k) // WORD_BITS)


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")


def pack_bits(bits: Tensor | np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack a 0/1 (or bool) tensor along ``axis`` into uint64 words; the packed axis becomes the last one.

    Args:
        bits: values in {0, 1} (any integer or bool dtype, or float 0.0/1.0).
        axis: the axis to pack (it is moved to the end).

    Returns:
        uint64 array of shape ``shape without axis + [words(K)]``, padding bits zero.

    Example:
        >>> pack_bits(np.array([1, 1, 0, 1])).tolist()
        [11]
    """
    a = _as_numpy(bits)
    if a.ndim == 0:
        raise ValueError("pack_bits needs at least one dimension to pack")
    if a.dtype != np.bool_:
        ok = (a == 0) | (a == 1)
        if not ok.all():
            raise ValueError("pack_bits takes values in {0, 1}; use pack_signs for +-1 values")
        a = a != 0
    return _pack_bool(np.moveaxis(a, axis, -1))


def _pack_bool(b: np.ndarray) -> np.ndarray:
    """bool [..., K] -> uint64 [..., words(K)] (bit j of the row at word j // 64, bit j % 64)."""
    k = b.shape[-1]
    kw = words(k)
    if k != kw * WORD_BITS:
        pad = np.zeros(b.shape[:-1] + (kw * WORD_BITS - k,), dtype=np.bool_)
        b = np.concatenate([b, pad], axis=-1)
    by = np.packbits(np.ascontiguousarray(b), axis=-1, bitorder="little")  # [..., 8 * kw] bytes, LSB first
    # little-endian words: byte i of a word holds bits 8i .. 8i + 7
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64, copy=False).reshape(b.shape[:-1] + (kw,))


def unpack_bits(w: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint64 ``[..., words(k)]`` -> uint8 0/1 with ``k`` entries at ``axis``.

    Example:
        >>> unpack_bits(np.array([11], dtype=np.uint64), 4).tolist()
        [1, 1, 0, 1]
    """
    w = np.asarray(w)
    if w.dtype != np.uint64:
        raise TypeError(f"unpack_bits takes uint64 words, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] != words(k) or k < 1:
        raise ValueError(f"unpack_bits: {k} bits need {words(k)} words in the last dim, got shape {w.shape}")
    by = np.ascontiguousarray(w).astype("<u8", copy=False).view(np.uint8).reshape(w.shape[:-1] + (-1,))
    bits = np.unpackbits(by, axis=-1, count=k, bitorder="little")
    return np.moveaxis(bits, -1, axis)


def pack_signs(x: Tensor | np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack the signs of ``x`` along ``axis``: ``x >= 0`` (+1) -> 1, ``x < 0`` (-1) -> 0 (sign(0) = +1).

    Args:
        x: a real tensor (typically +-1); NaN is an error (it has no sign).
        axis: the axis to pack (moved to the end).

    Returns:
        uint64 array ``shape without axis + [words(K)]``.

    Example:
        >>> pack_signs(torch.tensor([1.0, -1.0, 1.0])).tolist()
        [5]
    """
    a = _as_numpy(x)
    if a.ndim == 0:
        raise ValueError("pack_signs needs at least one dimension to pack")
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise ValueError("pack_signs: the tensor holds NaN, which has no sign")
    return _pack_bool(np.moveaxis(a >= 0, axis, -1))


def unpack_signs(w: np.ndarray, k: int, axis: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: a +-1 tensor with ``k`` entries at ``axis``.

    Example:
        >>> unpack_signs(np.array([5], dtype=np.uint64), 3)
        tensor([ 1., -1.,  1.])
    """
    bits = torch.from_numpy(unpack_bits(w, k, axis).astype(np.float32))
    return (2 * bits - 1).to(dtype)


def pack_nchw(x: Tensor | np.ndarray) -> np.ndarray:
    """Signs of an NCHW tensor as packed NHWC words ``[N, H, W, words(C)]``; ``[N, C]`` gives ``[N, 1, 1, Cw]``.

    Example:
        >>> pack_nchw(torch.ones(2, 3, 4, 5)).shape
        (2, 4, 5, 1)
    """
    a = _as_numpy(x)
    if a.ndim == 2:
        a = a[:, :, None, None]
    if a.ndim != 4:
        raise ValueError(f"pack_nchw takes [N, C, H, W] or [N, C], got shape {a.shape}")
    return pack_signs(np.moveaxis(a, 1, -1), axis=-1)


def unpack_nhwc(w: np.ndarray, c: int) -> Tensor:
    """Packed NHWC words ``[N, H, W, words(c)]`` -> a +-1 float NCHW tensor ``[N, c, H, W]``.

    Example:
        >>> unpack_nhwc(pack_nchw(-torch.ones(1, 3, 2, 2)), 3).shape
        torch.Size([1, 3, 2, 2])
    """
    if np.ndim(w) != 4:
        raise ValueError(f"unpack_nhwc takes [N, H, W, Cw] words, got shape {np.shape(w)}")
    return unpack_signs(w, c, axis=-1).permute(0, 3, 1, 2)
