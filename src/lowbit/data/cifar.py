"""CIFAR-10 from the official python batches, an image-folder tree, or an image-folder tarball.

Accepted layouts inside a data directory (first match wins):

* ``cifar-10-batches-py/`` -- the official release (``data_batch_1..5``, ``test_batch``);
* ``cifar10/{train,test}/<class>/*.{png,jpg}`` -- an image-folder tree;
* ``cifar10*.tar.gz`` -- the same tree in a tarball (e.g. ``cifar10-jpeg.tar.gz``).

Image folders and tarballs are decoded once into a uint8 ``.npz`` cache keyed by the source's
checksum, so later runs load in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lowbit.data._files import (
    DataIntegrityError,
    cache_dir,
    data_dirs,
    not_found,
    sha256_file,
    verify_sha256,
)

__all__ = ["CIFAR10_CLASSES", "load_cifar10_arrays"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_SPLIT_SIZE = {"train": 50_000, "test": 10_000}  # the official sizes (progress-bar total)


class _RestrictedUnpickler(pickle.Unpickler):
    """The official batches are pickles of dicts of numpy arrays; allow nothing else to load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in self._ALLOWED:
            raise DataIntegrityError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.exists():
            raise DataIntegrityError(f"{folder}: {name} is missing (official layout expected)")
        with open(path, "rb") as f:
            try:
                d = _RestrictedUnpickler(f, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise DataIntegrityError(f"{path}: corrupt batch file ({e})") from e
        data, labels = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int64)
        if data.shape != (len(labels), 3072):
            raise DataIntegrityError(f"{path}: data shape {data.shape} is not (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _decode(blob: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except Exception as e:  # PIL raises many types on bad files
        raise DataIntegrityError(f"{where}: cannot decode image ({e})") from e
    if img.shape != (32, 32, 3):
        raise DataIntegrityError(f"{where}: image is {img.shape}, expected 32x32 RGB")
    return img.transpose(2, 0, 1)


def _tree_members(root: Path) -> Iterator[tuple[str, str, bytes]]:
    for split in _SPLIT_SIZE:
        for cls in CIFAR10_CLASSES:
            for p in sorted((root / split / cls).glob("*")):
                yield split, cls, p.read_bytes()


def _tar_members(path: Path) -> Iterator[tuple[str, str, bytes]]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3:
                    continue
                split, cls = parts[-3], parts[-2]
                f = tar.extractfile(m)
                if f is not None and split in _SPLIT_SIZE:
                    yield split, cls, f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataIntegrityError(f"{path}: corrupt or truncated tarball ({e})") from e


def _decode_folder(members: Iterator[tuple[str, str, bytes]], where: str) -> dict[str, np.ndarray]:
    from lowbit.train.progress import progress

    out: dict[str, list] = {s: [] for s in _SPLIT_SIZE}
    labels: dict[str, list[int]] = {s: [] for s in _SPLIT_SIZE}
    total = sum(_SPLIT_SIZE.values())
    with progress(total, f"decoding CIFAR-10 from {Path(where).name}") as advance:
        for split, cls, blob in members:
            if cls not in CIFAR10_CLASSES:
                raise DataIntegrityError(f"{where}: unknown class folder {cls!r}; allowed: {CIFAR10_CLASSES}")
            out[split].append(_decode(blob, f"{where}:{split}/{cls}"))
            labels[split].append(CIFAR10_CLASSES.index(cls))
            advance(1)
    arrays: dict[str, np.ndarray] = {}
    for split in _SPLIT_SIZE:
        missing = set(range(len(CIFAR10_CLASSES))) - set(labels[split])
        if missing:
            names = ", ".join(CIFAR10_CLASSES[i] for i in sorted(missing))
            raise DataIntegrityError(f"{where}: the {split} split has no images of {names}")
        arrays[f"x_{split}"] = np.stack(out[split])
        arrays[f"y_{split}"] = np.asarray(labels[split], np.int64)
    return arrays


def _cached(source: Path, decode) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    if source.is_file():
        key = sha256_file(source)[:16]
    else:  # a tree: key on every file's path, size and modification time
        listing = sorted(f"{p.relative_to(source)}|{p.stat().st_size}|{p.stat().st_mtime_ns}"
                         for p in source.rglob("*") if p.is_file())
        key = "tree-" + hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    path = cache_dir() / f"cifar10-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            path.unlink()  # a broken cache is rebuilt, never trusted
    arrays = decode()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def _mixed(split: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The split of an image-folder copy, the test split in a fixed random order (seed 0).

    Folders list the images class by class, so a prefix of the test split (a quick evaluation on the first N
    images, an export check on a few hundred) would hold one or two classes only; the official batches are in
    random order, and so is this. The train split keeps the folder order: training shuffles it every epoch
    anyway, and reordering it would change the batches of runs already checkpointed."""
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if split != "test":
        return x, y
    order = np.random.default_rng(0).permutation(len(y))
    return x[order], y[order]


def load_cifar10_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of the ``train`` or ``test`` split (an image-folder
    copy's test split in a fixed random order, not class by class: see :func:`_mixed`)."""
    looked = data_dirs(data_dir)
    for d in looked:
        if (d / "cifar-10-batches-py").is_dir():
            return _load_batches(d / "cifar-10-batches-py", split)
        if (d / "cifar10" / "train").is_dir():
            root = d / "cifar10"
            arrays = _cached(root, lambda r=root: _decode_folder(_tree_members(r), str(r)))
            return _mixed(split, arrays)
        tars = sorted(d.glob("cifar10*.tar.gz")) + sorted(d.glob("cifar-10*.tar.gz"))
        if tars:
            tar = tars[0]
            verify_sha256(tar)
            arrays = _cached(tar, lambda t=tar: _decode_folder(_tar_members(t), str(t)))
            return _mixed(split, arrays)
    raise not_found(
        "cifar10", looked, "cifar-10-batches-py/, cifar10/{train,test}/ or cifar10*.tar.gz",
        "Get the official python release of CIFAR-10 or an image-folder copy; nothing is downloaded.",
    )
