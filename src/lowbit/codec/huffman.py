"""Canonical Huffman coding of symbol streams (cluster indices, relative indices), decoded by numba.

Deep Compression's last stage: the quantized weights' cluster indices and the sparse format's relative
indices are far from uniform (the paper's Figure 5: a bimodal weight histogram, many short gaps), so a
variable-length prefix code saves a further 20-30% of the storage.

Coding rules:

    code lengths   Huffman's algorithm on the symbol frequencies (heapq, ties broken by node id so the
                   result is deterministic); a symbol that does not occur gets length 0 (no code).
    length limit   24 bits (``MAX_CODE_LENGTH``). A longer code (possible only for Fibonacci-like
                   frequencies in streams of more than ~10^5 symbols) is shortened by the length-limiting
                   adjustment of JPEG, ITU-T T.81 Annex K.3 (``Adjust_BITS``): two leaves at the deepest
                   level are moved, one up a level and one under a shallower leaf, which keeps the Kraft sum
                   at 1; the lengths are then handed out again, shortest to the most frequent symbols. It
                   is not optimal (package-merge is) but close: on 30 symbols with Fibonacci frequencies
                   (29 bits deep unlimited) it costs 0.0005% more bits than unlimited Huffman at 24 bits,
                   0.09% at 16.
    canonical      codes are assigned in order of (length, symbol): the first code of each length is
                   ``first[l] = (first[l-1] + count[l-1]) << 1`` and the codes of one length are
                   consecutive. So the code lengths alone define the code; they are what a file stores.
    bit order      codes are written most significant bit first into bytes, first symbol at bit 7 of byte
                   0; the last byte is padded with zero bits.

Encoding is vectorized numpy: every code is placed in a 64-bit window starting at its 32-bit word (24 bits of
code plus at most 31 bits of offset fit), and the windows' two halves are summed into the output words with
``np.bincount`` (codes occupy disjoint bits, so the sum is the bitwise or). Decoding is a numba kernel over
a 64-bit bit buffer: one lookup in a ``2**12``-entry table gives symbol and length of every code up to 12
bits; longer codes are found with the canonical ``first``/``count`` arrays.

Example:
    >>> code = HuffmanCode.from_symbols(np.array([0, 0, 0, 1, 2, 0]))
    >>> code.lengths.tolist()
    [1, 2, 2]
    >>> data, nbits = code.encode(np.array([0, 0, 0, 1, 2, 0]))
    >>> nbits, code.decode(data, 6, nbits).tolist()
    (8, [0, 0, 0, 1, 2, 0])

References:
    Huffman, "A Method for the Construction of Minimum-Redundancy Codes", Proc. IRE 1952.
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", arXiv:1510.00149 (Section 4).
"""

from __future__ import annotations

import heapq

import numba
import numpy as np

from lowbit.codec._errors import CodecError

__all__ = [
    "MAX_CODE_LENGTH", "MAX_ALPHABET", "HuffmanCode", "code_lengths", "canonical_codes", "entropy_bits",
    "bits_per_symbol",
]

MAX_CODE_LENGTH = 24  # a code plus its bit offset in a 32-bit word (<= 31) fits the encoder's 64-bit window
MAX_ALPHABET = 1 << 20  # symbols 0 .. 2**20 - 1; the codec needs 2**16 + 1 (a 16-bit codebook + filler)
_LUT_BITS = 12  # decode table: 4096 int32 entries = 16 KiB, stays in L1
_CHUNK = 1 << 20  # symbols per encoding step, bounds the temporaries to ~100 MB


def _as_counts(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs)
    if f.ndim != 1 or not (np.issubdtype(f.dtype, np.integer) or f.size == 0):
        raise CodecError(f"frequencies must be a 1-D integer array, got shape {f.shape} dtype {f.dtype}")
    if f.size > MAX_ALPHABET:
        raise CodecError(f"alphabet of {f.size} symbols; at most {MAX_ALPHABET} are supported")
    f = f.astype(np.int64)
    if f.size and f.min() < 0:
        raise CodecError("frequencies must be >= 0")
    return f


def entropy_bits(freqs: np.ndarray) -> float:
    """Shannon entropy of a frequency table in bits per symbol (0 for an empty or one-symbol stream)."""
    f = _as_counts(freqs)
    f = f[f > 0].astype(np.float64)
    if f.size == 0:
        return 0.0
    p = f / f.sum()
    return float(-(p * np.log2(p)).sum())


