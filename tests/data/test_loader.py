from pathlib import Path

import pytest
import torch

from lowbit.data import ImageLoader, Split, TextLoader, load_dataset
from lowbit.data.transforms import random_crop, random_hflip


def test_random_crop_picks_a_window_of_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for b in range(2):
        windows = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_hflip_flips_about_half() -> None:
    x = torch.randint(0, 255, (400, 1, 4, 4), dtype=torch.uint8)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = sum(torch.equal(o, i.flip(-1)) and not torch.equal(o, i) for o, i in zip(out, x, strict=True))
    assert 150 < flipped < 250


def test_image_loader_is_deterministic_and_resumable() -> None:
    split = Split(torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    loader = ImageLoader(split, 8, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True, seed=3)
    full = list(loader.batches(epoch=2))
    assert len(full) == len(loader) == 7 and len(full[-1][1]) == 2
    tail = list(loader.batches(epoch=2, start=4))
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(loader.batches(epoch=3))
    assert not torch.equal(full[0][1], other[0][1])  # a new epoch, a new order
    assert sorted(torch.cat([y for _, y in full]).tolist()) == list(range(50))  # each sample once


def test_text_loader_targets_are_the_next_tokens() -> None:
    ids = torch.arange(1000) % 97
    loader = TextLoader(Split(ids, ids), batch_size=4, seq_len=16, shuffle=True, seed=0)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], (x[:, -1] + 1) % 97)
    with pytest.raises(ValueError, match="shorter than seq_len"):
        TextLoader(Split(ids[:10], ids[:10]), 4, 16)


def test_digits_is_a_small_ready_set() -> None:
    ds = load_dataset("digits")
    assert ds.train.x.shape == (1497, 1, 8, 8) and len(ds.test) == 300
    assert set(ds.test.y.tolist()) == set(range(10))


def test_tinyshakespeare_split(shared_data: Path) -> None:
    ds = load_dataset("tinyshakespeare", str(shared_data))
    n = len(ds.train.x) + len(ds.test.x)
    assert abs(len(ds.train.x) - 0.9 * n) <= 1 and ds.num_classes == len(ds.vocab) == 65
    assert "".join(ds.vocab[i] for i in ds.train.x[:9].tolist()) == "First Cit"


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="cifar10, digits, mnist, tinyshakespeare"):
        load_dataset("imagenet")
