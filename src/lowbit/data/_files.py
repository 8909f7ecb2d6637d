"""Where data sets live, and checking that a file is the one we expect.

Lookup order for a data directory: the explicit ``data_dir`` argument (``--data-dir``), then the
``LOWBIT_DATA`` environment variable. Decoded caches go to ``LOWBIT_CACHE`` (default
``~/.cache/lowbit``). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "DataNotFoundError",
    "DataIntegrityError",
    "cache_dir",
    "data_dirs",
    "sha256_file",
    "verify_sha256",
]

# SHA-256 of the files lowbit knows; a file with a known name and another digest is refused.
KNOWN_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
    "t10k-labels-idx1-ubyte.gz": "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
    "train-images-idx3-ubyte.gz": "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
    "train-labels-idx1-ubyte.gz": "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
    "cifar10-jpeg.tar.gz": "5bbd2193f3b9982b20b3e62de1fcb9691706d5884e1bfe2840596f4c5f9b9bec",
    "tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where lowbit looked."""


class DataIntegrityError(ValueError):
    """A data file exists but is corrupt, truncated or not the expected file."""


def data_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories to search, in order: ``data_dir`` then ``$LOWBIT_DATA``."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("LOWBIT_DATA")) if d]
    return list(dict.fromkeys(dirs))


def cache_dir() -> Path:
    """Directory for decoded caches (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), created on demand."""
    path = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path) -> None:
    """Raise :class:`DataIntegrityError` if ``path`` has a known name but not the known digest."""
    expected = KNOWN_SHA256.get(path.name)
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(
            f"{path}: SHA-256 {actual} does not match the expected {expected}; "
            "the file is corrupt, truncated or a different release. Replace it with the original."
        )


def not_found(name: str, looked: list[Path], wanted: str, how: str) -> DataNotFoundError:
    where = ", ".join(str(p) for p in looked) or "(no directory given)"
    return DataNotFoundError(
        f"data set {name!r} not found: looked for {wanted} in {where}. "
        f"Pass --data-dir DIR or set LOWBIT_DATA=DIR. {how}"
    )