def _huffman_depths(freqs: list[int]) -> list[int]:
    """Depth of each leaf in a Huffman tree over ``freqs`` (all > 0, at least two)."""
    n = len(freqs)
    heap = [(f, i) for i, f in enumerate(freqs)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        fa, a = heapq.heappop(heap)
        fb, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (fa + fb, node))
        node += 1
    depth = [0] * (2 * n - 1)  # the root is node 2n-2; every parent is created after its children
    for v in range(2 * n - 3, -1, -1):
        depth[v] = depth[parent[v]] + 1
    return depth[:n]


def _limit_depths(depths: list[int], freqs: list[int], max_length: int) -> list[int]:
    """JPEG Annex K.3 ``Adjust_BITS``: the same number of leaves with no code longer than ``max_length``."""
    deepest = max(depths)
    count = [0] * (deepest + 1)
    for d in depths:
        count[d] += 1
    for i in range(deepest, max_length, -1):
        while count[i] > 0:  # count[i] is even: level i is the deepest of a full tree
            j = i - 2
            while count[j] == 0:
                j -= 1
            if j < 1:  # cannot happen with at most 2**max_length leaves
                raise CodecError(f"cannot limit {len(depths)} codes to {max_length} bits")
            count[i] -= 2  # two siblings at level i: one replaces their parent at level i-1 ...
            count[i - 1] += 1
            count[j + 1] += 2  # ... and one joins a leaf from level j, both now at level j+1
            count[j] -= 1
    order = sorted(range(len(depths)), key=lambda s: (depths[s], -freqs[s], s))
    out = [0] * len(depths)
    k = 0
    for length in range(1, max_length + 1):
        for _ in range(count[length]):
            out[order[k]] = length
            k += 1
    return out


