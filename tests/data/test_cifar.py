import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data import CIFAR10_CLASSES, DataIntegrityError, DataNotFoundError, load_dataset


def _official(root: Path, per_batch: int = 20) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(rng.integers(0, 10, per_batch))}, f)
    return first


def test_official_batches_layout(tmp_path: Path) -> None:
    first = _official(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train.x.shape == (100, 3, 32, 32) and ds.test.x.shape == (20, 3, 32, 32)
    # the official rows are 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.array_equal(ds.train.x[0, 1].numpy().ravel(), first[0, 1024:2048])


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    _official(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(DataIntegrityError, match="refusing to unpickle"):
        load_dataset("cifar10", str(tmp_path))


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


def test_image_folder_tarball_is_decoded_and_cached(tmp_path: Path) -> None:
    tar_path = tmp_path / "cifar10-tiny.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for split in ("train", "test"):
            for label, cls in enumerate(CIFAR10_CLASSES):
                blob = _png((label * 20, 0, 255 - label * 20))
                info = tarfile.TarInfo(f"{split}/{cls}/0000.png")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train.x.shape == (10, 3, 32, 32)
    bird = int((ds.train.y == CIFAR10_CLASSES.index("bird")).nonzero()[0])
    assert ds.train.x[bird, 0, 5, 5] == 2 * 20 and ds.train.x[bird, 2, 5, 5] == 255 - 2 * 20
    tar_path.write_bytes(b"not a tarball any more")  # the cache is keyed by checksum: now a miss
    with pytest.raises(DataIntegrityError, match="corrupt or truncated"):
        load_dataset("cifar10", str(tmp_path))


def test_image_folder_test_split_is_mixed_not_class_by_class(tmp_path: Path) -> None:
    per_class = 4
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            folder = tmp_path / "cifar10" / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i:04d}.png").write_bytes(_png((label * 20, i * 50, 0)))
    ds = load_dataset("cifar10", str(tmp_path))
    again = load_dataset("cifar10", str(tmp_path))
    y = ds.test.y.numpy()
    assert np.bincount(y).tolist() == [per_class] * 10  # every image once
    assert np.any(np.diff(y) < 0)  # not class by class
    assert len(set(y[:10].tolist())) >= 4  # a prefix sees several classes (class by class: 3)
    assert np.array_equal(ds.test.x[:, 0, 0, 0].numpy(), y * 20)  # each image still carries its own label
    assert torch.equal(again.test.x, ds.test.x) and torch.equal(again.test.y, ds.test.y)  # a fixed order
    assert np.all(np.diff(ds.train.y.numpy()) >= 0)  # the train split keeps the folder order


def test_missing_cifar_names_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match=str(tmp_path)) as e:
        load_dataset("cifar10", str(tmp_path))
    assert "LOWBIT_DATA" in str(e.value)


def test_shared_cifar10_copy(shared_data: Path) -> None:
    ds = load_dataset("cifar10", str(shared_data))
    assert ds.train.x.shape == (50000, 3, 32, 32) and ds.test.x.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train.y.numpy()).tolist() == [5000] * 10
    assert np.bincount(ds.test.y.numpy()).tolist() == [1000] * 10
    mean = ds.train.x.sum((0, 2, 3), dtype=torch.int64) / (50000 * 32 * 32 * 255)
    assert np.allclose(mean.numpy(), ds.mean, atol=0.02)  # the normalization constants fit this copy
