"""In-memory batch loaders whose every epoch is a pure function of (seed, epoch).

That makes a run resumable mid-epoch bit-exactly: ``batches(epoch, start=k)`` yields the same batches
as an uninterrupted epoch from its k-th batch on, without replaying the first k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowbit.data.transforms import normalize, random_crop, random_hflip

__all__ = ["Split", "ImageLoader", "TextLoader", "Loader"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Split:
    """One split of a data set: inputs (uint8 images or int64 token ids) and int64 targets."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _generator(seed: int, *salt: int) -> torch.Generator:
    gen = torch.Generator()
    # Mix the parts into one 63-bit seed; different (epoch, batch) pairs get unrelated streams.
    value = seed
    for s in salt:
        value = (value * 6364136223846793005 + s + 1442695040888963407) % (1 << 63)
    gen.manual_seed(value)
    return gen


class ImageLoader:
    """Batches of normalized float images with optional crop/flip augmentation."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size = split, batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.augment = shuffle, augment
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        n = len(self.split)
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else None
        for i in range(start, len(self)):
            idx = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            sel = order[idx] if order is not None else idx
            x, y = self.split.x[sel], self.split.y[sel]
            if self.augment:
                gen = _generator(self.seed, epoch, i + 1)
                if self.crop_padding:
                    x = random_crop(x, self.crop_padding, gen)
                if self.flip:
                    x = random_hflip(x, gen)
            yield normalize(x, self.mean, self.std), y

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


class TextLoader:
    """(B, T) windows of token ids and their next-token targets.

    Training batches start at random offsets; evaluation walks the split in non-overlapping windows.
    """

    def __init__(
        self, split: Split, batch_size: int, seq_len: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        if len(split.x) <= seq_len:
            raise ValueError(f"text of {len(split.x)} tokens is shorter than seq_len={seq_len}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        return max(1, (len(self.split.x) - 1) // (self.batch_size * self.seq_len))

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        ids, t = self.split.x, self.seq_len
        n_windows = (len(ids) - 1) // t
        for i in range(start, len(self)):
            if self.shuffle:
                gen = _generator(self.seed, epoch, i + 1)
                offs = torch.randint(0, len(ids) - t - 1, (self.batch_size,), generator=gen)
            else:
                first = i * self.batch_size
                offs = torch.arange(first, min(first + self.batch_size, n_windows)) * t
            rows = offs[:, None] + torch.arange(t + 1)  # (B, T+1)
            window = ids[rows]
            yield window[:, :-1], window[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


Loader = ImageLoader | TextLoader