def code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8, 0 = symbol unused) for a frequency table, none above ``max_length``.

    A stream of one distinct symbol gets a 1-bit code; an empty stream gets no codes.
    """
    f = _as_counts(freqs)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_CODE_LENGTH:
        raise CodecError(f"max_length must be an int in 1..{MAX_CODE_LENGTH}, got {max_length!r}")
    used = np.flatnonzero(f)
    lengths = np.zeros(f.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used] = 1
    elif used.size > 1:
        if used.size > 1 << max_length:
            raise CodecError(f"{used.size} distinct symbols do not fit in codes of at most {max_length} bits")
        counts = f[used].tolist()
        depths = _huffman_depths(counts)
        if max(depths) > max_length:
            depths = _limit_depths(depths, counts, max_length)
        lengths[used] = depths
    return lengths


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not (np.issubdtype(lengths.dtype, np.integer) or lengths.size == 0):
        raise CodecError(f"code lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    if lengths.size > MAX_ALPHABET:
        raise CodecError(f"alphabet of {lengths.size} symbols; at most {MAX_ALPHABET} are supported")
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise CodecError(f"code lengths must be in 0..{MAX_CODE_LENGTH}, got {lengths.min()}..{lengths.max()}")
    lengths = lengths.astype(np.uint8)
    used = lengths[lengths > 0].astype(np.int64)
    kraft = int((np.int64(1) << (MAX_CODE_LENGTH - used)).sum())  # Kraft sum scaled by 2**24, exact
    if kraft > 1 << MAX_CODE_LENGTH:
        raise CodecError("code lengths violate the Kraft inequality (sum of 2**-length > 1): not a prefix code")
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint32, right-aligned in ``length`` bits) of every symbol; 0 where unused."""
    lengths = _check_lengths(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return codes
    order = used[np.argsort(lengths[used], kind="stable")]  # by (length, symbol)
    count = np.bincount(lengths[used], minlength=MAX_CODE_LENGTH + 1).astype(np.int64)
    first = np.zeros(MAX_CODE_LENGTH + 1, dtype=np.int64)
    for n in range(2, MAX_CODE_LENGTH + 1):
        first[n] = (first[n - 1] + count[n - 1]) << 1
    start = np.cumsum(count) - count  # index in ``order`` of the first symbol of each length
    ls = lengths[order].astype(np.int64)
    codes[order] = first[ls] + np.arange(order.size) - start[ls]
    return codes


@numba.njit(cache=True, nogil=True)
def _decode_kernel(buf, nbits, out, lut, lut_bits, first, count, offset, sorted_syms, max_len):  # pragma: no cover
    """Decode ``out.size`` symbols; returns the bits consumed, or ``-1 - i`` if symbol ``i`` is not a code
    or runs past ``nbits``. ``buf`` must extend at least 8 zero bytes past the stream."""
    acc = np.uint64(0)  # bit buffer, next bit at bit 63
    have = 0  # valid bits in acc
    pos = 0  # next byte of buf
    used = 0
    lut_shift = np.uint64(64 - lut_bits)
    for i in range(out.shape[0]):
        if have < 32:
            word = (
                (np.uint64(buf[pos]) << np.uint64(24))
                | (np.uint64(buf[pos + 1]) << np.uint64(16))
                | (np.uint64(buf[pos + 2]) << np.uint64(8))
                | np.uint64(buf[pos + 3])
            )
            acc |= word << np.uint64(32 - have)
            pos += 4
            have += 32
        e = np.int64(lut[acc >> lut_shift])
        if e > 0:
            length = e & 31
            sym = e >> 5
        else:  # a code longer than the table, or no code at all
            length = 0
            sym = 0
            for n in range(lut_bits + 1, max_len + 1):
                j = np.int64(acc >> np.uint64(64 - n)) - first[n]
                if 0 <= j < count[n]:
                    length = n
                    sym = np.int64(sorted_syms[offset[n] + j])
                    break
            if length == 0:
                return -1 - i
        acc <<= np.uint64(length)
        have -= length
        used += length
        if used > nbits:
            return -1 - i
        out[i] = sym
    return used


class HuffmanCode:
    """A canonical Huffman code over the symbols ``0 .. alphabet_size - 1``, defined by its code lengths.

    Args:
        lengths: code length per symbol (0 = the symbol has no code), each at most ``MAX_CODE_LENGTH``;
            they must satisfy the Kraft inequality. An incomplete code (one symbol, length 1) is allowed.
    """

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = _check_lengths(lengths)
        self.codes = canonical_codes(self.lengths)
        self.max_length = int(self.lengths.max()) if self.lengths.size else 0
        self._tables: tuple[np.ndarray, ...] | None = None

    @classmethod
    def from_frequencies(cls, freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> HuffmanCode:
        return cls(code_lengths(freqs, max_length))

    @classmethod
    def from_symbols(
        cls, symbols: np.ndarray, alphabet_size: int | None = None, max_length: int = MAX_CODE_LENGTH
    ) -> HuffmanCode:
        """The code for the stream's own frequencies (the alphabet ends at the largest symbol by default)."""
        s = _as_symbols(symbols)
        return cls.from_frequencies(np.bincount(s, minlength=alphabet_size or 0), max_length)

    @property
    def alphabet_size(self) -> int:
        return int(self.lengths.size)

    def average_bits(self, freqs: np.ndarray) -> float:
        """Mean code length in bits per symbol for a frequency table (0 for an empty one)."""
        f = _as_counts(freqs)
        if f.size > self.lengths.size and f[self.lengths.size:].any():
            raise CodecError("frequency table has symbols outside the code's alphabet")
        f = f[: self.lengths.size]
        total = int(f.sum())
        if total and (self.lengths[: f.size][f > 0] == 0).any():
            raise CodecError("frequency table has symbols that have no code")
        return float((f * self.lengths[: f.size]).sum() / total) if total else 0.0

    def encode(self, symbols: np.ndarray) -> tuple[bytes, int]:
        """Encode a stream; returns the packed bytes and the number of bits used (the rest is zero padding)."""
        s = _as_symbols(symbols)
        if s.size == 0:
            return b"", 0
        if s.max() >= self.lengths.size or (self.lengths[s] == 0).any():
            bad = s[(s >= self.lengths.size) | (self.lengths[np.minimum(s, self.lengths.size - 1)] == 0)][0]
            raise CodecError(f"symbol {int(bad)} has no code (alphabet size {self.lengths.size})")
        lengths = self.lengths.astype(np.int64)
        nbits = int(lengths[s].sum())
        words = np.zeros((nbits >> 5) + 2, dtype=np.uint64)  # big-endian 32-bit words of the stream
        base = 0  # bit offset of the chunk
        for lo in range(0, s.size, _CHUNK):
            chunk = s[lo: lo + _CHUNK]
            ln = lengths[chunk]
            start = base + np.cumsum(ln) - ln  # bit offset of each code
            base += int(ln.sum())
            # The code in a 64-bit window that starts at its first word: 64 - (offset in word) - length >= 9,
            # so a code touches two words at most; the high and low halves are summed into them.
            window = self.codes[chunk].astype(np.uint64) << (64 - (start & 31) - ln).astype(np.uint64)
            word = start >> 5
            w0 = int(word[0])
            rel = word - w0
            span = int(rel[-1]) + 2
            hi = np.bincount(rel, weights=(window >> np.uint64(32)).astype(np.float64), minlength=span)
            hi[1:] += np.bincount(rel, weights=(window & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=span - 1)
            words[w0: w0 + span] += hi.astype(np.uint64)  # < 2**32 each: exact in float64
        return words.astype(">u4").tobytes()[: (nbits + 7) >> 3], nbits

    def _decode_tables(self) -> tuple[np.ndarray, ...]:
        if self._tables is None:
            lut_bits = max(1, min(self.max_length, _LUT_BITS))
            lut = np.zeros(1 << lut_bits, dtype=np.int32)
            used = np.flatnonzero(self.lengths)
            short = used[self.lengths[used] <= lut_bits]
            ls = self.lengths[short].astype(np.int64)
            span = np.int64(1) << (lut_bits - ls)  # table entries covered by each short code
            first_entry = self.codes[short].astype(np.int64) << (lut_bits - ls)
            idx = np.repeat(first_entry - (np.cumsum(span) - span), span) + np.arange(int(span.sum()))
            lut[idx] = np.repeat((short.astype(np.int64) << 5) | ls, span)
            order = used[np.argsort(self.lengths[used], kind="stable")]
            count = np.bincount(self.lengths[used], minlength=MAX_CODE_LENGTH + 1).astype(np.int64)
            first = np.zeros(MAX_CODE_LENGTH + 1, dtype=np.int64)
            for n in range(2, MAX_CODE_LENGTH + 1):
                first[n] = (first[n - 1] + count[n - 1]) << 1
            offset = np.cumsum(count) - count
            self._tables = (lut, np.int64(lut_bits), first, count, offset, order.astype(np.uint32))
        return self._tables

    def decode(self, data: bytes | np.ndarray, count: int, nbits: int) -> np.ndarray:
        """Decode ``count`` symbols (uint32) from a stream of ``nbits`` bits written by :meth:`encode`.

        Raises :class:`CodecError` if the stream is shorter than ``nbits``, holds a bit pattern that is no
        code, or does not use exactly ``nbits`` bits for ``count`` symbols.
        """
        buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
            raise CodecError("Huffman data must be bytes or a 1-D uint8 array")
        for what, v in (("count", count), ("nbits", nbits)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise CodecError(f"{what} must be a non-negative int, got {v!r}")
        nbytes = (int(nbits) + 7) >> 3
        if buf.size < nbytes:
            raise CodecError(f"Huffman stream of {buf.size} bytes is shorter than its {nbits} bits")
        if count == 0:
            if nbits:
                raise CodecError(f"Huffman stream has {nbits} bits but no symbols")
            return np.zeros(0, dtype=np.uint32)
        if self.max_length == 0:
            raise CodecError(f"cannot decode {count} symbols with an empty code")
        if count > nbits:  # every code is at least one bit: checked before allocating ``count`` outputs
            raise CodecError(f"{count} symbols cannot fit in {nbits} bits")
        padded = np.zeros(nbytes + 8, dtype=np.uint8)
        padded[:nbytes] = buf[:nbytes]
        out = np.empty(int(count), dtype=np.uint32)
        lut, lut_bits, first, cnt, offset, syms = self._decode_tables()
        used = _decode_kernel(padded, int(nbits), out, lut, lut_bits, first, cnt, offset, syms, self.max_length)
        if used < 0:
            raise CodecError(f"corrupt Huffman stream: symbol {-1 - used} of {count} is not a valid code "
                             f"or runs past the stream's {nbits} bits")
        if used != nbits:
            raise CodecError(f"corrupt Huffman stream: {count} symbols used {used} of its {nbits} bits")
        return out


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    s = np.asarray(symbols)
    if s.ndim != 1 or not (np.issubdtype(s.dtype, np.integer) or s.size == 0):
        raise CodecError(f"symbols must be a 1-D integer array, got shape {s.shape} dtype {s.dtype}")
    s = s.astype(np.int64, copy=False)
    if s.size and (s.min() < 0 or s.max() >= MAX_ALPHABET):
        raise CodecError(f"symbols must be in 0..{MAX_ALPHABET - 1}, got {s.min()}..{s.max()}")
    return s


def bits_per_symbol(symbols: np.ndarray, code: HuffmanCode | None = None) -> float:
    """Average Huffman code length of a stream, with ``code`` or the stream's own optimal code."""
    s = _as_symbols(symbols)
    code = code or HuffmanCode.from_symbols(s)
    return code.average_bits(np.bincount(s))
