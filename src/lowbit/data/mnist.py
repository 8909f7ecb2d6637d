"""MNIST from the standard IDX ``.gz`` files (embedded in the package as the default data set)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from lowbit.data._files import DataIntegrityError, data_dirs, not_found, verify_sha256

__all__ = ["read_idx", "load_mnist_arrays", "EMBEDDED_MNIST"]

EMBEDDED_MNIST = Path(__file__).parent / "files" / "mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MAX_ITEMS = 10_000_000  # refuse absurd sizes read from a header before allocating


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes, validating its header.

    The header is: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian uint32. The payload must have exactly prod(dims) bytes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated/corrupt streams
        raise DataIntegrityError(f"{path}: cannot decompress ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataIntegrityError(f"{path}: not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise DataIntegrityError(f"{path}: IDX type 0x{raw[2]:02x} unsupported (only 0x08 = uint8)")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DataIntegrityError(f"{path}: IDX header with {ndim} dimensions is malformed")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    if count > _MAX_ITEMS * 784 or len(raw) - 4 - 4 * ndim != count:
        raise DataIntegrityError(
            f"{path}: header says {dims} = {count} bytes, file holds {len(raw) - 4 - 4 * ndim}"
        )
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_dir(data_dir: str | None) -> Path:
    for d in data_dirs(data_dir):
        for cand in (d / "mnist", d):
            if (cand / _FILES["train"][0]).exists():
                return cand
    return EMBEDDED_MNIST


def load_mnist_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the ``train`` or ``test`` split."""
    folder = _find_dir(data_dir)
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = folder / img_name, folder / lbl_name
    if not img_path.exists() or not lbl_path.exists():
        raise not_found("mnist", [folder], f"{img_name} and {lbl_name}", "The IDX files are the official ones.")
    for p in (img_path, lbl_path):
        verify_sha256(p)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataIntegrityError(f"{folder}: images {images.shape} and labels {labels.shape} disagree")
    if labels.max() > 9:
        raise DataIntegrityError(f"{lbl_path}: labels must be 0..9, found {labels.max()}")
    return images[:, None].copy(), labels.astype(np.int64)
