import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from lowbit.data import DataIntegrityError, load_dataset
from lowbit.data.mnist import read_idx

# Class counts of the official MNIST training set (LeCun et al.), independent of this copy.
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_embedded_mnist_is_the_official_set() -> None:
    ds = load_dataset("mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train.y.numpy()).tolist() == OFFICIAL_TRAIN_COUNTS
    assert ds.train.x.dtype.is_floating_point is False and int(ds.train.x.max()) == 255


def _idx(path: Path, dims: tuple[int, ...], payload: bytes, type_code: int = 8) -> Path:
    header = bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)
    return path


def test_read_idx_round_trip(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8)
    arr = read_idx(_idx(tmp_path / "a.gz", (2, 3, 4), data.tobytes()))
    assert arr.shape == (2, 3, 4) and np.array_equal(arr.ravel(), data)


@pytest.mark.parametrize(
    "dims, payload, type_code, message",
    [
        ((2, 3), b"\x00" * 5, 8, "header says"),  # truncated payload
        ((2, 3), b"\x00" * 7, 8, "header says"),  # trailing garbage
        ((4_000_000_000, 4_000_000_000), b"", 8, "header says"),  # absurd size: refused, not allocated
        ((2,), b"\x00" * 2, 0x0D, "unsupported"),  # float IDX
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, dims, payload, type_code, message) -> None:
    with pytest.raises(DataIntegrityError, match=message):
        read_idx(_idx(tmp_path / "bad.gz", dims, payload, type_code))


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    good = _idx(tmp_path / "x.gz", (4,), b"\x01\x02\x03\x04").read_bytes()
    bad = tmp_path / "y.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataIntegrityError):
        read_idx(bad)


def test_a_known_file_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "mnist"
    d.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        _idx(d / name, (1,), b"\x00")
    with pytest.raises(DataIntegrityError, match="SHA-256"):
        load_dataset("mnist", str(tmp_path))
