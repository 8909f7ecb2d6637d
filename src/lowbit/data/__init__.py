"""Data sets (a registry) and in-memory loaders.

    ds = lowbit.data.load_dataset("mnist")          # embedded, always available
    train = ds.loader("train", batch_size=128, shuffle=True, augment=False)
    for x, y in train: ...

Names: ``mnist``, ``cifar10``, ``tinyshakespeare``, ``digits``. Data directories come from
``data_dir=`` (CLI ``--data-dir``) or ``$LOWBIT_DATA``; see :mod:`lowbit.data._files`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit._registry import Registry
from lowbit.data._files import DataIntegrityError, DataNotFoundError
from lowbit.data.cifar import CIFAR10_CLASSES, load_cifar10_arrays
from lowbit.data.loader import ImageLoader, Loader, Split, TextLoader
from lowbit.data.mnist import load_mnist_arrays
from lowbit.data.text import load_text_arrays

__all__ = [
    "Dataset", "datasets", "load_dataset", "list_datasets", "Split", "ImageLoader", "TextLoader",
    "Loader", "DataNotFoundError", "DataIntegrityError", "CIFAR10_CLASSES",
]


@dataclass
class Dataset:
    """A loaded data set: both splits in memory plus what a model needs to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (T,) for text
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    augment: bool = False  # whether the standard crop+flip augmentation suits this set
    vocab: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return bool(self.vocab)

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, augment: bool | None = None,
        seed: int = 0, seq_len: int = 128,
    ) -> Loader:
        """A loader over ``split`` ('train' or 'test'); ``augment=None`` uses the set's default
        for training and never augments the test split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = self.train if split == "train" else self.test
        if self.is_text:
            return TextLoader(data, batch_size, seq_len, shuffle=shuffle, seed=seed)
        aug = (self.augment and split == "train") if augment is None else augment
        return ImageLoader(data, batch_size, self.mean, self.std, shuffle=shuffle, augment=aug, seed=seed)


datasets: Registry[Callable[[str | None], Dataset]] = Registry("dataset")


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


@datasets.register("mnist")
def mnist(data_dir: str | None = None) -> Dataset:
    """MNIST, 60,000 train + 10,000 test 28x28 grey digits (embedded in the package)."""
    return Dataset(
        "mnist", _split(*load_mnist_arrays("train", data_dir)), _split(*load_mnist_arrays("test", data_dir)),
        num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
    )


@datasets.register("cifar10")
def cifar10(data_dir: str | None = None) -> Dataset:
    """CIFAR-10, 50,000 train + 10,000 test 32x32 RGB images, 10 classes."""
    return Dataset(
        "cifar10", _split(*load_cifar10_arrays("train", data_dir)),
        _split(*load_cifar10_arrays("test", data_dir)), num_classes=10, input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), augment=True,
    )


@datasets.register("tinyshakespeare")
def tinyshakespeare(data_dir: str | None = None) -> Dataset:
    """Character-level tinyshakespeare: first 90% train, last 10% validation (as 'test')."""
    train, vocab = load_text_arrays("tinyshakespeare", "train", data_dir)
    test, _ = load_text_arrays("tinyshakespeare", "test", data_dir)
    as_split = lambda ids: Split(torch.from_numpy(ids), torch.from_numpy(ids))  # noqa: E731
    return Dataset(
        "tinyshakespeare", as_split(train), as_split(test), num_classes=len(vocab),
        input_shape=(128,), vocab=vocab,
    )


@datasets.register("digits")
def digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images): a tiny set for fast tests. 1,497 train / 300 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # values 0..16 -> 0..255
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, te = order[:-300], order[-300:]
    return Dataset(
        "digits", _split(x[tr], y[tr]), _split(x[te], y[te]), num_classes=10, input_shape=(1, 8, 8),
        mean=(0.30,), std=(0.38,),
    )


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Load a registered data set by name; an unknown name lists the valid ones."""
    return datasets.get(name)(data_dir)


def list_datasets(pattern: str = "*") -> list[str]:
    return datasets.list(pattern)

