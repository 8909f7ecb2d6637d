"""Pruning tests run on one thread (the CI machine is small and shared) with tiny models and data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lowbit.data import Dataset, load_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")
