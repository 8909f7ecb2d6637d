"""Helpers shared by the container tests: a small valid model file, and re-sealing edited files."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.codec import CompressedTensor, save


def sparse(
    shape: tuple[int, ...], density: float, weight_bits: int, index_bits: int, seed: int = 0
) -> CompressedTensor:
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    positions = np.flatnonzero(rng.random(numel) < density)
    k = int(rng.integers(1, (1 << weight_bits) + 1))
    codebook = rng.standard_normal(k).astype(np.float32)
    codes = rng.integers(0, k, positions.size)
    return CompressedTensor(shape, positions, codes, codebook, index_bits, weight_bits)


def small_model(path: Path) -> dict[str, Any]:
    """A file with two sparse layers (one with filler entries), a bias and a bool mask; returns the tensors."""
    tensors: dict[str, Any] = {
        "fc1.weight": sparse((30, 40), 0.08, weight_bits=5, index_bits=3, seed=1),  # gaps overflow 3 bits
        "fc1.bias": torch.linspace(-1, 1, 30),
        "fc2.weight": sparse((10, 30), 0.3, weight_bits=4, index_bits=5, seed=2),
        "mask": torch.tensor([True, False, True]),
    }
    save(path, tensors, meta={"model": "toy", "acc": 0.5})
    return tensors


def split(blob: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(version, header, body) of a file."""
    _, version, n = struct.unpack_from("<4sHI", blob)
    return version, json.loads(blob[10: 10 + n]), blob[10 + n: -32]


def seal(header: bytes | dict[str, Any], body: bytes, version: int = 1, magic: bytes = b"LBZ\x00") -> bytes:
    """A file with a valid checksum around any header and body (what a forger would write)."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    return with_digest(struct.pack("<4sHI", magic, version, len(header)) + header + body)


def with_digest(blob: bytes) -> bytes:
    """``blob`` followed by its SHA-256, the file's last 32 bytes."""
    return blob + hashlib.sha256(blob).digest()
