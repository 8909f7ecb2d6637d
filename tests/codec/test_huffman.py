import heapq
import math
from collections import Counter

import numpy as np
import pytest

from lowbit.codec import CodecError, HuffmanCode, bits_per_symbol, code_lengths, entropy_bits
from lowbit.codec.huffman import MAX_CODE_LENGTH, canonical_codes


def _entropy(symbols: list[int]) -> float:
    counts = Counter(symbols)
    n = len(symbols)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _optimal_cost(freqs: list[int]) -> int:
    """Total bits of an optimal prefix code = sum of the weights of Huffman's merged nodes."""
    heap = [f for f in freqs if f > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def _bit_by_bit_decode(data: bytes, count: int, lengths: np.ndarray) -> list[int]:
    """Reference decoder: walk the bits MSB first and look the growing prefix up in a dict."""
    codes = canonical_codes(lengths)
    table = {(int(lengths[s]), int(codes[s])): s for s in np.flatnonzero(lengths)}
    out, length, value = [], 0, 0
    for byte in data:
        for k in range(7, -1, -1):
            value, length = (value << 1) | ((byte >> k) & 1), length + 1
            if (length, value) in table:
                out.append(table[(length, value)])
                length = value = 0
                if len(out) == count:
                    return out
    return out


def _skewed(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(0.15, size=n) - 1, 200)


def _fibonacci_stream() -> np.ndarray:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    return np.repeat(np.arange(30), fib)  # an unlimited Huffman code would be 29 bits deep


@pytest.mark.parametrize("kind", ["skewed", "uniform", "fibonacci"])
def test_round_trip(kind: str) -> None:
    rng = np.random.default_rng(1)
    s = {"skewed": _skewed(50_000), "uniform": rng.integers(0, 256, 50_000), "fibonacci": _fibonacci_stream()}[kind]
    rng.shuffle(s)
    code = HuffmanCode.from_symbols(s)
    data, nbits = code.encode(s)
    assert len(data) == (nbits + 7) // 8 and nbits == int(code.lengths[s].sum())
    np.testing.assert_array_equal(code.decode(data, s.size, nbits), s)
    if kind == "uniform":
        assert (code.lengths == 8).all()  # 256 equally likely symbols: the fixed-length code
    if kind == "fibonacci":
        assert code.max_length == MAX_CODE_LENGTH  # limited; codes above 12 bits use the slow path


def test_numba_decoder_matches_a_bit_by_bit_reference() -> None:
    s = _skewed(3000, seed=3)
    code = HuffmanCode.from_symbols(s)
    data, nbits = code.encode(s)
    assert _bit_by_bit_decode(data, s.size, code.lengths) == s.tolist()


def test_single_symbol_and_empty_streams() -> None:
    s = np.full(1000, 7)
    code = HuffmanCode.from_symbols(s)
    assert code.lengths.tolist() == [0] * 7 + [1]
    data, nbits = code.encode(s)
    assert nbits == 1000 and data == bytes(125)  # code '0' for the one symbol
    np.testing.assert_array_equal(code.decode(data, 1000, nbits), s)
    with pytest.raises(CodecError, match="not a valid code"):
        code.decode(b"\x80" + bytes(124), 1000, 1000)  # a '1' bit: the incomplete code has no such code

    empty = HuffmanCode.from_symbols(np.array([], dtype=np.int64))
    assert empty.alphabet_size == 0 and empty.encode(np.array([], dtype=np.int64)) == (b"", 0)
    assert empty.decode(b"", 0, 0).size == 0
    assert bits_per_symbol(np.array([], dtype=np.int64)) == 0.0 and entropy_bits(np.array([])) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_average_length_is_optimal_and_within_one_bit_of_the_entropy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alphabet = int(rng.integers(2, 300))
    p = rng.dirichlet(np.full(alphabet, rng.choice([0.05, 0.5, 5.0])))
    s = rng.choice(alphabet, size=20_000, p=p)
    freqs = np.bincount(s)
    lengths = code_lengths(freqs)
    h = _entropy(s.tolist())
    avg = bits_per_symbol(s)
    assert h - 1e-9 <= avg < h + 1
    assert abs(entropy_bits(freqs) - h) < 1e-9
    assert int((freqs * lengths).sum()) == _optimal_cost(freqs.tolist())  # exactly Huffman's cost
    used = lengths[lengths > 0].astype(float)
    if used.size > 1:
        assert np.isclose((2.0 ** -used).sum(), 1.0)  # a complete code (Kraft equality)


def test_codes_are_canonical_and_prefix_free() -> None:
    lengths = code_lengths(np.bincount(_skewed(5000)))
    codes = canonical_codes(lengths)
    words = {s: format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)}
    for a in words.values():
        assert sum(b.startswith(a) for b in words.values()) == 1  # only itself
    ordered = sorted(words, key=lambda s: (lengths[s], s))  # canonical: codes increase in (length, symbol)
    left_aligned = [int(codes[s]) << (MAX_CODE_LENGTH - int(lengths[s])) for s in ordered]
    assert left_aligned == sorted(left_aligned)


@pytest.mark.parametrize("max_length", [4, 5, 8, 12])
def test_length_limit(max_length: int) -> None:
    fib = np.bincount(_fibonacci_stream())[:16]
    lengths = code_lengths(fib, max_length=max_length)
    assert lengths.max() <= max_length and lengths.min() >= 1
    assert np.isclose((2.0 ** -lengths.astype(float)).sum(), 1.0)
    cost = int((fib * lengths).sum())
    assert cost >= _optimal_cost(fib.tolist())
    if max_length == 4:
        assert (lengths == 4).all()  # 16 symbols in 4 bits: the fixed-length code is the only choice
    with pytest.raises(CodecError, match="do not fit"):
        code_lengths(np.ones(17, dtype=np.int64), max_length=4)


def test_invalid_codes_and_streams_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="Kraft"):
        HuffmanCode(np.array([1, 1, 1]))
    with pytest.raises(CodecError, match="0..24"):
        HuffmanCode(np.array([25, 1]))
    with pytest.raises(CodecError, match="integer"):
        code_lengths(np.array([0.5, 1.0]))
    s = _skewed(2000)
    code = HuffmanCode.from_symbols(s)
    data, nbits = code.encode(s)
    with pytest.raises(CodecError, match="shorter than"):
        code.decode(data[:-2], s.size, nbits)
    with pytest.raises(CodecError, match="cannot fit"):
        code.decode(data, nbits + 1, nbits)
    with pytest.raises(CodecError):
        code.decode(data, s.size, nbits - 1)  # runs past the end
    with pytest.raises(CodecError, match="used"):
        code.decode(data, s.size - 1, nbits)  # bits left over
    with pytest.raises(CodecError, match="has no code"):
        code.encode(np.array([int(s.max()) + 1]))
    with pytest.raises(CodecError, match="1-D integer"):
        code.encode(np.array([0.0, 1.0]))
