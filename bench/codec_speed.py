"""Decode speed and size of lowbit's canonical Huffman coder against zstd, on Deep Compression's streams.

    python -m bench.codec_speed                    # 2M kept weights, 7 timed runs each
    python -m bench.codec_speed --kept 500000 --repeats 5

Streams (the two that the ``.lbz`` container Huffman-codes):

    codes_Nbit    cluster indices of the kept weights: a Gaussian layer magnitude-pruned to 10% (so the kept
                  values are bimodal, the paper's Figure 5) and quantized to 2**N levels spaced linearly
                  between the smallest and largest kept weight (the paper's linear initialization)
    gaps_idxN     relative indices of the same layer's kept positions with N-bit indices, fillers included
    uniform_8bit  uniformly random bytes: nothing to gain, the coder's worst case
    lenet_fc1_*   the same two streams from the trained LeNet-300-100 baseline's fc1, pruned to the paper's
                  8% and quantized to 6 bits (5-bit indices); small (about 22K symbols), so per-call costs show

zstd (``zstandard``, levels 3 and 19) gets each stream as one byte per symbol, so its Msym/s is its MB/s of
decoded output. Times are the median of ``--repeats`` runs on one thread, Huffman and zstd timed in turns;
the Huffman decode includes the copy into a padded buffer and the output allocation, as zstd's does. The
ratio to zstd in the same run is the number to read; absolute speeds depend on the machine and its load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zstandard

from bench._common import CHECKPOINTS, write_results
from lowbit.codec import HuffmanCode, encode_positions, entropy_bits
from lowbit.timing import interleaved_medians


def _race(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, one call of each in turn per round (round robin) so that a change in the
    machine's load hits all of them alike; one untimed warm-up run each (numba's kernel is loaded from its cache)."""
    return interleaved_medians(fns, rounds=repeats)["wall"]


def _quantize(values: np.ndarray, bits: int) -> np.ndarray:
    """Index of the nearest of 2**bits levels spaced linearly over [min, max] (linear initialization)."""
    lo, hi = float(values.min()), float(values.max())
    steps = (1 << bits) - 1
    return np.rint((values - lo) / (hi - lo) * steps).astype(np.int64)


def _pruned_layer(weights: np.ndarray, keep: float) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values) of the largest-magnitude ``keep`` fraction of a flat weight array."""
    flat = weights.reshape(-1)
    n = int(round(keep * flat.size))
    threshold = np.partition(np.abs(flat), flat.size - n)[flat.size - n]
    positions = np.flatnonzero(np.abs(flat) >= threshold)
    return positions, flat[positions]


def streams(kept: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(kept * 10, dtype=np.float32)
    positions, values = _pruned_layer(weights, 0.1)
    out = {
        "codes_5bit": _quantize(values, 5),
        "codes_8bit": _quantize(values, 8),
        "gaps_idx5": encode_positions(positions, 5)[0].astype(np.int64),
        "gaps_idx8": encode_positions(positions, 8)[0].astype(np.int64),
        "uniform_8bit": rng.integers(0, 256, kept),
    }
    ckpt = CHECKPOINTS / "lenet300_100.safetensors"
    if ckpt.exists():
        from safetensors.torch import load_file

        fc1 = load_file(ckpt)["model.fc1.weight"].numpy()
        positions, values = _pruned_layer(fc1, 0.08)
        out["lenet_fc1_codes_6bit"] = _quantize(values, 6)
        out["lenet_fc1_gaps_idx5"] = encode_positions(positions, 5)[0].astype(np.int64)
    return out


def measure(symbols: np.ndarray, repeats: int) -> dict[str, float]:
    code = HuffmanCode.from_symbols(symbols)
    data, nbits = code.encode(symbols)
    decoded = code.decode(data, symbols.size, nbits)
    assert np.array_equal(decoded, symbols), "Huffman round trip failed"
    raw = symbols.astype(np.uint8).tobytes()  # every stream here has symbols < 256
    n = symbols.size
    fixed = max(1, (code.alphabet_size - 1).bit_length())  # the packed fixed-width code (P+Q)
    row: dict[str, float] = {
        "symbols": n,
        "alphabet": code.alphabet_size,
        "entropy_bits_per_symbol": round(entropy_bits(np.bincount(symbols)), 4),
        "huffman_bits_per_symbol": round(nbits / n, 4),
        "fixed_bits_per_symbol": fixed,
        "huffman_saving_vs_fixed_pct": round(100 * (1 - nbits / n / fixed), 1),
        "huffman_max_code_bits": code.max_length,
        "huffman_table_bytes": code.alphabet_size,
    }
    dctx = zstandard.ZstdDecompressor()
    packed = {level: zstandard.ZstdCompressor(level=level).compress(raw) for level in (3, 19)}
    for level, blob in packed.items():
        assert dctx.decompress(blob) == raw
        row[f"zstd{level}_bits_per_symbol"] = round(8 * len(blob) / n, 4)
    t = _race({
        "huffman_decode": lambda: code.decode(data, n, nbits),
        "zstd3_decode": lambda: dctx.decompress(packed[3]),
        "zstd19_decode": lambda: dctx.decompress(packed[19]),
    }, repeats)
    t.update(_race({
        "huffman_encode": lambda: code.encode(symbols),
        "zstd3_encode": lambda: zstandard.ZstdCompressor(level=3).compress(raw),
    }, max(1, repeats // 2)))
    for name, seconds in t.items():
        row[f"{name}_msym_s"] = round(n / seconds / 1e6, 1)
    row["huffman_decode_vs_zstd3"] = round(row["huffman_decode_msym_s"] / row["zstd3_decode_msym_s"], 2)
    row["huffman_size_vs_zstd19"] = round(row["huffman_bits_per_symbol"] / row["zstd19_bits_per_symbol"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kept", type=int, default=2_000_000, help="kept weights in the synthetic layer")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    cols = {"symbols": "symbols", "fixed_bits_per_symbol": "fixed", "entropy_bits_per_symbol": "entropy",
            "huffman_bits_per_symbol": "huffman", "zstd19_bits_per_symbol": "zstd19",
            "huffman_decode_msym_s": "huff Msym/s", "zstd3_decode_msym_s": "zstd3 Msym/s",
            "huffman_decode_vs_zstd3": "ratio"}
    print(f"{'stream':22s}" + "".join(f"{c:>13s}" for c in cols.values()))
    for name, symbols in streams(args.kept).items():
        results[name] = measure(symbols, args.repeats)
        print(f"{name:22s}" + "".join(f"{results[name][c]:>13}" for c in cols))
    print(f"wrote {write_results('codec_speed', results, merge=False)}")


if __name__ == "__main__":
    main()
