"""Deep Compression's sparse format: relative indices of the kept weights, with filler entries.

A flattened weight tensor keeps the weights at positions ``p_0 < p_1 < ... < p_{n-1}``. Instead of the
absolute positions, the format stores for every entry the number of zeros skipped before it, the gap

    d_0 = p_0,    d_i = p_i - p_{i-1} - 1

in ``index_bits`` bits. When a gap exceeds the largest storable value ``M = 2**index_bits - 1``, filler
entries are inserted: a filler stands ``M + 1`` positions after the previous entry (its own gap is ``M``)
and holds the value zero, so a gap ``d`` costs ``d >> index_bits`` fillers and the real entry keeps the
remainder ``d & M``. This is the paper's Figure 3 (3-bit indices there; 8 bits for conv and 5 bits for
fully connected layers in its experiments). The figure counts differences ``p_i - p_{i-1}`` (up to 8 with
3 bits); storing the difference minus one, as here, uses all ``2**index_bits`` values, and the filler lands
on the same position (12 in the figure's example below). The entries' values are stored elsewhere, one per
entry; the caller marks a filler by a reserved code (``lowbit.codec.container`` uses code ``k`` for a
``k``-entry codebook).

Example:
    >>> gaps, is_filler = encode_positions(np.array([1, 4, 15]), index_bits=3)
    >>> gaps.tolist(), is_filler.tolist()
    ([1, 2, 7, 2], [False, False, True, False])
    >>> decode_positions(gaps, is_filler, index_bits=3).tolist()
    [1, 4, 15]

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", arXiv:1510.00149 (Section 2, Figure 3).
"""

from __future__ import annotations

import numpy as np

from lowbit.codec._errors import CodecError

__all__ = ["MAX_INDEX_BITS", "encode_positions", "decode_positions", "count_fillers"]

MAX_INDEX_BITS = 16  # gaps are stored as uint16; the paper uses 4 to 8


def _check_index_bits(index_bits: int) -> None:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)):
        raise CodecError(f"index_bits must be an int in 1..{MAX_INDEX_BITS}, got {type(index_bits).__name__}")
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise CodecError(f"index_bits must be in 1..{MAX_INDEX_BITS}, got {index_bits}")


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros skipped before each position (int64), after checking the positions are sorted and >= 0."""
    p = np.asarray(positions)
    if p.ndim != 1 or not (np.issubdtype(p.dtype, np.integer) or p.size == 0):
        raise CodecError(f"positions must be a 1-D integer array, got shape {p.shape} dtype {p.dtype}")
    p = p.astype(np.int64, copy=False)
    if p.size and p[0] < 0:
        raise CodecError(f"positions must be >= 0, got {int(p[0])}")
    d = np.diff(p, prepend=-1) - 1
    if p.size and d.min() < 0:
        i = int(np.argmin(d))
        raise CodecError(f"positions must be strictly increasing; position {i} is {int(p[i])} after {int(p[i - 1])}")
    return d


def count_fillers(positions: np.ndarray, index_bits: int) -> int:
    """How many filler entries :func:`encode_positions` would insert (without building the streams)."""
    _check_index_bits(index_bits)
    return int((_gaps(positions) >> index_bits).sum())


def encode_positions(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indices of sorted flat positions, with filler entries where a gap overflows.

    Args:
        positions: 1-D strictly increasing non-negative integers (flat indices of the kept weights).
        index_bits: bits per relative index, 1..16; the largest gap stored directly is ``2**index_bits - 1``.

    Returns:
        ``(gaps, is_filler)``: ``gaps`` (uint16, one per entry, each ``< 2**index_bits``) and a bool mask of
        the inserted filler entries; ``len(gaps) == len(positions) + is_filler.sum()``.
    """
    _check_index_bits(index_bits)
    d = _gaps(positions)
    fillers = d >> index_bits  # fillers in front of each real entry
    real = np.arange(d.size, dtype=np.int64) + np.cumsum(fillers)  # where each real entry lands
    total = d.size + int(fillers.sum())
    max_gap = (1 << index_bits) - 1
    gaps = np.full(total, max_gap, dtype=np.uint16)
    is_filler = np.ones(total, dtype=bool)
    gaps[real] = d & max_gap
    is_filler[real] = False
    return gaps, is_filler


def decode_positions(gaps: np.ndarray, is_filler: np.ndarray, index_bits: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`: the flat positions (int64) of the real (non-filler) entries.

    Raises :class:`CodecError` unless the streams are in the canonical form the encoder writes: equal
    lengths, every gap ``< 2**index_bits``, every filler at the largest gap, and no filler at the end.
    """
    _check_index_bits(index_bits)
    g = np.asarray(gaps)
    f = np.asarray(is_filler)
    if g.ndim != 1 or f.shape != g.shape or f.dtype != np.bool_:
        raise CodecError(f"gaps and is_filler must be 1-D of equal length (bool mask), got {g.shape} and {f.shape}")
    if g.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(g.dtype, np.integer):
        raise CodecError(f"gaps must be integers, got {g.dtype}")
    g = g.astype(np.int64)
    max_gap = (1 << index_bits) - 1
    if g.min() < 0 or g.max() > max_gap:
        raise CodecError(f"gaps must be in 0..{max_gap} for index_bits={index_bits}, got {g.min()}..{g.max()}")
    if f[-1]:
        raise CodecError("the last entry is a filler; fillers only precede a real entry")
    if (g[f] != max_gap).any():
        raise CodecError(f"a filler entry must have the largest gap {max_gap}")
    return (np.cumsum(g + 1) - 1)[~f]
